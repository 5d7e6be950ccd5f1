"""Merge quality on the MiniLM zoo (``minilm.py``): CtM against MtC, core-space MtC and
full-parameter merging, over the committed training seeds.

``python -m benchmarks.quality.minilm_tables [--seeds 0 1 2] [--quick] [--protocol paper]``
(from the repository root; needs ``pip install -e '.[quality]'``) loads each committed seed of
the zoo (``zoo_minilm/seed<k>/``), checks that its adapters still score what the manifest says,
merges the 36 adapted modules with CtM (the engine, beta 0 and beta 1), MtC, core-space MtC (ranks
16 and 32) and full-parameter merging, for sum, TIES, DARE-TIES, TSV and Iso-C; chooses lambda (and
top-K) on validation (mean normalised accuracy); reports normalised test accuracy (merged /
the task's own adapter x 100) per task and on average, its mean and spread (max - min) over the
seeds, the energy each method's rank-r result keeps of every adapter, and the adapters'
spectra and overlap. Heads stay per task (only backbone updates merge).
Writes ``benchmarks/results/quality_minilm[_paper][_quick].{json,md}``.

The committed tables were made seed by seed, from one commit (each run writes
``benchmarks/results/quality_minilm_seeds/seed<k>_project.json`` as it goes), then summarised::

    python -m benchmarks.quality.minilm_tables --seeds 0 --only-seeds    # and 1 (one process each)
    python -m benchmarks.quality.minilm_tables --seeds 2 --only-seeds --rules tsv iso_c
    python -m benchmarks.quality.minilm_tables --seeds 2 --only-seeds --extend --rules sum ties dare_ties
    python -m benchmarks.quality.minilm_tables --reuse

``--extend`` merges a seed again with other ranks, rules or methods and adds the rows to its file
(the lambda search starts afresh for every rank and rule, so splitting a seed by rules gives the
rows one run would; start the extending run once the first has written a row and let it end last).

The lambda search climbs the grid (``minilm.Evaluator.val_scores``) from the best lambda of
the previous method with the same rule (the grid's middle for the first): a merged-model
evaluation is a forward pass of the 22M-parameter model over every validation example, and
the climb needs 2-4 of them where the grid has 7 (81 under ``--protocol paper``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ctm_kernels import reference

from . import minilm
from .digits import SEEDED_RULES, TOP_K_RULES, _grid_text, find, layer_factors
from .merging import RANKED, Merger, energy_kept, rule_validity, singular_subspaces
from .report import RESULTS_DIR, markdown_table, metadata, write_json
from .tables import interference, spectrum_stats


@dataclass
class Config:
    ranks: tuple = (16, 32)
    methods: tuple = ("ctm", "ctm_b1", "mtc", "core_mtc", "full")
    rules: tuple = ("sum", "ties", "dare_ties", "tsv", "iso_c")
    lambdas: tuple = tuple(2.0 ** k for k in range(-3, 4))
    top_ks: tuple = (0.1, 0.3)
    dare_ps: tuple = (0.5,)
    dare_seed: int = 0
    betas: tuple = (0.0,)
    protocol: str = "project"
    limit_val: int | None = None       # examples per task (None: the whole split)
    limit_test: int | None = None
    interference: bool = True
    result_energy: bool = True         # energy kept by each merged result (36 SVDs per row)


FULL = Config()
QUICK = replace(FULL, ranks=(16,), methods=("ctm", "mtc"), rules=("sum", "ties"), lambdas=(0.125, 0.25, 0.5, 1.0),
                top_ks=(0.3,), limit_val=25, limit_test=minilm.CHECK_TEST, interference=False,
                result_energy=False)
# The CtM paper's search: beta {0, .25, .5, .75} for CtM, lambda 0..2 step 0.025, top-K 5-100%, DARE p.
PAPER = replace(FULL, methods=("ctm", "mtc", "core_mtc", "full"),
                lambdas=tuple(round(0.025 * k, 3) for k in range(1, 81)),
                top_ks=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), dare_ps=(0.1, 0.3, 0.5, 0.7),
                betas=(0.0, 0.25, 0.5, 0.75), protocol="paper")


class CachedMerger(Merger):
    """``Merger`` that computes each full-parameter merge once and reuses it: MtC is that merge
    truncated to the rank (``reference.mtc``: ``truncate(full_merge(...))``; Iso-C: the sum,
    truncated, then flattened), at every rank, and ``full`` is the merge itself."""

    def __init__(self, layers):
        super().__init__(layers)
        self._full: dict = {}

    def full_merge(self, rule: str, params: dict) -> list[torch.Tensor]:
        key = (rule, tuple(sorted(params.items())))
        if key not in self._full:
            self._full[key] = super().merge("full", rule, None, **params)
        return self._full[key]

    def merge(self, method, rule, rank, beta=None, **params):
        if method == "full":
            return self.full_merge(rule, params)
        if method == "mtc":
            if rule == "iso_c":
                pairs = [reference.truncate_isotropic(F, rank) for F in self.full_merge("sum", {})]
            else:
                pairs = [reference.truncate(F, rank) for F in self.full_merge(rule, params)]
            return [B @ A for B, A in pairs]
        return super().merge(method, rule, rank, beta, **params)


def param_grid(cfg: Config, method: str, rule: str) -> list[dict]:
    grid = [{}]
    if method == "ctm" and len(cfg.betas) > 1:
        grid = [{"beta": b} for b in cfg.betas]
    if rule in SEEDED_RULES:
        grid = [{**g, "p": p, "seed": cfg.dare_seed} for g in grid for p in cfg.dare_ps]
    if rule in TOP_K_RULES:
        grid = [{**g, "top_k": k} for g in grid for k in cfg.top_ks]
    return grid


def kept_by_result(dense: torch.Tensor, merged: torch.Tensor, rank: int) -> list[float]:
    """Share of each adapter's update ``dense [T, m, n]`` inside the top-``rank`` singular
    subspaces of a merged update (what a rank-``rank`` result can express of it)."""
    return energy_kept(dense, *singular_subspaces(merged, rank)).tolist()


def check_manifest(zoo: minilm.Zoo, ev: minilm.Evaluator, limit_test: int | None) -> list[dict]:
    """Known answer: each adapter's accuracy on its own task, now, against the manifest's (on the
    whole test split, or on the first ``minilm.CHECK_TEST`` examples the manifest recorded)."""
    rows = []
    if limit_test not in (None, zoo.manifest["check_test_examples"]):
        raise ValueError(f"the manifest records accuracies on all test examples or the first "
                         f"{zoo.manifest['check_test_examples']}, not {limit_test}")
    key = "individual" if limit_test is None else "check"
    for i, task in enumerate(zoo.tasks):
        want = zoo.manifest["tasks"][task][f"{key}_test_acc"]
        rows.append({"task": task, "manifest": want, "measured": ev.individual["test"][i]})
    return rows


def run_seed(seed: int, cfg: Config, tok, base, log=print, partial: Path | None = None) -> dict:
    """Merges one seed's zoo with every (rank, rule, method) of ``cfg``; with ``partial``, the
    results so far are written there after every row (``"complete": false`` until the end)."""
    t_start = time.perf_counter()
    zoo = minilm.load_zoo(minilm.zoo_dir(seed))
    data = minilm.load_data(tok, zoo.config, {"train": 0, "val": cfg.limit_val, "test": cfg.limit_test})
    ev = minilm.Evaluator(zoo, base, data)
    checks = check_manifest(zoo, ev, cfg.limit_test)
    layers = layer_factors(zoo)
    merger = CachedMerger(layers)
    names = zoo.tasks
    zero = ev.accuracies(None, "test")
    out = {"seed": seed, "tasks": names, "individual_test_acc": ev.individual["test"],
           "individual_val_acc": ev.individual["val"], "manifest_check": checks,
           "lambda0_test_norm": ev.normalised(zero, "test"), "results": [], "skipped": []}
    log(f"seed {seed}: adapters " + ", ".join(f"{c['task']} {c['measured']:.1f}" for c in checks))
    out["spectrum"] = spectrum_stats(layers)
    out["norms"] = [sum(float(d[t].norm()) ** 2 for d in merger.dense) ** 0.5 for t in range(len(names))]
    out["subspaces"] = []
    for rank in cfg.ranks:
        if "ctm" not in cfg.methods:
            continue
        plans = merger.plans(rank, 0.0)
        ctm_kept = [p.info.energy_kept for p in plans]
        mtc_sum = [energy_kept(d, *singular_subspaces(d.sum(0), rank)).tolist() for d in merger.dense]
        out["subspaces"].append({"rank": rank, "energy_kept_ctm": [sum(c) / len(c) for c in zip(*ctm_kept)],
                                 "energy_kept_mtc_sum": [sum(c) / len(c) for c in zip(*mtc_sum)],
                                 "iterations": [p.info.iterations for p in plans]})
    for rank in cfg.ranks:
        for rule in cfg.rules:
            hint = None
            for method in cfg.methods:
                if method == "full" and rank != cfg.ranks[0]:
                    continue
                r = rank if method in RANKED else None
                reason = rule_validity(method, rule, layers, rank)
                if reason:
                    out["skipped"].append({"rank": r, "method": method, "rule": rule, "reason": reason})
                    continue
                t0 = time.perf_counter()
                best = None
                for params in param_grid(cfg, method, rule):
                    merged = [M.float() for M in merger.merge(method, rule, r, **params)]
                    updates = dict(zip(zoo.config.lora_layers, merged))
                    ev.start = hint
                    scores = ev.val_scores(updates, cfg.lambdas)
                    i = max(range(len(scores)), key=lambda j: scores[j])
                    if best is None or scores[i] > best[0]:
                        best = (scores[i], params, i, merged)
                score, params, i, merged = best
                hint = i
                lam = cfg.lambdas[i]
                test = ev.accuracies(dict(zip(zoo.config.lora_layers, merged)), "test", lam)
                norm = ev.normalised(test, "test")
                kept = None
                if r is not None and cfg.result_energy:
                    per_layer = [kept_by_result(d, M.double(), r) for d, M in zip(merger.dense, merged)]
                    kept = [sum(col) / len(col) for col in zip(*per_layer)]
                row = {"rank": r, "method": method, "rule": rule, "lambda": lam, "val_norm_avg": score,
                       "params": {k: v for k, v in params.items() if k != "seed"}, "test_acc": test,
                       "test_norm": norm, "test_norm_avg": sum(norm) / len(norm), "energy_kept_result": kept,
                       "seconds": time.perf_counter() - t0}
                out["results"].append(row)
                if partial is not None:
                    write_json(partial, {**out, "complete": False})
                log(f"  rank {str(r):4s} {method:8s} {rule:9s} norm. acc {row['test_norm_avg']:6.1f} "
                    f"(lambda {lam:g}, {row['params']}, {row['seconds']:.0f} s)")
    if cfg.interference:
        out["interference"] = interference(zoo, ev)
    out["evaluations"] = ev.evaluations
    out["seconds"] = time.perf_counter() - t_start
    out["complete"] = True
    return out


def summarise(outs: list[dict], cfg: Config) -> dict:
    rows, wins = [], []
    for rank in cfg.ranks:
        for rule in cfg.rules:
            for method in cfg.methods:
                r = rank if method in RANKED else None
                got = [g for g in (find(o, method, rule, r) for o in outs) if g is not None]
                if not got:
                    continue
                seeds_with = [o["seed"] for o in outs if find(o, method, rule, r) is not None]
                vals = [g["test_norm_avg"] for g in got]
                T = len(got[0]["test_norm"])
                rows.append({"rank": rank, "rule": rule, "method": method, "per_seed": vals, "seeds": seeds_with,
                             "mean": sum(vals) / len(vals), "spread": max(vals) - min(vals),
                             "per_task": [sum(g["test_norm"][t] for g in got) / len(got) for t in range(T)],
                             "energy_kept": None if got[0]["energy_kept_result"] is None else
                             [sum(g["energy_kept_result"][t] for g in got) / len(got) for t in range(T)],
                             "lambdas": [g["lambda"] for g in got], "params": [g["params"] for g in got]})
            pick = lambda m: next(({s: v for s, v in zip(x["seeds"], x["per_seed"])} for x in rows
                                   if x["rank"] == rank and x["rule"] == rule and x["method"] == m), None)
            if pick("ctm") is None:
                continue
            row = {"rank": rank, "rule": rule}
            # CtM (beta 0) against each baseline under the baseline's name; CtM with beta 1
            # (where it ran) under "ctm_b1-<baseline>"
            for name, prefix in (("ctm", ""), ("ctm_b1", "ctm_b1-")):
                ctm = pick(name)
                for other_name in ("mtc", "core_mtc", "full"):
                    other = pick(other_name)
                    both = [s for s in ctm or {} if other is not None and s in other]
                    if both:
                        d = [ctm[s] - other[s] for s in both]
                        row[prefix + other_name] = {"diff": d, "seeds": both, "mean": sum(d) / len(d),
                                                    "won": sum(x > 0 for x in d)}
            wins.append(row)
    return {"rows": rows, "wins": wins}


def to_markdown(outs, summary, cfg: Config, meta, seconds) -> str:
    n = len(outs)
    names = outs[0]["tasks"]
    short = [t.replace("_", " ") for t in names]
    lines = ["# Merge quality on the MiniLM zoo", "",
             f"{meta['date']}, commit `{meta['commit']}`, {meta['machine']['cpu']}, torch {meta['versions']['torch']}, "
             f"{torch.get_num_threads()} torch thread(s). Run time of this command {seconds:.0f} s (seeds taken from "
             "`quality_minilm_seeds/` with `--reuse`); merging time of each seed's first run: "
             + ", ".join(f"seed {o['seed']} {o['seconds']:.0f} s" for o in outs if "seconds" in o) + ".", "",
             "Zoo: all-MiniLM-L6-v2 (6-layer BERT, hidden 384), one rank-16 LoRA (alpha 32) per task on query, key, "
             "value, attention output, intermediate and output dense of all 6 blocks (36 modules), a linear head per "
             "task on the mean-pooled last hidden state (heads are not merged). Eight tasks from WordNet 3.0 and the "
             "fortune files (`benchmarks/quality/minilm_data.py`).", "",
             f"Protocol `{cfg.protocol}`: lambda grid {_grid_text(cfg.lambdas)} (climbed, see the module's "
             f"docstring), top-K {list(cfg.top_ks)} (TIES, DARE-TIES), DARE p {list(cfg.dare_ps)} (mask seed "
             f"{cfg.dare_seed}), CtM beta {list(cfg.betas)}; chosen on validation by mean normalised accuracy, the "
             "same grids for every method. Validation / test examples per task: "
             f"{cfg.limit_val or 'all (100)'} / {cfg.limit_test or 'all (200)'}. Cells: normalised test accuracy "
             "(merged / the task's own adapter x 100), mean over the seeds ± spread (max - min).", ""]
    ref = []
    for i, t in enumerate(names):
        zs = [minilm.load_zoo(minilm.zoo_dir(o["seed"])).manifest["tasks"][t] for o in outs]
        mean = lambda key: sum(z[key] for z in zs) / len(zs)
        ref.append([short[i], mean("individual_test_acc"), mean("probe_test_acc"), mean("lambda0_test_acc"),
                    mean("individual_test_acc") - mean("probe_test_acc"),
                    sum(o["lambda0_test_norm"][i] for o in outs) / n])
    lines += ["## The adapters", "",
              "Test accuracy (%), mean over the seeds: the task's adapter with its head; the probe (a head alone "
              "trained on the frozen model); the base model with the adapter's head (lambda 0), also normalised.", "",
              markdown_table(["task", "adapter", "probe (frozen)", "base + adapter's head", "adapter - probe",
                              "lambda 0 (normalised)"], ref), ""]
    lines += ["Adapters' spectra and overlap, per seed: " + "; ".join(
        f"seed {o['seed']}: {o['spectrum']['directions_90_mean']:.1f} directions for 90% of an update's energy "
        f"(min {o['spectrum']['directions_90_min']}), first direction {100 * o['spectrum']['first_share_mean']:.0f}% "
        f"(max {100 * o['spectrum']['first_share_max']:.0f}%), mean |cos| between two tasks' updates "
        f"{o['spectrum']['overlap_mean_abs_cos']:.3f}" for o in outs), ""]
    if all("interference" in o for o in outs):
        lines += ["Full-parameter sum of the first k adapters at lambda 1 (mean normalised accuracy on their k "
                  "tasks), per seed: " + "; ".join(", ".join(f"k={k}: {v:.1f}" for k, v in o["interference"].items())
                                                   for o in outs), ""]
    diff_names = {"mtc": "CtM - MtC", "core_mtc": "CtM - core MtC", "ctm_b1-mtc": "CtM beta 1 - MtC"}
    diffs = [d for d in diff_names if d != "ctm_b1-mtc" or "ctm_b1" in cfg.methods]
    for rank in cfg.ranks:
        body = []
        for rule in cfg.rules:
            cells = []
            for method in cfg.methods:
                x = next((x for x in summary["rows"] if x["rank"] == rank and x["rule"] == rule
                          and x["method"] == method), None)
                few = "" if x is None or len(x["seeds"]) == n else f" (seeds {x['seeds']})"
                cells.append(f"{x['mean']:.1f} ± {x['spread']:.1f}{few}" if x else "n/a")
            w = next((w for w in summary["wins"] if w["rank"] == rank and w["rule"] == rule), {})
            for other in diffs:
                cells.append(f"{w[other]['mean']:+.1f} ({w[other]['won']}/{len(w[other]['seeds'])})"
                             if other in w else "n/a")
            body.append([rule] + cells)
        lines += [f"## Rank {rank}", "", "Average normalised accuracy (ctm: CtM with beta 0, ctm_b1: beta 1):", "",
                  markdown_table(["rule"] + [m + (" (no rank limit)" if m == "full" else "") for m in cfg.methods] +
                                 [diff_names[d] + " (seeds won)" for d in diffs], body), ""]
        per_task, energy = [], []
        for x in summary["rows"]:
            if x["rank"] != rank:
                continue
            label = f"{x['rule']} / {x['method']}"
            per_task.append([label] + x["per_task"] + [x["mean"]])
            if x["energy_kept"] is not None:
                energy.append([label] + x["energy_kept"] + [sum(x["energy_kept"]) / len(x["energy_kept"]),
                                                            x["mean"]])
        lines += ["Per task (normalised, mean over the seeds):", "",
                  markdown_table(["rule / method"] + short + ["avg"], per_task), ""]
        subs = [s for o in outs for s in o.get("subspaces", []) if s["rank"] == rank]
        if subs:
            ctm = [sum(s["energy_kept_ctm"][t] for s in subs) / len(subs) for t in range(len(names))]
            mtc = [sum(s["energy_kept_mtc_sum"][t] for s in subs) / len(subs) for t in range(len(names))]
            energy += [["CtM subspace (before the rule)"] + ctm + [sum(ctm) / len(ctm), ""],
                       ["summed update's top-r subspace"] + mtc + [sum(mtc) / len(mtc), ""]]
        lines += [f"Energy kept per adapter (share of ||dW_t||^2 inside the top-{rank} singular subspaces of the "
                  "merged result, mean over the 36 modules and the seeds), beside the accuracy:", "",
                  markdown_table(["rule / method"] + short + ["mean", "norm. acc"], energy, decimals=2), ""]
    checks = [f"seed {o['seed']}: " + ", ".join(f"{c['measured']:.1f} (manifest {c['manifest']:.1f})"
                                                for c in o["manifest_check"]) for o in outs]
    lines += ["Adapters' own test accuracy now against the manifest: " + "; ".join(checks), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="zoo seeds to merge (default: every committed seed; --quick: 0)")
    parser.add_argument("--quick", action="store_true", help="one seed, rank 16, sum and TIES, CtM and MtC, "
                        "25 validation and 50 test examples per task")
    parser.add_argument("--protocol", choices=("project", "paper"), default="project")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="take a seed's results from "
                        "<out>/quality_minilm_seeds/seed<k>_<protocol>.json where a previous run wrote them")
    parser.add_argument("--only-seeds", action="store_true", help="merge the seeds and write their files, "
                        "not the tables (run the seeds in separate processes, then once more with --reuse)")
    parser.add_argument("--methods", nargs="+", help="override the methods (e.g. ctm ctm_b1 mtc: beta 1 beside 0)")
    parser.add_argument("--rules", nargs="+", help="override the rules")
    parser.add_argument("--ranks", type=int, nargs="+", help="override the ranks")
    parser.add_argument("--extend", action="store_true", help="merge the seeds again with the overrides and add "
                        "the new rows to their earlier results file")
    parser.add_argument("--tag", default="", help="suffix of the output files (runs with overrides)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else (PAPER if args.protocol == "paper" else FULL)
    for name in ("methods", "rules", "ranks"):
        if getattr(args, name):
            cfg = replace(cfg, **{name: tuple(getattr(args, name))})
    if args.quick and args.protocol == "paper":
        cfg = replace(PAPER, ranks=QUICK.ranks, methods=QUICK.methods, rules=QUICK.rules, limit_val=QUICK.limit_val,
                      limit_test=QUICK.limit_test, interference=False, top_ks=(0.3,), betas=(0.0, 0.5))
    seeds = args.seeds or ([0] if args.quick else sorted(
        int(p.name[4:]) for p in minilm.ZOO_ROOT.glob("seed*") if (p / "manifest.json").is_file()))
    t0 = time.perf_counter()
    tok, base = minilm.load_base()
    outs = []
    for s in seeds:
        cached = args.out / "quality_minilm_seeds" / f"seed{s}_{cfg.protocol}{args.tag}.json"
        if args.reuse and not args.quick and cached.is_file():
            outs.append(json.loads(cached.read_text()))
            print(f"seed {s}: reused {cached}" + ("" if outs[-1].get("complete", True) else " (partial)"))
            continue
        if args.extend and cached.is_file():
            # add this run's rows (other ranks or methods) to a seed's earlier results
            new = run_seed(s, replace(cfg, interference=False), tok, base, partial=cached.with_suffix(f".extend{os.getpid()}.json"))
            old = json.loads(cached.read_text())       # read after the run: another run may have extended it
            have = {(r["rank"], r["method"], r["rule"]) for r in old["results"]}
            old["results"] += [r for r in new["results"] if (r["rank"], r["method"], r["rule"]) not in have]
            ranks = {x["rank"] for x in old.get("subspaces", [])}
            old["subspaces"] = old.get("subspaces", []) + [x for x in new["subspaces"] if x["rank"] not in ranks]
            outs.append(old)
            write_json(cached, old)
            cached.with_suffix(f".extend{os.getpid()}.json").unlink(missing_ok=True)
            continue
        outs.append(run_seed(s, cfg, tok, base, partial=None if args.quick else cached))
        if not args.quick:
            write_json(cached, outs[-1])
    if args.only_seeds:
        return {"outs": outs}
    summary = summarise(outs, cfg)
    seconds = time.perf_counter() - t0
    meta = metadata()
    # a run from an exported tree (no .git) names the commit it was exported from
    meta["commit"] = os.environ.get("CTM_SOURCE_COMMIT", meta["commit"])
    stem = "quality_minilm" + ("_paper" if cfg.protocol == "paper" else "") + ("_quick" if args.quick else "") + args.tag
    write_json(args.out / f"{stem}.json", {"meta": meta, "config": asdict(cfg), "seconds": seconds,
                                           "seeds": outs, "summary": summary})
    (args.out / f"{stem}.md").write_text(to_markdown(outs, summary, cfg, meta, seconds))
    print(f"wrote {args.out / stem}.json and .md ({seconds:.0f} s)")
    for w in summary["wins"]:
        print(f"rank {w['rank']} {w['rule']}: " + ", ".join(
            f"CtM{' beta 1' if k.startswith('ctm_b1-') else ''} - {k.removeprefix('ctm_b1-')} {v['mean']:+.1f} "
            f"({v['won']}/{len(v['seeds'])})" for k, v in w.items() if isinstance(v, dict)))
    return {"outs": outs, "summary": summary, "seconds": seconds}


if __name__ == "__main__":
    main()
