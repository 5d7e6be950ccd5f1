"""Which default stop? Every candidate energy-stop setting replayed on the same paths.

The stop test only ends a path, it never changes it: the default route's sweeps up to any stop
are the same whatever ``tol``. So each of the random sets of ``ctm_kernels.testing.hooi_case``
is solved ONCE, to convergence (energy test at ``tol=1e-13``, flat end off), recording after
every sweep the relative objective gain, the relative change of the total energy kept and that
total (``E = sum_t ||U^T dW_t V||^2 / sum_t ||dW_t||^2``). Each candidate (``tol``, flat end:
``flat_sweeps`` sweeps with gains and changes at most ``flat_share * tol``, or none) is then
replayed on the recorded windows with the engine's own estimate (``reference.energy_left``):
where it would stop, after how many sweeps, and how far its ``E`` is from the converged one.

Checked before any analysis: on the first ``--check`` sets the replayed stop of the default settings must be
the sweep at which the engine itself stops, with the same ``stopped_by``.

    python benchmarks/bench_default_tol.py --count 3000              # results/default_tol.json
    python benchmarks/bench_default_tol.py --start 1500 --count 1500 --out /tmp/p1.json --paths-only
    python benchmarks/bench_default_tol.py --combine /tmp/p0.json /tmp/p1.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctm_kernels as ck  # noqa: E402
from ctm_kernels import engine  # noqa: E402
from ctm_kernels.reference import ENERGY_WINDOW, energy_left  # noqa: E402
from ctm_kernels.testing import hooi_case  # noqa: E402
from benchmarks.common import header, table, write_json  # noqa: E402

TOLS = (1e-6, 1e-5, 1e-4)
FLAT = ((None, None), (10, 1.0), (20, 0.5), (20, 1.0), (30, 1.0))    # (flat_sweeps, flat_share); None: off
CONVERGED = dict(tol=1e-13, max_iter=3000, solver=engine.SolverSettings(flat_sweeps=10 ** 9))


def _kw(case):
    return dict(rank=case.rank, method="sum", beta=case.beta, scales=case.scales)


def record_path(index: int) -> dict:
    """The default route's sweeps on set ``index``, to convergence: per sweep (gain, change of E, E)."""
    case = hooi_case(index)
    seen = []
    sweep = engine._HOOISolve.sweep

    def recording(self):
        sweep(self)
        e = self.energy
        seen.append((float(e.gains[0, -1]), float(e.moves[0, -1]), float(e.kept[0])))
    engine._HOOISolve.sweep = recording
    try:
        out = ck.merge_layer(case.A, case.B, **_kw(case), **CONVERGED)
    finally:
        engine._HOOISolve.sweep = sweep
    return {"case": case.label, "index": index, "stopped_by": out.info.stopped_by, "path": seen}


def replay(path: list, tol: float, flat_sweeps: int | None, flat_share: float | None) -> tuple[int, str]:
    """The sweep (1-based) at which the energy test with these settings stops on ``path``, and why."""
    t = torch.tensor(path, dtype=torch.float64)
    pad = torch.full((ENERGY_WINDOW - 1,), math.nan, dtype=torch.float64)
    windows = [torch.cat([pad, t[:, j]]).unfold(0, ENERGY_WINDOW, 1) for j in (0, 1)]
    left = torch.maximum(energy_left(windows[0]), energy_left(windows[1]))
    run = 0
    for i in range(len(path)):
        if left[i] <= tol:
            return i + 1, "energy"
        if flat_sweeps is not None:
            small = flat_share * tol
            run = run + 1 if t[i, 0] <= small and abs(float(t[i, 1])) <= small else 0
            if run >= flat_sweeps:
                return i + 1, "flat"
    return len(path), "max_iter"


def check(paths: list[dict]) -> list[dict]:
    """The replay of the default settings against the engine's own default stop, on the sets of
    ``paths`` (recorded by :func:`record_path`)."""
    rows = []
    s = engine.DEFAULT_SOLVER
    for rec in paths:
        case = hooi_case(rec["index"])
        out = ck.merge_layer(case.A, case.B, **_kw(case))
        sweeps, why = replay(rec["path"], engine.DEFAULT_TOL["energy"], s.flat_sweeps, s.flat_share)
        rows.append({"case": rec["case"], "engine": [out.info.iterations, out.info.stopped_by], "replay": [sweeps, why]})
        if (sweeps, why) != (out.info.iterations, out.info.stopped_by):
            raise SystemExit(f"{rec['case']}: the replay stops at {sweeps} ({why}), the engine at "
                             f"{out.info.iterations} ({out.info.stopped_by}); not analysing")
    return rows


def analyse(paths: list[dict]) -> list[dict]:
    rows = []
    for tol in TOLS:
        for flat_sweeps, flat_share in FLAT:
            errs, sweeps, flat = [], 0, 0
            for rec in paths:
                kept = [p[2] for p in rec["path"]]
                n, why = replay(rec["path"], tol, flat_sweeps, flat_share)
                errs.append(abs(kept[n - 1] - kept[-1]) / max(kept[-1], 1e-300))
                sweeps += n
                flat += why == "flat"
            rows.append({"tol": tol, "flat_sweeps": flat_sweeps, "flat_share": flat_share, "sets": len(errs),
                         "within_1e-6": sum(e <= 1e-6 for e in errs), "within_1e-5": sum(e <= 1e-5 for e in errs),
                         "within_1e-4": sum(e <= 1e-4 for e in errs), "worst": max(errs), "sweeps": sweeps,
                         "ended_flat": flat})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--check", type=int, default=40, help="sets on which the replay is checked against the engine")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paths-only", action="store_true", help="record the paths of this part, analyse later")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="analyse the recorded paths of parts")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.combine:
        parts = [json.loads(Path(f).read_text()) for f in a.combine]
        paths = [rec for part in parts for rec in part["paths"]]
        checks = [row for part in parts for row in part["checks"]]
        seconds = sum(part["seconds"] for part in parts)
    else:
        t0 = time.perf_counter()
        paths = [record_path(i) for i in range(a.start, a.start + a.count)]
        checks = check(paths[:a.check])
        seconds = time.perf_counter() - t0
    out = {**header(), "args": vars(a), "seconds": seconds, "checks": checks}
    if a.paths_only:
        path = write_json("default_tol_part.json", {**out, "paths": paths}, a.out)
        print("wrote", path)
        return 0
    rows = analyse(paths)
    print(table(rows, ["tol", "flat_sweeps", "flat_share", "within_1e-6", "within_1e-5", "within_1e-4", "worst",
                       "sweeps", "ended_flat"]))
    path = write_json("default_tol.json", {**out, "sets": len(paths), "rows": rows}, a.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
