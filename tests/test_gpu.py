"""The compiled Triton kernels and the CUDA Jacobi on a CUDA device (skipped without one):
each against a float64 reference at sizes of real layers, into NaN-poisoned outputs,
and one whole merge on the GPU against the CPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from ctm_kernels import backend  # noqa: E402
from ctm_kernels.ops import gram, lift, project  # noqa: E402
from op_checks import assert_close, rel_err, rtol  # noqa: E402
from tolerances import MERGE_RTOL  # noqa: E402

NAN = float("nan")
DT_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def ref_gram(B, A, s):
    Bs = B.double() * s.double()[:, None, :]
    return Bs.mT @ Bs, A.double() @ A.double().mT


# (L, m, R, n): one tile, tiles + mirroring with partial blocks, split reduction (L = 1), R > 1000
GRAM_SHAPES = [(8, 1024, 128, 1536), (2, 2000, 200, 1000), (1, 4096, 64, 4096), (1, 1100, 1040, 900)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_IDS.get)
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=lambda s: "L{}-m{}-R{}-n{}".format(*s))
def test_gram_kernel_gpu(shape, dtype):
    from ctm_kernels.ops.triton_gram import gram_triton
    L, m, R, n = shape
    g = _gen(0)
    B = torch.randn((L, m, R), generator=g, device="cuda").to(dtype)
    A = torch.randn((L, R, n), generator=g, device="cuda").to(dtype)
    s = torch.rand((L, R), generator=g, device="cuda") + 0.5
    out = torch.full((2, L, R, R), NAN, device="cuda")
    G_B, G_A = gram_triton(B, A, s, torch.float32, out=out)
    rB, rA = ref_gram(B, A, s)
    assert_close(G_B, rB, torch.float32, what="G_B")
    assert_close(G_A, rA, torch.float32, what="G_A")
    assert torch.equal(G_B, G_B.mT)


def test_gram_tf32x3_accuracy():
    L, m, R, n = 4, 2048, 128, 2048
    g = _gen(1)
    B = torch.randn((L, m, R), generator=g, device="cuda")
    A = torch.randn((L, R, n), generator=g, device="cuda")
    s = torch.rand((L, R), generator=g, device="cuda") + 0.5
    G_B, G_A = gram.gram(B, A, s, backend="triton", precision="tf32x3")
    rB, rA = ref_gram(B, A, s)
    # three-pass TF32 is meant to be as accurate as fp32 products: held to the fp32 bound
    assert max(rel_err(G_B, rB), rel_err(G_A, rA)) <= rtol(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
@pytest.mark.parametrize("L,T,rb,r", [(16, 8, 16, 16), (4, 32, 16, 16), (2, 5, 7, 3), (1, 100, 16, 16)],
                         ids=["T8", "T32", "odd", "T100"])
def test_project_kernel_gpu(L, T, rb, r, dtype):
    from ctm_kernels.ops.project import project_torch
    from ctm_kernels.ops.triton_project import project_triton
    g = _gen(2)
    R = T * rb
    G_B, G_A, Phi, Psi = (torch.randn(s, generator=g, device="cuda", dtype=dtype)
                          for s in [(L, R, R), (L, R, R), (L, R, r), (L, R, r)])
    out = torch.full((L, T, r, r), NAN, device="cuda", dtype=dtype)
    C = project_triton(G_B, G_A, Phi, Psi, T, out=out)
    assert_close(C, project_torch(G_B.double(), G_A.double(), Phi.double(), Psi.double(), T), dtype, what="C")


@pytest.mark.parametrize("in_dtype,compute,out_dtype", [
    (torch.bfloat16, torch.float64, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float64, torch.float16), (torch.float32, torch.float64, torch.float32),
], ids=["bf16-f64-bf16", "bf16-f32-f32", "f16-f64-f16", "f32-f64-f32"])
@pytest.mark.parametrize("L,m,R,n,r", [(8, 1024, 128, 1536, 16), (1, 4096, 256, 4096, 1), (3, 1000, 70, 333, 33)],
                         ids=["L8", "L1-r1", "odd"])
def test_lift_kernel_gpu(L, m, R, n, r, in_dtype, compute, out_dtype):
    from ctm_kernels.ops.triton_lift import lift_triton
    g = _gen(3)
    B = torch.randn((L, m, R), generator=g, device="cuda").to(in_dtype)
    A = torch.randn((L, R, n), generator=g, device="cuda").to(in_dtype)
    s = torch.rand((L, R), generator=g, device="cuda") + 0.5
    left = torch.randn((L, R, r), generator=g, device="cuda", dtype=compute)
    right = torch.randn((L, r, R), generator=g, device="cuda", dtype=compute)
    out = (torch.full((L, m, r), NAN, device="cuda", dtype=out_dtype),
           torch.full((L, r, n), NAN, device="cuda", dtype=out_dtype))
    Bo, Ao = lift_triton(B, A, s, left, right, out_dtype, out=out)
    assert_close(Bo, (B.double() * s.double()[:, None, :]) @ left.double(), compute, out_dtype, what="B_out")
    assert_close(Ao, right.double() @ A.double(), compute, out_dtype, what="A_out")


@pytest.mark.skipif(not backend.compiled_op("jacobi_eigh", "cuda"), reason="ctm_kernels._C built without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
@pytest.mark.parametrize("batch,n", [(1, 1), (7, 5), (300, 16), (64, 33), (32, 100), (8, 160)],
                         ids=["n1", "odd", "many16", "n33", "n100-global", "n160-global"])
def test_jacobi_cuda_matches_eigh(batch, n, dtype):
    g = torch.Generator().manual_seed(n)
    X = torch.randn((batch, n, n), generator=g, dtype=torch.float64)
    M = ((X + X.mT) / 2)
    w, V = torch.ops.ctm_kernels.jacobi_eigh(M.to(dtype).cuda())
    w0, V0 = torch.linalg.eigh(M)
    tol = {torch.float32: 5e-6, torch.float64: 1e-13}[dtype]
    w, V = w.double().cpu(), V.double().cpu()
    scale = w0.abs().amax(-1, keepdim=True)
    assert ((w - w0).abs() / scale).max() <= tol
    # one-dimensional eigenspaces (random spectra): compare projectors, error ~ eps / gap
    gap = ((w0[:, 1:] - w0[:, :-1]).amin(-1) / scale[:, 0]).clamp(min=1e-12)
    P = V[..., :, None, :] * V[..., None, :, :]
    P0 = V0[..., :, None, :] * V0[..., None, :, :]
    assert ((P - P0).abs().amax((-3, -2, -1)) * gap).max() <= tol * 10


def test_merge_on_gpu_matches_cpu():
    import ctm_kernels
    g = torch.Generator().manual_seed(4)
    m, n, T, r = 512, 384, 6, 8
    A = [torch.randn((r, n), generator=g) for _ in range(T)]
    B = [torch.randn((m, r), generator=g) for _ in range(T)]
    kw = dict(rank=r, method="ties", max_iter=100)
    ref = ctm_kernels.merge_layer(A, B, **kw)
    out = ctm_kernels.merge_layer([a.cuda() for a in A], [b.cuda() for b in B], backend="triton", **kw)
    dW, dW0 = (out.B @ out.A).cpu().double(), (ref.B @ ref.A).double()
    # GPU: float32 Grams; the merge-level bound of the suite applies (Frobenius ratio)
    assert ((dW - dW0).norm() / dW0.norm()).item() <= MERGE_RTOL[torch.float32]
