"""Synthetic adapter sets for the tests: gaussian and structured (shared + task-specific)."""
from __future__ import annotations

import torch


def gaussian(m, n, ranks, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype) for r in ranks]
    B = [torch.randn(m, r, generator=g, dtype=torch.float64).div(m ** 0.5).to(dtype) for r in ranks]
    return A, B


def structured(m, n, ranks, *, shared=3, dtype=torch.float64, seed=0, strength=3.0):
    """A few directions shared by all adapters (with task-specific mixing) plus each task's own."""
    g = torch.Generator().manual_seed(seed)
    Us = torch.randn(m, shared, generator=g, dtype=torch.float64) / m ** 0.5
    Vs = torch.randn(shared, n, generator=g, dtype=torch.float64)
    A, B = [], []
    for r in ranks:
        a = torch.randn(r, n, generator=g, dtype=torch.float64)
        b = torch.randn(m, r, generator=g, dtype=torch.float64) / m ** 0.5
        k = min(shared, r)
        mix = torch.randn(k, k, generator=g, dtype=torch.float64)
        b[:, :k] = strength * Us[:, :k] @ mix + 0.3 * b[:, :k]
        a[:k] = strength * Vs[:k] + 0.3 * a[:k]
        A.append(a.to(dtype))
        B.append(b.to(dtype))
    return A, B


def relerr(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-300)).item()
