"""Per-op timings with pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Each benchmark first checks its op against the float64 computation it names, then times it.
CPU sizes of one Llama-style q_proj layer group (m = n = 1024, T = 8, r = 16)."""
from __future__ import annotations

import pytest
import torch

import ctm_kernels as ck
from ctm_kernels.ops import gram, lift, project

L, M, N, T, RB, RANK = 4, 1024, 1024, 8, 16, 16
R = T * RB


@pytest.fixture(scope="module")
def factors():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(L, M, R, generator=g) / M ** 0.5
    A = torch.randn(L, R, N, generator=g) / N ** 0.5
    scale = torch.rand(L, R, generator=g) + 0.5
    Phi = torch.randn(L, R, RANK, generator=g, dtype=torch.float64)
    Psi = torch.randn(L, R, RANK, generator=g, dtype=torch.float64)
    return B, A, scale, Phi, Psi


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def test_gram(benchmark, factors):
    B, A, scale, _, _ = factors
    Bs = B.double() * scale.double()[:, None, :]
    G_B, G_A = gram.gram(B, A, scale, out_dtype=torch.float64)
    assert _rel(G_B, Bs.mT @ Bs) < 1e-12 and _rel(G_A, A.double() @ A.double().mT) < 1e-12
    benchmark(gram.gram, B, A, scale, out_dtype=torch.float64)


def test_project(benchmark, factors):
    B, A, scale, Phi, Psi = factors
    G_B, G_A = gram.gram(B, A, scale, out_dtype=torch.float64)
    C = project.project(G_B, G_A, Phi, Psi, T)
    t = 3
    want = (Phi[0].mT @ G_B[0][:, t * RB:(t + 1) * RB]) @ (G_A[0][t * RB:(t + 1) * RB] @ Psi[0])
    assert _rel(C[0, t], want) < 1e-12
    benchmark(project.project, G_B, G_A, Phi, Psi, T)


def test_lift(benchmark, factors):
    B, A, scale, Phi, Psi = factors
    Bo, Ao = lift.lift(B, A, scale, Phi, Psi.mT, torch.float64)
    assert _rel(Bo, (B.double() * scale.double()[:, None, :]) @ Phi) < 1e-12
    assert _rel(Ao, Psi.mT @ A.double()) < 1e-12
    benchmark(lift.lift, B, A, scale, Phi, Psi.mT, torch.float32)


def test_merge_layers_group(benchmark, factors):
    B, A, scale, _, _ = factors
    layers = [([A[l, t * RB:(t + 1) * RB] for t in range(T)], [B[l][:, t * RB:(t + 1) * RB] for t in range(T)])
              for l in range(L)]
    outs = ck.merge_layers(layers, rank=RANK, method="sum")
    assert all(o.B.shape == (M, RANK) and torch.isfinite(o.A).all() for o in outs)
    benchmark.pedantic(ck.merge_layers, args=(layers,), kwargs=dict(rank=RANK, method="ties"), rounds=3)
