"""The cost model of a many-adapter CtM merge (docs/DESIGN.md section 12) against measured runs.

For each CtM row of a ``bench_many.py`` result (which records the sweeps and, per route and
dtype, the top-r solves and factored steps) the model predicts the seconds from FLOP counts
and this CPU's measured rates (``ctm_kernels/ops/topr.py``: GEMM_FLOPS, NARROW_FLOPS,
EIGH_S_PER_K3) and prints measured / predicted. ``--gpu`` projects the same counts onto an
H100-class GPU with the assumed rates below (a projection, not a measurement).

    python benchmarks/cost_model.py benchmarks/results/many_m2048.json
    python benchmarks/cost_model.py many.json --rates topr.json   # rates bench_topr.py measured

On a shared machine the rates of the moment differ from the constants (3-8x lower at a load
average of 6 on 2 cores); ``--rates`` takes them from a ``bench_topr.py`` result measured
alongside the runs instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctm_kernels.ops import topr  # noqa: E402
from benchmarks.common import table  # noqa: E402

F64, F32 = torch.float64, torch.float32


class CPU:
    """This CPU, one thread: the constants the engine routes by."""
    name = "this CPU (measured rates)"
    gemm = topr.GEMM_FLOPS
    narrow = topr.NARROW_FLOPS
    eigh = topr.EIGH_S_PER_K3
    launch = 0.0


class GPU:
    """Assumed H100/H200-class rates (vendor peak figures derated, not measured here): FP64
    and FP32 products ~40 TFLOP/s, narrow products bound by ~3 TB/s of memory bandwidth and
    ~10 us per kernel, a dense float64 eigh of k = 2048 taken as ~0.1 s (cuSOLVER syevd runs
    its tridiagonal stage at memory speed)."""
    name = "H100-class GPU (projection)"
    gemm = {F64: 40e12, F32: 40e12}
    narrow = None                      # bandwidth: bytes / 3e12
    eigh = {F64: 0.1 / 2048 ** 3, F32: 0.05 / 2048 ** 3}
    launch = 10e-6


def measured(path):
    """A hardware profile from the rates of a ``bench_topr.py`` result (its largest k)."""
    rates = max(json.loads(Path(path).read_text())["rates"], key=lambda row: row["k"])

    class Measured(CPU):
        name = f"rates of {path}"
        gemm = {F64: rates["gemm_gflops_float64"] * 1e9, F32: rates["gemm_gflops_float32"] * 1e9}
        narrow = {F64: rates["narrow24_gflops_float64"] * 1e9, F32: rates["narrow24_gflops_float32"] * 1e9}
        eigh = {F64: rates["eigh_s_per_k3_float64"], F32: rates["eigh_s_per_k3_float32"]}
    return Measured


def products(hw, flops, bytes_, dtype, launches=1):
    if hw.narrow is None:
        return max(flops / hw.gemm[dtype], bytes_ / 3e12) + launches * hw.launch
    return flops / hw.narrow[dtype]


def dense_solve(hw, k, p, dtype):
    return 2 * k * k * p / hw.gemm[dtype] + hw.eigh[dtype] * k ** 3 + 3 * hw.launch


def factored_step(hw, k, p, dtype, r, q=topr.DEPTH):
    b = r + topr.GUARD
    size = 8 if dtype == F64 else 4
    return products(hw, 3 * q * b * 2 * k * p + 4 * k * ((q + 1) * b) ** 2, 2 * q * size * k * p, dtype,
                    launches=4 * q + 6)


def predict(hw, m, n, T, r, rank, solves):
    """Seconds of one layer's CtM merge: Grams, whitening, the recorded top-r solves, the
    half-step images, coordinates and lift."""
    R = T * r
    parts = {}
    if R <= min(m, n):
        parts["grams"] = 2 * (m + n) * R * R / hw.gemm[F64]
    else:
        parts["grams"] = sum((2 * d * R * R if R <= d else 2 * d * d * R) for d in (m, n)) / hw.gemm[F64]
    # Cholesky and triangular inverse of each side's k x k root, at half the product rate
    parts["whitening"] = sum(2 / 3 * min(d, R) ** 3 for d in (m, n)) / (hw.gemm[F64] / 2)
    solve = 0.0
    half_steps = 0
    for dtype, name in ((F64, "float64"), (F32, "float32")):
        dense = solves.get(f"dense_{name}", 0)
        fact = solves.get(f"factored_{name}", 0)
        steps = solves.get(f"steps_{name}", 0)
        half_steps += dense + fact
        k = min(m, R)
        # the first two float64 solves are the HOSVD (p = R), the rest half-steps (p = T rank)
        hosvd = min(2, dense) if dtype == F64 else 0
        solve += hosvd * dense_solve(hw, k, R, dtype) + (dense - hosvd) * dense_solve(hw, k, T * rank, dtype)
        size = 8 if dtype == F64 else 4
        start = products(hw, 4 * k * T * rank * (rank + topr.GUARD), 2 * size * k * T * rank, dtype, launches=3)
        solve += steps * factored_step(hw, k, T * rank, dtype, rank) + fact * start
    parts["top_r"] = solve
    parts["images"] = half_steps * 2 * (min(m, R) + min(n, R)) * R * rank / hw.gemm[F64]
    parts["lift"] = 2 * (m + n) * R * rank / hw.gemm[F64]
    return sum(parts.values()), parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--gpu", action="store_true", help="also project onto an H100-class GPU")
    p.add_argument("--rates", default=None, help="bench_topr.py result whose measured rates replace the constants")
    a = p.parse_args(argv)
    hw = measured(a.rates) if a.rates else CPU
    rows = []
    for path in a.results:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            if not row["method"].startswith("ctm") or row.get("status") != "ok" or "solves" not in row:
                continue
            m, T, r = row["m"], row["T"], row["r"]
            pred, parts = predict(hw, m, m, T, r, r, row["solves"])
            out = {"kind": row["kind"], "m": m, "T": T, "method": row["method"], "sweeps": row["sweeps"],
                   "measured_s": row["seconds"], "predicted_s": pred, "measured/predicted": row["seconds"] / pred,
                   **{f"{k}_s": v for k, v in parts.items()}}
            if a.gpu:
                out["gpu_projection_s"] = predict(GPU, m, m, T, r, r, row["solves"])[0]
            rows.append(out)
    print(f"model: {hw.name}")
    print(table(rows, list(rows[0]) if rows else []))


if __name__ == "__main__":
    main()
