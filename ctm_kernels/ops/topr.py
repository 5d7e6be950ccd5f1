"""Top-``r`` eigenpairs of ``M = Z Z^T`` from the factor ``Z`` (the HOOI half-steps and the
HOSVD init of the engine), and the cost model that picks between the two routes.

* :func:`top_r_dense` - form ``M`` (``O(k^2 p)``) and take a full ``eigh`` (``O(k^3)``).
* :func:`top_r_factored` - block Krylov with Rayleigh-Ritz on ``Z`` itself (``M`` never
  formed): a block of ``b = r + guard`` vectors, warm-started from the caller's previous
  answer, expanded to ``[X, M X, ..., M^depth X]`` per step. Its error shrinks with the gap
  ``lambda_r / lambda_{b+1}`` (not ``lambda_r / lambda_{r+1}``), and it stops only when every
  wanted residual ``||M x_i - theta_i x_i||`` is at the rounding level of a dense solve
  (``RESID_FACTOR * eps * sqrt(p) * theta_1``), so its answer is the dense one to rounding.
  A layer that has not converged within ``max_steps`` is solved densely.
* :func:`dense_seconds`, :func:`factored_step_seconds` - predicted seconds of one dense solve
  and of one factored step, from FLOP counts and rates measured on this project's CPU; the
  engine gives the factored route at most the steps that a dense solve would cost (the HOSVD
  start, one solve per layer).
* :func:`block_step` - the HOOI half-step: ONE warm-started step on a carried block of ``b``
  orthonormal columns (a Chebyshev filter, then Rayleigh-Ritz on ``b x b``). No ``k x k``
  matrix and no eigensolve wider than the block.
"""
from __future__ import annotations

import math

import torch

from ._common import check, check_tensor
from .eig import topk_eigh
from .gram import gram_rows

# Block of the factored solver: r + GUARD vectors, Krylov depth DEPTH per step. Measured on
# the half-steps of a structured 2048^2, T = 128, r = 16 merge (k = p = 2048, float64, gap
# lambda_16 / lambda_17 = 1.004-1.007): from a far start / from the previous iterate,
# guard 8: depth 2 45 / 15 steps, depth 3 22 / 8, depth 4 14 / 5, depth 6 8 / 3 (cost per
# step grows like depth; measured with the whole basis orthonormalised at once); guard 0 (the block of the earlier Krylov route) had not converged
# after 200 steps of depth 1. Guards 12-16 took fewer steps but more time (products of
# 28-32 columns ran at a third of the rate of 24 on this CPU).
GUARD = 8
DEPTH = 4
# stop when every wanted residual is below RESID_FACTOR * eps * sqrt(p) * theta_1: the
# backward error of a dense eigh of M, whose entries carry p-term rounding (the residuals of
# the block Gram-Schmidt steps levelled off at 1.1-1.6 eps sqrt(p) theta_1 times 4 on a
# rank-deficient 80 x 40 factor, hence 8)
RESID_FACTOR = 8.0

# Cost model constants, measured on this project's CPU (AMD EPYC, one thread, torch 2.13 +
# MKL; benchmarks/bench_topr.py, results/topr_cpu.json):
# square products (the dense Z Z^T), narrow products (Z or Z^T times a block of 24-120
# columns, bound by reading Z) and the full eigh, seconds per k^3.
GEMM_FLOPS = {torch.float64: 45e9, torch.float32: 90e9}
NARROW_FLOPS = {torch.float64: 14e9, torch.float32: 45e9}
EIGH_S_PER_K3 = {torch.float64: 2.6e-10, torch.float32: 1.2e-10}


def _rate(table, dtype):
    return table.get(dtype, table[torch.float32])


def dense_seconds(k, p, dtype):
    """Predicted seconds of :func:`top_r_dense` for one ``[k, p]`` factor."""
    return 2 * k * k * p / _rate(GEMM_FLOPS, dtype) + _rate(EIGH_S_PER_K3, dtype) * k ** 3


