"""Merge quality on the zoos at ranks 16 and 32 over three training seeds: one table per zoo.

``python -m benchmarks.quality.tables [--quick] [--protocol paper] [--zoos digits seq seq_families]``
(from the repository root) merges

* the digits zoo (``zoo.py``: MLP, rank-8 LoRA on fc2/fc3, a head per task); seed 0 is the
  committed zoo, seeds 1 and 2 are retrained (seconds each), as ``digits.py``'s replicates;
* the two sequence zoos (``seqzoo.py``: a transformer, rank-16 LoRA on q/k/v/o and the MLP, one
  shared frozen head; ``seq``: one dialect per task, ``seq_families``: six); the three seeds of
  each are committed under ``zoo_seq[_families]/seed<k>/``;

with CtM, MtC, core-space MtC and full-parameter merging for sum, TIES, DARE-TIES, TSV and Iso-C,
chooses the parameters on validation (``digits.RunConfig`` grids; ``--protocol paper``: the CtM
paper's search) and reports, per zoo, rank, rule and method, the mean normalised test accuracy
over the seeds, its spread (max - min) and on how many seeds CtM beats MtC and core-space MtC.
It also measures what explains the result: the adapters' effective rank (directions for 90% of
each update's energy, share of the first), how much the tasks' updates overlap (mean |cosine|
between two tasks' updates of a module), the energy each rank-r subspace keeps, and how much the
adapters disturb each other at full strength (``interference``).
Writes ``benchmarks/results/quality_tables[_paper][_quick].{json,md}``.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ctm_kernels import reference

from . import digits, seqzoo
from .merging import update_spectrum
from .report import RESULTS_DIR, markdown_table, metadata, write_json
from .tasks import Digits
from .zoo import ZOO_DIR, ZooConfig, load_zoo, train_zoo

RULES = ("sum", "ties", "dare_ties", "tsv", "iso_c")
METHODS = ("ctm", "mtc", "core_mtc", "full")
SEEDS = (0, 1, 2)
# grids a factor 2 coarser than digits.py's (lambda 1/8..8 in factors of 2, three top_k): the
# sequence zoo's evaluation is the cost, and the grids are the same for every method
FULL = digits.RunConfig(ranks=(16, 32), methods=METHODS, rules=RULES, lambdas=tuple(2.0 ** k for k in range(-3, 4)),
                        top_ks=(0.1, 0.3, 1.0), dare_ps=(0.5,), dare_seeds=(0,), replicates=0)
QUICK = replace(FULL, ranks=(16,), rules=("sum", "ties"), top_ks=(0.2, 1.0), lambdas=(0.25, 0.5, 1.0, 2.0))
PAPER = replace(digits.PAPER, ranks=(16, 32), methods=METHODS, rules=RULES, dare_ps=(0.3, 0.5, 0.7), replicates=0)


def spectrum_stats(layers) -> dict:
    """Effective rank and overlap of the adapters' updates, over every module."""
    needed, first, overlap = [], [], []
    for layer in layers:
        dW = reference.dense_updates(layer.A, layer.B, layer.scales)          # [T, m, n]
        for d in dW:
            n, f = update_spectrum(d)
            needed.append(n)
            first.append(f)
        flat = dW.flatten(1)
        flat = flat / flat.norm(dim=1, keepdim=True)
        cos = (flat @ flat.T).abs()
        overlap += [float(cos[i, j]) for i, j in itertools.combinations(range(len(dW)), 2)]
    mean = lambda v: sum(v) / len(v)
    return {"adapter_rank": layers[0].A[0].shape[0], "directions_90_mean": mean(needed),
            "directions_90_min": min(needed), "first_share_mean": mean(first), "first_share_max": max(first),
            "overlap_mean_abs_cos": mean(overlap)}


def energy_stats(out: dict) -> dict:
    """Mean energy kept per rank: CtM's subspace against the rank-r subspace of the summed update."""
    rows = {}
    for rank in out["config"]["ranks"]:
        sub = [s for s in out["subspaces"] if s["rank"] == rank]
        mean = lambda key: sum(sum(s[key]) / len(s[key]) for s in sub) / len(sub)
        rows[rank] = {"ctm": mean("energy_kept_ctm"), "mtc_sum": mean("energy_kept_mtc_sum")}
    return rows


