"""Merge rules: one registry, one place for their semantics.

Every rule maps a stack of per-adapter matrices ``C [L, T, p, q]`` to one merged matrix
``[L, p, q]`` per layer. CtM applies them to the ``r x r`` coordinates ``C_t = U^T dW_t V``;
the baselines apply the very same code entry-wise to dense ``m x n`` updates. User weights
``w_t`` are already folded into ``C_t``; the global scale lambda is applied after the rule.

Rules are registered with declared parameters (name, default, check, meaning; declared with
the other merge settings in :mod:`ctm_kernels.options`), like the ``merge_methods`` of
mergekit; :func:`resolve_params` validates a request against them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .options import NORMALIZE as _NORMALIZE, P as _P, SEED as _SEED, TOP_K as _TOP_K, RuleParameter as Param

DARE_LAYER_STRIDE = 1_000_003  # layer l of a merge draws its DARE mask from seed + l * stride


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable
    params: tuple[Param, ...] = field(default_factory=tuple)
    needs_rotation_convention: bool = False

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


RULES: dict[str, Rule] = {}


def register(name: str, *params: Param, needs_rotation_convention: bool = False):
    def deco(fn):
        RULES[name] = Rule(name, fn, tuple(params), needs_rotation_convention)
        return fn
    return deco


def resolve_params(method: str, given: dict) -> dict:
    """Validated parameters of ``method``: defaults filled in, unknown names and bad values raise."""
    if method not in RULES:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(sorted(RULES))}")
    rule = RULES[method]
    known = {p.name: p for p in rule.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise ValueError(f"method {method!r} takes no parameter {unknown[0]!r} (its parameters: {allowed})")
    out = {}
    for p in rule.params:
        value = given.get(p.name, p.default)
        if value is None:
            value = p.default
        try:
            ok = p.check(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"method {method!r}: {p.name}={value!r} is invalid ({p.meaning})")
        out[p.name] = value
    return out


def apply_rule(method: str, C: torch.Tensor, *, layer_ids=None, **params) -> torch.Tensor:
    """Merge ``C [L, T, p, q]`` -> ``[L, p, q]`` with rule ``method``.

    ``layer_ids`` (``[L]`` ints, default ``0..L-1``) tell seeded rules which layer each slice
    is, so that a layer gets the same random mask whether merged alone or in a batch.
    """
    params = resolve_params(method, params)
    if C.dim() != 4:
        raise ValueError(f"rules take C of shape [L, T, p, q], got {tuple(C.shape)}")
    if layer_ids is None:
        layer_ids = list(range(C.shape[0]))
    fn = RULES[method].fn
    if method in ("dare", "dare_ties"):
        return fn(C, layer_ids=layer_ids, **params)
    return fn(C, **params)


# ---------------------------------------------------------------------------------------------
# rules


@register("sum")
def rule_sum(C):
    """Task arithmetic: ``sum_t C_t``."""
    return C.sum(1)


@register("mean")
def rule_mean(C):
    """Plain average: ``sum_t C_t / T`` (T counts every adapter given, zero ones included)."""
    return C.mean(1)


def ties_keep_count(top_k: float, d: int) -> int:
    """Entries TIES keeps per task out of ``d``: ``max(1, round(top_k * d))`` (Python's
    ``round``, halves to even). The CtM paper's code keeps ``int(d * top_k) + 1`` (``top_k < 1``):
    one entry more than this rule wherever ``top_k * d`` rounds down, the same elsewhere."""
    return max(1, round(top_k * d))


def _trim(C, top_k):
    """Keep, per task, its ``k = ties_keep_count(top_k, d)`` entries of largest |value|.

    Ties at the threshold are kept (so a task may keep more than k entries)."""
    L, T, p, q = C.shape
    d = p * q
    k = ties_keep_count(top_k, d)
    mag = C.abs().reshape(L, T, d)
    if k >= d:
        return C
    # the k-th largest |value| is the (d-k+1)-th smallest
    thresh = mag.kthvalue(d - k + 1, dim=-1, keepdim=True).values
    return C * (mag >= thresh).reshape(L, T, p, q)


def _elect_disjoint_mean(kept, normalize: bool = True):
    """Sign election and disjoint mean over ``kept [L, T, p, q]`` (trimmed entries are 0).

    Elected sign per entry = sign of the sum of the kept values; where that sum is exactly
    zero, the sign of the sum of all elected signs of the layer. Result = mean of the kept
    values that carry the elected sign (0 where none does); with ``normalize=False`` their sum."""
    total = kept.sum(1)                                     # [L, p, q]
    elected = torch.sign(total)
    fallback = torch.sign(elected.sum((-2, -1), keepdim=True)).expand_as(elected)
    elected = torch.where(elected == 0, fallback, elected)
    agree = (torch.sign(kept) == elected[:, None]) & (kept != 0)
    count = agree.sum(1)
    picked = (kept * agree).sum(1)
    if not normalize:
        return picked
    return torch.where(count > 0, picked / count.clamp(min=1), torch.zeros_like(picked))


@register("ties", _TOP_K, needs_rotation_convention=True)
def rule_ties(C, top_k):
    """TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

    Per task keep its ``k = max(1, round(top_k * d))`` entries of largest |value| (``d = p*q``
    entries per task; ties at the threshold kept), zero the rest. Elected sign of an entry =
    sign of the sum of the kept values (a zero sum takes the sign of the sum of all elected
    signs of the layer). Result = mean over the tasks whose kept entry has the elected sign
    (0 where none). Weights enter through ``C_t`` (already scaled), so the election is
    weighted by them; the divisor counts agreeing tasks, unweighted. PEFT divides by the sum
    of the agreeing weights instead and mergekit elects the sign by weighted mass or count
    depending on its options: with unit weights all three agree."""
    return _elect_disjoint_mean(_trim(C, top_k))


def _dare_masks(C, p, seed, layer_ids):
    """Keep masks ``[L, T, p, q]`` drawn on the CPU from ``seed + layer_id * stride``: the same
    bits on every device and whatever the batch a layer is merged in."""
    L, T, P, Q = C.shape
    masks = []
    for lid in layer_ids:
        g = torch.Generator(device="cpu").manual_seed(int(seed) + int(lid) * DARE_LAYER_STRIDE)
        masks.append(torch.rand((T, P, Q), generator=g, dtype=torch.float64) >= p)
    return torch.stack(masks).to(C.device)


def _dare(C, p, seed, layer_ids):
    if p == 0:
        return C
    return C * _dare_masks(C, p, seed, layer_ids) / (1.0 - p)


@register("dare", _P, _SEED, needs_rotation_convention=True)
def rule_dare(C, p, seed, layer_ids):
    """DARE (Yu et al., 2024): drop each entry with probability ``p`` (a seeded CPU generator,
    so the result is reproducible on every device), rescale survivors by ``1/(1-p)``, sum."""
    return _dare(C, p, seed, layer_ids).sum(1)


@register("dare_ties", _P, _SEED, _TOP_K, _NORMALIZE, needs_rotation_convention=True)
def rule_dare_ties(C, p, seed, top_k, normalize, layer_ids):
    """DARE then TIES: drop and rescale as ``dare`` (no sum), then trim / elect / disjoint mean
    as ``ties`` on the rescaled entries (``top_k=1``: no trim; ``normalize=False``: the sum of
    the agreeing entries instead of their mean).

    mergekit's ``dare_ties`` with ``density`` d is ``p = 1 - d, top_k = 1, normalize = False``:
    random drop keeping a share d, survivors rescaled, sign elected by the summed values, the
    agreeing values summed (mergekit's ``normalize`` defaults to false for this method); a
    config file in mergekit's vocabulary is read that way (:mod:`ctm_kernels.pipeline.config`)."""
    kept = _trim(_dare(C, p, seed, layer_ids), top_k)
    return _elect_disjoint_mean(kept) if normalize else _elect_disjoint_mean(kept, normalize=False)


def _polar(X):
    """Nearest matrix with orthonormal columns (the polar factor) of ``X [..., p, k]``."""
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def tsv_keep_count(d: int, T: int) -> int:
    """Components TSV keeps per task: ``max(1, floor(d / T))`` (``d = min(p, q)``, r on CtM
    coordinates)."""
    return max(1, d // T)


@register("tsv")
def rule_tsv(C):
    """Task Singular Vectors merge (TSV-M, Gargiulo et al., 2025).

    Per task: SVD ``C_t = U_t S_t V_t^T``, keep the top ``k = max(1, floor(min(p, q) / T))``
    components. Concatenate the kept left vectors ``[U_1k .. U_Tk]`` and right vectors,
    replace each concatenation by its polar factor (nearest orthonormal), recombine with the
    kept singular values: ``P_U diag(S) P_V^T``. On CtM coordinates ``min(p, q) = r``.
    Kept components with a zero singular value are dropped before the polar factor."""
    return tsv_merge(C, keep_null=False)


def tsv_merge(C, *, keep_null: bool):
    """TSV of ``C [L, T, p, q]`` -> ``[L, p, q]`` (see :func:`rule_tsv`).

    ``keep_null=False`` (the rule): a kept component whose singular value is zero carries
    arbitrary singular vectors, so it is dropped before the polar factor and a rank-deficient
    task gives one well-defined result. ``keep_null=True`` is how the CtM paper's code merges
    dense updates: with ``k = floor(min(m, n) / T)`` above a LoRA update's rank, the SVD
    routine's null-space vectors enter the concatenations and bend the polar factors of the
    live ones (the result then depends on which null-space basis the SVD routine returns)."""
    L, T, p, q = C.shape
    k = tsv_keep_count(min(p, q), T)
    U, S, Vh = torch.linalg.svd(C, full_matrices=False)
    Uc = U[..., :k].permute(0, 2, 1, 3).reshape(L, p, T * k)           # [L, p, T k]
    Vc = Vh[..., :k, :].mT.permute(0, 2, 1, 3).reshape(L, q, T * k)     # [L, q, T k]
    Sc = S[..., :k].reshape(L, T * k)
    if not keep_null:
        live = _nonzero_sv(S, (p, q))[..., :k].reshape(L, 1, T * k)
        Uc, Vc = Uc * live, Vc * live
    return (_polar(Uc) * Sc[:, None, :]) @ _polar(Vc).mT


def _nonzero_sv(S, shape):
    tol = S[..., :1] * max(shape) * torch.finfo(S.dtype).eps
    return S > tol


@register("iso_c")
def rule_iso_c(C):
    """Iso-C (Marczak et al., 2025): SVD of the sum, every nonzero singular value replaced by
    their mean (an isotropic spectrum on the sum's own subspace). A zero sum gives zero."""
    M = C.sum(1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    nz = _nonzero_sv(S, M.shape[-2:])
    mean = (S * nz).sum(-1, keepdim=True) / nz.sum(-1, keepdim=True).clamp(min=1)
    return (U * (mean * nz)[:, None, :]) @ Vh


@register("iso_cts")
def rule_iso_cts(C):
    """Iso-CTS (Marczak et al., 2025), with one task-specific direction per task.

    ``d = min(p, q)`` (``r`` on CtM coordinates) must exceed ``T``. Common subspace: the top
    ``d - T`` singular pairs of the sum ``M``. For each task, its residual outside the common
    left subspace, ``(I - U_c U_c^T) C_t``, contributes its top singular pair. The left vectors
    (common + task) and the right vectors are each replaced by their polar factor
    (orthonormalised), and the merged matrix is ``s * P_U P_V^T`` with ``s`` the mean of the
    kept singular values (the common ones of ``M`` and the task ones of the residuals). A task
    whose residual is zero (a zero adapter, or one inside the common subspace) adds nothing."""
    L, T, p, q = C.shape
    d = min(p, q)
    if T >= d:
        raise ValueError(f"iso_cts needs fewer adapters than the rank: T={T}, rank={d}")
    kc = d - T
    M = C.sum(1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    Uc, Sc, Vc = U[..., :kc], S[..., :kc], Vh[..., :kc, :].mT
    resid = C - Uc[:, None] @ (Uc.mT[:, None] @ C)
    Ut, St, Vht = torch.linalg.svd(resid, full_matrices=False)
    # a task whose residual is zero contributes no direction (its vectors would be arbitrary):
    # its column is zero before the polar factor and dropped after it
    live = (St[..., 0] > S[:, :1] * max(p, q) * torch.finfo(S.dtype).eps).to(C.dtype)   # [L, T]
    keep = torch.cat([_nonzero_sv(S, (p, q))[..., :kc].to(C.dtype), live], -1)   # [L, d]
    Ucat = torch.cat([Uc, Ut[..., 0].mT], -1) * keep[:, None, :]       # [L, p, d]
    Vcat = torch.cat([Vc, Vht[..., 0, :].mT], -1) * keep[:, None, :]   # [L, q, d]
    s = (Sc.sum(-1) + (St[..., 0] * live).sum(-1)) / keep.sum(-1).clamp(min=1)
    return s[:, None, None] * ((_polar(Ucat) * keep[:, None, :]) @ _polar(Vcat).mT)


def share_after_rule(C: torch.Tensor, merged: torch.Tensor, norms: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per adapter, the share of its update that survives in the merged update.

    ``share_t = <dW_t, dW> / ||dW_t||_F^2`` with ``dW = scale * U merged V^T`` the merged
    update: the component of ``dW`` along ``dW_t`` as a fraction of ``dW_t`` (1 when the merge
    reproduces the adapter's direction at full strength, 0 when orthogonal to it, negative when
    opposed). Computed exactly in coordinates, ``<C_t, scale * merged> / nu_t^2``, because
    ``U`` and ``V`` are orthonormal; ``nu_t = ||dW_t||_F`` counts the part of ``dW_t`` outside
    the subspace too. ``C [L, T, p, q]``, ``merged [L, p, q]``, ``norms [L, T]`` -> ``[L, T]``
    (0 for a zero adapter)."""
    inner = scale * (C * merged[:, None]).sum((-2, -1))
    nu2 = norms.to(inner.dtype) ** 2
    return torch.where(nu2 > 0, inner / torch.where(nu2 > 0, nu2, 1.0), torch.zeros_like(inner))


def describe() -> str:
    """One paragraph per rule: name, parameters with defaults, semantics."""
    out = []
    for name, rule in RULES.items():
        ps = ", ".join(f"{p.name}={p.default!r}" for p in rule.params) or "no parameters"
        out.append(f"{name} ({ps})\n    {rule.doc.splitlines()[0] if rule.doc else ''}")
    return "\n".join(out)


__all__ = ["RULES", "Rule", "Param", "apply_rule", "resolve_params", "register", "describe",
           "DARE_LAYER_STRIDE", "ties_keep_count", "tsv_keep_count", "tsv_merge", "share_after_rule"]