def factored_step_seconds(k, p, b, depth, dtype):
    """Predicted seconds of one step of :func:`top_r_factored` (``2 * depth`` products of
    ``Z`` or ``Z^T`` with ``b`` columns, and the block Gram-Schmidt of ``[k, (depth + 1) b]``)."""
    width = (depth + 1) * b
    return (2 * depth * b * 2 * k * p + 4 * k * width * width) / _rate(NARROW_FLOPS, dtype)


def top_r_dense(Z, r):
    """``Z [L, k, p]`` -> the top-``r`` eigenpairs of ``Z Z^T``: (``[L, r]`` descending,
    ``[L, k, r]``); the eigensolve is :func:`ops.eig.topk_eigh` (LAPACK's partial solver or a
    full decomposition, whichever was measured faster at that size). A float32 eigensolve that
    fails to converge is redone in float64: LAPACK's float32 solver failed on a 210 x 210
    ``Z Z^T`` with 105 zero rows (a rank-padded set with R > m), which float64 solves."""
    M = gram_rows(Z)
    r = min(r, M.shape[-1])
    try:
        return topk_eigh(M, r)
    except torch.linalg.LinAlgError:
        if M.dtype == torch.float64:
            raise
        return tuple(X.to(M.dtype) for X in topk_eigh(M.double(), r))


def _orth(X):
    # Householder QR: orthonormal columns even where X's columns are dependent
    return torch.linalg.qr(X).Q


