"""The CtM fast path: everything from two Gram matrices, batched over same-shape layers.

For one group of ``L`` layers with the same ``(m, n, T, rb)`` the adapters' factors are
stacked (each adapter's rank padded with zeros to ``rb = max r_t``, ``R = T * rb``)::

    Bh [L, m, R] = [s_1 B_1, ..., s_T B_T]      Ah [L, R, n] = [A_1; ...; A_T]

and the only passes over the factors are ``ops.gram`` (``G_B = Bh^T Bh``, ``G_A = Ah Ah^T``)
and ``ops.lift`` (the output factors). In between, everything is small (``R x R`` and less)
and runs in float64:

* whitening: any square root ``Rb`` of ``G_B`` (``Rb^T Rb = G_B``, ``R x R``: the Cholesky
  factor, or ``diag(sqrt(lam)) Q^T`` from ``G_B = Q diag(lam) Q^T`` for rank-deficient Grams),
  so that ``Bh = Ob Rb`` with ``Ob`` orthonormal; likewise ``Ra`` for ``Ah^T``. Then
  ``dW_t = Ob (Rb_t Ra_t^T) Oa^T`` and the Tucker-2 problem of DESIGN section 2 becomes the
  same problem on the small cores ``Rb_t Ra_t^T``, with orthonormal ``U' = Ob^T U``.
* HOSVD init and HOOI half-steps: ``Z = [Rb_t (c_t Ra_t^T V')]_t`` (``R x T r``), ``U'`` =
  top-r eigenvectors of ``Z Z^T``. The principal-angle stopping test is the dense one
  (``Ob`` is orthonormal). By default each side carries a block of ``b = r + p`` orthonormal
  columns and a half-step is ONE warm-started Chebyshev-filtered step on it with a ``b x b``
  Rayleigh-Ritz problem (``ops.topr.block_step``): no ``k x k`` eigensolve per half-step.
* Anderson acceleration (on by default) extrapolates the sweep map ``V' -> V'_next`` from
  its last few iterates (aligned to one frame by orthogonal Procrustes). It changes the path,
  never the fixed point: it stops on the plain HOOI step taken from the current point, with
  the same ``tol``. ``accelerate=False`` follows the reference iteration step for step.
* coordinates ``C_t = Phi^T G_B[:, t] G_A[t, :] Psi`` (``ops.project``), with
  ``Phi = Rb^-1 U'`` so that ``U = Bh Phi``.
* rule, then ``C = X S Y^T`` and the lift ``B = Bh (Phi X S^1/2)``,
  ``A = (S^1/2 Y^T Psi^T) Ah``.

No dense ``m x n`` update and no ``R x R x T`` tensor is ever built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import backend
from .ops import eig as eig_op
from .ops import gram as gram_op
from .ops import lift as lift_op
from .ops import project as project_op
from .ops import topr as topr_op
from .options import check_max_iter, check_stop, check_tol
from .reference import (DEFAULT_TOL, ENERGY_WINDOW, FLAT_SHARE, FLAT_SWEEPS, NULL_RTOL, canonical_signs,
                        energy_left, sin_angle, subspace_weights)
from .reference import balanced_factors as ref_balanced_factors
from .reference import dense_updates as ref_dense_updates
from .reference import tucker2 as ref_tucker2
from .rules import apply_rule, resolve_params, share_after_rule

SOLVE_DTYPE = torch.float64
# Gram eigenvalues below this share of the largest are dropped when whitening: they are
# rounding noise of the Gram (fp64 Grams on CPU keep every real direction down to 1e-6 of
# the largest singular value; fp32 Grams on GPU cannot resolve below ~1e-3 of it).
WHITEN_RTOL = {torch.float64: 1e-13, torch.float32: 1e-7}
POLAR_EIGH_RCOND = 1e-6   # M^T M this near singular (cond(M) > 1e3) takes the SVD polar factor


@dataclass(frozen=True)
class SolverSettings:
    """The subspace solver's tuning, declared once. Frozen: a caller (a test, a benchmark)
    passes its own instance down (``solve_subspace(..., settings=)``, ``PreparedGroup(...,
    solver=)``, ``merge_layer(..., solver=)``); nothing patches module globals.

    Anderson acceleration (measured as sweeps to tol=1e-4, plain HOOI / these settings, on
    gaussian 256^2, 2048^2, 1024^2 and structured 1024^2, 512^2, 2048^2 sets, T=8, r=16:
    137/22, 269/33, 349/38, 64/15, 52/16, 546/31; depth 4 or 6, or restarting on any growth
    of the step, lost 2-8x of that on the gaussian sets):

    * ``anderson_depth``: iterates kept.
    * ``restart_growth``: a plain step this many times the last one restarts the accelerator.
    * ``stall_sweeps``: extrapolating sweeps in which the lowest step has not halved before a
      layer falls back to plain HOOI for good. Plain HOOI converges from anywhere (gaussian at
      256^2 with R > m: T=64 oscillated for 3000 sweeps without this guard; T=256 crept on for
      452-922 sweeps while a guard waited for "no new low", 264 with this one).
    * ``monotone_slack``: relative rounding allowed when an extrapolation is compared with a
      plain image.
    * ``gate_window``, ``gate_drift``: extrapolation only where plain HOOI already converges
      steadily: the last ``gate_window`` ratios of successive plain steps below 1 and within
      ``gate_drift * (1 - ratio)`` of each other. On the way past a saddle the ratio drifts up
      by 5-10% of (1 - ratio) per sweep (gaussian 256^2, T = 64: 0.73 -> 0.99 over 15 sweeps,
      then the steps grow), and an extrapolation there ended at another fixed point
      (objective 33.602 against plain HOOI's 33.579).
    * ``trust``: an extrapolation may move at most this many times the plain iteration's
      predicted remaining distance, ``step * rate / (1 - rate)``, beyond the plain image.

    The block half-step (``ops.topr.block_step``): ``inner_damping`` and ``max_degree`` of its
    Chebyshev filter (measurements beside ``ops.topr.INNER_DAMPING``); ``filter_budget``:
    on the CPU, a layer whose filter would cost more than an exact dense solve takes the exact
    one (False: always filter, the GPU's policy). ``unformed_min_k``: a side whose whitened
    size ``k`` is at least this, with ``R <= T r``, runs its block half-steps on the images kept
    as their factors (``ops.topr.BlockImages``), never forming ``Z [k, T r]``. One thread,
    float64, one product pair (``Z^T Q``, ``Z W``, 32 columns) / forming ``Z``: k = 128 (T = 8)
    0.08 / 0.05 ms formed, 0.12 ms unformed; k = 512 (T = 32) 1.09 / 2.5 ms, 1.27 ms unformed;
    k = 2048 (T = 128) 22 / 59 ms, 24 ms unformed; with ``R = 2 T r`` (rank-32 adapters merged
    to 16) an unformed pair cost 2.5-4 times a formed one.

    Plain HOOI's exact half-steps (``accelerate=False``): top-r eigensolves of ``M = Z Z^T``,
    dense (``Z Z^T`` and a full eigh) or the factored block Krylov of ``ops.topr``, chosen per
    solve by its cost model (``exact_route="auto"``; ``"dense"`` / ``"factored"`` force one,
    the latter up to ``forced_steps``). The factored solve goes down to a dense solve's
    accuracy, not to a share of the HOOI step: an earlier Krylov route that stopped at 1e-3 of
    the step took 304 sweeps where the dense one took 19 (docs/DESIGN.md section 8).

    * ``warm_steps`` / ``cold_steps``: factored steps a solve is expected to need from the
      previous iterate / from seeded random vectors (the HOSVD start): from the previous HOOI
      iterate 1-3 on gaussian sets, 5-13 on structured ones (benchmarks/bench_many.py,
      2048^2, T = 128: 67 steps for 7 float64 solves, mean 9.6; gap lambda_16 / lambda_17 =
      1.004-1.007), 14 from random vectors (benchmarks/bench_topr.py). A solve goes factored
      when the cost model affords at least these many steps, and turns dense as soon as its
      residuals' rate predicts more further steps than a dense solve costs (or after three
      times that many). With 3 here, structured 2048^2 at T = 512 paid 3 steps before
      turning dense in 7 of 9 half-steps.
    * ``hint_solves``: a side's own step count replaces ``warm_steps`` after this many
      factored half-steps in a row (a single quick solve sent later ones factored, which then
      needed 5-13 steps and turned dense after 3: about 1.4 s lost at 2048^2, T = 512).
    * ``factored_guard``: extra columns of the factored solver's block.

    ``flat_sweeps``, ``flat_share``: the energy test's flat end (``reference.FLAT_SWEEPS``,
    ``FLAT_SHARE``)."""
    anderson_depth: int = 10
    restart_growth: float = 2.0
    stall_sweeps: int = 30
    monotone_slack: float = 1e-12
    gate_window: int = 3
    gate_drift: float = 0.02
    trust: float = 2.0
    inner_damping: float = topr_op.INNER_DAMPING
    max_degree: int = topr_op.MAX_DEGREE
    filter_budget: bool = True
    unformed_min_k: int = 256
    exact_route: str = "auto"
    warm_steps: int = 10
    cold_steps: int = 16
    hint_solves: int = 2
    forced_steps: int = 500
    factored_guard: int = topr_op.GUARD
    flat_sweeps: int = FLAT_SWEEPS
    flat_share: float = FLAT_SHARE

    def __post_init__(self):
        counts = ("anderson_depth", "stall_sweeps", "gate_window", "max_degree", "warm_steps", "cold_steps",
                  "hint_solves", "forced_steps", "flat_sweeps", "unformed_min_k")
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SolverSettings.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.factored_guard, bool) or not isinstance(self.factored_guard, int) or self.factored_guard < 0:
            raise ValueError(f"SolverSettings.factored_guard must be an int >= 0, got {self.factored_guard!r}")
        for name in ("restart_growth", "trust"):
            if not getattr(self, name) > 1:
                raise ValueError(f"SolverSettings.{name} must be > 1, got {getattr(self, name)!r}")
        for name in ("monotone_slack", "gate_drift"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"SolverSettings.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 < self.flat_share <= 1:
            raise ValueError(f"SolverSettings.flat_share must be in (0, 1], got {self.flat_share!r}")
        if not 0 < self.inner_damping < 1:
            raise ValueError(f"SolverSettings.inner_damping must be in (0, 1), got {self.inner_damping!r}")
        if self.exact_route not in ("auto", "dense", "factored"):
            raise ValueError(f"SolverSettings.exact_route must be 'auto', 'dense' or 'factored', "
                             f"got {self.exact_route!r}")
        if not isinstance(self.filter_budget, bool):
            raise ValueError(f"SolverSettings.filter_budget must be a bool, got {self.filter_budget!r}")


DEFAULT_SOLVER = SolverSettings()


@dataclass
class LayerInfo:
    """What the subspace search did for one layer."""
    iterations: int
    converged: bool
    last_step: float                       # sine of the last plain HOOI step
    energy_kept: list[float]               # per adapter: ||U^T dW_t V||^2 / ||dW_t||^2
    norms: list[float]                     # per adapter: ||dW_t||_F
    seconds: float = 0.0
    stopped_by: str = ""                   # the test that ended the solve: "energy", "flat", "subspace" or "max_iter"
    objective: float = math.nan            # sum_t c_t^2 ||U^T dW_t V||^2 (what HOOI maximises)


@dataclass
class MergedLayer:
    """One merged LoRA: ``B [m, rank] @ A [rank, n]`` is the merged update."""
    A: torch.Tensor
    B: torch.Tensor
    info: LayerInfo
    method: str = ""
    params: dict = field(default_factory=dict)
    # per adapter: <dW_t, B A> / ||dW_t||^2, the share of its update the merged one keeps
    # (after the rule and the scale; ``info.energy_kept`` is the share inside the subspace)
    share_after_rule: list[float] = field(default_factory=list)

    @property
    def delta(self) -> torch.Tensor:
        """The dense merged update ``[m, n]`` (builds it: for checks on small layers)."""
        return self.B @ self.A


# ------------------------------------------------------------------------------------------
# input checks


def _where(layer) -> str:
    return "" if layer is None else f"layer {layer}: "


def _as_list(x, T, what, where):
    if x is None:
        return [1.0] * T
    vals = [float(v) for v in (x.tolist() if torch.is_tensor(x) else x)]
    if len(vals) != T:
        raise ValueError(f"{where}{what} has {len(vals)} entries for {T} adapters")
    for t, v in enumerate(vals):
        if not math.isfinite(v):
            raise ValueError(f"{where}adapter {t}: {what[:-1]} is {v}")
    return vals


def check_layer(A, B, scales=None, weights=None, *, rank=None, layer=None):
    """Validate one layer's factors; returns ``(m, n, [r_t], scales, weights)`` or raises
    ``ValueError`` naming the adapter and what is wrong."""
    where = _where(layer)
    if not isinstance(A, (list, tuple)) or not isinstance(B, (list, tuple)):
        raise ValueError(f"{where}A and B must be lists of tensors (one per adapter)")
    if len(A) != len(B):
        raise ValueError(f"{where}{len(A)} lora_A factors but {len(B)} lora_B factors")
    if len(A) == 0:
        raise ValueError(f"{where}no adapters to merge")
    T = len(A)
    m = n = None
    ranks = []
    for t, (a, b) in enumerate(zip(A, B)):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            raise ValueError(f"{where}adapter {t}: factors must be torch tensors")
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{where}adapter {t}: lora_A must be [r, n] and lora_B [m, r], "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{where}adapter {t}: factors must be floating point, got {a.dtype}/{b.dtype}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}adapter {t}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
        if m is None:
            m, n = b.shape[0], a.shape[1]
        elif b.shape[0] != m or a.shape[1] != n:
            raise ValueError(f"{where}adapter {t}: update is {b.shape[0]}x{a.shape[1]} but adapter 0's is {m}x{n}")
        if a.shape[0] < 1:
            raise ValueError(f"{where}adapter {t}: rank 0 factors")
        for name, x in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{where}adapter {t}: {name} contains NaN or Inf")
        ranks.append(a.shape[0])
    s = _as_list(scales, T, "scales", where)
    w = _as_list(weights, T, "weights", where)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{where}rank must be a positive integer, got {rank!r}")
        if rank > min(m, n):
            raise ValueError(f"{where}rank {rank} exceeds min(m, n) = {min(m, n)} of the {m}x{n} layer")
    return m, n, ranks, s, w


def check_solver(stop, tol, max_iter, beta, solver=None):
    check_stop(stop)
    check_tol(tol)
    check_max_iter(max_iter)
    if not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if solver is not None and not isinstance(solver, SolverSettings):
        raise ValueError(f"solver must be a SolverSettings (or None), got {type(solver).__name__}")


# ------------------------------------------------------------------------------------------
# the small problem (float64, batched over layers)


@dataclass
class _Side:
    """One side (B or A) of a group in whitened form: ``F = O Rf`` with ``O`` orthonormal
    (never formed), ``F`` the scaled ``Bh`` ``[L, d, R]`` or ``Ah^T``.

    ``Rf [L, k, R]`` (``Rf^T Rf = F^T F``, dropped directions as zero rows), ``W [L, R, k]``
    (:class:`_RootInverse` or :class:`_PseudoInverse`, never formed: only ``W @ U`` is used) with ``F W = O`` on the
    kept directions, ``blocks [L, T, rb, rb]`` the diagonal blocks of ``F^T F`` and
    ``G [L, R, R]`` the whole Gram where it was built."""
    Rf: torch.Tensor
    W: _RootInverse | _PseudoInverse
    blocks: torch.Tensor
    G: torch.Tensor | None


def _diag_blocks(G, T):
    L, R, _ = G.shape
    rb = R // T
    idx = torch.arange(T, device=G.device)
    return G.reshape(L, T, rb, T, rb)[:, idx, :, idx].permute(1, 0, 2, 3)   # [L, T, rb, rb]


# A Cholesky pivot is the squared distance of a column of F to the span of the columns before
# it, and never below the Gram's smallest eigenvalue. A layer whose pivots all exceed this
# share of the largest diagonal entry (1e3 above the float64 WHITEN_RTOL) is whitened by the
# Cholesky factor; one with a smaller pivot (duplicates, rank-deficient sets) by the
# eigendecomposition, which drops the directions below WHITEN_RTOL. Measured at R = 2048:
# Cholesky 0.13 s, eigh 2.2 s (float64, one thread).
CHOL_MIN_PIVOT = 1e-10


def _gram_root(G, rtol):
    """A square root of the Gram ``G [L, R, R]``: ``Rf [L, R, R]`` with ``Rf^T Rf = G`` (up to
    the directions below ``rtol``, dropped as zero rows) and ``W [L, R, R]`` with ``Rf W`` the
    identity on the kept directions. Cholesky (``Rf`` upper triangular, ``W = Rf^-1``) where
    every pivot passes ``CHOL_MIN_PIVOT``, else ``G = Q diag(lam) Q^T``, ``Rf = diag(sqrt lam)
    Q^T``. Exactly zero columns of ``F`` (rank padding, zero adapters) get zero rows of ``Rf``
    and zero columns of ``W`` on either route."""
    L, R, _ = G.shape
    diag = G.diagonal(dim1=-2, dim2=-1)
    zero = diag <= 0
    # a zero column is its own block of G: a unit diagonal there leaves the others' factor as it is
    Lc, info = torch.linalg.cholesky_ex(G + torch.diag_embed(zero.to(G.dtype)))
    pivots = Lc.diagonal(dim1=-2, dim2=-1) ** 2
    ok = (info == 0) & ((pivots > CHOL_MIN_PIVOT * diag.amax(-1, keepdim=True)) | zero).all(-1)
    live = (~zero).to(G.dtype)
    Rf = Lc.mT * live[:, :, None]
    W = _RootInverse(Lc.mT, live)
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(1)
        lam, Q = eig_op.eigh_batched(G[bad])
        keep = lam > rtol * lam[:, -1:].clamp(min=0)
        root = torch.where(keep, lam.clamp(min=0).sqrt(), 0.0)
        inv = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
        Rf[bad] = (Q * root[:, None, :]).mT
        W.by_eigh(bad, Q * inv[:, None, :])
    return Rf, W


class _RootInverse:
    """``W [L, R, R]`` of :func:`_gram_root`, applied without forming it (only ``W @ U`` is
    used, for ``r`` columns): a triangular solve with the Cholesky factor, ``O(R^2 r)``, where
    ``Rf^-1`` itself cost ``R^3`` FLOPs (0.33 s at R = 2048, float64, one thread: 9% of a
    Llama-3-8B q_proj merge of 128 adapters); the eigendecomposition route's layers keep their
    ``W = Q diag(1 / sqrt lam)`` (zero columns for dropped directions)."""

    def __init__(self, upper, live):
        self.upper, self.live = upper, live            # [L, R, R] upper triangular, [L, R]
        self.bad, self.W_bad = None, None

    @property
    def all_cholesky(self) -> bool:
        """Whether every layer took the Cholesky route (``Rf^T Rf`` is then the Gram itself)."""
        return self.bad is None

    def by_eigh(self, bad, W_bad):
        """Layers ``bad`` take the eigendecomposition route's ``W_bad [len(bad), R, R]``."""
        self.bad, self.W_bad = bad, W_bad

    def __matmul__(self, U):
        # a zero column of F (its unit pivot) maps to nothing: mask the rows of U it would read
        out = torch.linalg.solve_triangular(self.upper, U * self.live[:, :, None], upper=True)
        if self.bad is not None:
            out[self.bad] = self.W_bad @ U[self.bad]
        return out

    def t_matmul(self, U):
        """``W^T U``."""
        out = torch.linalg.solve_triangular(self.upper.mT, U, upper=False) * self.live[:, :, None]
        if self.bad is not None:
            out[self.bad] = self.W_bad.mT @ U[self.bad]
        return out


