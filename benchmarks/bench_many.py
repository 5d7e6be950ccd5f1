"""Many adapters on one layer: time and peak RSS as T grows, CtM against the dense pipelines.

Every (method, T) runs in a fresh process (peak RSS is that process's own, reset after the
inputs exist) under a time limit; a run that does not finish or does not fit is recorded as
such. Before timing, CtM is checked against the dense fp64 reference route at the largest T
where that still fits (--check-T, --check-m, tight tol; at R > m the same outer-Gram route as
the large runs).

    python benchmarks/bench_many.py                                  # 1024^2, T = 64, 512
    python benchmarks/bench_many.py --m 2048 --T 8,32,128,512        # the scaling table
    python benchmarks/bench_many.py --quick                          # small smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ctm_kernels as ck  # noqa: E402
from ctm_kernels import engine  # noqa: E402
from ctm_kernels import reference as ref  # noqa: E402
from ctm_kernels.ops import topr  # noqa: E402
from benchmarks.bench_layer import dense, make_adapters  # noqa: E402
from benchmarks.common import header, peak_rss_mib, reset_peak_rss, rss_mib, table, write_json  # noqa: E402

METHODS = ("ctm", "ctm_dense", "mtc_full_svd", "core_mtc")   # ctm_dense: every top-r solve dense


def child(method, kind, m, T, r, threads):
    torch.set_num_threads(threads)
    A, B = make_adapters(kind, m, m, T, r, torch.float32, "cpu")
    reset_peak_rss()
    base = rss_mib()
    t0 = time.perf_counter()
    info = {}
    if method in ("ctm", "ctm_dense"):
        solver = engine.SolverSettings(exact_route="auto" if method == "ctm" else "dense")
        # count the top-r solves of each route (a factored solve's dense fallback counts there
        # too) and the factored steps, for the cost model (benchmarks/cost_model.py)
        solves = {}
        dense_fn, factored_fn = topr.top_r_dense, topr.top_r_factored

        def add(key, Z, v=1):
            key = f"{key}_{str(Z.dtype).removeprefix('torch.')}"
            solves[key] = solves.get(key, 0) + v

        def counted_dense(Z, *args, **kw):
            add("dense", Z)
            return dense_fn(Z, *args, **kw)

        def counted_factored(Z, *args, **kw):
            res = factored_fn(Z, *args, **kw)
            add("factored", Z)
            add("steps", Z, int(res[2].max()))
            return res
        topr.top_r_dense, topr.top_r_factored = counted_dense, counted_factored
        out = ck.merge_layer(A, B, rank=r, method="ties", solver=solver)
        info = {"sweeps": out.info.iterations, "converged": out.info.converged, "solves": solves}
    elif method == "mtc_full_svd":
        ref.mtc(dense(A, B), r, "ties")
    elif method == "core_mtc":
        ref.core_mtc(A, B, r, "ties")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib() - base, **info}))


def check(kind, m, T, r):
    """CtM (fast path) against the dense fp64 reference route at tight tol -> relative error.

    With ``sum``: it depends on the subspace only, not on the rotation inside it, which is
    ill-defined where the top eigenvalues are nearly degenerate (gaussian adapters; TIES is
    then ill-conditioned on either route, docs/DESIGN.md section 9)."""
    A, B = make_adapters(kind, m, m, T, r, torch.float32, "cpu")
    want = ref.ctm(ref.dense_updates(A, B), r, "sum", stop="subspace", tol=1e-9, max_iter=3000).dW
    got = ck.merge_layer(A, B, rank=r, method="sum", stop="subspace", tol=1e-9, max_iter=3000)
    return ((got.B.double() @ got.A.double() - want).norm() / want.norm()).item()


def check_routes(kind, m, T, r):
    """Every top-r solve on the factored route against every one dense, same inputs, default
    tol and at tight tol -> (sweeps factored, sweeps dense, relative difference of the merged
    ``sum`` update at tight tol)."""
    A, B = make_adapters(kind, m, m, T, r, torch.float32, "cpu")
    out = {}
    for route in ("factored", "dense"):
        solver = engine.SolverSettings(exact_route=route)
        default = ck.merge_layer(A, B, rank=r, method="sum", solver=solver)
        tight = ck.merge_layer(A, B, rank=r, method="sum", stop="subspace", tol=1e-9, max_iter=3000, solver=solver)
        out[route] = (default.info.iterations, tight.B.double() @ tight.A.double())
    diff = ((out["factored"][1] - out["dense"][1]).norm() / out["dense"][1].norm()).item()
    return out["factored"][0], out["dense"][0], diff


def fits(method, m, T, r, limit_gib):
    R = T * r
    need = {"ctm": 8 * (2 * m * R + 4 * min(m, R) * R),
            "ctm_dense": 8 * (2 * m * R + 4 * min(m, R) * R),
            "mtc_full_svd": 4 * 4 * T * m * m,           # dense updates + the rule's temporaries
            "core_mtc": 8 * (R * R * T + 2 * m * R)}[method]
    return need <= limit_gib * 2 ** 30


def growth(rows, method, key):
    """Least-squares exponent of ``key`` in T over the finished runs of ``method``."""
    pts = [(math.log(r["T"]), math.log(r[key])) for r in rows
           if r["method"] == method and r.get(key) and r[key] > 0 and r.get("status") == "ok"]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--T", default="64,512")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--kinds", default="structured,gaussian")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--check-T", type=int, default=64, help="T at which CtM is checked against the dense route")
    p.add_argument("--check-m", type=int, default=256,
                   help="m = n of that check (the dense fp64 route runs HOOI on m x m eigensolves)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--mem-limit-gib", type=float, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on a shared machine)")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        method, kind, m, T, r, threads = a.child
        return child(method, kind, int(m), int(T), int(r), int(threads))
    if a.quick:
        a.m, a.T, a.r, a.check_T, a.check_m, a.kinds = 128, "8,64", 4, 16, 64, "structured"
    rows, checks, route_checks = [], {}, {}
    name = f"many_m{a.m}{'_quick' if a.quick else ''}.json"
    for kind in a.kinds.split(","):
        err = check(kind, a.check_m, a.check_T, a.r)
        checks[kind] = err
        if err > 1e-4:
            raise AssertionError(f"{kind}: CtM differs from the dense route at T={a.check_T}: {err:.2e}")
        print(f"{kind}: CtM vs dense fp64 route at m={a.check_m}, T={a.check_T}: relative error {err:.1e}",
              flush=True)
        sw_f, sw_d, diff = check_routes(kind, a.check_m, a.check_T, a.r)
        route_checks[kind] = {"sweeps_factored": sw_f, "sweeps_dense": sw_d, "tight_relerr": diff}
        if diff > 1e-8:
            raise AssertionError(f"{kind}: factored top-r route differs from the dense one at tight tol: {diff:.2e}")
        print(f"{kind}: factored vs dense top-r route at m={a.check_m}, T={a.check_T}: sweeps {sw_f} / {sw_d}, "
              f"tight-tol merged update differs by {diff:.1e}", flush=True)
        for T in map(int, a.T.split(",")):
            for method in a.methods.split(","):
                row = {"kind": kind, "m": a.m, "T": T, "r": a.r, "R": T * a.r, "method": method}
                if not fits(method, a.m, T, a.r, a.mem_limit_gib):
                    row["status"] = f"does not fit in {a.mem_limit_gib:g} GiB"
                else:
                    try:
                        res = subprocess.run([sys.executable, __file__, "--child", method, kind, str(a.m), str(T),
                                              str(a.r), str(a.threads)], capture_output=True, text=True, timeout=a.timeout)
                        if res.returncode == 0:
                            row.update(json.loads(res.stdout.strip().splitlines()[-1]), status="ok")
                        else:
                            row["status"] = "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:120]
                    except subprocess.TimeoutExpired:
                        row["status"] = f"over {a.timeout:g} s"
                rows.append(row)
                write_json(name, {**header(), "args": vars(a), "check_relerr": checks, "route_check": route_checks, "rows": rows}, a.out)
                print(table([row], ["kind", "m", "T", "R", "method", "seconds", "peak_mib", "sweeps", "solves", "status"]),
                      flush=True)
    exps = {f"{kind}/{meth}": {"time": growth([r for r in rows if r["kind"] == kind], meth, "seconds"),
                               "memory": growth([r for r in rows if r["kind"] == kind], meth, "peak_mib")}
            for kind in a.kinds.split(",") for meth in a.methods.split(",")}
    print("\n" + table(rows, ["kind", "m", "T", "R", "method", "seconds", "peak_mib", "sweeps", "status"]))
    print("growth exponents in T (least squares over finished runs):", json.dumps(exps))
    path = write_json(name, {**header(), "args": vars(a), "check_relerr": checks, "route_check": route_checks, "rows": rows,
                             "growth_exponents": exps}, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
