"""Merge quality on real tasks: the digits LoRA zoo merged with every rule and method.

``python -m benchmarks.quality.digits`` (from the repository root) loads the committed zoo
(``benchmarks/quality/zoo/``; ``--retrain`` trains it again first), merges its adapters with
every rule in CtM, MtC, core-space MtC and full-parameter merging, chooses the scale lambda
(and ``top_k`` for TIES and DARE-TIES) on the validation split with the same grids for every
method, and reports test accuracy normalised by each adapter's own accuracy
(merged / individual x 100), per task and on average, as the tables of the CtM paper do.
Writes ``benchmarks/results/quality_digits.{json,md}`` (``--quick``: ``quality_digits_quick.*``).
``--protocol paper`` searches as the CtM paper does (CtM's beta in {0, 0.25, 0.5, 0.75}, lambda
on 0..2 in steps of 0.025, top-K and the DARE drop rate; every CtM subspace solved once per
(rank, beta)) and writes ``quality_digits_paper[_quick].*``.

Every task keeps its own head (trained with its adapter); only the backbone updates merge.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .merging import CTM_BETA, METHODS, RANKED, LayerFactors, Merger, energy_kept, rule_validity, singular_subspaces
from .report import RESULTS_DIR, markdown_table, metadata, write_json
from .tasks import Digits
from .zoo import ZOO_DIR, Zoo, ZooConfig, accuracy, load_zoo, save_zoo, train_zoo

ALL_RULES = ("sum", "mean", "ties", "dare", "dare_ties", "tsv", "iso_c", "iso_cts")
TOP_K_RULES = ("ties", "dare_ties")
SEEDED_RULES = ("dare", "dare_ties")


@dataclass
class RunConfig:
    """What a run merges and the hyper-parameter grids (the same for every method)."""

    ranks: tuple[int, ...] = (8, 16)
    methods: tuple[str, ...] = METHODS
    rules: tuple[str, ...] = ALL_RULES
    # geometric grid 1/8 .. 8 (factor sqrt 2): covers sum-like rules (lambda ~ 1/T) and
    # mean-like ones (TIES, Iso: lambda ~ 1..T)
    lambdas: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-6, 7))
    top_ks: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    dare_ps: tuple[float, ...] = (0.5,)
    dare_seeds: tuple[int, ...] = (0, 1, 2)
    # beta of method "ctm", searched on validation with the other parameters ("ctm_b1" is beta 1)
    betas: tuple[float, ...] = (0.0,)
    protocol: str = "project"
    tol: float | None = None      # the engine's default stop (energy, 1e-6)
    max_iter: int = 1000
    # zoos retrained with other seeds, on which the CtM-vs-MtC comparison is repeated
    replicates: int = 2


QUICK = RunConfig(ranks=(8,), methods=("ctm", "mtc", "core_mtc", "full"),
                  rules=("sum", "ties", "dare_ties", "tsv", "iso_c"),
                  lambdas=(0.25, 0.5, 1.0, 2.0, 4.0), top_ks=(0.1, 0.3, 1.0), dare_seeds=(0,), replicates=0)
# The CtM paper's protocol: beta searched for CtM, the scale on 0..2 in steps of 0.025, top-K
# 5-100% and the DARE drop rate searched, all on validation. Its TIES keeps int(K d) + 1
# entries per task where this project keeps max(1, round(K d)) (rules.ties_keep_count): at the
# digits zoo's sizes (d = r^2 >= 64 or m n) that is at most one entry in 64.
PAPER = RunConfig(ranks=(8, 16), methods=("ctm", "mtc", "core_mtc", "full"), rules=ALL_RULES,
                  lambdas=tuple(round(0.025 * k, 3) for k in range(81)),
                  top_ks=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), dare_ps=(0.1, 0.3, 0.5, 0.7), dare_seeds=(0,),
                  betas=(0.0, 0.25, 0.5, 0.75),
                  replicates=2, protocol="paper")
PAPER_QUICK = RunConfig(**{**asdict(PAPER), "ranks": (8,), "rules": ("sum", "ties"), "top_ks": (0.1, 0.3, 1.0),
                            "dare_ps": (0.5,), "betas": (0.0, 0.5)})
CLAIM_RULES = ("ties", "dare_ties")
CLAIM_METHODS = ("ctm", "ctm_b1", "mtc", "core_mtc")


def layer_factors(zoo: Zoo) -> list[LayerFactors]:
    return [LayerFactors([a.A[name] for a in zoo.adapters], [a.B[name] for a in zoo.adapters],
                         [a.scaling for a in zoo.adapters]) for name in zoo.config.lora_layers]


class Evaluator:
    """Accuracies of the zoo's task heads on one backbone update, per split."""

    def __init__(self, zoo: Zoo, data: Digits):
        self.zoo = zoo
        self.splits = {part: [data.split(t, part) for t in zoo.tasks] for part in ("val", "test")}
        self.individual = {part: [accuracy(zoo.backbone, a.deltas(), a.head_weight, a.head_bias, s)
                                  for a, s in zip(zoo.adapters, self.splits[part])] for part in self.splits}

    def accuracies(self, deltas: dict[str, torch.Tensor] | None, part: str) -> list[float]:
        return [accuracy(self.zoo.backbone, deltas, a.head_weight, a.head_bias, s)
                for a, s in zip(self.zoo.adapters, self.splits[part])]

    def normalised(self, accs: list[float], part: str) -> list[float]:
        return [100.0 * acc / ind for acc, ind in zip(accs, self.individual[part])]

    def val_scores(self, updates: dict[str, torch.Tensor], lambdas) -> list[float]:
        """Mean normalised validation accuracy of ``lam * updates`` for every ``lam``."""
        total = [0.0] * len(lambdas)
        for a, split, ind in zip(self.zoo.adapters, self.splits["val"], self.individual["val"]):
            with torch.no_grad():
                feats = self.zoo.backbone.features_over_scales(split.x, updates, lambdas)
                for i, f in enumerate(feats):
                    logits = torch.nn.functional.linear(f, a.head_weight, a.head_bias)
                    total[i] += 100.0 * (100.0 * (logits.argmax(1) == split.y).float().mean().item()) / ind
        return [t / len(self.zoo.adapters) for t in total]