def _whiten_inner(G, T, rtol):
    """From the ``R x R`` Gram ``G = F^T F``: ``Rf`` any square root of it (:func:`_gram_root`)."""
    Rf, W = _gram_root(G, rtol)
    return _Side(Rf, W, _diag_blocks(G, T), G)


class _PseudoInverse:
    """``W = F^T (F F^T)^+`` ``[L, R, d]`` kept as factors, ``(F F^T)^+ = Wd Wd^T``: ``F W`` is the
    identity on ``F``'s range, and ``W @ U`` costs ``O(d (d + R) r)`` instead of building
    ``[R, d]`` (``2 d^2 R`` FLOPs and 128 MiB at d = 2048, R = 8192)."""

    def __init__(self, F, Wd):
        self.F, self.Wd = F, Wd

    def __matmul__(self, U):
        return self.F.mT @ (self.Wd @ self.Wd.t_matmul(U))


def _whiten_outer(F, T, rtol):
    """When ``R > d``: ``F [L, d, R]`` is already a square root of ``F^T F`` (``O`` the identity
    of ``R^d``), so ``Rf = F`` and the whitened coordinates are the layer's own; only ``W``
    needs the ``d x d`` outer Gram. Memory ``O(d R)``, no ``R x R`` matrix."""
    L, d, R = F.shape
    Wd = _gram_root(gram_op.gram_rows(F), rtol)[1]
    rb = R // T
    Fb = F.reshape(L, d, T, rb).permute(0, 2, 1, 3)                       # [L, T, d, rb]
    return _Side(F, _PseudoInverse(F, Wd), Fb.mT @ Fb, None)


