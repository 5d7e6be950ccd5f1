"""Kernel benchmark: the Triton ops against their torch paths, and the CUDA Jacobi
against torch.linalg.eigh ("kernel" columns: the Triton kernel, or the compiled Jacobi for
eig), with achieved bandwidth and throughput against this card's
measured ceilings.

Ceilings are measured in the same run: a large device-to-device copy (GB/s, bytes read
plus written) and a large bf16 matrix product (TFLOP/s). Every case is checked against
a float64 reference before it is timed (a wrong kernel stops the run). Times are medians
(triton.testing.do_bench on CUDA; perf_counter medians on the CPU interpreter).

Counted work per op (per layer): gram reads B and A once (bytes) and counts the full
products 2 (m + n) R^2 (flops, though only the upper block triangle is computed);
project reads G_B, G_A, Phi, Psi and counts 4 R rb r + 2 rb r^2 per block; lift reads
B, A, left, right, writes the outputs and counts 2 (m + n) R r; eig reads and writes
the matrices and counts 9 n^3 per matrix (the work of the tridiagonal route, a yardstick
rather than the Jacobi's own operation count).

    python benchmarks/bench_kernels.py --device cuda --out results/kernels.json
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --device cpu --tiny   # smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu runs the Triton interpreter (sets TRITON_INTERPRET=1) at --tiny sizes")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (interpreter smoke run)")
    ap.add_argument("--ops", default="gram,project,lift,eig")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/kernels_<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        args.tiny = True
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported
    return args


ARGS = parse() if __name__ == "__main__" else None

import torch  # noqa: E402

from benchmarks.common import median_time  # noqa: E402
from ctm_kernels import backend  # noqa: E402
from ctm_kernels.ops.gram import gram_torch  # noqa: E402
from ctm_kernels.ops.lift import lift_torch  # noqa: E402
from ctm_kernels.ops.project import project_torch  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device, reps=5):
    """Median seconds of ``fn``."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
    return median_time(fn, repeat=reps)


def ceilings(device, tiny):
    n_copy = (1 << 18) if tiny else (1 << 30)          # float32 elements: 1 MiB / 4 GiB
    x = torch.empty(n_copy, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), device)
    gbs = 2 * x.numel() * 4 / t / 1e9
    k = 256 if tiny else 8192
    a = torch.randn((k, k), device=device, dtype=torch.bfloat16)
    b = torch.randn((k, k), device=device, dtype=torch.bfloat16)
    t = bench(lambda: a @ b, device)
    return {"copy_GBps": gbs, "bf16_matmul_TFLOPs": 2 * k ** 3 / t / 1e12}


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-300)).item()


def record(rows, name, case, t_kernel, t_torch, nbytes, flops, err, ceil):
    row = {"op": name, **case, "kernel_ms": 1e3 * t_kernel, "torch_ms": 1e3 * t_torch,
           "speedup": t_torch / t_kernel, "GBps": nbytes / t_kernel / 1e9, "TFLOPs": flops / t_kernel / 1e12,
           "rel_err": err}
    row["pct_copy_ceiling"] = 100 * row["GBps"] / ceil["copy_GBps"]
    row["pct_matmul_ceiling"] = 100 * row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
    rows.append(row)
    print(f"{name:8s} {json.dumps(case):60s} kernel {row['kernel_ms']:9.3f} ms  torch {row['torch_ms']:9.3f} ms  "
          f"x{row['speedup']:5.2f}  {row['GBps']:8.1f} GB/s ({row['pct_copy_ceiling']:4.1f}%)  "
          f"{row['TFLOPs']:7.2f} TFLOP/s ({row['pct_matmul_ceiling']:4.1f}%)  err {err:.1e}", flush=True)


def check(err, tol, what):
    if not err <= tol:
        raise SystemExit(f"bench_kernels.py: {what} is wrong (relative error {err:.2e} > {tol:.0e}); not timing it")


def bench_gram(device, tiny, ceil, rows):
    from ctm_kernels.ops.triton_gram import gram_triton
    cases = [(2, 48, 40, 56)] if tiny else [(32, 4096, 128, 4096), (8, 4096, 512, 4096), (1, 8192, 256, 8192),
                                            (4, 4096, 1600, 4096)]
    dtypes = [torch.bfloat16, torch.float32]
    for L, m, R, n in cases:
        for dt in dtypes:
            for prec in (["ieee", "tf32x3"] if dt == torch.float32 else ["ieee"]):
                B = torch.randn((L, m, R), device=device).to(dt)
                A = torch.randn((L, R, n), device=device).to(dt)
                s = torch.rand((L, R), device=device) + 0.5
                G_B, G_A = gram_triton(B, A, s, torch.float32, precision=prec)
                rB, rA = gram_torch(B.double(), A.double(), s.double(), out_dtype=torch.float64)
                err = max(rel_err(G_B, rB), rel_err(G_A, rA))
                check(err, 1e-4, f"gram {dt} {prec}")
                t_tr = bench(lambda: gram_triton(B, A, s, torch.float32, precision=prec), device)
                t_to = bench(lambda: gram_torch(B, A, s, out_dtype=torch.float32), device)
                nbytes = L * (m * R + R * n) * B.element_size() + 2 * L * R * R * 4
                flops = 2 * L * (m + n) * R * R
                case = {"L": L, "m": m, "R": R, "n": n, "dtype": str(dt)[6:], "precision": prec}
                record(rows, "gram", case, t_tr, t_to, nbytes, flops, err, ceil)


