"""Float64 dense reference of CtM (DESIGN section 2) and the baselines (section 5).

Everything here builds dense ``m x n`` updates: small sizes only. It is the answer key of the
tests and the slow side of the benchmarks, written for clarity, not speed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .options import check_stop
from .rules import apply_rule, tsv_merge

NULL_RTOL = 1e-12  # eigenvalues below NULL_RTOL * largest span no direction of the adapters


def dense_updates(A, B, scales=None, weights=None) -> torch.Tensor:
    """``dW_t = scales[t] * weights[t] * B_t @ A_t`` in float64 -> ``[T, m, n]``."""
    T = len(A)
    s = [1.0] * T if scales is None else list(scales)
    w = [1.0] * T if weights is None else list(weights)
    return torch.stack([float(s[t]) * float(w[t]) * (B[t].double() @ A[t].double()) for t in range(T)])


def subspace_weights(nu: torch.Tensor, beta: float) -> torch.Tensor:
    """``c_t = (beta*nu_t + (1-beta)*mean(nu)) / nu_t`` over the adapters with ``nu_t > 0``
    (their mean); ``c_t = 0`` for a zero adapter, which is left out of the subspace search."""
    live = nu > 0
    mean = nu[live].mean() if live.any() else nu.new_tensor(0.0)
    return torch.where(live, (beta * nu + (1 - beta) * mean) / torch.where(live, nu, 1.0), 0.0)


def sin_angle(U0: torch.Tensor, U1: torch.Tensor) -> torch.Tensor:
    """Sine of the largest principal angle, ``||U1 - U0 (U0^T U1)||_2`` (from the difference,
    not ``1 - cos``); works batched over leading dimensions."""
    return torch.linalg.matrix_norm(U1 - U0 @ (U0.mT @ U1), ord=2)


def top_eigvecs(M: torch.Tensor, r: int):
    """Top-``r`` eigenpairs of symmetric ``M`` (descending); columns whose eigenvalue is below
    ``NULL_RTOL`` times the largest are zeroed: they span no direction of the data."""
    w, Q = torch.linalg.eigh(M)
    w, Q = w.flip(-1)[..., :r], Q.flip(-1)[..., :r]
    live = w > NULL_RTOL * w[..., :1].clamp(min=0)
    return w, Q * live[..., None, :]


@dataclass
class Tucker2:
    U: torch.Tensor       # [m, r]
    V: torch.Tensor       # [n, r]
    iterations: int
    converged: bool
    last_step: float = float("nan")   # sine of the last step
    stopped_by: str = "max_iter"      # "energy", "flat", "subspace" or "max_iter"
    objective: float = float("nan")   # sum_t ||U^T X_t V||^2


# The stop tests of HOOI (DESIGN section 2, docs/DESIGN.md section 8), shared with the engine:
# "energy" (the default) ends when the objective has less than tol (relative) left to gain,
# "subspace" when a step moves U and V by a sine of at most tol (the exact fixed point).
DEFAULT_TOL = {"energy": 1e-6, "subspace": 1e-4}
ENERGY_WINDOW = 3        # gains the energy test looks back on (two ratios)
ENERGY_ROUNDING = 1e-13  # relative gains below this, twice in a row, are float64 rounding
REVERSAL_FACTOR = 10.0   # a damped swing of ratio up to 0.9 moves at most 10x its largest change
# The energy test's "flat" end: a layer whose objective gain and total-energy change have both
# stayed at most FLAT_SHARE * tol (relative) for FLAT_SWEEPS sweeps in a row, while the window
# cannot tell what is left (the changes do not shrink), stops with stopped_by="flat". Such an
# objective rises by at most tol / 2 a sweep: a saddle plateau (gaussian 2048^2, T = 128:
# 1.2e-7 a sweep for 250 sweeps, then an escape worth 8e-5) or a crawl with a contraction near
# 1. Chosen on the 3000 agreement sets (docs/DESIGN.md section 8): 10 sweeps at tol ended 64
# sets flat and 5.3e-3 short at worst; 20 at tol / 2 end 20, at worst 8.8e-4 short.
FLAT_SWEEPS = 20
FLAT_SHARE = 0.5


def energy_left(changes: torch.Tensor) -> torch.Tensor:
    """The energy test's estimate of how much a quantity will still change, from its last
    changes ``[..., ENERGY_WINDOW]`` (signed, newest last, NaN while unknown) -> ``[...]``.

    A linearly converging sequence whose changes shrink by ``q`` per sweep still moves by
    ``d q / (1 - q)`` after a change ``d``; ``q`` is the largest ratio of successive changes in
    the window (the cautious one). Infinite while the window is not full or the changes do not
    shrink; zero once the last two changes are at float64 rounding (``ENERGY_ROUNDING``).

    Changes of both signs in the window (above rounding) mean two modes of opposite sign are
    passing each other, and a small newest change says nothing about what is left: an
    adapter's energy kept fell by 1.1e-5, rose by 1.1e-6, then rose by 3.5e-6, and the
    linear estimate at the small change stopped 1.3e-5 short of the converged value
    (22 x 96, T=2). Such a window estimates ``REVERSAL_FACTOR`` times its largest change."""
    d = changes.abs()
    q = (d[..., 1:] / d[..., :-1].clamp(min=1e-300)).amax(-1)
    last = d[..., -1]
    left = torch.where(q < 1, torch.maximum(last, last * q / (1 - q).clamp(min=1e-300)), math.inf)
    signs = torch.where(d > ENERGY_ROUNDING, torch.sign(changes), 0.0)
    reversal = (signs.amax(-1) > 0) & (signs.amin(-1) < 0)
    left = torch.where(reversal, REVERSAL_FACTOR * d.amax(-1), left)
    left = torch.where(torch.isnan(d).any(-1), math.inf, left)
    rounding = ~torch.isnan(d[..., -2:]).any(-1) & (d[..., -2:] <= ENERGY_ROUNDING).all(-1)
    return torch.where(rounding, 0.0, left)


def energy_kept(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``||U^T X_t V||^2 / ||X_t||^2`` per slice of ``X [T, m, n]`` (0 for a zero slice); the same
    for ``X_t = c_t dW_t`` as for ``dW_t``."""
    nu2 = X.square().sum((-2, -1))
    kept = (U.mT @ X @ V).square().sum((-2, -1))
    return torch.where(nu2 > 0, kept / nu2.clamp(min=1e-300), 0.0)


