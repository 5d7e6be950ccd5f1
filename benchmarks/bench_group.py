"""A group of same-shape layers solved in one batch, as ``merge`` solves every group of a model:
this tree against an earlier commit of the engine, side by side in one run.

The layers alternate gaussian and structured rank-16 adapters (seed = layer index), so they
stop after very different sweep counts (7 to about 280 at 1024^2, T = 8) and the batch runs
its last sweeps for a few layers: the case where work spent on stopped layers shows.

1. correctness first: in this process, every layer alone (``ck.prepare`` on its own) is the
   key; the batch's total energy kept per layer (this tree, in its child) must be within 1e-6
   (relative) of it, or nothing is timed. The base commit's error against the key is reported.
2. speed, medians of ``--repeat``: ``ck.prepare_layers`` of the whole group (Grams, solve,
   coordinates), each tree in its own fresh process (``--base``: unpacked with ``git archive``).

    python benchmarks/bench_group.py                       # results/group_cpu.json
    python benchmarks/bench_group.py --m 512 --T 8 --layers 8 --repeat 1 --base ''
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RANK = 16


def make_group(m: int, T: int, layers: int):
    from benchmarks.bench_layer import make_adapters

    return [make_adapters("structured" if l % 2 else "gaussian", m, m, T, RANK, torch.float32, "cpu", seed=l)
            for l in range(layers)]


def child(tree: str, m: int, T: int, layers: int, repeat: int, threads: int) -> None:
    """In a fresh process: time ``prepare_layers`` of ``tree``'s ctm_kernels; print JSON."""
    sys.path.insert(0, tree)
    import ctm_kernels as ck
    assert Path(ck.__file__).resolve().is_relative_to(Path(tree).resolve()), ck.__file__
    sys.path.insert(1, str(ROOT))
    from benchmarks.common import median_time

    torch.set_num_threads(threads)
    group = make_group(m, T, layers)
    run = lambda: ck.prepare_layers(group, rank=RANK)   # noqa: E731
    plans = run()
    seconds = median_time(run, repeat=repeat, warmup=0)
    print(json.dumps({"seconds": seconds, "sweeps": [p.info.iterations for p in plans],
                      "energy_kept": [p.info.energy_kept for p in plans], "norms": [p.info.norms for p in plans]}))


def _in_child(tree, a) -> dict:
    from benchmarks.common import run_child

    return run_child([__file__, "--child", str(tree), str(a.m), str(a.T), str(a.layers), str(a.repeat), str(a.threads)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1024, help="m = n of every layer")
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", default="b330440", help="git commit to compare with ('' for none)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        tree, *nums = a.child
        child(tree, *map(int, nums))
        return 0

    sys.path.insert(0, str(ROOT))
    import ctm_kernels as ck
    from ctm_kernels.testing import total_energy_kept
    from benchmarks.common import header, table, unpack_commit, write_json

    torch.set_num_threads(a.threads)
    key = [ck.prepare(A, B, rank=RANK).info for A, B in make_group(a.m, a.T, a.layers)]

    def worst_error(res):
        return max(abs(total_energy_kept(kept, k.norms) - total_energy_kept(k.energy_kept, k.norms))
                   / total_energy_kept(k.energy_kept, k.norms) for kept, k in zip(res["energy_kept"], key))

    mine = _in_child(ROOT, a)
    row = {"m": a.m, "T": a.T, "layers": a.layers, "sweeps_min": min(mine["sweeps"]), "sweeps_max": max(mine["sweeps"]),
           "sweeps_total": sum(mine["sweeps"]), "energy_rel_error_vs_alone": worst_error(mine)}
    if row["energy_rel_error_vs_alone"] > 1e-6:
        raise SystemExit(f"a layer of the batch keeps {row['energy_rel_error_vs_alone']:.2e} other energy than "
                         "alone (> 1e-6); not timing it")
    row["ctm_s"] = mine["seconds"]
    if a.base:
        with tempfile.TemporaryDirectory() as base_dir:
            unpack_commit(a.base, base_dir)
            base = _in_child(base_dir, a)
        row.update(base_s=base["seconds"], base_sweeps_total=sum(base["sweeps"]),
                   base_energy_rel_error_vs_alone=worst_error(base), speedup_vs_base=base["seconds"] / mine["seconds"])
    print(table([row], list(row)))
    path = write_json("group_cpu.json", {**header(), "args": vars(a), "rank": RANK, "row": row,
                                         "sweeps": mine["sweeps"]}, a.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
