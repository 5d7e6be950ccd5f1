"""Where the time of one small-layer merge goes, and whether a second-order solve of the
Tucker-2 problem would cut it (docs/DESIGN.md section 9).

For each case (one layer, fp32 adapters, rank 16, TIES), in one process:

* MtC with a full SVD and CtM (``merge_layer``), medians of ``--repeat``; CtM split into
  its subspace solve and everything else (Grams, whitening, coordinates, rule, lift).
* The cost of one dense top-r eigensolve of the solve's ``k x k`` matrix (float64 and
  float32), and the ratio MtC / CtM would have if every sweep cost only its two
  eigensolves: an upper bound for any HOOI-type solver with the engine's sweep count.
* A Riemannian trust-region Newton solve (truncated CG on the exact Hessian of
  ``sum_t ||U^T X_t V||^2`` over both Grassmannians, preconditioned by its U-U and V-V
  blocks in their eigenbases), started after ``--rtr-after`` plain HOOI sweeps. It must reach
  the engine's fixed point (checked against a tight-tol engine solve by principal angles)
  before its time counts. Also reported: where it goes when started from the HOSVD point.

    python benchmarks/bench_solver.py                       # 2048^2, T = 8, both kinds
    python benchmarks/bench_solver.py --cases gaussian:1024:8 --repeat 3
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ctm_kernels as ck  # noqa: E402
from ctm_kernels import engine  # noqa: E402
from ctm_kernels import reference as ref  # noqa: E402
from ctm_kernels.reference import sin_angle  # noqa: E402
from benchmarks.bench_layer import dense, make_adapters  # noqa: E402
from benchmarks.common import header, median_time, table, write_json  # noqa: E402

RANK = 16


@contextlib.contextmanager
def recording_solves(log):
    """Record the arguments, result and wall time of every ``engine.solve_subspace`` call."""
    original = engine.solve_subspace

    def recorded(*args, **kw):
        t0 = time.perf_counter()
        out = original(*args, **kw)
        log.append({"args": args, "kw": kw, "out": out, "seconds": time.perf_counter() - t0})
        return out

    engine.solve_subspace = recorded
    try:
        yield log
    finally:
        engine.solve_subspace = original


class Tucker2Problem:
    """``f(U, V) = sum_t ||U^T M_t V||^2`` with ``M_t = P_t Q_t^T`` in the engine's whitened
    coordinates: ``P = Rb [1, k, R]``, ``Q = Ra c [1, k', R]`` (``rb`` columns per adapter).
    ``at(U, V)`` fixes the point; ``grad`` and ``hess`` are half the Riemannian gradient and
    Hessian (the factor cancels in the Newton step)."""

    def __init__(self, P, Q, T):
        self.P, self.Q, self.T = P, Q, T
        self.rb = P.shape[-1] // T

    def _blocks(self, X):                        # [1, R, r] -> [1, T, rb, r]
        return X.reshape(X.shape[0], self.T, self.rb, -1)

    def value(self, U, V):
        a, b = self._blocks(self.P.mT @ U), self._blocks(self.Q.mT @ V)
        return float(((a.mT @ b) ** 2).sum())

    def at(self, U, V):
        self.U, self.V = U, V
        self.a, self.b = self._blocks(self.P.mT @ U), self._blocks(self.Q.mT @ V)
        self.core = self.a.mT @ self.b                                      # [1, T, r, r]
        r = U.shape[-1]
        EU = self.P @ (self.b @ self.core.mT).reshape(1, -1, r)            # G_U(V) U
        EV = self.Q @ (self.a @ self.core).reshape(1, -1, r)               # G_V(U) V
        self.SU, self.SV = U.mT @ EU, V.mT @ EV
        self.grad = (EU - U @ self.SU, EV - V @ self.SV)
        self.f = float((self.core ** 2).sum())
        self._preconditioner(EU, EV)

    def hess(self, xi, eta):
        r = xi.shape[-1]
        px, qe = self._blocks(self.P.mT @ xi), self._blocks(self.Q.mT @ eta)
        dcore = self.a.mT @ qe + px.mT @ self.b
        DU = self.P @ (qe @ self.core.mT + self.b @ dcore.mT).reshape(1, -1, r)
        DV = self.Q @ (px @ self.core + self.a @ dcore).reshape(1, -1, r)
        return (DU - self.U @ (self.U.mT @ DU) - xi @ self.SU,
                DV - self.V @ (self.V.mT @ DV) - eta @ self.SV)

    def _preconditioner(self, EU, EV):
        """Inverse of the U-U and V-V blocks of ``-hess``: ``xi -> xi S - P_perp G xi P_perp``
        is diagonal (``w_j - mu_i``) in the eigenbases of ``S`` and of ``G`` on the complement;
        two full eigensolves per side, as many as one HOOI sweep."""
        self.pre = []
        for U, Pm, Qm, other in ((self.U, self.P, self.Q, self.V), (self.V, self.Q, self.P, self.U)):
            r = U.shape[-1]
            Z = engine.half_step_images(Pm, Qm, other, self.T).dense()
            perp = torch.linalg.qr(U, mode="complete").Q[..., r:]
            ZP = Z.mT @ perp
            mu, Wr = torch.linalg.eigh(ZP.mT @ ZP)
            ZU = Z.mT @ U
            w, Y = torch.linalg.eigh(ZU.mT @ ZU)
            den = (w[:, None, :] - mu[:, :, None]).abs().clamp(min=1e-12 * float(w.abs().max()))
            self.pre.append((perp @ Wr, Y, den))

    def precondition(self, xi, eta):
        return tuple(W @ ((W.mT @ x @ Y) / den) @ Y.mT for (W, Y, den), x in zip(self.pre, (xi, eta)))


def _dot(x, y):
    return float((x[0] * y[0]).sum() + (x[1] * y[1]).sum())


def _axpy(a, x, y):
    return (y[0] + a * x[0], y[1] + a * x[1])


def rtr(problem, U, V, *, gtol=1e-10, max_outer=200, max_cg=300):
    """Riemannian trust region with Steihaug-Toint truncated CG (preconditioned, trust region in
    the preconditioner's norm). Returns ``U, V, outer iterations, CG iterations, eigensolves``."""
    problem.at(U, V)
    eigensolves, cg_total, delta = 4, 0, None
    for outer in range(1, max_outer + 1):
        g = problem.grad
        z = problem.precondition(*g)
        rz = _dot(g, z)
        if _dot(g, g) ** 0.5 <= gtol * problem.f:
            return U, V, outer - 1, cg_total, eigensolves
        if delta is None:   # first step: a preconditioned gradient step of Euclidean length 0.3
            delta = rz ** 0.5 * min(1.0, 0.3 / _dot(z, z) ** 0.5)
        # minimise -<g, s> - 1/2 <H s, s> in ||s||_P <= delta (Conn, Gould and Toint, alg. 7.5.1)
        s = (torch.zeros_like(g[0]), torch.zeros_like(g[1]))
        res, p = g, z
        ss, sp, pp = 0.0, 0.0, rz
        r0 = _dot(g, g) ** 0.5
        hit_boundary = False
        for _ in range(max_cg):
            cg_total += 1
            Hp = problem.hess(*p)
            pAp = -_dot(p, Hp)
            alpha = rz / pAp if pAp > 0 else float("inf")
            if pAp <= 0 or ss + 2 * alpha * sp + alpha ** 2 * pp >= delta ** 2:
                tau = (-sp + (sp ** 2 + pp * (delta ** 2 - ss)) ** 0.5) / pp
                s = _axpy(tau, p, s)
                hit_boundary = True
                break
            s = _axpy(alpha, p, s)
            res = _axpy(alpha, Hp, res)             # residual of (-H) s = g
            ss += 2 * alpha * sp + alpha ** 2 * pp
            rn = _dot(res, res) ** 0.5
            if rn <= r0 * min(0.1, r0):              # superlinear forcing term
                break
            z = problem.precondition(*res)
            rz, rz_old = _dot(res, z), rz
            beta = rz / rz_old
            sp = beta * (sp + alpha * pp)
            pp = rz + beta ** 2 * pp
            p = _axpy(beta, p, z)
        Hs = problem.hess(*s)
        model = _dot(g, s) + 0.5 * _dot(s, Hs)        # predicted half increase
        U1, V1 = torch.linalg.qr(U + s[0]).Q, torch.linalg.qr(V + s[1]).Q
        rho = (problem.value(U1, V1) - problem.f) / 2 / model if model > 0 else -1.0
        if rho < 0.25:
            delta /= 4
        elif rho > 0.75 and hit_boundary:
            delta *= 2
        if rho > 0.1:
            U, V = U1, V1
            problem.at(U, V)
            eigensolves += 4
    return U, V, max_outer, cg_total, eigensolves


def hooi_sweeps(P, Pc, Q, Qc, T, U, V, count):
    """Plain HOOI sweeps in whitened coordinates (the engine's half-step)."""
    for _ in range(count):
        U = engine._top_r(engine.half_step_images(P, Qc, V, T).dense(), RANK, engine.DEFAULT_SOLVER)[1]
        V = engine._top_r(engine.half_step_images(Q, Pc, U, T).dense(), RANK, engine.DEFAULT_SOLVER)[1]
    return U, V


def eigh_seconds(M, repeat):
    return median_time(lambda: torch.linalg.eigh(M), repeat=repeat, warmup=2)


def run_case(kind, m, T, a):
    A, B = make_adapters(kind, m, m, T, RANK, torch.float32, "cpu")
    row = {"kind": kind, "m": m, "T": T, "r": RANK, "rule": "ties"}
    # the answer key: the engine's fixed point at tight tol
    with recording_solves([]) as log:
        ck.prepare(A, B, rank=RANK, stop="subspace", tol=1e-10, max_iter=5000)
    tight = log[0]
    side_b, side_a, c, _, _ = tight["args"]
    c = c.to(engine.SOLVE_DTYPE)
    Uw, Vw = tight["out"].Uw, tight["out"].Vw
    cc = c.repeat_interleave(side_b.Rf.shape[-1] // T, dim=1)[:, None, :]
    P, Q = side_b.Rf, side_a.Rf
    Pc, Qc = P * cc, Q * cc
    problem = Tucker2Problem(P, Qc, T)
    row["k"] = P.shape[1]
    row["f_fixed_point"] = problem.value(Uw, Vw)

    # MtC and CtM, side by side
    row["mtc_full_svd_s"] = median_time(lambda: ref.mtc(dense(A, B), RANK, "ties"), repeat=a.mtc_repeat, warmup=1)
    with recording_solves([]) as log:
        row["ctm_s"] = median_time(lambda: ck.merge_layer(A, B, rank=RANK, method="ties"), repeat=a.repeat, warmup=1)
    solve_times = sorted(entry["seconds"] for entry in log[1:])
    row["ctm_solve_s"] = solve_times[len(solve_times) // 2]
    row["ctm_other_s"] = row["ctm_s"] - row["ctm_solve_s"]
    row["sweeps"] = log[-1]["out"].iterations[0]
    row["speedup_vs_mtc_full_svd"] = row["mtc_full_svd_s"] / row["ctm_s"]
    # one dense top-r eigensolve of the solve's own matrix, and the zero-overhead bound
    Z = engine.half_step_images(P, Qc, Vw, T).dense()
    M = Z @ Z.mT
    row["eigh_f64_ms"] = 1e3 * eigh_seconds(M, a.repeat * 4)
    row["eigh_f32_ms"] = 1e3 * eigh_seconds(M.float(), a.repeat * 4)
    floor = row["ctm_other_s"] + 2 * row["sweeps"] * min(row["eigh_f64_ms"], row["eigh_f32_ms"]) / 1e3
    row["speedup_bound_zero_overhead"] = row["mtc_full_svd_s"] / floor

    # second order: RTR after a few plain sweeps, checked against the fixed point, then timed
    def second_order(after):
        U = engine._hosvd(side_b, side_a.blocks, c, RANK, engine.DEFAULT_SOLVER)
        V = engine._hosvd(side_a, side_b.blocks, c, RANK, engine.DEFAULT_SOLVER)
        U, V = hooi_sweeps(P, Pc, Q, Qc, T, U, V, after)
        return rtr(problem, U, V)

    U, V, outer, cg, eigs = second_order(a.rtr_after)
    row["rtr_outer"], row["rtr_cg"], row["rtr_eigensolves"] = outer, cg, eigs + 4 + 2 * a.rtr_after
    row["rtr_sin_to_fixed_point"] = max(float(sin_angle(Uw, U).max()), float(sin_angle(Vw, V).max()))
    if row["rtr_sin_to_fixed_point"] > 1e-6:
        raise AssertionError(f"{kind} {m}^2 T={T}: RTR stopped {row['rtr_sin_to_fixed_point']:.1e} from the fixed point")
    row["rtr_solve_s"] = median_time(lambda: second_order(a.rtr_after), repeat=a.repeat, warmup=0)
    row["engine_eigensolves"] = 4 + 2 * row["sweeps"] + 1
    # from the HOSVD point itself: which stationary point does RTR find?
    U, V, *_ = second_order(0)
    row["rtr_from_hosvd_sin_to_fixed_point"] = max(float(sin_angle(Uw, U).max()), float(sin_angle(Vw, V).max()))
    row["rtr_from_hosvd_f"] = problem.value(U, V)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="structured:2048:8,gaussian:2048:8", help="kind:m:T,...")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--mtc-repeat", type=int, default=3)
    p.add_argument("--rtr-after", type=int, default=2, help="plain HOOI sweeps before the trust-region solve")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for case in a.cases.split(","):
        kind, m, T = case.split(":")
        rows.append(run_case(kind, int(m), int(T), a))
        print(table(rows[-1:], ["kind", "m", "T", "ctm_s", "ctm_solve_s", "sweeps", "eigh_f64_ms", "mtc_full_svd_s",
                                "speedup_vs_mtc_full_svd", "speedup_bound_zero_overhead", "rtr_solve_s",
                                "rtr_outer", "rtr_cg"]), flush=True)
    path = write_json("solver_cpu.json", {**header(), "benchmark": "bench_solver", "args": vars(a), "rows": rows}, a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