def _goes_factored(k, p, r, dtype, settings, expected):
    """Whether a top-``r`` solve of ``Z [k, p]`` takes the factored route (``settings.exact_route``;
    ``"auto"``: where the cost model affords the ``expected`` steps), and that budget: the
    factored steps one dense solve costs."""
    step = topr_op.factored_step_seconds(k, p, min(k, r + settings.factored_guard), topr_op.DEPTH, dtype)
    budget = int(topr_op.dense_seconds(k, p, dtype) / step)
    route = settings.exact_route
    return route == "factored" or (route == "auto" and budget >= expected), budget


def _top_r(Z, r, settings, X0=None, expected=None):
    """Top-``r`` eigenpairs of ``Z Z^T`` for ``Z [L, k, p]`` -> (``[L, r]`` descending,
    ``[L, k, r]`` with null columns zeroed, the factored steps the solve took: an int, None
    where it was (or ended) dense); ``X0 [L, k, r]``: a warm start for the factored route
    (seeded random without); ``expected``: the steps the caller expects it to need (default
    ``settings.warm_steps`` / ``cold_steps``). Both routes solve to rounding; the route is
    ``settings.exact_route`` (:class:`SolverSettings`)."""
    L, k, p = Z.shape
    if expected is None:
        expected = settings.warm_steps if X0 is not None else settings.cold_steps
    steps = None
    factored, budget = _goes_factored(k, p, r, Z.dtype, settings, expected)
    if factored:
        forced = settings.exact_route == "factored"
        w, U, taken, iterative = topr_op.top_r_factored(Z, r, X0, guard=settings.factored_guard,
                                                        max_steps=settings.forced_steps if forced else 3 * budget,
                                                        dense_steps=None if forced else budget)
        steps = int(taken.max()) if bool(iterative.all()) else None
    else:
        w, U = topr_op.top_r_dense(Z, r)
    return w, _zero_null(w, U), steps


def _zero_null(w, U):
    """``U [L, k, r]`` with the columns of eigen- or Ritz values ``w [L, r]`` (descending) below
    ``NULL_RTOL`` of the largest set to zero: they span no direction of the adapters."""
    return U * (w > NULL_RTOL * w[:, :1].clamp(min=0))[:, None, :]


