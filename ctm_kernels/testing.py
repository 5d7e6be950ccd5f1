"""Random adapter sets for property tests and the agreement benchmark of the subspace solve.

One seeded case per index: the same index gives the same set on every machine. The cases
cover what the accelerated solve must get right (docs/DESIGN.md section 8): layers from
16 to 256 on a side, one to sixteen adapters of mixed ranks, many adapters on a small side
(``R >= m`` and ``R`` close to ``m``), adapters with nothing in common (gaussian) or sharing
a few directions (structured), every subspace weighting ``beta`` in {0, 0.25, 0.5, 0.75, 1},
float64 factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def total_energy_kept(energy_kept, norms) -> float:
    """The share of all adapters' energy ``sum_t ||dW_t||^2`` that a solve keeps, from its
    per-adapter ``energy_kept`` and ``norms`` (as in ``LayerInfo``)."""
    nu2 = torch.tensor(norms, dtype=torch.float64) ** 2
    return float((torch.tensor(energy_kept, dtype=torch.float64) * nu2).sum() / nu2.sum().clamp(min=1e-300))


@dataclass
class HooiCase:
    """One random layer: ``A [r_t, n]``, ``B [m, r_t]`` per adapter, ``scales`` and settings."""
    index: int
    kind: str                  # "gaussian" or "structured"
    m: int
    n: int
    ranks: list[int]
    rank: int                  # the merged rank
    beta: float
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scales: list[float]

    @property
    def label(self) -> str:
        return (f"case{self.index}-{self.kind}-{self.m}x{self.n}-T{len(self.ranks)}-R{sum(self.ranks)}"
                f"-r{self.rank}-beta{self.beta:g}")


def hooi_case(index: int, *, max_side: int = 256) -> HooiCase:
    """Random case number ``index`` (sides 16..``max_side``)."""
    g = torch.Generator().manual_seed(1_000_003 * index + 17)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    T = pick(1, 16)
    ranks = [pick(1, 16) for _ in range(T)]
    R = sum(ranks)
    log_side = lambda: int(round(math.exp(math.log(16) + float(torch.rand(1, generator=g)) *
                                          (math.log(max_side) - math.log(16)))))
    m, n = log_side(), log_side()
    shape = index % 4
    if shape == 1:                          # many adapters on a small side: R >= m
        m = max(16, min(max_side, R - pick(0, max(0, R - 16))))
    elif shape == 2:                        # R close to m, on either side of it
        m = max(16, min(max_side, R + pick(-3, 3)))
    kind = "structured" if index % 2 else "gaussian"
    beta = BETAS[pick(0, len(BETAS) - 1)]
    rank = pick(1, min(16, m, n))
    A, B = [], []
    if kind == "structured":
        shared = pick(1, 4)
        Us = torch.randn(m, shared, generator=g, dtype=torch.float64) / m ** 0.5
        Vs = torch.randn(shared, n, generator=g, dtype=torch.float64)
    for r in ranks:
        a = torch.randn(r, n, generator=g, dtype=torch.float64)
        b = torch.randn(m, r, generator=g, dtype=torch.float64) / m ** 0.5
        if kind == "structured":
            k = min(shared, r)
            b[:, :k] = 3.0 * Us[:, :k] @ torch.randn(k, k, generator=g, dtype=torch.float64) + 0.3 * b[:, :k]
            a[:k] = 3.0 * Vs[:k] + 0.3 * a[:k]
        A.append(a)
        B.append(b)
    # adapters of different strengths, as trained ones are (log-normal, a factor ~5 either way)
    scales = torch.exp(0.8 * torch.randn(T, generator=g, dtype=torch.float64)).tolist()
    return HooiCase(index, kind, m, n, ranks, rank, beta, A, B, scales)
