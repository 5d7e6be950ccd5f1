"""One layer: CtM fast path vs Merge-then-Compress vs full-parameter merging vs core-space MtC
vs the fp64 dense reference, sweeping m = n, T, r (and the adapter kind and dtype).

Per configuration, correctness first:
* the CtM subspace is checked densely: ``U`` must span the top-r eigenspace of
  ``sum_t X_t V V^T X_t^T`` (sine of the largest principal angle <= 50 * tol) and ``V``
  likewise; with ``sum`` at rank >= R the merged update must equal the dense sum (1e-5);
* where it fits (m <= --ref-max), the fast path must match the fp64 reference at tight tol.
Then every method is timed side by side in the same process (medians of --repeat runs) and,
in a fresh process each, its peak RSS above the process's RSS once the inputs exist (the
peak is reset there, so the import of torch does not hide small peaks).

    python benchmarks/bench_layer.py                         # the default sweep (CPU)
    python benchmarks/bench_layer.py --quick                 # a small smoke run
    python benchmarks/bench_layer.py --sizes 2048 --T 8 --r 16 --kinds gaussian,structured
    python benchmarks/bench_layer.py --device cuda --sizes 4096 --T 8,32 --no-mem   # GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ctm_kernels as ck  # noqa: E402
from ctm_kernels import reference as ref  # noqa: E402
from benchmarks.common import (header, median_time, peak_rss_mib, reset_peak_rss, rss_mib, run_child, table,
                               write_json)  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
METHODS = ["ctm", "ctm_remerge", "mtc_full_svd", "full_param", "core_mtc", "reference"]


def make_adapters(kind, m, n, T, r, dtype, device, seed=0):
    """T rank-r adapters: ``gaussian`` (no shared structure: the slowest case for HOOI) or
    ``structured`` (4 directions shared by all adapters plus task-specific ones)."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, n, generator=g) / n ** 0.5 for _ in range(T)]
    B = [torch.randn(m, r, generator=g) / m ** 0.5 for _ in range(T)]
    if kind == "structured":
        k = min(4, r)
        Us = torch.randn(m, k, generator=g) / m ** 0.5
        Vs = torch.randn(k, n, generator=g) / n ** 0.5
        for t in range(T):
            B[t][:, :k] = 3 * Us @ torch.randn(k, k, generator=g) / k ** 0.5 + 0.3 * B[t][:, :k]
            A[t][:k] = 3 * Vs + 0.3 * A[t][:k]
    elif kind != "gaussian":
        raise ValueError(f"unknown adapter kind {kind!r}")
    return [a.to(device, dtype) for a in A], [b.to(device, dtype) for b in B]


def dense(A, B):
    """``[T, m, n]`` updates in the factors' dtype (what MtC pipelines build)."""
    return torch.stack([b @ a for a, b in zip(A, B)])


def run_method(name, A, B, rank, rule, params, tol):
    """The computation each benchmark row names, end to end from the factors."""
    if name == "ctm":
        out = ck.merge_layer(A, B, rank=rank, method=rule, tol=tol, **params)
        return out.B, out.A
    if name == "mtc_full_svd":
        return ref.mtc(dense(A, B), rank, rule, **params)
    if name == "full_param":
        return ref.full_merge(dense(A, B), rule, **params)
    if name == "core_mtc":
        return ref.core_mtc(A, B, rank, rule, **params)
    if name == "reference":
        return ref.ctm(ref.dense_updates(A, B), rank, rule, tol=tol, **params).dW
    raise KeyError(name)


def check(A, B, rank, rule, params, tol, ref_max):
    """Correctness of the fast path on these very inputs; raises on failure."""
    m, n = B[0].shape[0], A[0].shape[1]
    plan = ck.prepare(A, B, rank=rank, tol=tol)
    U, V = plan.bases()
    dWs = ref.dense_updates(A, B)
    total = dWs.sum(0)
    X = ref.subspace_weights(torch.linalg.matrix_norm(dWs), 0.0)[:, None, None] * dWs
    XV = X @ V
    Ut = ref.top_eigvecs(torch.einsum("tmr,tkr->mk", XV, XV), rank)[1]
    XU = X.mT @ U
    Vt = ref.top_eigvecs(torch.einsum("tnr,tkr->nk", XU, XU), rank)[1]
    s_u, s_v = ref.sin_angle(Ut, U).item(), ref.sin_angle(Vt, V).item()
    if max(s_u, s_v) > 50 * tol:
        raise AssertionError(f"CtM subspace is not a HOOI fixed point: sin = {s_u:.2e}, {s_v:.2e}")
    R = sum(a.shape[0] for a in A)
    full = ck.merge_layer(A, B, rank=min(R, m, n), method="sum")
    err_sum = ((full.B.double() @ full.A.double() - total).norm() / total.norm()).item()
    if R <= min(m, n) and err_sum > 1e-5:
        raise AssertionError(f"CtM sum at full rank differs from the dense sum: {err_sum:.2e}")
    out = {"fixed_point_sin": max(s_u, s_v), "full_rank_sum_relerr": err_sum}
    if m <= ref_max:
        want = ref.ctm(dWs, rank, rule, stop="subspace", tol=1e-10, max_iter=20000, **params).dW
        got = ck.merge_layer(A, B, rank=rank, method=rule, stop="subspace", tol=1e-10, max_iter=20000, **params)
        err = ((got.B.double() @ got.A.double() - want).norm() / want.norm()).item()
        if err > 1e-4:
            raise AssertionError(f"CtM differs from the fp64 reference: {err:.2e}")
        out["reference_relerr"] = err
    return out