def _search(ev: Evaluator, merged_by_param: dict, lambdas) -> dict:
    """Best ``(params, lambda)`` on validation (mean normalised accuracy; the first best wins,
    params and lambdas in grid order), then its test accuracies. ``merged_by_param`` maps a
    tuple of ``(name, value)`` pairs to the per-layer merged updates."""
    best = None
    layers = ev.zoo.config.lora_layers
    for key, merged in merged_by_param.items():
        updates = {name: M.float() for name, M in zip(layers, merged)}
        for lam, score in zip(lambdas, ev.val_scores(updates, lambdas)):
            if best is None or score > best[0]:
                best = (score, key, lam, updates)
    score, key, lam, updates = best
    test = ev.accuracies({name: lam * M for name, M in updates.items()}, "test")
    return {**dict(key), "lambda": lam, "val_norm_avg": score, "test_acc": test,
            "test_norm": ev.normalised(test, "test")}


def _param_grid(cfg: RunConfig, method: str, rule: str, seed) -> list[tuple]:
    """Every parameter combination searched for ``(method, rule)``, as tuples of pairs."""
    axes = []
    if method == "ctm":
        axes.append([("beta", b) for b in cfg.betas])
    if seed is not None:
        axes.append([("p", p) for p in cfg.dare_ps])
    if rule in TOP_K_RULES:
        axes.append([("top_k", k) for k in cfg.top_ks])
    grid = [()]
    for axis in axes:
        grid = [g + (a,) for g in grid for a in axis]
    return grid