def half_step_images(Rx, Ry, V, T):
    """``Z = [Rx_t (Ry_t^T V)]_t`` ``[L, k, T r]`` as :class:`ops.topr.BlockImages` (``.dense()``
    forms it), so that ``Z Z^T`` is the matrix whose top eigenvectors a HOOI half-step takes
    (``Rx [L, k, R]``, ``Ry [L, k', R]`` in blocks of ``rb`` columns per adapter, c_t folded into
    Ry, ``V [L, k', r]``)."""
    L, _, R = Ry.shape
    return topr_op.BlockImages(Rx, topr_op.t_mul(Ry, V).reshape(L, T, R // T, -1))


def adapter_energies(Rx, Ry, V, U, T):
    """``[L, T]``: ``||(Rx_t^T U)^T (Ry_t^T V)||_F^2`` per adapter block ``t`` of ``Rx [L, k, R]``
    and ``Ry [L, k', R]`` (``rb = R / T`` columns each), for ``U [L, k, r]``, ``V [L, k', r]``:
    with the whitened factors, the energy ``||U^T dW_t V||^2`` each adapter keeps."""
    L, _, R = Ry.shape
    P = topr_op.t_mul(Rx, U).reshape(L, T, R // T, -1)         # [L, T, rb, r]
    Q = topr_op.t_mul(Ry, V).reshape(L, T, R // T, -1)
    return (P.mT @ Q).square().sum((-2, -1))


def half_step_objective(Rx, Ry, V, U, T):
    """``||U^T Z||_F^2`` ``[L]`` for ``Z`` of :func:`half_step_images`, without forming ``Z``:
    the sum of :func:`adapter_energies`. Forming ``Z [L, k, T r]`` in float64 for this was the
    peak of a float32 sweep (gaussian 2048^2, T = 512: peak RSS 1.52 GiB, 1.27 GiB without)."""
    return adapter_energies(Rx, Ry, V, U, T).sum(-1)


def _hosvd(side, blocks_other, c, rank, settings, block=False):
    """HOSVD init: top eigenvectors of ``sum_t c_t^2 B_t (A_t A_t^T) B_t^T`` in whitened
    coordinates, ``Rf blockdiag(c_t^2 G_other[t, t]) Rf^T = Z Z^T`` with
    ``Z = [Rf_t c_t S_t]_t``, ``S_t`` the symmetric square root of ``G_other[t, t]``.
    ``block``: the ``rank`` columns are a whole orthonormal block (null columns completed).

    Where the side's Gram ``G = Rf^T Rf`` is at hand (every layer whitened by its Cholesky
    factor) and the solve is dense, the ``R x R`` matrix ``Z^T Z = S G S`` (``S`` the
    block-diagonal of the ``c_t S_t``) comes from ``G`` in ``4 R^2 rb`` FLOPs instead of
    ``Z Z^T`` in ``2 k^2 R`` (k = R: the same eigenvalues, the same size), and
    ``U = Z Y / sqrt(w)`` from its eigenpairs ``(w, Y)``: 0.35 s a side less at R = 2048 (a
    Llama-3-8B q_proj with 128 adapters, one thread)."""
    lam, Q = torch.linalg.eigh(blocks_other)                     # [L, T, rb], [L, T, rb, rb]
    root = (Q * lam.clamp(min=0).sqrt()[..., None, :]) @ Q.mT * c[:, :, None, None]
    L, k, R = side.Rf.shape
    cholesky = isinstance(side.W, _RootInverse) and side.W.all_cholesky
    if side.G is not None and cholesky and not _goes_factored(k, R, rank, side.Rf.dtype, settings,
                                                              settings.cold_steps)[0]:
        U = _hosvd_from_gram(side, root, rank)
    else:
        Z = topr_op.BlockImages(side.Rf, root).dense()           # [L, k, R]
        U = _top_r(Z, rank, settings)[1]    # a factored solve starts from seeded random vectors
    # Householder QR completes zeroed (null) columns to an orthonormal block, keeping the others
    return _orthonormal(U) if block else U


def _hosvd_from_gram(side, root, rank):
    """Top-``rank`` left singular vectors ``[L, k, rank]`` (null ones zero) of ``Z = Rf S``,
    ``S = blockdiag(root_t)`` (``root [L, T, rb, rb]`` symmetric), from the eigenpairs of
    ``Z^T Z = S G S`` (``G = Rf^T Rf [L, R, R]``)."""
    L, T, rb, _ = root.shape
    R = T * rb
    SG = topr_op.block_diagonal_mul(root, side.G)                                         # S G
    # (S G) S: the blocks of S applied to the column blocks of S G
    N = (SG.reshape(L, R, T, rb).permute(0, 2, 1, 3) @ root).permute(0, 2, 1, 3).reshape(L, R, R)
    w, Y = eig_op.topk_eigh((N + N.mT) / 2, min(rank, R))                                # descending
    live = w > NULL_RTOL * w[:, :1].clamp(min=0)
    inv = torch.where(live, w.clamp(min=torch.finfo(w.dtype).tiny).rsqrt(), 0.0)
    return (side.Rf @ topr_op.block_diagonal_mul(root, Y)) * inv[:, None, :]


def _orthonormal(X):
    """Orthonormal basis of the columns of ``X [L, k, r]``, column j spanning the first j
    (Householder QR, each column's sign kept)."""
    Q, Rr = torch.linalg.qr(X)
    sign = torch.sign(Rr.diagonal(dim1=-2, dim2=-1))
    return Q * torch.where(sign == 0, 1.0, sign)[:, None, :]


def _polar(M):
    """Orthogonal polar factor of each ``M [..., r, r]``: ``M (M^T M)^(-1/2)`` from one small
    eigh, half the time of an SVD (640 16 x 16 matrices, 2 threads: 11.6 ms against 22.2 ms)
    and equal to it within 3e-15 on the Anderson history's well-conditioned frames. Where
    ``M^T M`` is near singular (its error grows as eps cond(M)^2) the SVD decides."""
    lam, Q = torch.linalg.eigh(M.mT @ M)
    P = M @ (Q * lam.clamp(min=1e-300).rsqrt()[..., None, :]) @ Q.mT
    bad = lam[..., 0] <= POLAR_EIGH_RCOND * lam[..., -1]
    if bool(bad.any()):
        X, _, Yh = torch.linalg.svd(M[bad])
        P[bad] = X @ Yh
    return P


def _rows(idx, L):
    """``X -> X[idx]`` for ``[L, ...]`` tensors, without a gather when ``idx`` is the whole batch."""
    return (lambda X: X) if len(idx) == L else (lambda X: X[idx])


def _on(mask, fn, *Xs):
    """``fn(*Xs)`` ``[L, ...]`` on the layers in ``mask [L]`` only; NaN on the others (a stopped
    layer's tests are never read: computing them for the whole batch was 0.74 of 7.2 s in a group
    of 32 gaussian and structured 1024^2 layers, whose tail runs a few layers for 100+ sweeps)."""
    if bool(mask.all()):
        return fn(*Xs)
    idx = mask.nonzero().squeeze(1)
    part = fn(*(X[idx] for X in Xs))
    out = part.new_full((len(mask),) + part.shape[1:], math.nan)
    out[idx] = part
    return out


class _Anderson:
    """Type-II Anderson mixing of the sweep map ``x -> g(x)`` for a batch of ``[R, r]``
    orthonormal bases.

    Bases are only defined up to a rotation, so every step re-expresses the stored iterates
    in the frame of the newest image ``g`` (orthogonal Procrustes, ``r x r`` polar factors).
    A fixed frame (the first iterate) degrades as the iterates move away from it: 2048^2,
    T=8, r=16 gaussian adapters took 262 sweeps with it, 58 with the moving frame (plain
    HOOI: 269). Safeguarded: a layer whose plain step grew by more than ``restart_growth``
    restarts from its plain iterate with an empty history, as does a wild extrapolation."""

    def __init__(self, depth):
        self.depth = depth
        self.xs, self.gs = [], []
        self.age = None

    def step(self, x, g, hold, skip):
        """Next iterate from the current point ``x`` and its image ``g`` (``[L, R, r]``);
        layers in ``hold [L]`` (gate shut) record the pair, take ``g`` and are not computed;
        layers in ``skip [L]`` (stopped ones) take ``g`` and are not computed either. Returns
        the next iterates and ``[L]``: which of them are extrapolations (the others are ``g``
        itself)."""
        L = x.shape[0]
        self._ensure(L, x.device)
        self.xs.append(x)
        self.gs.append(g)
        self.age = (self.age + 1).clamp(max=self.depth)
        if len(self.xs) > self.depth:
            self.xs.pop(0)
            self.gs.pop(0)
        k = len(self.xs)
        none = torch.zeros(L, dtype=torch.bool, device=x.device)
        # only layers that will take the extrapolation are computed: not the stopped ones (a group
        # of 32 gaussian 1024^2 layers spent 6.7 of its 12.6 s here when they were), not the held
        # ones (gaussian 2048^2, T = 8: 25 of 43 sweeps run with the gate shut; its merge took
        # 1.15x as long, 2 threads, when they were), and not a layer with fewer than two
        # iterates since its last restart (no difference yet)
        calc = ~skip & ~hold & (self.age >= 2)
        if k < 2 or not bool(calc.any()):
            return g, none
        idx = calc.nonzero().squeeze(1)
        take = _rows(idx, L)
        gi, age = take(g), self.age[idx]
        # all stored bases re-expressed in g's frame with one batched r x r polar factor
        H = torch.stack([take(X) for X in self.xs + self.gs])          # [2k, l, R, r]
        H = (H @ _polar(H.mT @ gi)).reshape(2 * k, len(idx), -1).permute(1, 2, 0)   # [l, R r, 2k]
        X, G = H[..., :k], H[..., k:]
        F = G - X
        valid = torch.arange(k - 1, device=x.device)[None, :] >= (k - age)[:, None]   # [l, k-1]
        dF = F.diff(dim=-1) * valid[:, None, :]
        dG = G.diff(dim=-1) * valid[:, None, :]
        # regularised normal equations: the differences become nearly collinear at convergence
        H = dF.mT @ dF
        # a restarted layer with one difference so far has a rank-one system; an all-zero one
        # (H = 0) gets ridge 1, not a subnormal that turns the solve into NaN, which would count
        # as wild, restart the layer again and keep its accelerator off for good
        trace = H.diagonal(dim1=-2, dim2=-1).sum(-1)
        eps = torch.where(trace > 0, 1e-12 * trace, 1.0)
        H = H + eps[:, None, None] * torch.eye(k - 1, dtype=H.dtype, device=H.device)
        gamma = torch.linalg.solve(H, dF.mT @ F[..., -1:])          # [l, k-1, 1]
        nxt = (G[..., -1:] - dG @ gamma).reshape(gi.shape)
        wild = ~torch.isfinite(nxt).all(-1).all(-1) | (gamma.abs().amax((-2, -1)) > 1e4)
        self.age[idx] = torch.where(wild, 0, age)
        Q, _ = torch.linalg.qr(torch.where(wild[:, None, None], gi, nxt))
        out, extrapolated = g.clone(), none.clone()
        out[idx] = torch.where(wild[:, None, None], gi, Q)
        extrapolated[idx] = ~wild
        return out, extrapolated

    def _ensure(self, L, device):
        if self.age is None:
            self.age = torch.zeros(L, dtype=torch.long, device=device)

    def forget(self, mask):
        """Drop the history of the layers in ``mask [L]``."""
        self._ensure(len(mask), mask.device)
        self.age = torch.where(mask, 0, self.age)

    def keep_last(self, mask, count):
        """Layers in ``mask [L]`` keep at most their last ``count`` iterates."""
        self._ensure(len(mask), mask.device)
        self.age = torch.where(mask, self.age.clamp(max=count), self.age)


@dataclass
class Subspace:
    Phi: torch.Tensor        # [L, R, r]: U = Bh Phi
    Psi: torch.Tensor        # [L, R, r]: V = Ah^T Psi
    Uw: torch.Tensor         # [L, kb, r]: U in whitened coordinates
    Vw: torch.Tensor         # [L, ka, r]
    iterations: list[int]
    converged: list[bool]
    last_step: list[float]
    stopped_by: list[str]    # per layer: "energy", "flat", "subspace" or "max_iter"
    objective: list[float]   # per layer: sum_t c_t^2 ||U^T dW_t V||^2 at the answer


class _HalfSteps:
    """The half-steps of one group: its operands (the whitened factors, with and without the
    subspace weights) and the state that carries from one half-step of a side to the next.

    With acceleration (the block route) each side carries a block of ``b`` orthonormal
    columns, started from the top-b HOSVD vectors (one exact solve per layer and side), and a
    half-step is one :func:`ops.topr.block_step` on it. Without, a half-step is an exact top-r
    solve (:meth:`_exact_top_r`) and a side carries only the factored steps its last solves
    took, a hint for the next one."""

    def __init__(self, side_b, side_a, c, T, r, *, block, settings):
        Rb, Ra = side_b.Rf, side_a.Rf
        R = Rb.shape[-1]
        cc = c.repeat_interleave(R // T, dim=1)[:, None, :]       # [L, 1, R]
        self.ops = {"b": Rb, "a": Ra, "bc": Rb * cc, "ac": Ra * cc}
        self.T, self.r, self.L = T, r, Rb.shape[0]
        self.settings = settings
        # per side (True: U), whether its block half-steps take the images unformed
        self.unformed = {side: R <= T * r and Rx.shape[1] >= settings.unformed_min_k
                         for side, Rx in ((True, Rb), (False, Ra))}
        # per side, (steps, solves): the factored steps a warm-started exact half-step is
        # expected to need, one more than the last factored solve of that side took, trusted
        # once that side has had ``hint_solves`` of them in a row (``warm_steps`` until then;
        # never again factored once one has ended dense). On flat spectra the iterates move
        # little and a warm solve takes 1-2 steps, where ``warm_steps`` kept the float64
        # half-steps of gaussian 2048^2, T = 512 dense (a dense solve costs 8 factored steps there)
        self.expected_steps = {}
        if block:
            # each side's block is updated in place from half-step to half-step
            self.blocks = {True: _hosvd(side_b, side_a.blocks, c, topr_op.block_width(Rb.shape[1], r), settings,
                                        block=True),
                           False: _hosvd(side_a, side_b.blocks, c, topr_op.block_width(Ra.shape[1], r), settings,
                                         block=True)}
            # the HOSVD start: the blocks' leading r columns (copies: the blocks move in place,
            # the iterates must not move with them)
            self.start = tuple(self.blocks[side][..., :r].clone() for side in (True, False))
        else:
            self.blocks = None
            self.start = (_hosvd(side_b, side_a.blocks, c, r, settings), _hosvd(side_a, side_b.blocks, c, r, settings))

    def __call__(self, u_side, Vin, X0, mask):
        """Half-step of the layers in ``mask``; the others keep ``X0``. Returns the new basis
        ``[L, k, r]`` (null columns zero) and, per layer, the objective ``f`` of the new basis
        paired with ``Vin`` (the sum of its top-r Ritz values or eigenvalues)."""
        out = X0.clone()
        obj = torch.full((self.L,), math.nan, dtype=SOLVE_DTYPE, device=X0.device)
        Rx, Ry = (self.ops["b"], self.ops["ac"]) if u_side else (self.ops["a"], self.ops["bc"])
        idx = mask.nonzero().squeeze(1)
        take = _rows(idx, self.L)
        Z = half_step_images(take(Rx), take(Ry), take(Vin), self.T)
        if self.blocks is None:
            w, Uh = self._exact_top_r(u_side, Z.dense(), take(X0))
        else:
            s = self.settings
            Z = Z if self.unformed[u_side] else Z.dense()
            th, Q, _ = topr_op.block_step(Z, take(self.blocks[u_side]), self.r, damping=s.inner_damping,
                                          max_degree=s.max_degree, budget="auto" if s.filter_budget else None)
            self.blocks[u_side][idx] = Q
            w = th[:, :self.r]
            Uh = _zero_null(w, Q[..., :self.r])              # as from an exact solve
        obj[idx] = w.sum(-1)
        out[idx] = Uh
        return out, obj

    def _exact_top_r(self, u_side, Z, X0):
        """The exact half-step of plain HOOI: top-r eigenpairs of ``Z Z^T`` to rounding, dense
        or factored (:func:`_top_r`), warm-started from ``X0``."""
        steps, solves = self.expected_steps.get(u_side, (None, 0))
        expected = steps if solves >= self.settings.hint_solves else None
        w, Uh, taken = _top_r(Z, self.r, self.settings, X0, expected)
        if taken is not None:
            self.expected_steps[u_side] = (taken + 1, solves + 1)
        elif u_side in self.expected_steps:     # a factored solve that ended dense: stay dense
            self.expected_steps[u_side] = (math.inf, math.inf)
        return w, Uh


class _EnergyTest:
    """The energy stop test (``stop="energy"``): by :func:`reference.energy_left`, the objective
    has less than ``tol`` (relative) left to gain and the total energy kept ``sum_t kept_t
    ||dW_t||^2 / sum_t ||dW_t||^2`` will move by less than ``tol`` (relative). The objective
    alone is not enough where the subspace weights differ from 1 (beta < 1 with adapters of
    different norms): it is stationary at the fixed point, the unweighted total is not, and at
    an objective within 1e-6 the total energy kept was 2e-4 from the converged one on such
    sets. Each adapter's own energy kept is not followed: on flat spectra the adapters trade
    energy back and forth while the total has settled (gaussian 2048^2, T=8: 72 sweeps against
    43 for the total, both within 1e-6 of the converged total).

    A layer whose gain and total-energy change have both stayed at most ``flat_share * tol`` for
    ``flat_sweeps`` sweeps in a row without passing is flat (``reference.FLAT_SWEEPS``).

    Holds, per layer, the relative objective gains and the signed relative changes of the total
    energy kept over the last ``ENERGY_WINDOW`` sweeps (newest last), that total, and the
    sweeps in a row with both at most ``flat_share * tol``."""

    def __init__(self, nu2, tol, settings):
        L, dev = nu2.shape[0], nu2.device
        self.nu2, self.tol = nu2, tol                                      # nu2 [L, T]: ||dW_t||^2
        self.flat_sweeps, self.flat_below = settings.flat_sweeps, settings.flat_share * tol
        self.gains = torch.full((L, ENERGY_WINDOW), math.nan, dtype=SOLVE_DTYPE, device=dev)
        self.moves = self.gains.clone()
        self.kept = torch.full((L,), math.nan, dtype=SOLVE_DTYPE, device=dev)
        self.flat_run = torch.zeros(L, dtype=torch.long, device=dev)

    def passes(self, f_old, f_new, half, U1, V1, active):
        """For the layers in ``active`` whose objective went from ``f_old`` to ``f_new`` in this
        sweep, at the images ``(U1, V1)`` (``half``: the half-steps, whose operands give each
        adapter's energy): ``[L]`` those that pass the test and ``[L]`` those that are flat."""
        gain = ((f_new - f_old) / f_new.abs().clamp(min=1e-300)).clamp(min=0)
        energies = _on(active, lambda Rb, Ra, V, U: adapter_energies(Rb, Ra, V, U, half.T),
                       half.ops["b"], half.ops["a"], V1, U1)                          # [L, T]
        kept = energies.sum(-1) / self.nu2.sum(-1).clamp(min=1e-300)
        move = (kept - self.kept) / kept.clamp(min=1e-300)
        roll = lambda H, x: torch.where(active[:, None], torch.cat([H[:, 1:], x[:, None]], 1), H)   # noqa: E731
        self.gains, self.moves = roll(self.gains, gain), roll(self.moves, move)
        self.kept = torch.where(active, kept, self.kept)
        passed = active & (torch.maximum(energy_left(self.gains), energy_left(self.moves)) <= self.tol)
        small = (gain <= self.flat_below) & (move.abs() <= self.flat_below)
        self.flat_run = torch.where(active, torch.where(small, self.flat_run + 1, 0), self.flat_run)
        return passed, active & ~passed & (self.flat_run >= self.flat_sweeps)


class _Acceleration:
    """Anderson acceleration of the sweep map with its safeguards, per layer:

    * the extrapolation gate (``gate``): extrapolate only while plain HOOI converges steadily
      (``ratios`` of successive plain steps, newest last, the last ``plain_step`` and the
      plain contraction ``rate`` at the gate's opening);
    * the stall guard: the lowest step so far (``best``), that step when it last halved
      (``mark``) and the extrapolating sweeps since (``slow``); a layer past
      ``stall_sweeps`` runs plain sweeps for good (``plain_only``);
    * ``extrapolated``: whether the current point is an extrapolation (else a plain image)."""

    def __init__(self, L, device, settings):
        self.s = settings
        self.anderson = _Anderson(settings.anderson_depth)
        self.extrapolated = torch.zeros(L, dtype=torch.bool, device=device)
        self.ratios = torch.full((L, settings.gate_window), math.nan, dtype=SOLVE_DTYPE, device=device)
        self.plain_step = torch.full((L,), math.nan, dtype=SOLVE_DTYPE, device=device)
        self.gate = torch.zeros(L, dtype=torch.bool, device=device)
        self.rate = torch.full((L,), math.nan, dtype=SOLVE_DTYPE, device=device)
        self.best = torch.full((L,), math.inf, dtype=SOLVE_DTYPE, device=device)
        self.mark = self.best.clone()
        self.slow = torch.zeros(L, dtype=torch.long, device=device)
        self.plain_only = torch.zeros(L, dtype=torch.bool, device=device)

    def reject(self, fa, f, active):
        """``[L]``: active layers whose extrapolated point's objective ``fa`` fell below the
        objective ``f`` of the plain image it replaced (beyond ``monotone_slack``). They drop
        their extrapolation and its history; the caller restarts them from that image."""
        bad = active & self.extrapolated & (fa < f - self.s.monotone_slack * f.abs())
        self.extrapolated &= ~bad
        self.close_gate(bad)
        return bad

    def close_gate(self, mask):
        """Layers in ``mask`` drop their extrapolation history and go back to plain sweeps
        until these converge steadily again."""
        self.gate &= ~mask
        self.ratios = torch.where(mask[:, None], math.nan, self.ratios)
        self.plain_step = torch.where(mask, math.nan, self.plain_step)
        self.anderson.forget(mask)

    def watch_gate(self, step, plain):
        """Open the gate of layers whose plain steps (``plain [L]``: this sweep started from
        a plain image) shrink at a steady rate (``gate_window``, ``gate_drift``); returns the
        layers whose gate opens now."""
        ratio = step / self.plain_step
        self.ratios = torch.where(plain[:, None], torch.cat([self.ratios[:, 1:], ratio[:, None]], 1), self.ratios)
        self.plain_step = torch.where(plain, step, self.plain_step)
        q = self.ratios
        last = q[:, -1]
        spread = q.amax(-1) - q.amin(-1)
        steady = ~torch.isnan(q).any(-1) & (q.amax(-1) < 1) & (spread <= self.s.gate_drift * (1 - last))
        opening = steady & ~self.gate
        self.rate = torch.where(opening, last, self.rate)
        self.gate |= steady
        return opening

    def after_sweep(self, step, grew, from_plain, active):
        """The safeguards on this sweep's plain ``step [L]``: the stall guard, a shut gate
        where the step grew past ``restart_growth`` (``grew``) or the layer runs plain sweeps
        for good, then the gate watch. Returns the layers whose gate opens now."""
        self.best = torch.where(step < self.best, step, self.best)
        halved = self.best <= self.mark / 2
        self.mark = torch.where(halved, self.best, self.mark)
        # only extrapolating sweeps count: a layer whose gate is closed runs plain sweeps anyway
        self.slow = torch.where(halved | ~self.gate, 0, self.slow + 1)
        self.plain_only |= self.slow >= self.s.stall_sweeps
        self.close_gate(active & (grew | self.plain_only))
        return self.watch_gate(step, from_plain)

    def next_point(self, x, V, steps, done, opening):
        """The point the next sweep starts from: the Anderson extrapolation from the plain
        image ``V`` where the gate is open and the extrapolation stays within ``trust`` times
        the plain iteration's predicted remaining distance, ``V`` elsewhere (still recorded
        in the history)."""
        self.anderson.keep_last(opening, self.s.gate_window + 1)          # history of the steady run only
        nxt, extrapolated = self.anderson.step(x, V, hold=~self.gate, skip=done)
        reach = self.s.trust * steps * self.rate / (1 - self.rate)
        extrapolated &= _on(extrapolated, sin_angle, V, nxt) <= reach
        self.extrapolated = extrapolated
        return torch.where(extrapolated[:, None, None], nxt, V)


class _HOOISolve:
    """The batched HOOI iteration of one group. Its per-layer state lives in named parts:

    * the iterate: the plain images ``U [L, kb, r]``, ``V [L, ka, r]`` and their objective
      ``f [L]``, the point ``x`` the next sweep starts from (``V`` or an extrapolation of it),
      sweeps taken (``iters``), the last plain step (``steps``), ``done`` and ``stopped_by``;
    * ``half`` (:class:`_HalfSteps`): the operands and what a side carries between half-steps;
    * ``energy`` (:class:`_EnergyTest`): the energy stop test's history;
    * ``acc`` (:class:`_Acceleration`, None without acceleration): the accelerator and its
      safeguards.

    One :meth:`sweep` from ``x``:

    1. U half-step: ``U1`` = top-r eigenvectors for ``x``, and the objective ``F(x) = f(U1, x)``;
    2. an extrapolated ``x`` is kept only if ``F(x)`` is at least the objective of the plain
       image it replaces; otherwise the layer takes that image and the U half-step is redone
       from it (and its extrapolation history is dropped);
    3. V half-step: ``V1`` and the objective ``f(U1, V1)``;
    4. the safeguards of the accelerator, from the plain step of this sweep;
    5. the stop test of the layer: ``subspace`` (that step) or ``energy``;
    6. the next point: the plain image ``V1`` or the Anderson extrapolation from it.

    Everything is float64. The answer is always a plain image pair ``(U1, V1)``, never an
    extrapolated point."""

    def __init__(self, side_b, side_a, c, T, rank, *, stop, tol, accelerate, settings=DEFAULT_SOLVER):
        c = c.to(SOLVE_DTYPE)
        L, _, R = side_b.Rf.shape
        dev = side_b.Rf.device
        self.L, self.T, self.r = L, T, min(rank, R)
        self.stop, self.tol, self.accelerate = stop, tol, accelerate
        self.half = _HalfSteps(side_b, side_a, c, T, self.r, block=accelerate, settings=settings)
        self.U, self.V = self.half.start
        self.x = self.V
        self.f = torch.full((L,), -math.inf, dtype=SOLVE_DTYPE, device=dev)
        self.iters = torch.zeros(L, dtype=torch.long, device=dev)
        self.done = torch.zeros(L, dtype=torch.bool, device=dev)
        self.stopped_by = ["max_iter"] * L
        self.steps = torch.full((L,), math.inf, dtype=SOLVE_DTYPE, device=dev)
        self.energy = _EnergyTest((side_b.blocks * side_a.blocks).sum((-2, -1)).clamp(min=0), tol, settings)
        self.acc = _Acceleration(L, dev, settings) if accelerate else None
        self.settings = settings

    def _monotone(self, U1, fa, active):
        """Step 2 of a sweep: the layers whose extrapolation did worse than the plain image go
        back to that image and redo their U half-step."""
        reject = self.acc.reject(fa, self.f, active)
        if bool(reject.any()):
            self.x = torch.where(reject[:, None, None], self.V, self.x)
            U1r, far = self.half(True, self.x, U1, reject)
            U1 = torch.where(reject[:, None, None], U1r, U1)
            fa = torch.where(reject, far, fa)
        return U1, fa

    def sweep(self):
        active = ~self.done
        U1, fa = self.half(True, self.x, self.U, active)
        if self.accelerate:
            U1, fa = self._monotone(U1, fa, active)
            from_plain = active & ~self.acc.extrapolated
        V1, fb = self.half(False, U1, self.V, active)
        step_v = _on(active, sin_angle, self.x, V1)
        if self.accelerate:
            # U's step is the plain HOOI one from the current point, V1 -> U(V1); it is only
            # needed (one more half-step) where V's step already passes.
            step = step_v.clone()
            if self.stop == "subspace":
                check = active & (step_v <= self.tol)
                if bool(check.any()):
                    U2, _ = self.half(True, V1, U1, check)
                    step = torch.where(check, torch.maximum(step_v, _on(check, sin_angle, U1, U2)), step_v)
        else:
            step = torch.maximum(_on(active, sin_angle, self.U, U1), step_v)
        self.iters += active.long()
        grew = step > self.settings.restart_growth * self.steps
        self.steps = torch.where(active, step, self.steps)
        if self.accelerate:
            opening = self.acc.after_sweep(step, grew, from_plain, active)
        flat = torch.zeros_like(active)
        if self.stop == "subspace":
            stop_now = active & (step <= self.tol)
        else:
            stop_now, flat = self.energy.passes(self.f, fb, self.half, U1, V1, active)
        self.f = torch.where(active, fb, self.f)
        self.U = torch.where(active[:, None, None], U1, self.U)
        self.V = torch.where(active[:, None, None], V1, self.V)
        for l in stop_now.nonzero().squeeze(1).tolist():
            self.stopped_by[l] = self.stop
        for l in flat.nonzero().squeeze(1).tolist():
            self.stopped_by[l] = "flat"
        self.done |= stop_now | flat
        self.x = self.acc.next_point(self.x, self.V, self.steps, self.done, opening) if self.accelerate else self.V

    def result(self, side_b, side_a) -> Subspace:
        # canonical order: columns by descending eigenvalue of their last update (eigh's order)
        return Subspace(side_b.W @ self.U, side_a.W @ self.V, self.U, self.V, self.iters.tolist(),
                        self.done.tolist(), self.steps.tolist(), list(self.stopped_by), self.f.tolist())


def solve_subspace(side_b: _Side, side_a: _Side, c, T, rank, *, stop="energy", tol=None, max_iter=1000,
                   accelerate=True, settings: SolverSettings = DEFAULT_SOLVER) -> Subspace:
    """Tucker-2 subspace of a group from its whitened sides and subspace weights ``c [L, T]``.

    ``stop`` picks the test that ends a layer (DESIGN section 2, docs/DESIGN.md section 8):
    ``"energy"`` when the objective ``sum_t ||U^T X_t V||^2`` has (by its recent gains) less
    than ``tol`` (relative) left to gain, ``"subspace"`` when the plain HOOI step from the
    current point moves U and V by a sine of at most ``tol``; ``tol=None`` takes
    ``DEFAULT_TOL[stop]``.

    Everything is float64. With acceleration (the default) each half-step is one block step
    on ``b`` carried columns (``ops.topr.block_step``, ending at HOOI's fixed points) and the
    sweeps are Anderson-extrapolated; extrapolated points are kept only where they do at least
    as well as the plain image they replace, so the objective never decreases. Plain HOOI
    (``accelerate=False``) solves every half-step exactly: it is the reference iteration, step
    for step. Layers stop independently (a converged layer is frozen and no longer computed),
    so a layer's answer does not depend on its batch. ``settings``: the solver's tuning
    (:class:`SolverSettings`)."""
    tol = DEFAULT_TOL[stop] if tol is None else tol
    hooi = _HOOISolve(side_b, side_a, c, T, rank, stop=stop, tol=tol, accelerate=accelerate, settings=settings)
    for _ in range(max_iter):
        hooi.sweep()
        if bool(hooi.done.all()):
            break
    return hooi.result(side_b, side_a)


# ------------------------------------------------------------------------------------------
# prepared layers and groups


def _stack(layers, rb, dtype, device):
    """Stack one group's factors -> Bh ``[L, m, R]``, Ah ``[L, R, n]``, colscale ``[L, R]``
    (``s_t w_t`` on adapter t's columns, 0 on padding)."""
    L = len(layers)
    T = len(layers[0][0])
    m, n = layers[0][1][0].shape[0], layers[0][0][0].shape[1]
    R = T * rb
    Bh = torch.zeros(L, m, R, dtype=dtype, device=device)
    Ah = torch.zeros(L, R, n, dtype=dtype, device=device)
    colscale = torch.zeros(L, R, dtype=torch.float64)
    for l, (A, B, s, w) in enumerate(layers):
        for t in range(T):
            k = A[t].shape[0]
            Bh[l, :, t * rb:t * rb + k] = B[t]
            Ah[l, t * rb:t * rb + k] = A[t]
            colscale[l, t * rb:t * rb + k] = s[t] * w[t]
    return Bh, Ah, colscale.to(device)


class PreparedGroup:
    """The subspace and coordinates of a group of same-shape layers; ``merge`` re-merges with
    any rule and scale without touching the subspace (one rule + one lift per call)."""

    def __init__(self, layers, *, rank, beta=0.0, stop="energy", tol=None, max_iter=1000, accelerate=True,
                 device=None, backend_name=None, layer_ids=None, solver: SolverSettings | None = None):
        t0 = time.perf_counter()
        A0, B0 = layers[0][0], layers[0][1]
        self.m, self.n = B0[0].shape[0], A0[0].shape[1]
        self.T = len(A0)
        self.rb = max(a.shape[0] for A, *_ in layers for a in A)
        self.rank = rank
        self.out_dtype = A0[0].dtype
        self.device = torch.device(device) if device is not None else A0[0].device
        self.backend = backend.resolve(self.device, backend_name)
        self.layer_ids = list(range(len(layers))) if layer_ids is None else list(layer_ids)
        if self.backend == "reference":
            self._init_reference(layers, rank, beta, stop, tol, max_iter, t0)
            return
        self._dense_bases = None
        in_dtype = torch.promote_types(self.out_dtype, B0[0].dtype)
        self.Bh, self.Ah, self.colscale = _stack(layers, self.rb, in_dtype, self.device)
        # CPU: fp64 Grams are cheap next to the rest and keep every real direction; GPU: fp32
        self.gram_dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        T, rb = self.T, self.rb
        L, R = len(layers), T * rb
        rtol = WHITEN_RTOL[self.gram_dtype]
        if R <= min(self.m, self.n):
            # the usual case: both R x R Grams in one fused pass over the factors
            G_B, G_A = self._by_layer(lambda l: gram_op.gram(
                self.Bh[l], self.Ah[l], self.colscale[l], out_dtype=self.gram_dtype, backend=self.backend), L)
            G_B, G_A = G_B.to(SOLVE_DTYPE), G_A.to(SOLVE_DTYPE)
            side_b, side_a = _whiten_inner(G_B, T, rtol), _whiten_inner(G_A, T, rtol)
        else:
            # many adapters (R > m or n): a side whose dimension is below R is whitened from its
            # d x d outer Gram, so memory stays O((m + n) R) and no R x R matrix is needed there
            Bs = self.Bh.to(SOLVE_DTYPE) * self.colscale.to(SOLVE_DTYPE)[:, None, :]
            As = self.Ah.to(SOLVE_DTYPE).mT
            inner = lambda F: _whiten_inner(gram_op.gram_rows(F.mT), T, rtol)
            side_b = inner(Bs) if R <= self.m else _whiten_outer(Bs, T, rtol)
            side_a = inner(As) if R <= self.n else _whiten_outer(As, T, rtol)
            del Bs, As
        nu2 = (side_b.blocks * side_a.blocks).sum((-2, -1)).clamp(min=0)       # [L, T]
        self.norms = nu2.sqrt()
        c = torch.stack([subspace_weights(self.norms[l], beta) for l in range(L)])
        sub = solve_subspace(side_b, side_a, c, T, rank, stop=stop, tol=tol, max_iter=max_iter,
                             accelerate=accelerate, settings=DEFAULT_SOLVER if solver is None else solver)
        self.Phi, self.Psi = sub.Phi, sub.Psi
        if side_b.G is not None and side_a.G is not None:
            self.C = project_op.project(side_b.G, side_a.G, self.Phi, self.Psi, T,
                                        backend=self.backend)                  # [L, T, r, r]
        else:  # the same C_t = U'^T Rb_t Ra_t^T V' from the whitened factors
            r = sub.Uw.shape[-1]
            P = (side_b.Rf.mT @ sub.Uw).reshape(L, T, rb, r)
            Q = (side_a.Rf.mT @ sub.Vw).reshape(L, T, rb, r)
            self.C = P.mT @ Q
        del side_b, side_a
        if self.Phi.shape[-1] < rank:                                       # R < rank: pad
            pad = rank - self.Phi.shape[-1]
            self.Phi = torch.nn.functional.pad(self.Phi, (0, pad))
            self.Psi = torch.nn.functional.pad(self.Psi, (0, pad))
            self.C = torch.nn.functional.pad(self.C, (0, pad, 0, pad))
        kept = (self.C ** 2).sum((-2, -1)) / nu2.clamp(min=1e-300)
        kept = torch.where(nu2 > 0, kept.clamp(max=1.0), torch.zeros_like(kept))
        seconds = (time.perf_counter() - t0) / L
        self.infos = [LayerInfo(sub.iterations[l], sub.converged[l], sub.last_step[l],
                                kept[l].tolist(), self.norms[l].tolist(), seconds, sub.stopped_by[l],
                                sub.objective[l]) for l in range(L)]

    def _by_layer(self, fn, count):
        """``fn(slice)`` over the group's layers, concatenated. On the CPU one layer at a time:
        the torch ops upcast their inputs to float64, and a whole group at once would hold a
        float64 copy of every layer's factors (4x a bf16 group); on the GPU one batched launch."""
        if self.device.type != "cpu":
            return fn(slice(0, count))
        parts = [fn(slice(l, l + 1)) for l in range(count)]
        return tuple(torch.cat(p) for p in zip(*parts))

    def _init_reference(self, layers, rank, beta, stop, tol, max_iter, t0):
        """The ``reference`` backend: DESIGN section 2 on dense float64 updates (small layers)."""
        bases, C, self.infos = [], [], []
        for A, B, s, w in layers:
            dWs = ref_dense_updates(A, B, s, w).to(self.device)
            nu = torch.linalg.matrix_norm(dWs)
            tk = ref_tucker2(subspace_weights(nu, beta)[:, None, None] * dWs, rank, tol, max_iter, stop=stop, norms=nu)
            Ct = tk.U.mT @ dWs @ tk.V
            kept = torch.where(nu > 0, (Ct ** 2).sum((-2, -1)) / (nu ** 2).clamp(min=1e-300), 0.0)
            bases.append((tk.U, tk.V))
            C.append(Ct)
            self.infos.append(LayerInfo(tk.iterations, tk.converged, tk.last_step, kept.tolist(), nu.tolist(),
                                        time.perf_counter() - t0, tk.stopped_by, tk.objective))
        self._dense_bases = bases
        self.C = torch.stack(C)

    def merge(self, method="ties", *, scale=1.0, only=None, **rule_params) -> list[MergedLayer]:
        """Merged layers of the group (``only``: a slice of its layers, e.g. ``slice(j, j+1)``)."""
        params = resolve_params(method, rule_params)
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")
        sel = slice(None) if only is None else only
        infos = self.infos[sel]
        Cm = apply_rule(method, self.C[sel], layer_ids=self.layer_ids[sel], **params)   # [L, r, r]
        norms = torch.tensor([info.norms for info in infos], dtype=Cm.dtype, device=Cm.device)
        shares = share_after_rule(self.C[sel], Cm, norms, float(scale)).tolist()          # [L][T]
        if self._dense_bases is not None:
            out = []
            for l, (U, V) in enumerate(self._dense_bases[sel]):
                Bo, Ao = ref_balanced_factors(U, Cm[l], V, float(scale))
                out.append(MergedLayer(Ao.to(self.out_dtype), Bo.to(self.out_dtype), infos[l], method, params,
                                       shares[l]))
            return out
        X, S, Yh = torch.linalg.svd(Cm)
        root = S.sqrt()
        g = abs(float(scale)) ** 0.5
        sign = 1.0 if scale >= 0 else -1.0
        left = sign * g * (self.Phi[sel] @ X) * root[:, None, :]              # [L, R, r]
        right = g * root[:, :, None] * (Yh @ self.Psi[sel].mT)                # [L, r, R]
        Bsel, Asel, csel = self.Bh[sel], self.Ah[sel], self.colscale[sel]        # views
        lift_dtype = SOLVE_DTYPE if self.device.type == "cpu" else torch.float32
        Bo, Ao = self._by_layer(lambda l: lift_op.lift(Bsel[l], Asel[l], csel[l], left[l], right[l], lift_dtype,
                                                       backend=self.backend), len(left))
        Bo, Ao = canonical_signs(Bo, Ao)
        Bo, Ao = Bo.to(self.out_dtype), Ao.to(self.out_dtype)
        return [MergedLayer(Ao[l], Bo[l], infos[l], method, params, shares[l]) for l in range(len(infos))]


class PreparedLayer:
    """One prepared layer (see :func:`prepare`): layer ``j`` of a (possibly batched) prepared group."""

    def __init__(self, group: PreparedGroup, j: int = 0):
        self._group = group
        self._j = j
        self.info = group.infos[j]

    def bases(self):
        """The shared subspace as dense orthonormal bases ``U [m, r]``, ``V [n, r]`` (one pass
        over the factors; columns of directions the adapters do not span are zero)."""
        g, j = self._group, self._j
        if g._dense_bases is not None:
            return g._dense_bases[j]
        U = (g.Bh[j].to(SOLVE_DTYPE) * g.colscale[j].to(SOLVE_DTYPE)) @ g.Phi[j]
        V = g.Ah[j].to(SOLVE_DTYPE).mT @ g.Psi[j]
        return U, V

    @property
    def coordinates(self) -> torch.Tensor:
        """``[T, r, r]``: ``C_t = U^T dW_t V`` of every adapter."""
        return self._group.C[self._j]

    def merge(self, method="ties", *, scale=1.0, **rule_params) -> MergedLayer:
        return self._group.merge(method, scale=scale, only=slice(self._j, self._j + 1), **rule_params)[0]


# ------------------------------------------------------------------------------------------
# public entry points


def prepare(A, B, *, rank, beta=0.0, weights=None, scales=None, stop="energy", tol=None, max_iter=1000,
            accelerate=True, device=None, backend=None, solver=None) -> PreparedLayer:
    """Find the shared subspace of one layer and the coordinates of every adapter.

    A: list of ``[r_t, n]`` (lora_A), B: list of ``[m, r_t]`` (lora_B), ``scales`` the LoRA
    scaling of each adapter (alpha/r or alpha/sqrt(r)), ``weights`` the user's weights.
    The returned layer's ``merge(method, scale=..., **rule_params)`` costs one rule and one lift.
    ``solver``: the solver's tuning (:class:`SolverSettings`; None: the defaults)."""
    check_solver(stop, tol, max_iter, beta, solver)
    _, _, _, s, w = check_layer(A, B, scales, weights, rank=rank)
    group = PreparedGroup([(list(A), list(B), s, w)], rank=rank, beta=beta, stop=stop, tol=tol, max_iter=max_iter,
                          accelerate=accelerate, device=device, backend_name=backend, solver=solver)
    return PreparedLayer(group)


def merge_layer(A, B, *, rank, method="ties", beta=0.0, scale=1.0, weights=None, scales=None,
                stop="energy", tol=None, max_iter=1000, accelerate=True, device=None, backend=None,
                solver=None, **rule_params) -> MergedLayer:
    """Merge the LoRA adapters of one layer into one rank-``rank`` LoRA with CtM.

    Returns a :class:`MergedLayer` whose ``B [m, rank] @ A [rank, n]`` is
    ``scale * U rule({C_t}) V^T`` (DESIGN section 2), in the input dtype."""
    resolve_params(method, rule_params)
    plan = prepare(A, B, rank=rank, beta=beta, weights=weights, scales=scales, stop=stop, tol=tol,
                   max_iter=max_iter, accelerate=accelerate, device=device, backend=backend, solver=solver)
    return plan.merge(method, scale=scale, **rule_params)


def _normalise_layers(layers, weights, rank):
    out = []
    for i, layer in enumerate(layers):
        if len(layer) == 2:
            A, B = layer
            s = None
        elif len(layer) == 3:
            A, B, s = layer
        else:
            raise ValueError(f"layer {i}: expected (A_list, B_list) or (A_list, B_list, scales)")
        w = None if weights is None else (weights[i] if isinstance(weights[0], (list, tuple)) or
                                          torch.is_tensor(weights[0]) else weights)
        _, _, _, s, w = check_layer(list(A), list(B), s, w, rank=rank, layer=i)
        out.append((list(A), list(B), s, w))
    return out


def group_keys(layers):
    """Layers that can be solved as one batch share ``(m, n, T, rb, dtype)``."""
    keys = {}
    for i, (A, B, *_) in enumerate(layers):
        key = (B[0].shape[0], A[0].shape[1], len(A), max(a.shape[0] for a in A), A[0].dtype, str(A[0].device))
        keys.setdefault(key, []).append(i)
    return keys


def _layer_ids(layer_ids, count):
    if layer_ids is None:
        return list(range(count))
    ids = [int(i) for i in layer_ids]
    if len(ids) != count:
        raise ValueError(f"layer_ids has {len(ids)} entries for {count} layers")
    return ids


def prepare_layers(layers, *, rank, beta=0.0, weights=None, stop="energy", tol=None, max_iter=1000, accelerate=True,
                   device=None, backend=None, max_group=None, layer_ids=None, solver=None) -> list[PreparedLayer]:
    """Prepared layers, many at once: ``layers`` is a list of ``(A_list, B_list[, scales])``; ``weights``
    is one list for all layers or a list of per-layer lists. Same-shape layers are batched.
    ``layer_ids`` (default ``0..len-1``) identify the layers to seeded rules (DARE): give each
    module of a model its own id so that its mask does not depend on how it is batched.
    ``solver``: the solver's tuning (:class:`SolverSettings`; None: the defaults)."""
    check_solver(stop, tol, max_iter, beta, solver)
    norm = _normalise_layers(layers, weights, rank)
    ids = _layer_ids(layer_ids, len(norm))
    prepared: list[PreparedLayer | None] = [None] * len(norm)
    for idx in group_keys(norm).values():
        step = max_group or len(idx)
        for k in range(0, len(idx), step):
            chunk = idx[k:k + step]
            group = PreparedGroup([norm[i] for i in chunk], rank=rank, beta=beta, stop=stop, tol=tol, max_iter=max_iter,
                              accelerate=accelerate, device=device, backend_name=backend,
                              layer_ids=[ids[i] for i in chunk], solver=solver)
            for j, i in enumerate(chunk):
                prepared[i] = PreparedLayer(group, j)
    return prepared


def merge_layers(layers, *, rank, method="ties", beta=0.0, scale=1.0, weights=None, stop="energy", tol=None,
                 max_iter=1000, accelerate=True, device=None, backend=None, layer_ids=None, solver=None,
                 **rule_params) -> list[MergedLayer]:
    """Merge many layers (same-shape ones batched); see :func:`prepare_layers`."""
    params = resolve_params(method, rule_params)
    check_solver(stop, tol, max_iter, beta, solver)
    norm = _normalise_layers(layers, weights, rank)
    return merge_checked_layers(norm, _layer_ids(layer_ids, len(norm)), rank=rank, method=method, params=params,
                                beta=beta, scale=scale, stop=stop, tol=tol, max_iter=max_iter, accelerate=accelerate,
                                device=device, backend=backend, solver=solver)


def merge_checked_layers(layers, layer_ids, *, rank, method, params, beta, scale, stop, tol, max_iter,
                         accelerate=True, device=None, backend=None, solver=None) -> list[MergedLayer]:
    """:func:`merge_layers` without its checks, for a caller that has made them: the pipeline,
    whose plan checked every setting and whose reader checked every factor (finite, shapes),
    so a model's factors are scanned once. ``layers``: ``(A_list, B_list, scales, weights)``
    with float lists, as :func:`check_layer` returns them; ``params``: the rule's resolved
    parameters; ``layer_ids``: one id per layer."""
    out: list[MergedLayer | None] = [None] * len(layers)
    for idx in group_keys(layers).values():
        group = PreparedGroup([layers[i] for i in idx], rank=rank, beta=beta, stop=stop, tol=tol, max_iter=max_iter,
                              accelerate=accelerate, device=device, backend_name=backend,
                              layer_ids=[layer_ids[i] for i in idx], solver=solver)
        for j, merged in zip(idx, group.merge(method, scale=scale, **params)):
            out[j] = merged
    return out
