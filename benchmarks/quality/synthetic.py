"""Merge quality without tasks: how much of each adapter a rank-r merge keeps.

``python -m benchmarks.quality.synthetic [--quick]`` (from the repository root) builds
structured adapter sets (a few directions shared by all adapters plus task-specific ones,
uneven norms, LoRA factors in a random basis) for several T and target ranks r, merges them
with CtM (the engine), MtC and core-space MtC (``ctm_kernels.reference``) and, as the
ceiling, full-parameter merging, and measures per adapter t:

* energy kept: ``||U^T dW_t V||^2 / ||dW_t||^2``, with ``U, V`` the CtM subspaces (the
  engine's ``info.energy_kept``) or, for MtC and core-space MtC, the left/right singular
  subspaces of the rank-r merged output; the share kept of the task-specific part
  (``dW_t`` minus its shared-direction part) is measured the same way from the output's
  singular subspaces (for CtM they are U, V whenever the merged core is nonsingular);
* function error: ``||dW_merged x - dW_t x|| / ||dW_t x||`` averaged over gaussian inputs x,
  with ``dW_merged = lambda * merge``; lambda minimises the (squared) error on a separate
  draw of x, as the digits benchmark chooses lambda on a validation split. Gaussian x excite
  every adapter's directions alike, so the other adapters' updates count as error; the
  "own inputs" variant draws x from adapter t's input subspace (``x = A_t^T z``), the
  inputs that adapter t acts on, as a task's own data would.

Writes ``benchmarks/results/quality_synthetic.{json,csv,md}`` (``--quick``: ``*_quick.*``).
``--protocol paper`` chooses lambda on the grid 0..2 (step 0.025) and searches top_k, the DARE
drop rate and CtM's beta on the validation draw, as the CtM paper does
(``quality_synthetic_paper[_quick].*``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .merging import METHODS, RANKED, LayerFactors, Merger, singular_subspaces, energy_kept
from .report import RESULTS_DIR, markdown_table, metadata, write_csv, write_json

SYN_METHODS = tuple(m for m in METHODS if m != "ctm_b1")


@dataclass
class SyntheticConfig:
    m: int = 384
    n: int = 384
    adapter_rank: int = 16
    shared: int = 4            # directions shared by every adapter
    shared_strength: float = 1.0
    decay: float = 0.85        # task-specific singular values decay^j
    norm_spread: float = 0.3   # adapters' norms vary as exp(norm_spread * N(0, 1))
    Ts: tuple[int, ...] = (4, 8, 16, 32)
    ranks: tuple[int, ...] = (8, 16, 32)
    rules: tuple[str, ...] = ("sum", "ties", "dare_ties", "tsv", "iso_c")
    inputs: int = 256          # gaussian inputs x per draw (one draw picks lambda, one measures)
    seed: int = 0
    # "project": lambda in closed form, rule defaults (TIES top_k 0.2, DARE-TIES p 0.5), CtM beta 0;
    # "paper": the CtM paper's search on the validation draw: lambda on the grid below, top_k,
    # DARE p and CtM's beta searched
    protocol: str = "project"
    lambdas: tuple[float, ...] = tuple(round(0.025 * k, 3) for k in range(81))
    top_ks: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    dare_ps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    betas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)


QUICK = SyntheticConfig(m=256, n=256, Ts=(4, 16), ranks=(8, 16), rules=("sum", "ties", "tsv"), inputs=128)


@dataclass
class AdapterSet:
    layer: LayerFactors
    specific: torch.Tensor     # [T, m, n]: each update minus its shared-direction part


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def structured_adapters(cfg: SyntheticConfig, T: int, seed: int) -> AdapterSet:
    """T adapters ``dW_t = U_s S_t V_s^T + g_t U_t D V_t^T`` as LoRA factors.

    ``U_s [m, k], V_s [n, k]``: directions shared by all (``S_t``: positive, +-25% per
    adapter); ``U_t, V_t``: the adapter's own directions with singular values ``D = decay^j``;
    ``g_t``: lognormal norm spread. The factors are ``B_t = [U_s S_t^1/2, U_t (g_t D)^1/2] Q_t``,
    ``A_t = Q_t^T [...]^T`` with a random orthogonal ``Q_t``, so they are not SVD-aligned (as
    trained LoRA factors are not)."""
    g = torch.Generator().manual_seed(seed)
    k, rt = cfg.shared, cfg.adapter_rank
    Us, Vs = _orthonormal(cfg.m, k, g), _orthonormal(cfg.n, k, g)
    A, B, specific = [], [], []
    own = cfg.decay ** torch.arange(rt - k, dtype=torch.float64)
    for _ in range(T):
        s_shared = cfg.shared_strength * (1 + 0.25 * torch.randn(k, generator=g, dtype=torch.float64)).clamp(min=0.1)
        s_own = own * float(torch.exp(cfg.norm_spread * torch.randn((), generator=g, dtype=torch.float64)))
        Ut, Vt = _orthonormal(cfg.m, rt - k, g), _orthonormal(cfg.n, rt - k, g)
        Q = _orthonormal(rt, rt, g)
        sig = torch.cat([s_shared, s_own]).sqrt()
        B.append((torch.cat([Us, Ut], 1) * sig) @ Q)
        A.append(Q.mT @ (torch.cat([Vs, Vt], 1) * sig).mT)
        specific.append((Ut * s_own) @ Vt.mT)
    return AdapterSet(LayerFactors(A, B, [1.0] * T), torch.stack(specific))


def function_error(merged: torch.Tensor, dW: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor):
    """Mean over adapters and test inputs of ``||lam M x - dW_t x|| / ||dW_t x||``; ``lam``
    minimises the mean squared relative error on ``x_val`` (closed form).

    ``merged [m, n]``, ``dW [T, m, n]``; inputs ``x [n, N]`` shared by all adapters or
    ``[T, n, N]`` (adapter t measured on ``x[t]``) -> (error, lam)."""
    Mx = merged @ x_val                                      # [m, N] or [T, m, N]
    Dx = dW @ x_val                                          # [T, m, N]
    w = 1.0 / Dx.square().sum(1)                             # [T, N]
    num = (w * (Mx * Dx).sum(-2)).sum()
    den = (w * Mx.square().sum(-2)).sum()
    lam = float(num / den) if den > 0 else 0.0
    Dt = dW @ x_test
    per = (lam * (merged @ x_test) - Dt).norm(dim=-2) / Dt.norm(dim=-2)   # [T, N]
    return float(per.mean()), lam


def grid_error(merged: torch.Tensor, dW: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor, lambdas):
    """Mean relative error ``||lam M x - dW_t x|| / ||dW_t x||`` (as :func:`function_error`)
    with ``lam`` the grid value of least error on ``x_val`` -> (val error, test error, lam)."""
    def errors(x):
        Mx, Dx = merged @ x, dW @ x                           # [m, N] or [T, m, N]; [T, m, N]
        # ||lam a - b||^2 = lam^2 a.a - 2 lam a.b + b.b per adapter and input: no [grid, T, m, N] tensor
        aa, ab, bb = (Mx * Mx).sum(-2), (Mx * Dx).sum(-2), (Dx * Dx).sum(-2)          # [T, N]
        lam = torch.tensor(lambdas, dtype=Dx.dtype)[:, None, None]
        sq = (lam ** 2 * aa - 2 * lam * ab + bb).clamp(min=0)
        return (sq.sqrt() / bb.sqrt()).flatten(1).mean(1)                              # [len(lambdas)]
    val = errors(x_val)
    best = int(val.argmin())
    return float(val[best]), float(errors(x_test)[best]), lambdas[best]


def _paper_grid(cfg: SyntheticConfig, method: str, rule: str) -> list[dict]:
    grid = [{}]
    if method == "ctm":
        grid = [{"beta": b} for b in cfg.betas]
    if rule == "dare_ties":
        grid = [{**g, "p": p, "seed": 0} for g in grid for p in cfg.dare_ps]
    if rule in ("ties", "dare_ties"):
        grid = [{**g, "top_k": k} for g in grid for k in cfg.top_ks]
    return grid


def _paper_search(merger, method, rule, rank, dW, draws, lambdas, grid):
    """Per input kind (gaussian, own), the parameters and lambda of least validation error."""
    best = {}
    for params in grid:
        M = merger.merge(method, rule, rank, **params)[0]
        for kind, (x_val, x_test) in draws.items():
            val, test, lam = grid_error(M, dW, x_val, x_test, lambdas)
            if kind not in best or val < best[kind][0]:
                best[kind] = (val, test, lam, params, M)
    return best


def run(cfg: SyntheticConfig, log=print) -> list[dict]:
    rows = []
    for T in cfg.Ts:
        data = structured_adapters(cfg, T, cfg.seed + T)
        merger = Merger([data.layer], tol=1e-6, max_iter=2000)
        dW = merger.dense[0]
        g = torch.Generator().manual_seed(cfg.seed + 1000 + T)
        x_val = torch.randn(cfg.n, cfg.inputs, generator=g, dtype=torch.float64)
        x_test = torch.randn(cfg.n, cfg.inputs, generator=g, dtype=torch.float64)
        A = torch.stack([a.double() for a in data.layer.A])                     # [T, r_t, n]
        own_val = A.mT @ torch.randn(T, cfg.adapter_rank, cfg.inputs, generator=g, dtype=torch.float64)
        own_test = A.mT @ torch.randn(T, cfg.adapter_rank, cfg.inputs, generator=g, dtype=torch.float64)
        for rank in cfg.ranks:
            for method in SYN_METHODS:
                if method == "full" and rank != cfg.ranks[0]:
                    continue
                for rule in cfg.rules:
                    t0 = time.perf_counter()
                    r = rank if method in RANKED else None
                    if cfg.protocol == "paper":
                        best = _paper_search(merger, method, rule, r, dW,
                                             {"gaussian": (x_val, x_test), "own": (own_val, own_test)},
                                             cfg.lambdas, _paper_grid(cfg, method, rule))
                        _, err, lam, params, M = best["gaussian"]
                        _, own_err, own_lam, own_params, _ = best["own"]
                        chosen = {"chosen": params, "own_chosen": own_params}
                    else:
                        params = {"p": 0.5, "seed": 0} if rule == "dare_ties" else {}
                        M = merger.merge(method, rule, r, **params)[0]
                        err, lam = function_error(M, dW, x_val, x_test)
                        own_err, own_lam = function_error(M, dW, own_val, own_test)
                        chosen = {}
                    row = {"T": T, "rank": r, "method": method, "rule": rule, "function_error": err,
                           "lambda": lam, "own_function_error": own_err, "own_lambda": own_lam, **chosen}
                    if method in RANKED:
                        U, V = singular_subspaces(M, rank)
                        if method == "ctm":
                            plan = merger.plans(rank, params.get("beta", 0.0))[0]
                            kept = torch.tensor(plan.info.energy_kept, dtype=torch.float64)
                            row |= {"iterations": plan.info.iterations, "converged": plan.info.converged}
                        else:
                            kept = energy_kept(dW, U, V)
                        spec = energy_kept(data.specific, U, V)
                        row |= {"energy_kept_mean": float(kept.mean()), "energy_kept_min": float(kept.min()),
                                "specific_energy_kept_mean": float(spec.mean())}
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
            log(f"T={T:3d} r={rank:3d}: " + ", ".join(
                f"{r['method']}/{r['rule']} kept {r.get('energy_kept_mean', float('nan')):.2f} err {r['function_error']:.2f}"
                for r in rows if r["T"] == T and r["rank"] in (rank, None) and r["rule"] == "ties"))
    return rows


def to_markdown(rows: list[dict], cfg: SyntheticConfig, meta: dict, seconds: float) -> str:
    lines = ["# Merge quality on synthetic adapter sets", "",
             f"{meta['date']}, commit `{meta['commit']}`, {meta['machine']['cpu']}, torch {meta['versions']['torch']}. "
             f"Run time {seconds:.0f} s.", "",
             f"{cfg.m}x{cfg.n} layer, rank-{cfg.adapter_rank} adapters: {cfg.shared} directions shared by all "
             f"(strength {cfg.shared_strength:g}, +-25%) plus {cfg.adapter_rank - cfg.shared} own directions "
             f"(singular values {cfg.decay:g}^j, norms spread exp({cfg.norm_spread:g} N(0,1))). "
             "Energy kept: mean over adapters of ||U^T dW_t V||^2/||dW_t||^2 (CtM: its subspaces; MtC, "
             "core MtC: the singular subspaces of the rank-r output); own: the same for the adapter's "
             "task-specific part. Function error: mean ||lam M x - dW_t x||/||dW_t x|| over gaussian x "
             "(err) and over x in adapter t's input subspace (own err), lam fitted on a separate draw. " +
             ("DARE-TIES: p 0.5, seed 0; TIES top_k 0.2." if cfg.protocol == "project" else
              f"Protocol `paper`: lambda on {cfg.lambdas[0]}..{cfg.lambdas[-1]} ({len(cfg.lambdas)} values), top_k in "
              f"{list(cfg.top_ks)}, DARE p in {list(cfg.dare_ps)} (seed 0), CtM beta in {list(cfg.betas)}, chosen "
              "per input kind by the least mean error on the validation draw (TIES keeps max(1, round(K d)) "
              "entries, the paper's code int(K d) + 1)."), ""]
    ranked = [m for m in SYN_METHODS if m in RANKED]
    for rule in cfg.rules:
        header = ["T", "r"] + [f"kept {m}" for m in ranked] + [f"own kept {m}" for m in ranked] + \
                 [f"err {m}" for m in ranked] + ["err full"] + [f"own err {m}" for m in ranked] + ["own err full"]
        body = []
        for T in cfg.Ts:
            full = next(r for r in rows if r["T"] == T and r["method"] == "full" and r["rule"] == rule)
            for rank in cfg.ranks:
                got = {r["method"]: r for r in rows if r["T"] == T and r["rank"] == rank and r["rule"] == rule}
                body.append([T, rank] + [round(got[m]["energy_kept_mean"], 3) for m in ranked] +
                            [round(got[m]["specific_energy_kept_mean"], 3) for m in ranked] +
                            [round(got[m]["function_error"], 3) for m in ranked] + [round(full["function_error"], 3)] +
                            [round(got[m]["own_function_error"], 3) for m in ranked] +
                            [round(full["own_function_error"], 3)])
        lines += [f"## {rule}", "", markdown_table(header, body, decimals=3), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256x256, T in (4, 16), r in (8, 16), three rules")
    parser.add_argument("--protocol", choices=("project", "paper"), default="project",
                        help="paper: lambda on 0..2 step 0.025, top_k, DARE p and CtM beta searched on validation")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = replace(QUICK if args.quick else SyntheticConfig(), protocol=args.protocol)
    t0 = time.perf_counter()
    rows = run(cfg)
    seconds = time.perf_counter() - t0
    meta = metadata()
    out = args.out
    stem = "quality_synthetic" + ("_paper" if args.protocol == "paper" else "") + ("_quick" if args.quick else "")
    write_json(out / f"{stem}.json", {"meta": meta, "config": asdict(cfg), "seconds": seconds, "rows": rows})
    write_csv(out / f"{stem}.csv", [{**r, "rank": "" if r["rank"] is None else r["rank"]} for r in rows])
    (out / f"{stem}.md").write_text(to_markdown(rows, cfg, meta, seconds))
    print(f"wrote {out / stem}.json, .csv and .md ({seconds:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
