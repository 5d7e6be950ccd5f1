"""The Triton kernels on the CPU through the interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported), at small sizes: each kernel against a float64
reference on odd shapes, into NaN-poisoned outputs so that an unwritten element fails.
On CUDA machines the same kernels are compiled and checked by test_gpu.py instead."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="TRITON_INTERPRET=1 was not set before triton was imported (CUDA machine?)"),
]

from ctm_kernels.ops import gram, lift, project  # noqa: E402
from op_checks import assert_close  # noqa: E402

NAN = float("nan")
DT_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ref_gram(B, A, s):
    Bs = B.double() * (s.double()[:, None, :] if s is not None else 1.0)
    return Bs.mT @ Bs, A.double() @ A.double().mT


# (L, m, R, n, block, split): one tile (R <= 128), several tiles with mirroring (block 16,
# R = 37: 3 x 3 blocks, last one partial), split reductions, L = 1, R = 1, m = 1
GRAM_CASES = [
    (2, 37, 24, 45, None, 1),
    (1, 19, 37, 23, 16, 1),
    (3, 50, 37, 29, 16, 3),
    (1, 1, 1, 1, None, 1),
    (2, 70, 5, 3, None, 2),
    (1, 9, 130, 11, None, 1),
]
GRAM_IDS = ["one-tile", "tiles-mirrored", "tiles-split3", "all-ones", "split2-R5", "R130-default-blocks"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=DT_IDS.get)
@pytest.mark.parametrize("L,m,R,n,block,split", GRAM_CASES, ids=GRAM_IDS)
def test_gram_kernel(L, m, R, n, block, split, dtype):
    from ctm_kernels.ops.triton_gram import gram_triton
    g = _gen(0)
    B = torch.randn((L, m, R), generator=g).to(dtype)
    A = torch.randn((L, R, n), generator=g).to(dtype)
    s = torch.rand((L, R), generator=g) + 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.full((2, L, R, R), NAN, dtype=acc)
    G_B, G_A = gram_triton(B, A, s, acc, split=split, block=block, block_k=16, out=out)
    rB, rA = ref_gram(B, A, s)
    assert_close(G_B, rB, acc, what="G_B")
    assert_close(G_A, rA, acc, what="G_A")
    assert torch.equal(G_B, G_B.mT) and torch.equal(G_A, G_A.mT), "mirrored tiles must be exact transposes"


def test_gram_kernel_float64_accumulation_of_bf16_inputs_and_no_scale():
    g = _gen(1)
    B = torch.randn((2, 33, 20), generator=g).to(torch.bfloat16)
    A = torch.randn((2, 20, 17), generator=g).to(torch.bfloat16)
    G_B, G_A = gram.gram(B, A, None, out_dtype=torch.float64, backend="triton")
    rB, rA = ref_gram(B, A, None)
    assert G_B.dtype == torch.float64
    assert_close(G_B, rB, torch.float64, what="G_B")
    assert_close(G_A, rA, torch.float64, what="G_A")


def test_gram_kernel_strided_inputs():
    # factors that are views (transposed storage) must be read through their strides
    g = _gen(2)
    B = torch.randn((2, 20, 30), generator=g).mT          # [2, 30, 20] non-contiguous
    A = torch.randn((2, 25, 20), generator=g).mT          # [2, 20, 25] non-contiguous
    s = torch.rand((2, 40), generator=g)[:, ::2]          # [2, 20] stride 2
    G_B, G_A = gram.gram(B, A, s, backend="triton")
    rB, rA = ref_gram(B, A, s)
    assert_close(G_B, rB, torch.float32, what="G_B")
    assert_close(G_A, rA, torch.float32, what="G_A")


PROJECT_CASES = [(1, 1, 1, 1), (2, 3, 5, 1), (1, 4, 7, 3), (3, 5, 4, 17), (2, 2, 20, 16)]
PROJECT_IDS = ["all-ones", "r1", "L1-odd", "r-gt-rb", "rb20-r16"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
@pytest.mark.parametrize("L,T,rb,r", PROJECT_CASES, ids=PROJECT_IDS)
def test_project_kernel(L, T, rb, r, dtype):
    from ctm_kernels.ops.project import project_torch
    from ctm_kernels.ops.triton_project import project_triton
    g = _gen(3)
    R = T * rb
    G_B, G_A, Phi, Psi = (torch.randn(s, generator=g, dtype=dtype) for s in [(L, R, R), (L, R, R), (L, R, r), (L, R, r)])
    out = torch.full((L, T, r, r), NAN, dtype=dtype)
    C = project_triton(G_B, G_A, Phi, Psi, T, block_k=16, out=out)
    ref = project_torch(G_B.double(), G_A.double(), Phi.double(), Psi.double(), T)
    assert_close(C, ref, dtype, what="C")


# (L, m, R, n, r): partial row/column tiles, r = 1, L = 1, R > m
LIFT_CASES = [(2, 37, 24, 45, 1), (1, 70, 40, 33, 16), (3, 17, 30, 19, 5), (1, 3, 8, 2, 2)]
LIFT_IDS = ["r1", "L1-r16", "odd", "tiny"]


@pytest.mark.parametrize("in_dtype,compute,out_dtype", [
    (torch.bfloat16, torch.float64, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float64, torch.float16),
    (torch.float32, torch.float64, torch.float32),
    (torch.float64, torch.float64, torch.float64),
], ids=["bf16-f64-bf16", "bf16-f32-f32", "f16-f64-f16", "f32-f64-f32", "f64"])
@pytest.mark.parametrize("L,m,R,n,r", LIFT_CASES, ids=LIFT_IDS)
def test_lift_kernel(L, m, R, n, r, in_dtype, compute, out_dtype):
    from ctm_kernels.ops.triton_lift import lift_triton
    g = _gen(4)
    B = torch.randn((L, m, R), generator=g).to(in_dtype)
    A = torch.randn((L, R, n), generator=g).to(in_dtype)
    s = torch.rand((L, R), generator=g) + 0.5
    left = torch.randn((L, R, r), generator=g, dtype=compute)
    right = torch.randn((L, r, R), generator=g, dtype=compute)
    out = (torch.full((L, m, r), NAN, dtype=out_dtype), torch.full((L, r, n), NAN, dtype=out_dtype))
    Bo, Ao = lift_triton(B, A, s, left, right, out_dtype, block_m=16, block_k=16, out=out)
    assert Bo.dtype == out_dtype and Ao.dtype == out_dtype
    assert_close(Bo, (B.double() * s.double()[:, None, :]) @ left.double(), compute, out_dtype, what="B_out")
    assert_close(Ao, right.double() @ A.double(), compute, out_dtype, what="A_out")


def test_ops_dispatch_to_triton_through_the_env(monkeypatch):
    monkeypatch.setenv("CTM_KERNELS_BACKEND", "triton")
    g = _gen(5)
    B = torch.randn((1, 12, 6), generator=g)
    A = torch.randn((1, 6, 10), generator=g)
    G_B, G_A = gram.gram(B, A, None)
    assert_close(G_B, ref_gram(B, A, None)[0], torch.float32, what="G_B")
    Phi = torch.randn((1, 6, 2), generator=g, dtype=torch.float64)
    C = project.project(G_B.double(), G_A.double(), Phi, Phi, 3)
    assert C.shape == (1, 3, 2, 2)
    Bo, Ao = lift.lift(B, A, None, Phi, Phi.mT, torch.float32)
    assert_close(Bo, B.double() @ Phi, torch.float32, what="B_out")


def test_engine_merge_through_the_triton_kernels(monkeypatch):
    """A whole CtM merge with every op on the Triton path equals the torch path."""
    import ctm_kernels
    g = _gen(6)
    m, n, T = 24, 20, 3
    A = [torch.randn((r, n), generator=g) for r in (4, 3, 4)]
    B = [torch.randn((m, r), generator=g) for r in (4, 3, 4)]
    kw = dict(rank=4, method="ties", scales=[1.0, 0.5, 2.0], max_iter=50)
    monkeypatch.setenv("CTM_KERNELS_BACKEND", "torch")
    ref = ctm_kernels.merge_layer(A, B, **kw)
    monkeypatch.setenv("CTM_KERNELS_BACKEND", "triton")
    out = ctm_kernels.merge_layer(A, B, **kw)
    assert_close(out.B @ out.A, ref.B @ ref.A, torch.float32, what="merged update")
