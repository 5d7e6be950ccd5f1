"""Does the accelerated subspace solve end where plain HOOI ends, and does the default stop keep
the energy of the converged answer? Over thousands of random sets (``ctm_kernels.testing``).

For every case ``i`` in ``[start, start + count)``:

* fixed point: the accelerated solve and plain HOOI (``accelerate=False``, the reference
  iteration), both to ``stop="subspace", tol=1e-10``; the merged updates (``sum``) must agree
  to ``1e-6`` relative;
* default stop (``--energy``): the default solve (accelerated, energy test) against that
  converged answer: the relative error of the total energy kept
  ``sum_t ||U^T dW_t V||^2 / sum_t ||dW_t||^2``, the largest per-adapter error of the energy
  kept, and the distance of the merged update.

    python benchmarks/bench_hooi_agreement.py --count 3000          # results/hooi_agreement.json
    python benchmarks/bench_hooi_agreement.py --count 300 --energy --out /tmp/a.json
    # in parts (one process each), then one result file:
    python benchmarks/bench_hooi_agreement.py --start 1000 --count 1000 --energy --out /tmp/p1.json
    python benchmarks/bench_hooi_agreement.py --combine /tmp/p0.json /tmp/p1.json /tmp/p2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctm_kernels as ck  # noqa: E402
from ctm_kernels.testing import hooi_case, total_energy_kept  # noqa: E402

from common import header, write_json  # noqa: E402

TIGHT = dict(stop="subspace", tol=1e-10, max_iter=20000)
AGREE_RTOL = 1e-6


def _rel(x, ref):
    return ((x - ref).norm() / ref.norm().clamp(min=1e-300)).item()


def _total_kept(info):
    return total_energy_kept(info.energy_kept, info.norms)


def run_case(i: int, energy: bool) -> dict:
    c = hooi_case(i)
    kw = dict(rank=c.rank, method="sum", beta=c.beta, scales=c.scales)
    t0 = time.perf_counter()
    acc = ck.merge_layer(c.A, c.B, **kw, **TIGHT)
    t1 = time.perf_counter()
    plain = ck.merge_layer(c.A, c.B, accelerate=False, **kw, **TIGHT)
    t2 = time.perf_counter()
    row = {"case": c.label, "agree": None, "diff": _rel(acc.delta, plain.delta),
           "sweeps_accelerated": acc.info.iterations, "sweeps_plain": plain.info.iterations,
           "objective_accelerated": acc.info.objective, "objective_plain": plain.info.objective,
           "converged": acc.info.converged and plain.info.converged,
           "seconds_accelerated": t1 - t0, "seconds_plain": t2 - t1}
    row["agree"] = row["diff"] <= AGREE_RTOL
    if energy:
        t3 = time.perf_counter()
        default = ck.merge_layer(c.A, c.B, **kw)
        row["seconds_default"] = time.perf_counter() - t3
        e_conv, e_def = _total_kept(plain.info), _total_kept(default.info)
        row.update(sweeps_default=default.info.iterations, stopped_by=default.info.stopped_by,
                   energy_rel_error=abs(e_def - e_conv) / max(e_conv, 1e-300),
                   objective_rel_error=abs(default.info.objective - plain.info.objective) / max(plain.info.objective, 1e-300),
                   per_adapter_error=max(abs(a - b) for a, b in zip(default.info.energy_kept, plain.info.energy_kept)),
                   update_distance=_rel(default.delta, plain.delta))
    return row


def summarise(rows: list[dict], energy: bool, seconds: float) -> dict:
    agree = sum(r["agree"] for r in rows)
    summary = {"cases": len(rows), "agree": agree, "worst_diff": max(r["diff"] for r in rows),
               "sweeps_accelerated": sum(r["sweeps_accelerated"] for r in rows),
               "sweeps_plain": sum(r["sweeps_plain"] for r in rows), "seconds": seconds,
               # the accelerated route may end at a higher fixed point than plain HOOI, never a lower one
               "not_below_plain": sum(r["objective_accelerated"] >= r["objective_plain"] * (1 - 1e-9) for r in rows),
               "worst_objective_below_plain": max(1 - r["objective_accelerated"] / r["objective_plain"]
                                                  for r in rows if r["objective_plain"] > 0)}
    if energy:
        for key in ("energy_rel_error", "objective_rel_error", "per_adapter_error", "update_distance"):
            summary["max_" + key] = max(r[key] for r in rows)
        summary["sweeps_default"] = sum(r["sweeps_default"] for r in rows)
    return summary


def report(summary: dict, energy: bool) -> None:
    print(f"{summary['agree']} of {summary['cases']} sets agree (merged updates within {AGREE_RTOL:g}); worst "
          f"{summary['worst_diff']:.2e}; sweeps accelerated / plain: {summary['sweeps_accelerated']} / "
          f"{summary['sweeps_plain']}; objective at least plain HOOI's (to 1e-9) on {summary['not_below_plain']}")
    if energy:
        print(f"default stop: energy kept within {summary['max_energy_rel_error']:.2e} (relative), per adapter within "
              f"{summary['max_per_adapter_error']:.2e}, {summary['sweeps_default']} sweeps")


def combine(paths: list[str], out: str | None) -> int:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for part in parts for r in part["cases"]]
    energy = all(part["args"]["energy"] for part in parts)
    summary = summarise(rows, energy, sum(part["summary"]["seconds"] for part in parts))
    report(summary, energy)
    parts_meta = [{k: part[k] for k in ("machine", "versions", "commit", "date", "args")} for part in parts]
    path = write_json("hooi_agreement.json", {**header(), "parts": parts_meta, "summary": summary, "cases": rows}, out)
    print("wrote", path)
    return 0 if summary["agree"] == summary["cases"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--energy", action="store_true", help="also check the default (energy) stop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--combine", nargs="+", metavar="JSON", help="merge the result files of parts into one")
    a = p.parse_args(argv)
    if a.combine:
        return combine(a.combine, a.out)
    torch.set_num_threads(a.threads)
    rows, t0 = [], time.perf_counter()
    for i in range(a.start, a.start + a.count):
        row = run_case(i, a.energy)
        rows.append(row)
        if not row["agree"] or not row["converged"]:
            print(f"DISAGREE {row['case']}: diff {row['diff']:.2e}, sweeps {row['sweeps_accelerated']} / "
                  f"{row['sweeps_plain']}, objective {row['objective_accelerated']:.12g} / "
                  f"{row['objective_plain']:.12g}", flush=True)
        if (i - a.start + 1) % 250 == 0:
            print(f"{i - a.start + 1} cases, {sum(r['agree'] for r in rows)} agree", flush=True)
    summary = summarise(rows, a.energy, time.perf_counter() - t0)
    report(summary, a.energy)
    path = write_json("hooi_agreement.json", {**header(), "args": vars(a), "summary": summary, "cases": rows}, a.out)
    print("wrote", path)
    return 0 if summary["agree"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
