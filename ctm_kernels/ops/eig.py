"""Batched symmetric eigensolves of the engine (whitening, HOSVD and HOOI steps).

* :func:`eigh_batched` - full decomposition, ascending like ``torch.linalg.eigh``. On the
  CPU it uses the compiled cyclic Jacobi of csrc/ (``torch.ops.ctm_kernels.jacobi_eigh``)
  where that was measured faster than LAPACK, and ``torch.linalg.eigh`` elsewhere.
* :func:`topk_eigh` - the ``k`` largest eigenpairs, descending. On the CPU, where measured
  faster, LAPACK's partial solver (``?syevr`` with an index range, through scipy) computes
  only those ``k``; with a starting block ``X0`` it can run the warm-started
  :func:`subspace_topk`.
* :func:`subspace_topk` - block subspace iteration with Rayleigh-Ritz for the top ``k``
  eigenpairs of positive semidefinite matrices, batched over layers.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from .. import backend as _backend
from ._common import check, check_tensor

# Where the compiled Jacobi beats torch.linalg.eigh, measured with
# benchmarks/bench_eig_cpu.py (wall clock, medians of 5, default threads, batch 256) on
# this project's CPU machine (2-core AMD EPYC, AVX2, torch 2.13 with MKL; the machine was
# shared and loaded, load average ~5); benchmarks/results/eig_cpu.json:
#
#   n      float64 eigh / jacobi (us per matrix)   float32 eigh / jacobi
#   4         4.1 /    1.9  (x2.2)                    1.9 /    0.7  (x2.8)
#   8        27.2 /   26.8  (x1.0)                    5.6 /    4.8  (x1.2)
#   12       52.0 /   50.6  (x1.0)                   46.9 /   46.6  (x1.0)
#   16       96.1 /  139.1  (x0.7)                   80.1 /   97.8  (x0.8)
#   24      174.8 /  294.5  (x0.6)                  117.5 /  298.6  (x0.4)
#   64     4018.8 / 5310.1  (x0.8)                 2110.5 / 5579.6  (x0.4)
#
# (At n = 32..48 the Jacobi won some runs only because MKL's threads thrashed on the
# loaded machine; single-thread CPU time there is ~100 us for eigh against ~300-400 us
# for the Jacobi at n = 32, so those sizes stay with LAPACK.) Jacobi costs ~8 sweeps of
# O(n^3) rotations against LAPACK's tridiagonal route, so it only pays for small n, where
# the per-matrix overhead of the LAPACK calls dominates and the Jacobi runs vectorised over
# 4 (float64) or 8 (float32) matrices at a time on both cores. On the GPU the CUDA Jacobi
# is not used automatically until measured (benchmarks/gpu_check.sh reports it), so
# JACOBI_MAX_N has no CUDA entry.
JACOBI_MAX_N = {("cpu", torch.float64): 12, ("cpu", torch.float32): 12}
JACOBI_MIN_BATCH = 8

# topk_eigh with a warm start switches to subspace iteration from this size on, None:
# never automatically. Measured by bench_eig_cpu.py (4 layers, k = 16, start = exact
# subspace + 1e-3 noise, spectra of Z Z^T with 40 nonzero eigenvalues): p = 256 dense
# 233 ms / subspace 841 ms (46 steps), p = 512 1311 ms / 2606 ms (92 steps); the gap
# lambda_{b+1} / lambda_k of such spectra makes plain subspace iteration slow, so the
# engine keeps the dense solve and the iteration is only used on request
# (method="subspace").
SUBSPACE_MIN_P = None

# topk_eigh takes LAPACK's partial solver (?syevr with an index range: tridiagonal reduction,
# then bisection and inverse iteration for the k wanted pairs only, which skips the
# back-transform of all p eigenvectors; one OpenBLAS thread)
# for p x p matrices with p in PARTIAL_P[torch threads] and k <= PARTIAL_MAX_SHARE * p.
# Measured by benchmarks/bench_partial_eigh.py (results/partial_eigh_cpu.json: full-rank
# Z Z^T with flat and steep spectra, each solve right after a torch product, medians of 9),
# full / partial:
#   1 thread, k = 16: p = 128 0.6-0.8x, 192 0.8-1.0x, 256 1.09-1.31x, 512 1.49-1.83x,
#     2048 1.56-1.90x; k = 64: p = 256 0.51-0.70x, 512 0.97-1.18x, 1024 1.32-1.54x;
#   2 threads, k = 16: p = 256-512 0.89-1.52x (flat 1.11-1.52x), 1024-2048 0.86-1.12x (both
#     threads of the full solve pay off there); k = 64 0.40-1.05x.
# Not measured above 2 threads, where the full solve has more threads to use: full there.
# In the engine (gaussian 1024^2, T = 32: 512 x 512 half-steps, k = 16), 3.17 -> 2.42 s on 2
# threads and 4.46 -> 2.84 s on 1. CTM_KERNELS_TOPK_EIGH=full|partial forces one route for
# topk_eigh's "auto" (partial on a tensor it cannot take, a CUDA one, raises).
PARTIAL_P = {1: (256, None), 2: (256, 1024)}     # [lo, hi) by torch.get_num_threads()
PARTIAL_MAX_SHARE = 1 / 16

METHODS = ("auto", "lapack", "jacobi")  # eigh_batched; topk_eigh also takes "subspace", "partial"


def _jacobi_pays(M: torch.Tensor) -> bool:
    n = M.shape[-1]
    batch = M.numel() // max(1, n * n)
    limit = JACOBI_MAX_N.get((M.device.type, M.dtype), 0)
    return 0 < n <= limit and batch >= JACOBI_MIN_BATCH and _backend.compiled_op("jacobi_eigh", M.device)


def eigh_batched(M, *, method="auto"):
    """M ``[L, p, p]`` symmetric -> (evals ``[L, p]`` ascending, evecs ``[L, p, p]``).

    ``method``: "auto" (Jacobi where measured faster, see JACOBI_MAX_N), "lapack"
    (``torch.linalg.eigh``) or "jacobi" (the compiled op; ValueError if not built)."""
    check(method in METHODS, "eig", f"method must be one of {METHODS}, got {method!r}")
    if method == "jacobi":
        check(_backend.compiled_op("jacobi_eigh", M.device), "eig",
              f"method='jacobi' needs the compiled ops (pip install -e . --no-build-isolation) with a {M.device.type} kernel")
        return torch.ops.ctm_kernels.jacobi_eigh(M)
    if method == "auto" and _jacobi_pays(M):
        return torch.ops.ctm_kernels.jacobi_eigh(M)
    return torch.linalg.eigh(M)


def _scipy_linalg():
    try:
        import scipy.linalg
    except ImportError:
        return None
    return scipy.linalg


# threadpoolctl's limit is process-wide and restores what it found on entry: two overlapping
# limits from two Python threads left OpenBLAS at one thread for good. Partial solves therefore
# take turns.
_blas_lock = threading.Lock()


@functools.cache
def _blas_controller():
    """threadpoolctl's handle on the loaded BLAS libraries (None without threadpoolctl), built
    once, after scipy's LAPACK is loaded: building it scans the loaded libraries (0.55 ms), a
    limit on the built one costs 13 us."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")