def tucker2(X: torch.Tensor, rank: int, tol: float | None = None, max_iter: int = 1000, *,
            stop: str = "energy", norms: torch.Tensor | None = None) -> Tucker2:
    """Shared subspace of ``X [T, m, n]``: HOSVD init, then plain HOOI until the stop test
    passes or ``max_iter`` sweeps. ``stop="subspace"``: the sine of the largest principal angle
    between successive iterates is <= ``tol`` (default 1e-4) for U and V. ``stop="energy"``:
    by :func:`energy_left`, the objective ``sum_t ||U^T X_t V||^2`` has less than ``tol``
    (relative) left to gain and the total energy kept, ``sum_t kept_t nu_t^2 / sum_t nu_t^2``
    with ``kept_t`` from :func:`energy_kept` and ``nu = norms`` (``||dW_t||`` of the unweighted
    updates; by default the norms of ``X``'s slices), will move by less than ``tol`` (relative;
    default 1e-6); it also ends a flat layer (``FLAT_SWEEPS``, ``stopped_by="flat"``)."""
    check_stop(stop)
    tol = DEFAULT_TOL[stop] if tol is None else tol
    U = top_eigvecs(torch.einsum("tmn,tkn->mk", X, X), rank)[1]
    V = top_eigvecs(torch.einsum("tmn,tmk->nk", X, X), rank)[1]
    f_prev, kept_prev = None, None
    gains = torch.full((ENERGY_WINDOW,), math.nan, dtype=X.dtype)   # relative objective gains
    moves = gains.clone()                                            # signed changes of the total energy kept
    nu2 = (X.square().sum((-2, -1)) if norms is None else norms.to(X.dtype).square())
    total = lambda kept: float((kept * nu2).sum() / nu2.sum().clamp(min=1e-300))   # noqa: E731
    it, step, f, flat_run = 0, float("nan"), float("nan"), 0
    for it in range(1, max_iter + 1):
        XV = X @ V                                              # [T, m, r]
        U1 = top_eigvecs(torch.einsum("tmr,tkr->mk", XV, XV), rank)[1]
        XU = X.mT @ U1                                          # [T, n, r]
        w, V1 = top_eigvecs(torch.einsum("tnr,tkr->nk", XU, XU), rank)
        step = max(sin_angle(U, U1).item(), sin_angle(V, V1).item())
        f = float(w.clamp(min=0).sum())                         # = sum_t ||U1^T X_t V1||^2
        U, V = U1, V1
        if stop == "subspace" and step <= tol:
            return Tucker2(U, V, it, True, step, "subspace", f)
        if stop == "energy":
            kept = total(energy_kept(X, U, V))
            if f_prev is not None:
                gains = torch.cat([gains[1:], gains.new_tensor([max(f - f_prev, 0.0) / max(abs(f), 1e-300)])])
                moves = torch.cat([moves[1:], moves.new_tensor([(kept - kept_prev) / max(kept, 1e-300)])])
            f_prev, kept_prev = f, kept
            if float(torch.maximum(energy_left(gains), energy_left(moves))) <= tol:
                return Tucker2(U, V, it, True, step, "energy", f)
            small = FLAT_SHARE * tol
            flat_run = flat_run + 1 if float(gains[-1]) <= small and abs(float(moves[-1])) <= small else 0
            if flat_run >= FLAT_SWEEPS:
                return Tucker2(U, V, it, True, step, "flat", f)
    return Tucker2(U, V, it, False, step, "max_iter", f)