def top_r_factored(Z, r, X0=None, *, guard=GUARD, depth=DEPTH, max_steps=100, dense_steps=None, seed=0):
    """Top-``r`` eigenpairs of ``M = Z Z^T`` for ``Z [L, k, p]`` without forming ``M``.

    ``X0 [L, k, r0]`` (``r0 <= r + guard``, may hold zero columns): a starting block, e.g. the
    previous iterate of an outer loop; the rest of the block is seeded random. Each step
    builds an orthonormal basis ``Q`` of ``[X, M X, ..., M^depth X]`` block by block, takes the
    Rayleigh-Ritz pairs of ``M`` on it from ``Y = Z^T Q`` (``Q^T M Q = Y^T Y``) and keeps the
    top ``b``. The depth is capped so that the blocks fit in ``R^k``; a problem too small for
    one block beside ``X`` is solved densely. A layer stops when its
    top-``r`` residuals are at a dense solve's rounding (``RESID_FACTOR``); converged layers
    are frozen. Layers still unconverged after ``max_steps`` are solved by :func:`top_r_dense`,
    and so are all of them as soon as, from the third step on, the residuals' measured rate of
    decrease predicts that every unconverged layer needs more than ``dense_steps`` further
    steps (the cost of a dense solve in steps; None: never).

    Returns (eigenvalues ``[L, r]`` descending, eigenvectors ``[L, k, r]``, steps ``[L]``,
    solved iteratively ``[L]`` bool)."""
    check_tensor(Z, "topr", "Z", 3, (torch.float32, torch.float64))
    L, k, p = Z.shape
    check(isinstance(r, int) and 1 <= r <= k, "topr", f"r must be in [1, {k}], got {r!r}")
    check(isinstance(max_steps, int) and max_steps >= 0, "topr", f"max_steps must be >= 0, got {max_steps!r}")
    b = min(k, r + guard)
    if X0 is not None:
        check_tensor(X0, "topr", "X0", 3, (torch.float32, torch.float64))
        check(X0.shape[0] == L and X0.shape[1] == k and X0.shape[2] <= b, "topr",
              f"X0 must be [{L}, {k}, <= {b}], got {tuple(X0.shape)}")
    # the Krylov blocks must fit in R^k next to each other (Householder completions of an
    # exhausted block would not be orthogonal to the earlier ones)
    depth = min(depth, k // b - 1)
    if depth < 1 or max_steps == 0:
        w, U = top_r_dense(Z, r)
        return w, U, torch.zeros(L, dtype=torch.long, device=Z.device), torch.zeros(L, dtype=torch.bool, device=Z.device)
    start = X0.to(Z.dtype) if X0 is not None else Z.new_zeros(L, k, 0)
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn((L, k, b - start.shape[-1]), generator=gen, dtype=Z.dtype).to(Z.device)
    X = _orth(torch.cat([start, extra], -1))
    Y0 = Z.mT @ X                                               # Z^T X, [L, p, b]
    MX = Z @ Y0
    theta = X.new_zeros(L, b)
    steps = torch.zeros(L, dtype=torch.long, device=Z.device)
    done = torch.zeros(L, dtype=torch.bool, device=Z.device)
    bound = RESID_FACTOR * torch.finfo(Z.dtype).eps * math.sqrt(p)
    history = []                                                # excess of each step, [L]
    for _ in range(max_steps):
        # orthonormal Krylov blocks Q_0 = X, Q_1, ..., Q_depth by block Gram-Schmidt, keeping
        # every Y_j = Z^T Q_j: the Rayleigh-Ritz matrix Y^T Y then costs no further product,
        # 2 depth products of b columns per step (measured 20-30% faster than orthonormalising
        # [X, M X, ..., M^depth X] at once and multiplying it by Z^T again)
        Qs, Ys, W = [X], [Y0], MX
        for j in range(1, depth + 1):
            Qp = torch.cat(Qs, -1)
            W = W - Qp @ (Qp.mT @ W)
            W = W - Qp @ (Qp.mT @ W)
            Qj = _orth(W)
            Qj = _orth(Qj - Qp @ (Qp.mT @ Qj))                  # orthogonal to Qp to rounding
            Ys.append(Z.mT @ Qj)
            Qs.append(Qj)
            if j < depth:
                W = Z @ Ys[-1]
        Q, Y = torch.cat(Qs, -1), torch.cat(Ys, -1)            # [L, k, (depth + 1) b], [L, p, ...]
        H = Y.mT @ Y
        th, S = torch.linalg.eigh((H + H.mT) / 2)
        th, S = th.flip(-1)[:, :b], S.flip(-1)[..., :b]
        Xn, Y0n = Q @ S, Y @ S
        MXn = Z @ Y0n
        res = torch.linalg.vector_norm(MXn[..., :r] - Xn[..., :r] * th[:, None, :r], dim=-2)   # [L, r]
        excess = res.amax(-1) / (bound * th[:, 0].clamp(min=torch.finfo(Z.dtype).tiny))          # [L], <= 1: done
        keep = done[:, None, None]
        X, MX, Y0 = torch.where(keep, X, Xn), torch.where(keep, MX, MXn), torch.where(keep, Y0, Y0n)
        theta = torch.where(done[:, None], theta, th)
        steps += (~done).long()
        done |= excess <= 1
        if bool(done.all()):
            break
        history.append(excess)
        if dense_steps is not None and len(history) >= 3:
            # the residual shrinks about geometrically once the guard vectors have settled (the
            # first step's rate is not yet that: 0.68 then 0.15-0.3 on a structured half-step),
            # and alternates between fast and slow steps: the rate over the last two steps
            rate = (excess / history[-3]).sqrt().clamp(max=1 - 1e-12)
            need = torch.log(excess) / -torch.log(rate)
            if bool((need[~done] > dense_steps).all()):
                break
    w, U = theta[:, :r].clone(), X[..., :r].clone()
    if not bool(done.all()):
        bad = (~done).nonzero().squeeze(1)
        w[bad], U[bad] = top_r_dense(Z[bad], r)
    return w, U, steps, done


def block_width(k, r):
    """Columns ``b`` of the block a side carries from half-step to half-step: ``r`` plus an
    oversampling of ``r`` (at most 32 columns in all: torch's batched GPU eigh is batched only
    up to 32 x 32), but at least ``BLOCK_MIN_OVERSAMPLE``, and never more than ``k``.
    Measured over 300 random sets (docs/DESIGN.md section 8): no oversampling ended 28 of 212
    sets of a prototype at another stationary point, 8 columns with the plain power step one of
    150; with the filter below, 8 and ``r`` columns ended all 300 at plain HOOI's objective."""
    return min(k, max(r + BLOCK_MIN_OVERSAMPLE, min(2 * r, BLOCK_MAX_WIDTH)))


BLOCK_MIN_OVERSAMPLE = 8
BLOCK_MAX_WIDTH = 32
# The filter's degree is the smallest that damps the block's unwanted part by INNER_DAMPING
# against its r-th Ritz direction (1 / T_d(x), x = 2 theta_r / theta_b - 1), at most
# MAX_DEGREE. Plain power steps (degree 1, no shift) took 82 sweeps where exact half-steps took
# 9 (structured 512^2, T = 32, r = 16, b = 32: the 12 task-specific directions of the top 16
# sit in a flat bulk, theta_r / theta_b near 1); degree 4 took 10. The damping decides which
# fixed point the path reaches where plain HOOI passes a saddle (64 gaussian adapters on 256^2):
# 1e-1 ended the float64 and the float32 set at other fixed points, 1e-3 both at plain HOOI's
# (tests/test_solver.py::test_the_saddle_set_ends_where_plain_hooi_ends).
INNER_DAMPING = 1e-3
MAX_DEGREE = 16


def filter_degree(theta, r, damping, max_degree, eps=None):
    """``[L]`` Chebyshev degrees for Ritz values ``theta [L, b]`` (descending): the smallest
    ``d`` with ``1 / T_d(2 theta_r / theta_b - 1) <= damping``, in ``[1, max_degree]``, and no
    more than keeps the filter's range ``T_d(x_1) / T_d(x_r)`` within ``FILTER_RANGE / eps``
    (``eps``: the working precision; None: no such cap). Past that the filtered columns are
    swamped by the top eigenvector to rounding and the block loses the directions it wants
    (float32, a flat bulk under three large eigenvalues: degree 15 let the Ritz values fall
    from 0.92 to 0.66 while float64 converged). Returns (degrees, the uncapped need ``[L]``)."""
    e = _filter_edge(theta).squeeze(-1).double()
    x = (2 * theta[:, r - 1].double() / e - 1).clamp(min=1 + 1e-12)
    need = torch.ceil(math.acosh(1 / damping) / torch.acosh(x))
    cap = torch.full_like(need, float(max_degree))
    if eps is not None:
        x1 = (2 * theta[:, 0].double() / e - 1).clamp(min=1 + 1e-12)
        spread = (torch.acosh(x1) - torch.acosh(x)).clamp(min=1e-12)
        cap = torch.minimum(cap, torch.floor(math.log(FILTER_RANGE / eps) / spread))
    return torch.minimum(need, cap).clamp(min=1).long(), need


def filter_budget(k, p, b, dtype, device, width=None):
    """The highest degree worth filtering with on ``device`` before an exact dense solve of the
    top ``b`` pairs is cheaper (the cost model's dense solve against ``2 d + 1`` products of
    ``Z [k, p]`` with ``b`` columns, each reading ``width`` columns: ``p``, or ``R`` for
    :class:`BlockImages`); None on a GPU, where the dense route is the ``k x k`` eigensolve that
    torch does not batch and the filter always pays."""
    if torch.device(device).type != "cpu":
        return None
    product = 2 * k * (p if width is None else width) * b / _rate(NARROW_FLOPS, dtype)
    return int((dense_seconds(k, p, dtype) / product - 1) // 2)


# the filter may amplify the top Ritz direction over the r-th by at most FILTER_RANGE / eps
FILTER_RANGE = 1e-3


def _filter_edge(theta):
    """``[L, 1]``: the upper end of the damped interval ``[0, e]``, the block's last Ritz value
    (an estimate of the largest unwanted eigenvalue), kept above the rounding of the largest."""
    top = theta[:, :1].clamp(min=0)
    return torch.maximum(theta[:, -1:], 1e-12 * top).clamp(min=torch.finfo(theta.dtype).tiny)


def t_mul(Z, X):
    """``Z^T X`` as ``(X^T Z)^T``: MKL's float64 product of a transposed ``Z`` with a column-major
    ``X`` (as QR returns it) ran 8x slower than this form (512 x 512 by 32 columns, one thread:
    7.8 ms against 0.64 ms). ``Z`` may be :class:`BlockImages`."""
    if isinstance(Z, BlockImages):
        return Z.t_mul(X)
    return (X.mT @ Z).mT


def block_diagonal_mul(D, X):
    """``blockdiag(D_1, ..., D_T) X`` ``[L, T a, b]`` for the blocks ``D [L, T, a, c]`` and
    ``X [L, T c, b]``, without the ``T a x T c`` matrix."""
    L, T, a, c = D.shape
    return (D @ X.reshape(L, T, c, -1)).reshape(L, T * a, -1)


class BlockImages:
    """The half-step images ``Z = [Rx_1 Y_1, ..., Rx_T Y_T]`` ``[L, k, T p]`` kept as their
    factors ``Rx [L, k, R]`` (``T`` blocks of ``rb = R / T`` columns) and ``Y [L, T, rb, p]``.
    A product with ``b`` columns reads ``Rx`` once (``2 k R b`` FLOPs, against ``2 k T p b``
    for the formed ``Z``) and never builds ``Z``: forming it (a batched product of ``T`` strided
    blocks and a copy of ``[L, k, T p]`` to put the blocks side by side) took longer than the
    products of a half-step on gaussian 2048^2, T = 128 (k = R = 2048, r = 16). :meth:`dense`
    forms it where a route needs the matrix (a dense solve)."""

    def __init__(self, Rx, Y):
        L, k, R = Rx.shape
        check(Y.dim() == 4 and Y.shape[0] == L and Y.shape[1] * Y.shape[2] == R, "topr",
              f"Y must be [{L}, T, R / T, p] for Rx {tuple(Rx.shape)}, got {tuple(Y.shape)}")
        self.Rx, self.Y = Rx, Y
        self.shape = torch.Size((L, k, Y.shape[1] * Y.shape[3]))
        self.dtype, self.device = Rx.dtype, Rx.device
        self.width = R                   # the columns a product reads, for the cost model

    def __matmul__(self, W):
        """``Z W`` ``[L, k, b]`` for ``W [L, T p, b]``: ``Rx [Y_t W_t]_t``."""
        return self.Rx @ block_diagonal_mul(self.Y, W)

    def t_mul(self, X):
        """``Z^T X`` ``[L, T p, b]`` for ``X [L, k, b]``: ``[Y_t^T (Rx_t^T X)]_t``."""
        return block_diagonal_mul(self.Y.mT, t_mul(self.Rx, X))

    def __getitem__(self, idx):
        return BlockImages(self.Rx[idx], self.Y[idx])

    def dense(self):
        """The formed ``Z`` ``[L, k, T p]``."""
        L, k, R = self.Rx.shape
        T, rb = self.Y.shape[1], self.Y.shape[2]
        Z = self.Rx.reshape(L, k, T, rb).permute(0, 2, 1, 3) @ self.Y          # [L, T, k, p]
        return Z.permute(0, 2, 1, 3).reshape(L, k, -1)


def as_dense(Z):
    """``Z`` as a tensor: a :class:`BlockImages` formed, a tensor as it is."""
    return Z.dense() if isinstance(Z, BlockImages) else Z


def _ritz(Z, Q):
    """Rayleigh-Ritz of ``Z Z^T`` on the orthonormal block ``Q [L, k, b]``: Ritz values ``[L, b]``
    (descending), the rotated block ``Q S`` and ``Z^T Q S`` ``[L, p, b]``."""
    W = t_mul(Z, Q)
    H = W.mT @ W
    th, S = torch.linalg.eigh((H + H.mT) / 2)
    th, S = th.flip(-1), S.flip(-1)
    return th, Q @ S, W @ S


def block_step(Z, Q, r, *, damping=None, max_degree=None, budget="auto"):
    """One warm-started half-step on ``M = Z Z^T`` (``Z [L, k, p]``, a tensor or
    :class:`BlockImages`; ``M`` never formed) from the
    orthonormal block ``Q [L, k, b]`` (the side's block after its previous half-step).

    1. Rayleigh-Ritz on ``Q`` gives the Ritz values ``theta`` of the current ``M``;
    2. a Chebyshev filter ``T_d((2 M - e) / e)`` on ``[0, e]``, ``e = theta_b``, damps every
       direction below ``e`` against those above it (degree by :func:`filter_degree`, per layer;
       columns rescaled at every degree, which the three-term recurrence allows column by column);
    3. the filtered block is orthonormalised and Rayleigh-Ritz on it (``b x b``) gives the new
       block, its columns by descending Ritz value.

    The leading ``r`` columns are the new basis. A fixed point is a ``b``-dimensional invariant
    subspace of ``M`` that the filter does not move, whose top ``r`` Ritz vectors are then
    exact top eigenvectors. ``2 d + 1`` products of ``Z`` or ``Z^T`` with ``b`` columns. On the
    CPU a layer whose filter would cost more than an exact solve (:func:`filter_budget`) gets the
    exact top-``b`` pairs instead (degree 0); ``budget``: ``"auto"`` (that rule), ``None`` (always
    filter, the GPU's policy) or the highest degree to filter with.

    Returns (Ritz values ``[L, b]`` descending, block ``[L, k, b]``, degrees ``[L]``)."""
    if not isinstance(Z, BlockImages):
        check_tensor(Z, "topr", "Z", 3, (torch.float32, torch.float64))
    check_tensor(Q, "topr", "Q", 3, (torch.float32, torch.float64))
    L, k, _ = Z.shape
    b = Q.shape[-1]
    check(Q.shape[0] == L and Q.shape[1] == k and 1 <= r <= b <= k, "topr",
          f"Q must be [{L}, {k}, b] with {r} <= b <= {k}, got {tuple(Q.shape)}")
    th, Q, W = _ritz(Z, Q)
    degree = torch.zeros(L, dtype=torch.long, device=Z.device)
    if b == k:                        # the block is the whole space: Rayleigh-Ritz is exact
        return th, Q, degree
    degree, need = filter_degree(th, r, INNER_DAMPING if damping is None else damping,
                                 MAX_DEGREE if max_degree is None else max_degree, torch.finfo(Z.dtype).eps)
    if budget == "auto":
        budget = filter_budget(k, Z.shape[-1], b, Z.dtype, Z.device, getattr(Z, "width", None))
    exact = torch.zeros_like(degree, dtype=torch.bool) if budget is None else need > budget
    degree = torch.where(exact, 0, degree)
    if bool(exact.all()):
        return (*top_r_dense(as_dense(Z), b), degree)
    e = _filter_edge(th)[:, :, None]                        # [L, 1, 1]
    half = e / 2
    prev, cur = Q, (Z @ W - half * Q) / half                # T_0, T_1 of (M - e/2) / (e/2) on Q
    out = cur
    for d in range(2, int(degree.max()) + 1):
        scale = torch.linalg.vector_norm(cur, dim=-2, keepdim=True).clamp(min=torch.finfo(Z.dtype).tiny)
        prev, cur = prev / scale, cur / scale
        prev, cur = cur, 2 * (Z @ t_mul(Z, cur) - half * cur) / half - prev
        out = torch.where((degree == d)[:, None, None], cur, out)
    th, Q, _ = _ritz(Z, _orth(out))
    if bool(exact.any()):
        # a filter this long would cost more than the exact solve: those layers take the top b
        # pairs of a dense solve
        where = exact.nonzero().squeeze(1)
        th[where], Q[where] = top_r_dense(as_dense(Z[where]), b)
    return th, Q, degree