@contextlib.contextmanager
def _one_blas_thread():
    """A context that runs scipy's BLAS/LAPACK on one thread (no limit without threadpoolctl),
    one caller at a time (``_blas_lock``). The partial solve is mostly the tridiagonal
    reduction, which gained little from a second thread, and a multi-threaded OpenBLAS competes
    with torch's OpenMP workers, which keep spinning after each torch op: at p = 512, float32,
    2 threads, after a torch product, 12.7 ms on two OpenBLAS threads against 8.4 ms on one."""
    controller = _blas_controller()
    with _blas_lock, (contextlib.nullcontext() if controller is None else controller.limit(limits=1)):
        yield


def _partial_pays(M, k) -> bool:
    p = M.shape[-1]
    lo, hi = PARTIAL_P.get(torch.get_num_threads(), (None, None))
    return (M.device.type == "cpu" and M.dtype in (torch.float32, torch.float64) and not M.requires_grad
            and lo is not None and lo <= p < (hi or p + 1) and 0 < k <= PARTIAL_MAX_SHARE * p
            and _scipy_linalg() is not None)


def partial_topk(M, k):
    """Top-``k`` pairs of each symmetric CPU ``M [..., p, p]`` (float32 or float64) from LAPACK's
    ``?syevr`` with an index range -> (evals ``[..., k]`` descending, evecs ``[..., p, k]``). A
    matrix the partial solver refuses (non-finite entries) or fails on is solved by
    ``torch.linalg.eigh``, so errors and their messages are torch's. Not differentiable: a
    tensor that requires grad is refused (``topk_eigh``'s auto gives it the full solve)."""
    check(isinstance(M, torch.Tensor) and M.dim() >= 2 and M.shape[-1] == M.shape[-2], "eig",
          f"M must be [..., p, p], got {tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
    check(M.dtype in (torch.float32, torch.float64), "eig", f"the partial eigensolver takes float32 or float64, got {M.dtype}")
    check(M.device.type == "cpu", "eig", f"the partial eigensolver runs on the CPU, M is on {M.device}")
    check(not M.requires_grad, "eig", "the partial eigensolver is not differentiable; use method='lapack'")
    p = M.shape[-1]
    check(isinstance(k, int) and 0 <= k <= p, "eig", f"k must be in [0, {p}], got {k!r}")
    sl = _scipy_linalg()
    check(sl is not None, "eig", "the partial eigensolver needs scipy (pip install scipy)")
    batch = M.shape[:-2]
    Ms = M.reshape(-1, p, p)
    w = M.new_full((Ms.shape[0], k), float("nan"))
    Q = M.new_full((Ms.shape[0], p, k), float("nan"))
    if k > 0:
        with _one_blas_thread():
            for l in range(Ms.shape[0]):
                try:
                    wl, Ql = sl.eigh(Ms[l].numpy(), subset_by_index=[p - k, p - 1], driver="evr")
                except (ValueError, sl.LinAlgError):
                    wl, Ql = (X[..., p - k:] for X in torch.linalg.eigh(Ms[l]))
                w[l] = torch.as_tensor(wl).flip(-1)
                Q[l] = torch.as_tensor(Ql).flip(-1)
    return w.reshape(*batch, k), Q.reshape(*batch, p, k)


def topk_eigh(M, k, *, X0=None, method="auto", tol=1e-9, max_iter=100):
    """M ``[L, p, p]`` symmetric -> (evals ``[L, k]`` descending, evecs ``[L, p, k]``); the
    full and partial routes take any batch shape ``[..., p, p]``.

    ``method``: "auto" (the partial solver where measured faster, see PARTIAL_P; else a
    full decomposition by :func:`eigh_batched`), "partial" (:func:`partial_topk`; raises where
    it cannot run), "lapack", "jacobi" (a full decomposition by that route) or "subspace".
    ``$CTM_KERNELS_TOPK_EIGH`` (``full`` or ``partial``) overrides "auto"'s choice.
    ``X0 [L, p, k0]``: optional starting block (e.g. the previous iterate of an outer
    loop); when given with ``method="subspace"`` (or ``p >= SUBSPACE_MIN_P``), the top
    pairs come from :func:`subspace_topk` (M must then be positive semidefinite), with a
    dense solve for any layer that did not converge."""
    check(isinstance(k, int) and 0 <= k <= M.shape[-1], "eig", f"k must be in [0, {M.shape[-1]}], got {k!r}")
    check(method in METHODS + ("subspace", "partial"), "eig",
          f"method must be one of {METHODS + ('subspace', 'partial')}, got {method!r}")
    auto = method == "auto" and SUBSPACE_MIN_P is not None and M.shape[-1] >= SUBSPACE_MIN_P
    use_subspace = X0 is not None and (method == "subspace" or auto)
    if method == "auto" and not use_subspace:
        forced = os.environ.get("CTM_KERNELS_TOPK_EIGH") or None
        check(forced in (None, "full", "partial"), "eig",
              f"CTM_KERNELS_TOPK_EIGH must be 'full' or 'partial', got {forced!r}")
        if forced == "partial" or (forced is None and _partial_pays(M, k)):
            method = "partial"
    if method == "partial":
        return partial_topk(M, k)
    if use_subspace and k > 0:
        w, Q, _, ok = subspace_topk(M, k, X0, tol=tol, max_iter=max_iter)
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten()
            wd, Qd = torch.linalg.eigh(M[bad])
            w[bad], Q[bad] = wd.flip(-1)[..., :k], Qd.flip(-1)[..., :k]
        return w, Q
    w, Q = eigh_batched(M, method="auto" if method == "subspace" else method)
    return w.flip(-1)[..., :k], Q.flip(-1)[..., :k]


def subspace_topk(M, k, X0, *, tol=1e-9, max_iter=100, oversample=None):
    """Top-``k`` eigenpairs of positive semidefinite ``M [L, p, p]`` by block subspace
    iteration with Rayleigh-Ritz, started from ``X0 [L, p, k0]``.

    The block has ``b = min(p, k + oversample)`` columns (default oversample
    ``max(4, k // 2)``): ``X0``'s columns, completed with seeded random ones. Each step is one
    product ``M X`` (``O(p^2 b)``), a QR and a ``b x b`` eigensolve; a layer stops when every
    residual ``||M x_i - theta_i x_i||`` is at most ``tol * theta_1``. The error of a pair
    shrinks like ``(lambda_{b+1} / lambda_i)`` per step, so a close start needs few steps.

    Returns (evals ``[L, k]`` descending, evecs ``[L, p, k]``, steps ``[L]`` int,
    converged ``[L]`` bool)."""
    check_tensor(M, "eig", "M", 3, (torch.float32, torch.float64))
    check_tensor(X0, "eig", "X0", 3, (torch.float32, torch.float64))
    L, p, _ = M.shape
    check(X0.shape[0] == L and X0.shape[1] == p, "eig", f"X0 must be [{L}, {p}, k0], got {tuple(X0.shape)}")
    check(isinstance(k, int) and 1 <= k <= p, "eig", f"k must be in [1, {p}], got {k!r}")
    if oversample is None:
        oversample = max(4, k // 2)
    b = min(p, k + oversample)
    X = X0.to(M.dtype)[..., :b]
    if X.shape[-1] < b:
        gen = torch.Generator(device="cpu").manual_seed(0)
        extra = torch.randn((L, p, b - X.shape[-1]), generator=gen, dtype=M.dtype).to(M.device)
        X = torch.cat([X, extra], -1)
    X = torch.linalg.qr(X).Q
    steps = torch.zeros(L, dtype=torch.int64, device=M.device)
    done = torch.zeros(L, dtype=torch.bool, device=M.device)
    theta = torch.zeros((L, b), dtype=M.dtype, device=M.device)
    for _ in range(max_iter + 1):
        MX = M @ X                                              # [L, p, b]
        H = X.mT @ MX
        th, V = torch.linalg.eigh((H + H.mT) / 2)
        th, V = th.flip(-1), V.flip(-1)                          # descending Ritz values
        Xr, MXr = X @ V, MX @ V
        res = (MXr[..., :k] - Xr[..., :k] * th[:, None, :k]).norm(dim=1)     # [L, k]
        ok = (res <= tol * th[:, :1].abs().clamp(min=torch.finfo(M.dtype).tiny)).all(-1)
        # frozen layers keep their converged pairs; the others take this step
        keep = done[:, None, None]
        X = torch.where(keep, X, Xr)
        theta = torch.where(done[:, None], theta, th)
        done = done | ok
        if bool(done.all()):
            break
        steps = steps + (~done).long()
        X = torch.where(done[:, None, None], X, torch.linalg.qr(MXr).Q)
    return theta[:, :k].clone(), X[..., :k].clone(), steps, done
