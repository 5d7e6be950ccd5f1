"""Many adapters on one layer, seed by seed: CtM's default merge against the dense pipeline
(sum of the updates, full SVD, truncation), side by side for each seed.

A speed figure that held on one seed was 20x worse on another, so every seed is its own row.
Adapters of seed ``s``: ``g = torch.Generator().manual_seed(s)``, then every ``A_t`` and then
every ``B_t`` drawn as ``randn * 0.02`` (float32). ``--mixed``: ranks cycling through 8, 16
and 32 and log-normal LoRA scales (``exp(0.5 randn)``, drawn after the factors).

Correctness first: at small sizes of the same kind (the many-adapter route with ``R > m``
and the usual one with ``R < m``) CtM at tight tol must match the float64 dense reference
(``reference.ctm``) to 1e-6, or nothing is timed (on a 300 x 280 layer with T = 20 too, where
the half-step images stay unformed). Then per seed: CtM (``ck.merge_layer``,
``sum``, rank 16, default stop: sweeps, which test stopped, seconds) and MtC (``Bh @ Ah`` in
one product, ``torch.linalg.svd``, truncation: seconds), and what each merged update keeps of
the full sum (relative error against it).

    python benchmarks/bench_seeds.py --T 128 --seeds 0-9                 # results/seeds_cpu.json
    python benchmarks/bench_seeds.py --T 512 --seeds 0-4 --no-mtc --out /tmp/t512.json
    python benchmarks/bench_seeds.py --T 96 --mixed --seeds 0-2
    python benchmarks/bench_seeds.py --T 128 --seeds 0-4 --converged --no-mtc   # the stop on large sets

``--versus FIELD=VALUE ...``: each seed is also merged with those ``engine.SolverSettings``
fields changed (for example ``unformed_min_k=1000000000``: the half-step images formed, as
before ``ops.topr.BlockImages``), right after the default merge, in the same process: seconds,
sweeps, the ratio and how far apart the two total energies kept are.

    python benchmarks/bench_seeds.py --T 128 --seeds 0-9 --versus unformed_min_k=1000000000

``--max-iter 1``: CtM stopped after one sweep, beside the dense pipeline: what the Grams, the
whitening and the HOSVD start cost before the iteration.

``--converged``: each seed also solved to convergence (energy test at tol 1e-13, no flat end,
up to 3000 sweeps), and the default stop's total energy kept
(``sum_t ||U^T dW_t V||^2 / sum_t ||dW_t||^2``) compared with it: the stop validated on sets
far larger than the agreement benchmark's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ctm_kernels as ck  # noqa: E402
from ctm_kernels import engine  # noqa: E402
from ctm_kernels import reference as ref  # noqa: E402
from ctm_kernels.testing import total_energy_kept  # noqa: E402
from benchmarks.common import header, table, write_json  # noqa: E402

RANK = 16
MIXED_RANKS = (8, 16, 32)


def adapters(seed, m, n, T, mixed):
    """(A list, B list, scales) of seed ``seed`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    ranks = [MIXED_RANKS[t % 3] if mixed else RANK for t in range(T)]
    A = [torch.randn(r, n, generator=g) * 0.02 for r in ranks]
    B = [torch.randn(m, r, generator=g) * 0.02 for r in ranks]
    scales = torch.exp(0.5 * torch.randn(T, generator=g)).tolist() if mixed else [1.0] * T
    return A, B, scales


def check(mixed) -> list[dict]:
    """CtM at tight tol against the float64 dense reference on small layers of the same kind."""
    rows = []
    # R > m (outer whitening), R < m, and sides of at least 256 with R = T r, where the block
    # half-steps keep the images unformed (engine.SolverSettings.unformed_min_k)
    for m, n, T in ((96, 80, 12), (200, 180, 6), (300, 280, 20)):
        A, B, s = adapters(1000 + m, m, n, T, mixed)
        tight = dict(stop="subspace", tol=1e-10, max_iter=20000)
        want = ref.ctm(ref.dense_updates(A, B, s), RANK, "sum", **tight).dW
        got = ck.merge_layer(A, B, rank=RANK, method="sum", scales=s, **tight)
        err = float((got.B.double() @ got.A.double() - want).norm() / want.norm())
        rows.append({"m": m, "n": n, "T": T, "relerr_vs_reference": err})
        if not err <= 1e-6:
            raise SystemExit(f"{m}x{n}, T={T}: CtM is {err:.2e} from the float64 reference; not timing")
    return rows


def mtc_sum(A, B, s, rank):
    """Dense pipeline: the summed update in one product, full SVD, truncation."""
    Bh = torch.cat([b * si for b, si in zip(B, s)], 1)
    dW = Bh @ torch.cat(A, 0)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank], dW


def _setting(text):
    """``"field=value"`` -> (field, value as int, float or bool)."""
    field, _, value = text.partition("=")
    for parse in (int, float):
        try:
            return field, parse(value)
        except ValueError:
            pass
    if value in ("True", "False"):
        return field, value == "True"
    raise SystemExit(f"--versus {text}: the value must be an int, a float, True or False")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--seeds", default="0-9", help="a-b or a,b,c")
    p.add_argument("--mixed", action="store_true")
    p.add_argument("--no-mtc", action="store_true", help="CtM only (the dense side is not timed)")
    p.add_argument("--converged", action="store_true", help="also solve to convergence; the stop's energy shortfall")
    p.add_argument("--versus", nargs="+", default=None, metavar="FIELD=VALUE",
                   help="also merge with these SolverSettings fields changed (ints, floats or booleans)")
    p.add_argument("--max-iter", type=int, default=1000,
                   help="sweeps at most (1: what CtM costs before the iteration, beside the dense pipeline)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if "-" in a.seeds:
        lo, hi = map(int, a.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(x) for x in a.seeds.split(",")]
    versus = engine.SolverSettings(**dict(_setting(x) for x in a.versus)) if a.versus else None
    checks = check(a.mixed)
    print(table(checks, list(checks[0])), flush=True)
    rows = []
    for seed in seeds:
        A, B, s = adapters(seed, a.m, a.m, a.T, a.mixed)
        t0 = time.perf_counter()
        out = ck.merge_layer(A, B, rank=RANK, method="sum", scales=s, max_iter=a.max_iter)
        ctm_s = time.perf_counter() - t0
        row = {"seed": seed, "sweeps": out.info.iterations, "stopped_by": out.info.stopped_by, "ctm_s": ctm_s}
        if versus is not None:
            t0 = time.perf_counter()
            other = ck.merge_layer(A, B, rank=RANK, method="sum", scales=s, max_iter=a.max_iter, solver=versus)
            row.update(versus_s=time.perf_counter() - t0, versus_sweeps=other.info.iterations,
                       versus_stopped_by=other.info.stopped_by)
            row["speedup_vs_versus"] = row["versus_s"] / ctm_s
            kept, kept_other = (total_energy_kept(o.info.energy_kept, o.info.norms) for o in (out, other))
            row["energy_vs_versus"] = (kept - kept_other) / kept_other
        if a.converged:
            conv = ck.merge_layer(A, B, rank=RANK, method="sum", scales=s, tol=1e-13, max_iter=3000,
                                  solver=engine.SolverSettings(flat_sweeps=10 ** 9))
            kept, kept_conv = (total_energy_kept(o.info.energy_kept, o.info.norms) for o in (out, conv))
            row.update(converged_sweeps=conv.info.iterations, energy_short=(kept_conv - kept) / kept_conv)
        if not a.no_mtc:
            t0 = time.perf_counter()
            Bm, Am, dW = mtc_sum(A, B, s, RANK)
            row["mtc_s"] = time.perf_counter() - t0
            row["ctm_vs_mtc"] = row["mtc_s"] / ctm_s
            norm = dW.double().norm()
            row["ctm_err_vs_sum"] = float((dW.double() - out.B.double() @ out.A.double()).norm() / norm)
            row["mtc_err_vs_sum"] = float((dW.double() - Bm.double() @ Am.double()).norm() / norm)
            del dW
        rows.append(row)
        print(table([row], list(row)), flush=True)
    print(table(rows, list(rows[0])))
    suffix = ("_mixed" if a.mixed else "") + (f"_maxiter{a.max_iter}" if a.max_iter != 1000 else "")
    name = f"seeds_m{a.m}_T{a.T}{suffix}_cpu.json"
    path = write_json(name, {**header(), "args": vars(a), "rank": RANK, "checks": checks, "rows": rows}, a.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