def run(zoo: Zoo, data: Digits | None, cfg: RunConfig, log=print, evaluator=None) -> dict:
    """Merge the zoo with every (rank, method, rule) of ``cfg``; returns the results (JSON-ready).
    ``evaluator``: another zoo's evaluator with the interface of :class:`Evaluator` (its zoo
    has ``config.lora_layers`` and adapters with ``task``, ``A``, ``B``, ``scaling``)."""
    t_start = time.perf_counter()
    ev = Evaluator(zoo, data) if evaluator is None else evaluator
    layers = layer_factors(zoo)
    merger = Merger(layers, tol=cfg.tol, max_iter=cfg.max_iter)
    names = [a.task for a in zoo.adapters]
    zero = ev.accuracies(None, "test")
    out = {"tasks": names, "config": asdict(cfg),
           "individual_test_acc": ev.individual["test"], "individual_val_acc": ev.individual["val"],
           "lambda0_test_norm": ev.normalised(zero, "test"), "results": [], "skipped": []}
    for rank in cfg.ranks:
        for method in cfg.methods:
            if method == "full" and rank != cfg.ranks[0]:
                continue  # no rank: one run is enough
            for rule in cfg.rules:
                r = rank if method in RANKED else None
                reason = rule_validity(method, rule, layers, rank)
                if reason:
                    out["skipped"].append({"rank": r, "method": method, "rule": rule, "reason": reason})
                    continue
                t0 = time.perf_counter()
                seeds = cfg.dare_seeds if rule in SEEDED_RULES else (None,)
                per_seed = []
                for seed in seeds:
                    fixed = {"seed": seed} if seed is not None else {}
                    merged = {key: merger.merge(method, rule, r, **fixed, **dict(key))
                              for key in _param_grid(cfg, method, rule, seed)}
                    per_seed.append({"seed": seed, **_search(ev, merged, cfg.lambdas)})
                test_norm = [sum(s["test_norm"][i] for s in per_seed) / len(per_seed) for i in range(len(names))]
                test_acc = [sum(s["test_acc"][i] for s in per_seed) / len(per_seed) for i in range(len(names))]
                row = {"rank": r, "method": method, "rule": rule, "test_norm": test_norm, "test_acc": test_acc,
                       "test_norm_avg": sum(test_norm) / len(test_norm), "chosen": per_seed,
                       "seconds": time.perf_counter() - t0}
                out["results"].append(row)
                chosen = [{k: v for k, v in s.items() if k in ("beta", "p", "top_k", "lambda")} for s in per_seed]
                log(f"  rank {str(r):4s} {method:8s} {rule:9s} norm. acc {row['test_norm_avg']:6.1f}  "
                    f"(chosen {chosen}, {row['seconds']:.1f} s)")
    out["subspaces"] = subspace_diagnostics(zoo, merger, cfg)
    out["seconds"] = time.perf_counter() - t_start
    return out


def subspace_diagnostics(zoo: Zoo, merger: Merger, cfg: RunConfig) -> list[dict]:
    """Per rank and layer: what each subspace keeps of every adapter.

    Adapter norms, the share of each adapter's energy in its own top singular direction, the
    energy kept by the CtM subspaces (engine, beta 0 and 1) and by the rank-r singular
    subspaces of the summed update (what MtC with ``sum`` keeps), the sum's energy in its top
    r directions, and the CtM iterations."""
    rows = []
    for rank in cfg.ranks:
        for li, (name, dW) in enumerate(zip(zoo.config.lora_layers, merger.dense)):
            S = torch.linalg.svdvals(dW)                                     # [T, k]
            total = dW.sum(0)
            S_sum = torch.linalg.svdvals(total)
            row = {"rank": rank, "layer": name,
                   "norms": torch.linalg.matrix_norm(dW).tolist(),
                   "top1_share": (S[:, 0] ** 2 / (S ** 2).sum(1)).tolist(),
                   "sum_top_r_share": float((S_sum[:rank] ** 2).sum() / (S_sum ** 2).sum()),
                   "energy_kept_mtc_sum": energy_kept(dW, *singular_subspaces(total, rank)).tolist()}
            for method, beta in CTM_BETA.items():
                if method in cfg.methods:
                    info = merger.plans(rank, beta)[li].info
                    row[f"energy_kept_{method}"] = info.energy_kept
                    row[f"iterations_{method}"] = info.iterations
                    row[f"converged_{method}"] = info.converged
            rows.append(row)
    return rows


def find(out: dict, method: str, rule: str, rank: int | None) -> dict | None:
    for row in out["results"]:
        if row["method"] == method and row["rule"] == rule and row["rank"] == rank:
            return row
    return None


def claims(outs: list[dict]) -> list[dict]:
    """CtM (beta 0 and 1) against MtC with the same rule, per rank, for TIES and DARE-TIES, on
    every zoo of ``outs`` (the committed one first, then the replicates)."""
    rows = []
    for rank in outs[0]["config"]["ranks"]:
        for rule in CLAIM_RULES:
            got = {m: [find(o, m, rule, rank) for o in outs] for m in CLAIM_METHODS}
            if not all(got["ctm"]) or not all(got["mtc"]):
                continue
            row = {"rank": rank, "rule": rule}
            for m, found in got.items():
                if all(found):
                    row[m] = [f["test_norm_avg"] for f in found]
            diff = [c - m for c, m in zip(row["ctm"], row["mtc"])]
            row |= {"ctm_minus_mtc": diff, "ctm_minus_mtc_mean": sum(diff) / len(diff),
                    "ctm_beats_mtc_on": sum(d > 0 for d in diff), "zoos": len(diff)}
            if "core_mtc" in row:
                core = [c - m for c, m in zip(row["ctm"], row["core_mtc"])]
                row |= {"ctm_minus_core_mtc_mean": sum(core) / len(core),
                        "ctm_beats_core_mtc_on": sum(d > 0 for d in core)}
            rows.append(row)
    return rows


