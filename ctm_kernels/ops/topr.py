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
  engine gives the factored route at most the steps that a dense solve would cost.
"""
from __future__ import annotations

import math

import torch

from ._common import check, check_tensor
from .eig import topk_eigh

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


# Z Z^T by block rows up to the diagonal (the rest mirrored): 5/8 of the products with 4
# blocks. Measured, 2 threads (fp64 / fp32): k = p = 512 2.3 -> 1.4 / 0.9 -> 0.8 ms,
# k = 1024, p = 4096 50.5 -> 36.5 / 26.6 -> 18.8 ms, k = 2048, p = 8192 405 -> 276 / 207 ->
# 141 ms; exactly the full product at p = k, within 3e-16 / 2e-7 (relative) at p = 4 k.
GRAM_BLOCKS = 4
GRAM_BLOCKS_MIN_K = 512


def gram_rows(Z):
    """``Z Z^T`` ``[L, k, k]`` for ``Z [L, k, p]``, by ``GRAM_BLOCKS`` block rows from
    ``GRAM_BLOCKS_MIN_K`` on (each block row multiplied only up to the diagonal, the upper part
    mirrored, so the result is exactly symmetric)."""
    L, k, _ = Z.shape
    if k < GRAM_BLOCKS_MIN_K:
        return Z @ Z.mT
    b = -(-k // GRAM_BLOCKS)
    M = Z.new_empty(L, k, k)
    for i in range(0, k, b):
        e = min(i + b, k)
        M[:, i:e, :e] = Z[:, i:e] @ Z[:, :e].mT
        M[:, :i, i:e] = M[:, i:e, :i].mT
    return M


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