def mem_child(argv):
    """``--mem-child METHOD KIND m T r dtype rule tol``: peak RSS increment of one method."""
    method, kind, m, T, r, dt, rule, tol = argv
    m, T, r, tol = int(m), int(T), int(r), float(tol)
    A, B = make_adapters(kind, m, m, T, r, DTYPES[dt], "cpu")
    params = {"top_k": 0.2} if rule in ("ties", "dare_ties") else {}
    gc.collect()
    if method == "ctm_remerge":
        plan = ck.prepare(A, B, rank=r, tol=tol)
    reset_peak_rss()
    base = rss_mib()
    if method == "ctm_remerge":
        plan.merge(rule, **params)
    else:
        run_method(method, A, B, r, rule, params, tol)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "baseline_mib": base}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024,2048,4096", help="m = n values")
    p.add_argument("--T", default="8,32", help="numbers of adapters")
    p.add_argument("--r", default="16", help="ranks (adapters' and target's)")
    p.add_argument("--kinds", default="structured,gaussian")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--rule", default="ties")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-max", type=int, default=256, help="largest m checked against the fp64 reference")
    p.add_argument("--mtc-max", type=int, default=4096, help="largest m at which MtC is timed")
    p.add_argument("--full-max-elems", type=float, default=2.2e8, help="largest T*m*n built densely")
    p.add_argument("--no-mem", action="store_true", help="skip the per-method peak-RSS runs")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--out", default=None)
    p.add_argument("--mem-child", nargs=8, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.mem_child:
        return mem_child(a.mem_child)
    if a.quick:
        a.sizes, a.T, a.r, a.repeat, a.kinds = "256,512", "4,8", "8", 1, "structured"
    dtype = DTYPES[a.dtype]
    params = {"top_k": 0.2} if a.rule in ("ties", "dare_ties") else {}
    rows = []
    for kind in a.kinds.split(","):
        for m in map(int, a.sizes.split(",")):
            for T in map(int, a.T.split(",")):
                for r in map(int, a.r.split(",")):
                    A, B = make_adapters(kind, m, m, T, r, dtype, a.device)
                    row = {"kind": kind, "m": m, "T": T, "r": r, "dtype": a.dtype, "rule": a.rule}
                    row.update(check(A, B, r, a.rule, params, a.tol, a.ref_max))
                    row["hooi_iterations"] = ck.prepare(A, B, rank=r, tol=a.tol).info.iterations
                    dense_ok = T * m * m <= a.full_max_elems
                    for meth in METHODS:
                        if meth in ("mtc_full_svd", "full_param") and (not dense_ok or m > a.mtc_max):
                            continue
                        if meth == "reference" and (m > a.ref_max or T > 16):
                            continue
                        if meth == "core_mtc" and T * r > 2048:
                            continue
                        if meth == "ctm_remerge":
                            plan = ck.prepare(A, B, rank=r, tol=a.tol)
                            fn = lambda: plan.merge(a.rule, **params)
                        else:
                            fn = lambda: run_method(meth, A, B, r, a.rule, params, a.tol)
                        reps = 1 if meth in ("reference", "mtc_full_svd", "full_param") and m >= 2048 else a.repeat
                        row[f"{meth}_s"] = median_time(fn, repeat=reps, warmup=0 if reps == 1 else 1, device=a.device)
                        if not a.no_mem and a.device == "cpu":
                            res = run_child([__file__, "--mem-child", meth, kind, str(m), str(T), str(r), a.dtype,
                                             a.rule, str(a.tol)])
                            row[f"{meth}_mib"] = round(res["peak_rss_mib"] - res["baseline_mib"], 1)
                    for meth in ("mtc_full_svd", "full_param", "core_mtc", "reference"):
                        if f"{meth}_s" in row:
                            row[f"speedup_vs_{meth}"] = row[f"{meth}_s"] / row["ctm_s"]
                    rows.append(row)
                    print(table([row], ["kind", "m", "T", "r", "hooi_iterations", "ctm_s", "ctm_remerge_s",
                                        "mtc_full_svd_s", "full_param_s", "core_mtc_s", "reference_s",
                                        "speedup_vs_mtc_full_svd"]), flush=True)
                    gc.collect()
    cols = ["kind", "m", "T", "r", "hooi_iterations", "ctm_s", "ctm_remerge_s", "mtc_full_svd_s", "full_param_s",
            "core_mtc_s", "reference_s", "speedup_vs_mtc_full_svd", "ctm_mib", "mtc_full_svd_mib", "core_mtc_mib"]
    print("\n" + table(rows, cols))
    name = f"layer_{a.device}{'_quick' if a.quick else ''}.json"
    path = write_json(name, {**header(), "args": vars(a), "rows": rows}, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