def _subspace_table(out: dict, rank: int) -> list[str]:
    names = out["tasks"]
    header = ["layer", "measure"] + [n.replace("_", " ") for n in names] + ["mean"]
    body = []
    for row in out["subspaces"]:
        if row["rank"] != rank:
            continue
        for key, label in (("norms", "norm of dW_t"), ("top1_share", "top-1 direction share"),
                           ("energy_kept_ctm", "kept: CtM (beta 0)"), ("energy_kept_ctm_b1", "kept: CtM (beta 1)"),
                           ("energy_kept_mtc_sum", "kept: MtC sum subspace")):
            if key in row:
                fmt = (lambda v: round(v, 1)) if key == "norms" else (lambda v: round(v, 2))
                body.append([row["layer"], label] + [fmt(v) for v in row[key]] + [fmt(sum(row[key]) / len(row[key]))])
    return [markdown_table(header, body)]


def _grid_text(values) -> str:
    values = [round(x, 3) for x in values]
    if len(values) > 15:
        return f"{values[0]}..{values[-1]} ({len(values)} values)"
    return str(values)


def to_markdown(out: dict, meta: dict, zoo: Zoo) -> str:
    names = out["tasks"]
    short = [n.replace("_", " ") for n in names]
    cfg = out["config"]
    zc = zoo.config
    lines = ["# Merge quality on the digits LoRA zoo", "",
             f"{meta['date']}, commit `{meta['commit']}`, {meta['machine']['cpu']} "
             f"({meta['machine']['cores']} cores, {meta['machine']['torch_threads']} torch threads), "
             f"torch {meta['versions']['torch']}. Run time {out['wall_seconds']:.0f} s.", "",
             f"Zoo: MLP 64-{zc.hidden}-{zc.hidden}-{zc.hidden}, one rank-{zc.rank} LoRA (alpha {zc.alpha:g}) per task "
             f"on {', '.join(zc.lora_layers)} and one head per task (heads are not merged); {len(names)} tasks. "
             f"Protocol `{cfg['protocol']}`: lambda grid {_grid_text(cfg['lambdas'])}, top_k grid "
             f"{list(cfg['top_ks'])} (TIES, DARE-TIES), DARE p in {list(cfg['dare_ps'])} with seeds "
             f"{list(cfg['dare_seeds'])} (results averaged over seeds), CtM beta in {list(cfg['betas'])}; "
             "chosen on validation by mean normalised accuracy, the same grids for every method. "
             "TIES keeps max(1, round(K d)) entries per task (the paper's code: int(K d) + 1). "
             "Numbers: test accuracy of the merged model / the task's own adapter x 100. "
             "ctm: CtM (beta as the protocol says), ctm_b1: beta 1.", ""]
    ind = [["individual (abs. %)"] + list(out["individual_test_acc"]) +
           [sum(out["individual_test_acc"]) / len(names)],
           ["base + task heads (lambda 0)"] + list(out["lambda0_test_norm"]) +
           [sum(out["lambda0_test_norm"]) / len(names)]]
    lines += [markdown_table(["reference"] + short + ["avg"], ind), ""]
    lines += ["## CtM against MtC, same rule", "",
              f"Average normalised accuracy on the committed zoo and on {len(out['replicates'])} zoos retrained "
              "with other seeds (same tasks, split and grids).", ""]
    seq = lambda c, m: " / ".join(f"{v:.1f}" for v in c.get(m, [])) or "n/a"
    ctm_label = "CtM (beta searched)" if len(cfg["betas"]) > 1 else f"CtM (beta {cfg['betas'][0]:g})"
    lines += [markdown_table(
        ["rank", "rule", ctm_label, "CtM (beta 1)", "MtC", "core MtC", "CtM - MtC (mean)", "CtM better on",
         "CtM - core MtC (mean)", "CtM better on"],
        [[c["rank"], c["rule"], seq(c, "ctm"), seq(c, "ctm_b1"), seq(c, "mtc"), seq(c, "core_mtc"),
          round(c["ctm_minus_mtc_mean"], 1), f"{c['ctm_beats_mtc_on']} of {c['zoos']} zoos",
          round(c["ctm_minus_core_mtc_mean"], 1) if "ctm_minus_core_mtc_mean" in c else "n/a",
          f"{c['ctm_beats_core_mtc_on']} of {c['zoos']} zoos" if "ctm_beats_core_mtc_on" in c else "n/a"]
         for c in out["claims"]]), ""]
    for rank in cfg["ranks"]:
        lines += [f"## Merged rank {rank}", ""]
        summary = []
        for rule in cfg["rules"]:
            cells = []
            for method in cfg["methods"]:
                row = find(out, method, rule, rank if method in RANKED else None)
                cells.append(row["test_norm_avg"] if row else "n/a")
            summary.append([rule] + cells)
        lines += [f"Average normalised accuracy, rank {rank}:", "",
                  markdown_table(["rule"] + [m + (" (no rank limit)" if m == "full" else "") for m in cfg["methods"]],
                                 summary), "", "Per task:", ""]
        body = []
        for rule in cfg["rules"]:
            for method in cfg["methods"]:
                row = find(out, method, rule, rank if method in RANKED else None)
                if row:
                    label = f"{rule} / {method}" + ("" if method in RANKED else " (no rank limit)")
                    body.append([label] + row["test_norm"] + [row["test_norm_avg"]])
        lines += [markdown_table(["rule / method"] + short + ["avg"], body), ""]
        lines += [f"What the rank-{rank} subspaces keep of each adapter (share of ||dW_t||^2):", ""]
        lines += _subspace_table(out, rank) + [""]
    if out["skipped"]:
        lines += ["Not run:", ""] + [f"* {s['rule']} / {s['method']} (rank {s['rank']}): {s['reason']}"
                                      for s in out["skipped"]] + [""]
    its = [f"rank {s['rank']} {s['layer']}: " + ", ".join(
        f"{m} {s[f'iterations_{m}']}{'' if s[f'converged_{m}'] else ' (not converged)'}"
        for m in CTM_BETA if f"iterations_{m}" in s) for s in out["subspaces"]]
    lines += [f"CtM subspace search (engine, energy stop, tol {cfg['tol'] or 1e-6:g}), HOOI iterations: " + "; ".join(its), ""]
    return "\n".join(lines)


