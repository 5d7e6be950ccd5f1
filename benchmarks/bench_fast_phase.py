"""The float32 first sweeps of the HOOI solve, side by side in one process: all-float64,
float32 handed over at a fixed step of 1e-2, and the engine's default (float32 down to each
layer's rounding margin, docs/DESIGN.md section 8).

Correctness first: at tight tol the three settings must reach the same merged update (1e-6).
Then each is timed at the default tol (medians of --repeat), with its sweeps.

    python benchmarks/bench_fast_phase.py                        # gaussian 512^2, T = 32, 64
    python benchmarks/bench_fast_phase.py --cases gaussian:1024:64 --repeat 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ctm_kernels as ck  # noqa: E402
from ctm_kernels import engine  # noqa: E402
from benchmarks.bench_layer import make_adapters  # noqa: E402
from benchmarks.common import header, median_time, table, write_json  # noqa: E402

# name -> (FAST_UNTIL, FAST_NOISE_MARGIN): FAST_UNTIL = 0 turns the float32 phase off, an
# infinite margin leaves FAST_UNTIL as the only hand-over
SETTINGS = {"float64": (0.0, engine.FAST_NOISE_MARGIN),
            "float32_fixed_1e-2": (engine.FAST_UNTIL, float("inf")),
            "float32_margin": (engine.FAST_UNTIL, engine.FAST_NOISE_MARGIN)}


def merged(A, B, setting, **kw):
    engine.FAST_UNTIL, engine.FAST_NOISE_MARGIN = SETTINGS[setting]
    return ck.merge_layer(A, B, rank=16, method="sum", **kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="gaussian:512:32,gaussian:512:64", help="kind:m:T,...")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for case in a.cases.split(","):
        kind, m, T = case.split(":")
        A, B = make_adapters(kind, int(m), int(m), int(T), 16, torch.float32, "cpu")
        tight = {s: merged(A, B, s, tol=1e-9, max_iter=5000) for s in SETTINGS}
        want = tight["float64"].B.double() @ tight["float64"].A.double()
        for s, out in tight.items():
            err = ((out.B.double() @ out.A.double() - want).norm() / want.norm()).item()
            if err > 1e-6:
                raise AssertionError(f"{case}: {s} differs from float64 at tight tol: {err:.2e}")
        row = {"case": case}
        for s in SETTINGS:
            row[f"{s}_s"] = median_time(lambda: merged(A, B, s), repeat=a.repeat, warmup=0)
            row[f"{s}_sweeps"] = merged(A, B, s).info.iterations
        row["speedup_margin_vs_float64"] = row["float64_s"] / row["float32_margin_s"]
        row["speedup_margin_vs_fixed"] = row["float32_fixed_1e-2_s"] / row["float32_margin_s"]
        rows.append(row)
        print(table([row], list(row)), flush=True)
    path = write_json("fast_phase_cpu.json", {**header(), "args": vars(a), "rows": rows}, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
