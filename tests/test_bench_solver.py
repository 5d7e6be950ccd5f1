"""The second-order solver of benchmarks/bench_solver.py: its gradient and Hessian are those of
``f(U, V) = sum_t ||U^T M_t V||^2`` (finite differences along the retraction), and it
reaches the engine's HOOI fixed point, so the timing it reports is of the same answer."""
from __future__ import annotations

import types

import pytest
import torch

from benchmarks import bench_solver
from benchmarks.bench_layer import make_adapters
import ctm_kernels as ck


def _problem(kind, m, T):
    A, B = make_adapters(kind, m, m, T, bench_solver.RANK, torch.float64, "cpu")
    with bench_solver.recording_solves([]) as log:
        ck.prepare(A, B, rank=bench_solver.RANK, stop="subspace", tol=1e-11, max_iter=5000)
    side_b, side_a, c, _, _ = log[0]["args"]
    rb = side_b.Rf.shape[-1] // T
    Qc = side_a.Rf * c.to(torch.float64).repeat_interleave(rb, dim=1)[:, None, :]
    return bench_solver.Tucker2Problem(side_b.Rf, Qc, T), log[0]["out"]


def _tangent(U, g):
    X = torch.randn(U.shape, generator=g, dtype=U.dtype)
    return X - U @ (U.mT @ X)


def test_gradient_and_hessian_match_finite_differences():
    problem, sub = _problem("gaussian", 48, 3)
    g = torch.Generator().manual_seed(1)
    k, r = sub.Uw.shape[-2], bench_solver.RANK
    U = torch.linalg.qr(torch.randn(1, k, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(1, sub.Vw.shape[-2], r, generator=g, dtype=torch.float64)).Q
    xi, eta = _tangent(U, g), _tangent(V, g)
    problem.at(U, V)
    grad, Hxe = problem.grad, problem.hess(xi, eta)
    f = lambda t: problem.value(torch.linalg.qr(U + t * xi).Q, torch.linalg.qr(V + t * eta).Q)   # noqa: E731
    d1 = lambda h: (f(h) - f(-h)) / (2 * h)                             # noqa: E731
    d2 = lambda h: (f(h) - 2 * f(0.0) + f(-h)) / h ** 2                 # noqa: E731
    h = 1e-3   # central differences with one Richardson step: error O(h^4)
    first = (4 * d1(h / 2) - d1(h)) / 3
    second = (4 * d2(h / 2) - d2(h)) / 3
    # grad and hess are halves of the Riemannian ones; along the QR retraction the first two
    # derivatives are <grad f, s> and <Hess f[s], s> at a general point (second-order retraction)
    want_first = 2 * float((grad[0] * xi).sum() + (grad[1] * eta).sum())
    want_second = 2 * float((Hxe[0] * xi).sum() + (Hxe[1] * eta).sum())
    assert first == pytest.approx(want_first, rel=1e-6)
    assert second == pytest.approx(want_second, rel=1e-4, abs=1e-6 * abs(want_first))


@pytest.mark.parametrize("kind", ["structured", "gaussian"])
def test_trust_region_reaches_the_hooi_fixed_point(kind):
    problem, sub = _problem(kind, 64, 3)
    args = types.SimpleNamespace(repeat=1, mtc_repeat=1, rtr_after=2)
    row = bench_solver.run_case(kind, 64, 3, args)     # raises if RTR misses the fixed point
    assert row["rtr_sin_to_fixed_point"] <= 1e-6
    assert row["rtr_outer"] >= 1 and row["sweeps"] >= 1
    assert row["f_fixed_point"] == pytest.approx(problem.value(sub.Uw, sub.Vw), rel=1e-6)
    assert 0 < row["ctm_solve_s"] < row["ctm_s"]