def interference(zoo, ev) -> dict[int, float]:
    """Full-parameter sum of the first ``k`` adapters at full strength (lambda 1), for k = 1, 2,
    4, ... up to all of them: the mean normalised test accuracy on those ``k`` tasks. How much
    the adapters disturb each other before any rank limit or rule."""
    each = [a.deltas() for a in zoo.adapters]
    T, out, k = len(each), {}, 1
    while True:
        k = min(k, T)
        summed = {name: sum(d[name] for d in each[:k]) for name in each[0]}
        out[k] = sum(ev.normalised(ev.accuracies(summed, "test"), "test")[:k]) / k
        if k == T:
            return out
        k *= 2


def zoo_runs(kind: str, seeds, cfg: digits.RunConfig, log=print):
    """Yields ``(seed, layers, run output)`` for each seed of zoo ``kind``."""
    data = Digits() if kind == "digits" else None
    for seed in seeds:
        t0 = time.perf_counter()
        if kind == "digits":
            base = ZooConfig()
            zoo = load_zoo(ZOO_DIR) if seed == 0 else train_zoo(
                ZooConfig(base_seed=base.base_seed + seed, adapter_seed=base.adapter_seed + 100 * seed), data,
                log=lambda *a: None)
            ev = digits.Evaluator(zoo, data)
        else:
            zoo = seqzoo.load_zoo(seqzoo.zoo_dir(kind) / f"seed{seed}")
            ev = seqzoo.SeqEvaluator(zoo)
        out = digits.run(zoo, data, cfg, log=lambda *a: None, evaluator=ev)
        out["interference"] = interference(zoo, ev)
        log(f"{kind} seed {seed}: {time.perf_counter() - t0:.0f} s")
        yield seed, digits.layer_factors(zoo), out


def summarise(kind: str, per_seed: list[tuple], cfg: digits.RunConfig) -> dict:
    rows = []
    for rank in cfg.ranks:
        for rule in cfg.rules:
            for method in cfg.methods:
                r = rank if method in digits.RANKED else None
                got = [digits.find(out, method, rule, r) for _, _, out in per_seed]
                if not all(got):
                    continue
                vals = [g["test_norm_avg"] for g in got]
                rows.append({"rank": rank, "rule": rule, "method": method, "per_seed": vals,
                             "mean": sum(vals) / len(vals), "spread": max(vals) - min(vals)})
    wins = []
    for rank in cfg.ranks:
        for rule in cfg.rules:
            pick = lambda m: next((x["per_seed"] for x in rows if x["rank"] == rank and x["rule"] == rule
                                   and x["method"] == m), None)
            ctm = pick("ctm")
            if ctm is None:
                continue
            row = {"rank": rank, "rule": rule}
            for base in ("mtc", "core_mtc"):
                other = pick(base)
                if other is not None:
                    row[f"ctm_minus_{base}"] = sum(c - o for c, o in zip(ctm, other)) / len(ctm)
                    row[f"ctm_beats_{base}_on"] = sum(c > o for c, o in zip(ctm, other))
            wins.append(row)
    first_layers = per_seed[0][1]
    return {"zoo": kind, "seeds": [s for s, _, _ in per_seed], "rows": rows, "wins": wins,
            "spectrum": [spectrum_stats(layers) for _, layers, _ in per_seed],
            "energy_kept": [energy_stats(out) for _, _, out in per_seed],
            "interference": [out["interference"] for _, _, out in per_seed],
            "individual_test_acc": [out["individual_test_acc"] for _, _, out in per_seed],
            "modules": len(first_layers)}