def replicate(k: int, data: Digits, cfg: RunConfig, log=print) -> dict:
    """Retrain the zoo with seeds shifted by ``k`` and rerun the CtM-vs-MtC comparison on it."""
    base = ZooConfig()
    zoo = train_zoo(ZooConfig(base_seed=base.base_seed + k, adapter_seed=base.adapter_seed + 100 * k), data,
                    log=lambda *a: None)
    sub = RunConfig(**{**asdict(cfg), "methods": tuple(m for m in CLAIM_METHODS if m in cfg.methods),
                       "rules": tuple(r for r in CLAIM_RULES if r in cfg.rules)})
    out = run(zoo, data, sub, log=lambda *a: None)
    log(f"replicate {k}: " + ", ".join(f"rank {r['rank']} {r['method']} {r['rule']} {r['test_norm_avg']:.1f}"
                                       for r in out["results"]))
    return {"seeds": {"base_seed": zoo.config.base_seed, "adapter_seed": zoo.config.adapter_seed},
            "individual_test_acc": out["individual_test_acc"], "lambda0_test_norm": out["lambda0_test_norm"],
            "results": out["results"], "config": out["config"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="rank 8 only, fewer rules, smaller grids (< 2 min)")
    parser.add_argument("--protocol", choices=("project", "paper"), default="project",
                        help="paper: the CtM paper's search (beta, scale 0..2 step 0.025, top-K, DARE p)")
    parser.add_argument("--retrain", action="store_true", help="train the zoo again (and overwrite it) first")
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: these ops are too small to gain from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = {(False, "project"): RunConfig(), (True, "project"): QUICK, (False, "paper"): PAPER,
           (True, "paper"): PAPER_QUICK}[args.quick, args.protocol]
    data = Digits()
    if args.retrain or not (args.zoo / "manifest.json").is_file():
        save_zoo(train_zoo(ZooConfig(), data), args.zoo)
    zoo = load_zoo(args.zoo)
    out = run(zoo, data, cfg)
    out["replicates"] = [replicate(k, data, cfg) for k in range(1, cfg.replicates + 1)]
    out["claims"] = claims([out] + out["replicates"])
    meta = metadata()
    out["wall_seconds"] = time.perf_counter() - t0
    stem = "quality_digits" + ("_paper" if args.protocol == "paper" else "") + ("_quick" if args.quick else "")
    write_json(args.out / f"{stem}.json", {"meta": meta, "zoo": {"config": asdict(zoo.config), "stats": zoo.stats},
                                          **out})
    (args.out / f"{stem}.md").write_text(to_markdown(out, meta, zoo))
    print(f"wrote {args.out / stem}.json and .md ({out['wall_seconds']:.0f} s)")
    for c in out["claims"]:
        print(f"rank {c['rank']} {c['rule']}: CtM {c['ctm']} vs MtC {c['mtc']}")
    return out


if __name__ == "__main__":
    main()
