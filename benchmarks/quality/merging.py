"""One interface over the four ways of merging a model's adapters that the quality benchmarks compare.

* ``ctm``: Compress-then-Merge with the engine (``ctm_kernels.prepare_layers``; the subspace
  is found once per rank, every rule then costs one re-merge), with the default ``beta = 0``
  (adapters' norms equalised for the subspace search); ``ctm_b1``: the same with ``beta = 1``
  (raw norms);
* ``mtc``: Merge-then-Compress (``ctm_kernels.reference.mtc``: full-parameter merge, then
  truncated SVD to the rank);
* ``core_mtc``: core-space Merge-then-Compress (``ctm_kernels.reference.core_mtc``);
* ``full``: full-parameter merging (``ctm_kernels.reference.full_merge``, no rank limit).

Every method returns, per layer, the dense merged update ``[m, n]`` at scale 1: the global
scale lambda multiplies the rule's result (DESIGN section 4) and commutes with the rank
truncation, so a lambda search multiplies this one update instead of merging again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import ctm_kernels
from ctm_kernels import reference

CTM_BETA = {"ctm": 0.0, "ctm_b1": 1.0}
METHODS = ("ctm", "ctm_b1", "mtc", "core_mtc", "full")
RANKED = ("ctm", "ctm_b1", "mtc", "core_mtc")


def update_spectrum(dW: torch.Tensor, energy: float = 0.9) -> tuple[int, float]:
    """One update ``dW [m, n]``: the directions (singular vectors) needed for ``energy`` of
    ``||dW||^2``, and the share of the first (the zoos' effective-rank statistic)."""
    s2 = torch.linalg.svdvals(dW.double()) ** 2
    share = s2.cumsum(0) / s2.sum()
    return int((share < energy).sum()) + 1, float(share[0])


@dataclass
class LayerFactors:
    """One layer's adapters: ``A[t] [r_t, n]``, ``B[t] [m, r_t]``, LoRA scaling ``scales[t]``."""

    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scales: list[float]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B[0].shape[0], self.A[0].shape[1]

    @property
    def total_rank(self) -> int:
        return sum(a.shape[0] for a in self.A)


def rule_validity(method: str, rule: str, layers: list[LayerFactors], rank: int) -> str | None:
    """Why ``rule`` cannot run for ``method`` at ``rank`` (None when it can).

    Iso-CTS keeps a common subspace of ``d - T`` directions of the summed update, ``d`` the
    smaller side of the space it merges in (``rank`` for CtM, the core for core-space MtC,
    ``min(m, n)`` for dense merges). It needs ``T < d``; in the dense space it also needs the
    sum to have ``d - T`` directions: a sum of LoRA updates has rank at most ``R = sum r_t``,
    and beyond that the rule would fill the common subspace with arbitrary null-space vectors.
    """
    if rule != "iso_cts":
        return None
    T = len(layers[0].A)
    for i, layer in enumerate(layers):
        d = rank if method in CTM_BETA else layer.total_rank if method == "core_mtc" else min(layer.shape)
        if T >= d:
            return f"iso_cts needs T < d (layer {i}: T={T}, d={d})"
        if method in ("mtc", "full") and d - T > layer.total_rank:
            return (f"iso_cts in the dense space needs a common subspace of d - T = {d - T} directions "
                    f"but the summed LoRA updates of layer {i} have rank <= {layer.total_rank}")
    return None


class Merger:
    """Merges one model's adapters (a list of layers) with any method, rule and rank."""

    def __init__(self, layers: list[LayerFactors], *, tol: float | None = None, max_iter: int = 1000):
        self.layers = layers
        self.tol, self.max_iter = tol, max_iter
        self.dense = [reference.dense_updates(l.A, l.B, l.scales) for l in layers]  # [T, m, n] fp64 each
        self._plans: dict[tuple[int, float], list] = {}

    def plans(self, rank: int, beta: float = 0.0) -> list:
        """The engine's CtM plans at ``rank`` (subspace search done once, then cached)."""
        if (rank, beta) not in self._plans:
            self._plans[rank, beta] = ctm_kernels.prepare_layers(
                [(l.A, l.B, l.scales) for l in self.layers], rank=rank, beta=beta, tol=self.tol,
                max_iter=self.max_iter)
        return self._plans[rank, beta]

    def merge(self, method: str, rule: str, rank: int | None, beta: float | None = None,
              **params) -> list[torch.Tensor]:
        """Per layer, the merged update ``[m, n]`` (float64, lambda = 1). ``beta`` overrides the
        CtM methods' own (``CTM_BETA``); each ``(rank, beta)`` subspace is solved once.

        DARE draws one mask per layer from ``seed + layer * stride`` in every method (the engine
        does this itself for a batch of layers; the dense baselines merge one layer at a time)."""
        if method not in METHODS:
            raise ValueError(f"merging.py: unknown method {method!r}; expected one of {METHODS}")
        if method in RANKED and rank is None:
            raise ValueError(f"merging.py: method {method!r} needs a rank")
        if method in CTM_BETA:
            plans = self.plans(rank, CTM_BETA[method] if beta is None else beta)
            return [p.merge(rule, scale=1.0, **params).delta.double() for p in plans]
        if beta is not None:
            raise ValueError(f"merging.py: beta applies to CtM only, not to {method!r}")
        out = []
        for i, (layer, dW) in enumerate(zip(self.layers, self.dense)):
            p = dict(params)
            if "seed" in p:
                p["seed"] = p["seed"] + i * ctm_kernels.rules.DARE_LAYER_STRIDE
            if method == "full":
                out.append(reference.full_merge(dW, rule, **p))
            elif method == "mtc":
                B, A = reference.mtc(dW, rank, rule, **p)
                out.append(B @ A)
            else:
                B, A = reference.core_mtc(layer.A, layer.B, rank, rule, scales=layer.scales, **p)
                out.append(B @ A)
        return out


def energy_kept(dW: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Share of each update's energy inside the subspaces: ``||U^T dW_t V||^2 / ||dW_t||^2``.

    ``dW [T, m, n]``, orthonormal ``U [m, r]``, ``V [n, r]`` -> ``[T]`` (0 for a zero update)."""
    kept = (U.mT @ dW @ V).square().sum((-2, -1))
    total = dW.square().sum((-2, -1))
    return torch.where(total > 0, kept / total.clamp(min=1e-300), torch.zeros_like(total))


def singular_subspaces(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right top-``rank`` singular subspaces of ``M [m, n]`` -> (``[m, rank]``, ``[n, rank]``)."""
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank], Vh[:rank].mT