def to_markdown(summaries: list[dict], cfg: digits.RunConfig, meta: dict, seconds: float) -> str:
    lines = ["# Merge quality on the zoos, three training seeds", "",
             f"{meta['date']}, commit `{meta['commit']}`, {meta['machine']['cpu']}, torch {meta['versions']['torch']}. "
             f"Run time {seconds:.0f} s. Protocol `{cfg.protocol}`: lambda grid "
             f"{digits._grid_text(cfg.lambdas)}, top_k {list(cfg.top_ks)}, DARE p {list(cfg.dare_ps)} (seed 0), "
             f"CtM beta {list(cfg.betas)}; chosen on validation. Cells: mean normalised test accuracy over the "
             "seeds (merged / the task's own adapter x 100) and its spread (max - min); full-parameter merging "
             "has no rank limit (the same number at both ranks).", ""]
    for s in summaries:
        lines += [f"## {s['zoo']} zoo (seeds {s['seeds']})", ""]
        sp = s["spectrum"]
        lines += ["Adapters, per seed: " + "; ".join(
            f"rank {x['adapter_rank']}, {x['directions_90_mean']:.1f} directions for 90% of an update's energy "
            f"(min {x['directions_90_min']}), first direction {100 * x['first_share_mean']:.0f}% "
            f"(max {100 * x['first_share_max']:.0f}%), overlap |cos| {x['overlap_mean_abs_cos']:.3f}" for x in sp), ""]
        lines += ["Energy kept by the rank-r subspaces (mean share of ||dW_t||^2), per seed: " + "; ".join(
            ", ".join(f"r={rank}: CtM {e['ctm']:.2f} / MtC-sum {e['mtc_sum']:.2f}" for rank, e in es.items())
            for es in s["energy_kept"]), ""]
        lines += ["Full-parameter sum of the first k adapters at lambda 1 (mean normalised accuracy on their k tasks), "
                  "per seed: " + "; ".join(", ".join(f"k={k}: {acc:.1f}" for k, acc in it.items())
                                           for it in s["interference"]), ""]
        for rank in cfg.ranks:
            body = []
            for rule in cfg.rules:
                cells = []
                for method in cfg.methods:
                    x = next((x for x in s["rows"] if x["rank"] == rank and x["rule"] == rule and x["method"] == method),
                             None)
                    cells.append(f"{x['mean']:.1f} ± {x['spread']:.1f}" if x else "n/a")
                w = next((w for w in s["wins"] if w["rank"] == rank and w["rule"] == rule), {})
                n = len(s["seeds"])
                cells += [f"{w['ctm_minus_mtc']:+.1f} ({w['ctm_beats_mtc_on']}/{n})" if "ctm_minus_mtc" in w else "n/a",
                          f"{w['ctm_minus_core_mtc']:+.1f} ({w['ctm_beats_core_mtc_on']}/{n})"
                          if "ctm_minus_core_mtc" in w else "n/a"]
                body.append([rule] + cells)
            lines += [f"Rank {rank}:", "", markdown_table(
                ["rule"] + [m + (" (no rank limit)" if m == "full" else "") for m in cfg.methods] +
                ["CtM - MtC (seeds won)", "CtM - core MtC (seeds won)"], body), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only, rank 16, sum and TIES, small grids")
    parser.add_argument("--protocol", choices=("project", "paper"), default="project")
    kinds = ["digits"] + sorted(seqzoo.ZOOS)
    parser.add_argument("--zoos", nargs="+", choices=kinds, default=kinds)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = (QUICK if args.quick else FULL) if args.protocol == "project" else \
        (replace(PAPER, ranks=(16,), rules=("sum", "ties")) if args.quick else PAPER)
    seeds = (0,) if args.quick else SEEDS
    summaries = [summarise(kind, list(zoo_runs(kind, seeds, cfg)), cfg) for kind in args.zoos]
    seconds = time.perf_counter() - t0
    meta = metadata()
    stem = "quality_tables" + ("_paper" if args.protocol == "paper" else "") + ("_quick" if args.quick else "")
    write_json(args.out / f"{stem}.json", {"meta": meta, "config": asdict(cfg), "seconds": seconds,
                                           "summaries": summaries})
    (args.out / f"{stem}.md").write_text(to_markdown(summaries, cfg, meta, seconds))
    print(f"wrote {args.out / stem}.json and .md ({seconds:.0f} s)")
    return summaries


if __name__ == "__main__":
    main()
