"""The subspace solve as a user gets it: the default (energy) stop against the converged answer
and the sine stop, and CtM's time against Merge-then-Compress and against an earlier commit of
this engine, side by side in one run.

Per case ``kind:m:T`` (m = n, T rank-16 adapters, merged rank 16, TIES top_k 0.2, fp32 factors):

1. correctness first: the converged answer (the default route, ``stop="subspace"``, tol 1e-10)
   is the key; it must keep plain HOOI's converged objective (``accelerate=False``, same tol) to
   1e-9 or more (the block half-steps may end at a higher fixed point than plain HOOI from the
   HOSVD start, never a lower one). The default stop, the sine stop at 1e-4, and the base
   commit's default are compared with the key: relative error of the total energy kept, the
   largest error of an adapter's energy kept, sweeps, and for the default stop the distance of
   its merged update from the key's. A default stop more than 1e-4 (relative, total) from the
   key fails the run.
2. speed, medians of ``--repeat``: ``ck.merge_layer`` end to end (Grams, solve, rule, lift) at
   the default stop, each tree in its own fresh process (this tree, then ``--base``: a commit
   unpacked with ``git archive``), and MtC with a full SVD in this process (``reference.mtc``).

    python benchmarks/bench_stop.py                                # results/stop_cpu.json
    python benchmarks/bench_stop.py --cases gaussian:2048:8 --repeat 3 --base 18f56e5
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RANK, TOP_K = 16, 0.2


def child(tree: str, kind: str, m: int, T: int, repeat: int, threads: int) -> None:
    """In a fresh process: time ``merge_layer`` of ``tree``'s ctm_kernels; print JSON."""
    sys.path.insert(0, tree)
    import ctm_kernels as ck
    assert Path(ck.__file__).resolve().is_relative_to(Path(tree).resolve()), ck.__file__
    sys.path.insert(1, str(ROOT))
    from benchmarks.bench_layer import make_adapters
    from benchmarks.common import median_time

    torch.set_num_threads(threads)
    A, B = make_adapters(kind, m, m, T, RANK, torch.float32, "cpu")
    run = lambda: ck.merge_layer(A, B, rank=RANK, method="ties", top_k=TOP_K)   # noqa: E731
    out = run()
    seconds = median_time(run, repeat=repeat, warmup=0)
    print(json.dumps({"seconds": seconds, "sweeps": out.info.iterations, "energy_kept": out.info.energy_kept,
                      "stopped_by": getattr(out.info, "stopped_by", "subspace")}))


def _in_child(tree, kind, m, T, repeat, threads) -> dict:
    from benchmarks.common import run_child

    return run_child([__file__, "--child", str(tree), kind, str(m), str(T), str(repeat), str(threads)])


def _total(info) -> float:
    from ctm_kernels.testing import total_energy_kept

    return total_energy_kept(info.energy_kept, info.norms)


def _errors(kept, key, norms) -> dict:
    from ctm_kernels.testing import total_energy_kept

    total, want = total_energy_kept(kept, norms), total_energy_kept(key, norms)
    return {"energy_rel_error": abs(total - want) / want,
            "per_adapter_error": max(abs(a - b) for a, b in zip(kept, key))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="structured:2048:8,gaussian:2048:8,structured:1024:32,gaussian:1024:32")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--mtc-repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", default="18f56e5", help="git commit to compare with ('' for none)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=6, metavar=("TREE", "KIND", "M", "T", "REPEAT", "THREADS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        tree, kind, m, T, repeat, threads = a.child
        child(tree, kind, int(m), int(T), int(repeat), int(threads))
        return 0
    sys.path.insert(0, str(ROOT))
    import ctm_kernels as ck
    from ctm_kernels import reference as ref
    from benchmarks.bench_layer import dense, make_adapters
    from benchmarks.common import header, median_time, table, unpack_commit, write_json

    torch.set_num_threads(a.threads)
    base_dir = tempfile.TemporaryDirectory() if a.base else None
    if base_dir is not None:
        unpack_commit(a.base, base_dir.name)
    rows = []
    for case in a.cases.split(","):
        kind, m, T = case.split(":")
        m, T = int(m), int(T)
        A, B = make_adapters(kind, m, m, T, RANK, torch.float32, "cpu")
        plain = ck.prepare(A, B, rank=RANK, stop="subspace", tol=1e-10, max_iter=20000, accelerate=False)
        key = ck.prepare(A, B, rank=RANK, stop="subspace", tol=1e-10, max_iter=20000)
        if key.info.objective < plain.info.objective * (1 - 1e-9):
            raise SystemExit(f"{case}: the converged answer's objective {key.info.objective!r} is below plain "
                             f"HOOI's {plain.info.objective!r}; not timing it")
        sine = ck.prepare(A, B, rank=RANK, stop="subspace", tol=1e-4)
        mine = _in_child(ROOT, kind, m, T, a.repeat, a.threads)
        row = {"case": case, "sweeps_converged": key.info.iterations, "sweeps_default": mine["sweeps"],
               "sweeps_sine_1e-4": sine.info.iterations, "sweeps_plain_converged": plain.info.iterations,
               "objective_converged": key.info.objective, "objective_plain_converged": plain.info.objective,
               "energy_over_plain": _total(key.info) / _total(plain.info) - 1}
        err = _errors(mine["energy_kept"], key.info.energy_kept, key.info.norms)
        if err["energy_rel_error"] > 1e-4:
            raise SystemExit(f"{case}: the default stop's total energy kept is {err['energy_rel_error']:.2e} from the "
                             "converged answer's (> 1e-4); not timing it")
        row.update({f"default_{k}": v for k, v in err.items()})
        # what the user gets: the merged update of the default stop against the converged one
        want = key.merge("ties", top_k=TOP_K).delta
        got = ck.merge_layer(A, B, rank=RANK, method="ties", top_k=TOP_K).delta
        row["default_update_distance"] = float((got - want).norm() / want.norm())
        row.update({f"sine_{k}": v for k, v in _errors(sine.info.energy_kept, key.info.energy_kept,
                                                         key.info.norms).items()})
        row["ctm_s"] = mine["seconds"]
        if base_dir is not None:
            base = _in_child(base_dir.name, kind, m, T, a.repeat, a.threads)
            row.update(base_s=base["seconds"], base_sweeps=base["sweeps"],
                       base_energy_rel_error=_errors(base["energy_kept"], key.info.energy_kept,
                                                     key.info.norms)["energy_rel_error"])
            row["speedup_vs_base"] = row["base_s"] / row["ctm_s"]
        dWs = dense(A, B)
        row["mtc_s"] = median_time(lambda: ref.mtc(dWs, RANK, "ties", top_k=TOP_K), repeat=a.mtc_repeat, warmup=0)
        del dWs
        row["ctm_vs_mtc"] = row["mtc_s"] / row["ctm_s"]
        rows.append(row)
        print(table([row], list(row)), flush=True)
    cols = ["case", "sweeps_default", "sweeps_sine_1e-4", "sweeps_converged", "sweeps_plain_converged",
            "energy_over_plain", "default_energy_rel_error",
            "default_per_adapter_error", "default_update_distance", "sine_per_adapter_error", "ctm_s", "mtc_s", "ctm_vs_mtc"]
    if base_dir is not None:
        cols += ["base_s", "base_sweeps", "speedup_vs_base"]
    print(table(rows, cols))
    path = write_json("stop_cpu.json", {**header(), "args": vars(a), "rank": RANK, "top_k": TOP_K, "rows": rows}, a.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