def bench_project(device, tiny, ceil, rows):
    from ctm_kernels.ops.triton_project import project_triton
    cases = [(2, 3, 16, 16)] if tiny else [(32, 8, 16, 16), (8, 32, 16, 16), (4, 100, 16, 16)]
    for L, T, rb, r in cases:
        for dt in (torch.float64, torch.float32):
            R = T * rb
            G_B, G_A, Phi, Psi = (torch.randn(s, device=device, dtype=dt) for s in [(L, R, R), (L, R, R), (L, R, r), (L, R, r)])
            C = project_triton(G_B, G_A, Phi, Psi, T)
            err = rel_err(C, project_torch(G_B.double(), G_A.double(), Phi.double(), Psi.double(), T))
            check(err, 1e-4, f"project {dt}")
            t_tr = bench(lambda: project_triton(G_B, G_A, Phi, Psi, T), device)
            t_to = bench(lambda: project_torch(G_B, G_A, Phi, Psi, T), device)
            es = G_B.element_size()
            nbytes = L * (2 * R * R + 2 * R * r + T * r * r) * es
            flops = L * T * (4 * R * rb * r + 2 * rb * r * r)
            record(rows, "project", {"L": L, "T": T, "rb": rb, "r": r, "dtype": str(dt)[6:]},
                   t_tr, t_to, nbytes, flops, err, ceil)


def bench_lift(device, tiny, ceil, rows):
    from ctm_kernels.ops.triton_lift import lift_triton
    cases = [(2, 48, 40, 56, 8)] if tiny else [(32, 4096, 128, 4096, 16), (8, 4096, 512, 4096, 16),
                                               (4, 4096, 1600, 4096, 16)]
    for L, m, R, n, r in cases:
        for cdt in (torch.float64, torch.float32):
            B = torch.randn((L, m, R), device=device).to(torch.bfloat16)
            A = torch.randn((L, R, n), device=device).to(torch.bfloat16)
            s = torch.rand((L, R), device=device) + 0.5
            left = torch.randn((L, R, r), device=device, dtype=cdt)
            right = torch.randn((L, r, R), device=device, dtype=cdt)
            Bo, Ao = lift_triton(B, A, s, left, right, torch.float32)
            rB, rA = lift_torch(B.double(), A.double(), s.double(), left.double(), right.double(), torch.float64)
            err = max(rel_err(Bo, rB), rel_err(Ao, rA))
            check(err, 1e-4, f"lift compute {cdt}")
            t_tr = bench(lambda: lift_triton(B, A, s, left, right, torch.float32), device)
            t_to = bench(lambda: lift_torch(B, A, s, left, right, torch.float32), device)
            nbytes = L * ((m * R + R * n) * 2 + 2 * R * r * left.element_size() + (m + n) * r * 4)
            flops = 2 * L * (m + n) * R * r
            record(rows, "lift", {"L": L, "m": m, "R": R, "n": n, "r": r, "compute": str(cdt)[6:]},
                   t_tr, t_to, nbytes, flops, err, ceil)


def bench_eig(device, tiny, ceil, rows):
    if not backend.compiled_op("jacobi_eigh", device):
        print(f"eig: ctm_kernels._C has no {device.type} kernel; skipped", flush=True)
        return
    cases = [(64, 8)] if tiny else [(4096, 16), (1024, 32), (256, 64), (64, 128), (16, 256)]
    for batch, n in cases:
        for dt in (torch.float64, torch.float32):
            X = torch.randn((batch, n, n), device=device, dtype=torch.float64)
            M = ((X + X.mT) / 2).to(dt)
            w, _ = torch.ops.ctm_kernels.jacobi_eigh(M)
            err = rel_err(w, torch.linalg.eigh(M.double())[0])
            check(err, 1e-5, f"jacobi_eigh {dt}")
            t_j = bench(lambda: torch.ops.ctm_kernels.jacobi_eigh(M), device)
            t_e = bench(lambda: torch.linalg.eigh(M), device)
            record(rows, "eig", {"batch": batch, "n": n, "dtype": str(dt)[6:]}, t_j, t_e,
                   M.numel() * M.element_size() * 2, 9 * batch * n ** 3, err, ceil)


def main(args):
    device = torch.device(args.device)
    info = {"benchmark": "bench_kernels", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu (Triton interpreter)", "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "tiny": args.tiny}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        raise SystemExit("bench_kernels.py: triton is not installed")
    ceil = ceilings(device, args.tiny)
    info["ceilings"] = ceil
    print(f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.1f} TFLOP/s", flush=True)
    rows: list[dict] = []
    for op in args.ops.split(","):
        {"gram": bench_gram, "project": bench_project, "lift": bench_lift, "eig": bench_eig}[op](device, args.tiny, ceil, rows)
    info["results"] = rows
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kernels_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ARGS)