def balanced_factors(U, Cm, V, scale=1.0):
    """``dW = scale * U Cm V^T`` as a balanced LoRA: ``Cm = X S Y^T``,
    ``B = sign(scale) sqrt|scale| U X S^1/2``, ``A = sqrt|scale| S^1/2 Y^T V^T``; then each
    column of B has its largest-|entry| made positive (the matching row of A flips with it)."""
    X, S, Yh = torch.linalg.svd(Cm, full_matrices=False)
    root = S.sqrt()
    g = abs(scale) ** 0.5
    B = (scale >= 0 and 1.0 or -1.0) * g * (U @ X) * root
    A = g * root[:, None] * (Yh @ V.mT)
    return canonical_signs(B, A)


def canonical_signs(B, A):
    """Flip column j of ``B [..., m, r]`` and row j of ``A [..., r, n]`` so that B's
    largest-|entry| in that column is positive (the product ``B @ A`` is unchanged)."""
    idx = B.abs().argmax(-2, keepdim=True)
    sign = torch.sign(torch.gather(B, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return B * sign, A * sign.mT


@dataclass
class ReferenceResult:
    dW: torch.Tensor      # [m, n] merged update
    B: torch.Tensor       # [m, r]
    A: torch.Tensor       # [r, n]
    U: torch.Tensor
    V: torch.Tensor
    C: torch.Tensor       # [T, r, r] coordinates of the unscaled updates
    iterations: int
    converged: bool
    stopped_by: str = "max_iter"


def ctm(dWs: torch.Tensor, rank: int, method: str = "ties", *, beta: float = 0.0, scale: float = 1.0,
        stop: str = "energy", tol: float | None = None, max_iter: int = 1000, **rule_params) -> ReferenceResult:
    """Compress-then-Merge of dense updates ``dWs [T, m, n]`` (DESIGN section 2), in float64."""
    dWs = dWs.double()
    nu = torch.linalg.matrix_norm(dWs)
    c = subspace_weights(nu, beta)
    tk = tucker2(c[:, None, None] * dWs, rank, tol, max_iter, stop=stop, norms=nu)
    C = tk.U.mT @ dWs @ tk.V                                    # [T, r, r]
    Cm = apply_rule(method, C[None], **rule_params)[0]
    B, A = balanced_factors(tk.U, Cm, tk.V, scale)
    return ReferenceResult(B @ A, B, A, tk.U, tk.V, C, tk.iterations, tk.converged, tk.stopped_by)


# Baselines whose spectrum step follows the CtM paper's code rather than the plain rule:
#   tsv    the dense TSV keeps the SVD routine's null-space vectors in its concatenations
#          (``rules.tsv_merge(keep_null=True)``); on LoRA updates, whose rank is below
#          k = floor(min(m, n) / T), they change the polar factors (on the digits zoo the
#          merged updates differ from the variant below by a relative 0.79 on fc2, 0.72 on fc3);
#   iso_c  MtC and core-space MtC sum, truncate to the rank, then flatten those singular values
#          (``truncate_isotropic``); flattening first would pick the rank's directions among
#          many of equal singular value, i.e. arbitrarily (rank 8 on the digits zoo: the two
#          orders differ by a relative 1.0).
# ``tsv_nonnull`` keeps the rule's own TSV in the dense space (null-space components dropped):
# its answer does not depend on the SVD routine's choice of null-space basis.
BASELINE_ONLY = ("tsv_nonnull",)


def full_merge(dWs: torch.Tensor, method: str = "ties", *, scale: float = 1.0, **rule_params) -> torch.Tensor:
    """Full-parameter merging: the rule entry-wise on the dense updates ``[T, m, n]`` -> ``[m, n]``
    (no rank limit: the quality ceiling and the slow baseline). ``tsv`` keeps null-space vectors
    as the CtM paper's code does; ``tsv_nonnull`` is the rule's own TSV (see above)."""
    if method == "tsv":
        return scale * tsv_merge(dWs[None], keep_null=True)[0]
    if method == "tsv_nonnull":
        return scale * apply_rule("tsv", dWs[None])[0]
    return scale * apply_rule(method, dWs[None], **rule_params)[0]


def truncate(M: torch.Tensor, rank: int):
    """Best rank-``rank`` approximation of ``M [m, n]`` by a full SVD -> (B ``[m, r]``, A ``[r, n]``)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    return canonical_signs(U[:, :rank] * root, root[:, None] * Vh[:rank])


def truncate_isotropic(M: torch.Tensor, rank: int):
    """Iso-C after truncation: the top-``rank`` singular pairs of ``M [m, n]``, their nonzero
    singular values all set to the mean of those -> (B ``[m, r]``, A ``[r, n]``)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    S = S[:rank]
    live = S > S[:1] * max(M.shape) * torch.finfo(S.dtype).eps
    root = torch.where(live, S[live].mean() if live.any() else 0.0, 0.0).sqrt()
    return canonical_signs(U[:, :rank] * root, root[:, None] * Vh[:rank])


def _merge_and_truncate(dWs, rank, method, scale, rule_params):
    if method == "iso_c":
        return truncate_isotropic(full_merge(dWs, "sum", scale=scale), rank)
    return truncate(full_merge(dWs, method, scale=scale, **rule_params), rank)


def mtc(dWs: torch.Tensor, rank: int, method: str = "ties", *, scale: float = 1.0, **rule_params):
    """Merge-then-Compress (PEFT ``*_svd``, kohya ``svd_merge_lora``): full-parameter merge,
    then truncated SVD to ``rank`` -> (B ``[m, r]``, A ``[r, n]``). ``iso_c``: sum, truncate,
    then flatten the kept singular values (DESIGN section 5)."""
    return _merge_and_truncate(dWs, rank, method, scale, rule_params)


def core_bases(A, B, scales=None, weights=None):
    """Reference bases of the core space: left singular vectors of the stacked scaled B's and
    right singular vectors of the stacked A's (nonzero ones only), sorted by singular value,
    with canonical signs -> (Ub ``[m, kb]``, Va ``[n, ka]``)."""
    T = len(A)
    s = [1.0] * T if scales is None else list(scales)
    w = [1.0] * T if weights is None else list(weights)
    Bh = torch.cat([float(s[t]) * float(w[t]) * B[t].double() for t in range(T)], 1)
    Ah = torch.cat([a.double() for a in A], 0)
    out = []
    for M in (Bh, Ah.mT):
        Q, S, _ = torch.linalg.svd(M, full_matrices=False)
        Q = Q[:, S > S[:1] * max(M.shape) * torch.finfo(S.dtype).eps]
        out.append(canonical_signs(Q, Q.mT)[0])
    return out


def core_mtc(A, B, rank: int, method: str = "ties", *, scales=None, weights=None, scale: float = 1.0,
             **rule_params):
    """Core-space Merge-then-Compress: project every adapter onto the core space of the stacked
    factors (``M_t = Ub^T dW_t Va``, at most ``R x R``), merge there with the rule, truncate the
    merged core to ``rank`` and lift -> (B ``[m, r]``, A ``[r, n]``). ``iso_c`` and ``tsv`` as
    in :func:`mtc` (the paper's code merges its core space the same way)."""
    T = len(A)
    s = [1.0] * T if scales is None else list(scales)
    w = [1.0] * T if weights is None else list(weights)
    Ub, Va = core_bases(A, B, scales, weights)
    # the dense [T, kb, ka] core tensor, built from the factors (never from m x n updates)
    core = torch.stack([float(s[t]) * float(w[t]) * (Ub.mT @ B[t].double()) @ (A[t].double() @ Va)
                        for t in range(T)])
    Bc, Ac = _merge_and_truncate(core, rank, method, scale, rule_params)
    return canonical_signs(Ub @ Bc, Ac @ Va.mT)
