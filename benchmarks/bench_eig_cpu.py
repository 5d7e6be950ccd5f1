"""Where the compiled Jacobi eigensolver (csrc/) beats torch.linalg.eigh on this CPU.

For each size n and dtype: a batch of random symmetric n x n matrices, checked first
(eigenvalues and eigenspace projectors of jacobi_eigh against torch.linalg.eigh in
float64), then both timed alternately (wall clock, median of --repeat runs, default
intra-op threads, which both use). A second table times warm-started subspace iteration
(ops.eig.subspace_topk) against a dense eigh for the top-k pairs of p x p positive
semidefinite matrices. Writes JSON (machine, versions, commit, date, results) to
benchmarks/results/eig_cpu.json or --out.

    python benchmarks/bench_eig_cpu.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_eig_cpu.py --quick    # small sizes, one repeat: a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import commit, machine, median_time, versions  # noqa: E402
from ctm_kernels import backend  # noqa: E402
from ctm_kernels.ops import eig  # noqa: E402


def sym_batch(batch, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((batch, n, n), generator=g, dtype=torch.float64)
    return ((X + X.mT) / 2).to(dtype)


def check_jacobi(M):
    """Max eigenvalue error (relative to ||M||_2) and max projector error of the spectral
    projectors onto clusters of equal eigenvalues; raises if they are off."""
    w, V = torch.ops.ctm_kernels.jacobi_eigh(M)
    w0, V0 = torch.linalg.eigh(M.double())
    scale = w0.abs().amax(-1).clamp(min=1e-300)
    ev_err = ((w.double() - w0).abs().amax(-1) / scale).max().item()
    # random spectra have no repeated eigenvalues: one-dimensional eigenspaces
    P = V.double()[..., :, None, :] * V.double()[..., None, :, :]
    P0 = V0[..., :, None, :] * V0[..., None, :, :]
    gap = (w0[..., 1:] - w0[..., :-1]).amin(-1) / scale
    proj_err = ((P - P0).abs().amax((-3, -2, -1)) * gap).max().item()   # error ~ eps / gap
    eps = torch.finfo(M.dtype).eps
    n = M.shape[-1]
    if not (ev_err < 50 * n * eps and proj_err < 50 * n * eps):
        raise AssertionError(f"jacobi_eigh disagrees with eigh at n={n} {M.dtype}: {ev_err=:.2e} {proj_err=:.2e}")
    return ev_err, proj_err


def bench_jacobi(sizes, dtypes, repeat, batch_override):
    rows = []
    for dtype in dtypes:
        for n in sizes:
            batch = batch_override or (256 if n <= 64 else 64 if n <= 128 else 16)
            M = sym_batch(batch, n, dtype, seed=n)
            ev_err, proj_err = check_jacobi(M)
            # alternate the two so that load changes hit both alike
            t_lapack, t_jacobi = [], []
            for _ in range(repeat):
                t_lapack.append(median_time(lambda: torch.linalg.eigh(M), repeat=1))
                t_jacobi.append(median_time(lambda: torch.ops.ctm_kernels.jacobi_eigh(M), repeat=1))
            row = {"dtype": str(dtype).replace("torch.", ""), "n": n, "batch": batch,
                   "eigh_us": 1e6 * statistics.median(t_lapack) / batch,
                   "jacobi_us": 1e6 * statistics.median(t_jacobi) / batch,
                   "eigval_err": ev_err, "proj_err_x_gap": proj_err}
            row["speedup"] = row["eigh_us"] / row["jacobi_us"]
            rows.append(row)
            print(f"{row['dtype']:8s} n={n:4d} batch={batch:4d}  eigh {row['eigh_us']:10.1f} us  "
                  f"jacobi {row['jacobi_us']:10.1f} us  x{row['speedup']:.2f}  (err {ev_err:.1e}, {proj_err:.1e})",
                  flush=True)
    return rows


def faster_up_to(rows, dtype):
    """Largest n such that the Jacobi was faster at every measured size up to n (0: never)."""
    best = 0
    for row in sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["n"]):
        if row["speedup"] <= 1.0:
            break
        best = row["n"]
    return best


def bench_subspace(sizes, k, layers, repeat):
    rows = []
    for p in sizes:
        g = torch.Generator().manual_seed(p)
        Z = torch.randn((layers, p, 2 * k + 8), generator=g, dtype=torch.float64)
        M = Z @ Z.mT
        w0, Q0 = torch.linalg.eigh(M)
        Q0 = Q0.flip(-1)[..., :k]
        # a warm start: the exact subspace, perturbed as by one outer iteration
        X0 = Q0 + 1e-3 * torch.randn(Q0.shape, generator=g, dtype=torch.float64)
        w, Q, steps, ok = eig.subspace_topk(M, k, X0)
        err = (Q @ Q.mT - Q0 @ Q0.mT).norm(dim=(-2, -1)).max().item()
        t_dense = median_time(lambda: torch.linalg.eigh(M), repeat=repeat)
        t_sub = median_time(lambda: eig.subspace_topk(M, k, X0), repeat=repeat)
        row = {"p": p, "k": k, "layers": layers, "dense_ms": 1e3 * t_dense, "subspace_ms": 1e3 * t_sub,
               "steps_max": int(steps.max()), "converged": bool(ok.all()), "proj_err": err}
        rows.append(row)
        print(f"subspace p={p:5d} k={k}  dense {row['dense_ms']:9.2f} ms  subspace {row['subspace_ms']:9.2f} ms  "
              f"steps {row['steps_max']}  proj err {err:.1e}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4,8,12,16,24,32,48,64,96,128,192,256",
                    help="comma-separated n for the Jacobi table")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--batch", type=int, default=0, help="matrices per call (default: by size)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--subspace-sizes", default="128,256,512,1024")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="sizes 8,16 and p=128, one repeat")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eig_cpu.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.subspace_sizes, args.repeat = "8,16", "128", 1
    if not backend.compiled_op("jacobi_eigh", "cpu"):
        raise SystemExit("bench_eig_cpu.py: ctm_kernels._C is not built (pip install -e . --no-build-isolation)")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"benchmark": "bench_eig_cpu", "machine": machine(), "versions": versions(), "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "timing": "wall clock, median per call divided by the batch",
              "jacobi": bench_jacobi(sizes, dtypes, args.repeat, args.batch),
              "subspace": bench_subspace([int(s) for s in args.subspace_sizes.split(",")], args.k, 4, args.repeat)}
    result["jacobi_faster_up_to"] = {str(d).replace("torch.", ""): faster_up_to(result["jacobi"], str(d).replace("torch.", ""))
                                     for d in dtypes}
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"jacobi faster up to n = {result['jacobi_faster_up_to']}; wrote {out}")


if __name__ == "__main__":
    main()
