"""The merge-quality benchmarks at a tiny size: a 3-task digits zoo and a small synthetic set.

These check properties that must hold whatever the numbers: adapters learn their task,
accuracies are percentages, CtM with enough rank is exactly task arithmetic, CtM's subspace
keeps at least as much mean energy as MtC's (it maximises exactly that at beta 0), and the
command-line pipeline writes its result files.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import ctm_kernels
from benchmarks.quality import digits, synthetic
from benchmarks.quality.merging import Merger
from benchmarks.quality.tasks import Digits
from benchmarks.quality.zoo import ZooConfig, accuracy, load_zoo, save_zoo, train_zoo

TINY_ZOO = ZooConfig(hidden=32, rank=4, batch_size=128, base_epochs=20, base_lr=1e-2, adapter_epochs=15,
                     adapter_lr=1e-2, probe_epochs=15, tasks=["rot90", "flip_lr", "shift_perm"])
TINY_RUN = digits.RunConfig(ranks=(4, 12), methods=("ctm", "mtc", "core_mtc", "full"),
                            rules=("sum", "ties", "iso_cts"), lambdas=(0.25, 0.5, 1.0, 2.0),
                            top_ks=(0.3, 1.0), replicates=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: a second thread only adds synchronisation (and slows a shared machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return Digits()


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory, data):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("zoo") / "zoo"
    save_zoo(train_zoo(TINY_ZOO, data, log=lambda *a: None), path)
    return path


@pytest.fixture(scope="module")
def zoo(zoo_dir):
    return load_zoo(zoo_dir)


@pytest.fixture(scope="module")
def results(zoo, data):
    return digits.run(zoo, data, TINY_RUN, log=lambda *a: None)


def test_adapters_beat_the_base_model_on_their_task(zoo, data):
    for adapter, task in zip(zoo.adapters, zoo.tasks):
        stats = zoo.stats["tasks"][task.name]
        assert stats["adapter_test"] > stats["probe_test"] + 2.0, task.name
        assert stats["adapter_test"] > stats["base_with_head_test"] + 2.0, task.name


def test_saved_zoo_reproduces_training_accuracies(zoo, data):
    # the base is rounded to fp16 before the adapters train, so the stored zoo is exact
    for adapter, task in zip(zoo.adapters, zoo.tasks):
        acc = accuracy(zoo.backbone, adapter.deltas(), adapter.head_weight, adapter.head_bias, data.split(task, "test"))
        assert acc == zoo.stats["tasks"][task.name]["adapter_test"], task.name


def test_merged_accuracies_are_percentages(results):
    assert results["results"], "no merge ran"
    for row in results["results"]:
        assert len(row["test_acc"]) == 3
        assert all(0.0 <= a <= 100.0 for a in row["test_acc"]), row
        assert all(math.isfinite(v) and v >= 0 for v in row["test_norm"]), row
        assert all(c["lambda"] in TINY_RUN.lambdas for c in row["chosen"]), row


def test_iso_cts_runs_only_where_valid(results):
    ran = {(r["method"], r["rank"]) for r in results["results"] if r["rule"] == "iso_cts"}
    skipped = {(s["method"], s["rank"]) for s in results["skipped"] if s["rule"] == "iso_cts"}
    # CtM needs T=3 < rank: runs at 4 and 12; the 32x32 dense space needs 29 common
    # directions but the summed updates have rank <= 12
    assert ("ctm", 4) in ran and ("ctm", 12) in ran
    assert ("mtc", 4) in skipped and ("full", None) in skipped


def test_ctm_sum_at_full_rank_is_task_arithmetic(zoo, data, results):
    # rank 12 = 3 adapters x rank 4: the CtM subspaces hold every adapter, so the merged
    # update is the plain sum and the accuracies are those of full-parameter sum
    merger = Merger(digits.layer_factors(zoo))
    for ctm_dw, full_dw in zip(merger.merge("ctm", "sum", 12), merger.merge("full", "sum", None)):
        assert torch.allclose(ctm_dw, full_dw, rtol=0, atol=1e-5 * full_dw.abs().max().item())
    ctm = digits.find(results, "ctm", "sum", 12)
    full = digits.find(results, "full", "sum", None)
    assert ctm["test_acc"] == full["test_acc"]
    assert ctm["chosen"][0]["lambda"] == full["chosen"][0]["lambda"]
    # below that rank CtM compresses: the update differs
    low = merger.merge("ctm", "sum", 4)
    assert not torch.allclose(low[0], merger.merge("full", "sum", None)[0], atol=1e-3)


def test_claims_compare_the_same_rule(results):
    out = dict(results, replicates=[])
    rows = digits.claims([out])
    assert {(c["rank"], c["rule"]) for c in rows} == {(4, "ties"), (12, "ties")}
    for c in rows:
        assert c["ctm"][0] == digits.find(results, "ctm", c["rule"], c["rank"])["test_norm_avg"]
        assert c["mtc"][0] == digits.find(results, "mtc", c["rule"], c["rank"])["test_norm_avg"]


def test_quick_command_writes_results(zoo_dir, tmp_path):
    out = digits.main(["--quick", "--zoo", str(zoo_dir), "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "quality_digits_quick.json").read_text())
    assert payload["meta"]["versions"]["torch"] == torch.__version__
    assert payload["tasks"] == ["rot90", "flip_lr", "shift_perm"]
    assert len(payload["results"]) == len(out["results"]) > 0
    assert "CtM against MtC" in (tmp_path / "quality_digits_quick.md").read_text()


def test_synthetic_energy_and_exactness():
    cfg = synthetic.SyntheticConfig(m=48, n=40, adapter_rank=6, shared=2, Ts=(3,), ranks=(4, 18),
                                    rules=("sum", "ties"), inputs=64)
    rows = synthetic.run(cfg, log=lambda *a: None)
    get = lambda method, rule, rank: next(r for r in rows if r["method"] == method and r["rule"] == rule
                                          and r["rank"] == rank)
    for r in rows:
        if "energy_kept_mean" in r:
            assert 0.0 <= r["energy_kept_min"] <= r["energy_kept_mean"] <= 1.0 + 1e-9, r
    # beta 0 equalises norms, so CtM maximises the mean energy kept over all subspace pairs:
    # MtC's subspaces cannot keep more on average
    assert get("ctm", "sum", 4)["energy_kept_mean"] >= get("mtc", "sum", 4)["energy_kept_mean"] - 1e-9
    # rank 18 = 3 x 6 holds every adapter: everything is kept and CtM sum is task arithmetic
    assert get("ctm", "sum", 18)["energy_kept_min"] == pytest.approx(1.0, abs=1e-6)
    assert get("ctm", "sum", 18)["function_error"] == pytest.approx(get("full", "sum", None)["function_error"],
                                                                    abs=1e-6)
    assert get("mtc", "sum", 4)["function_error"] > get("full", "sum", None)["function_error"]


TINY_PAPER = digits.RunConfig(ranks=(4,), methods=("ctm", "mtc"), rules=("sum", "dare_ties"),
                              lambdas=(0.0, 0.5, 1.0, 1.5), top_ks=(0.3, 1.0), dare_ps=(0.3, 0.6), dare_seeds=(0,),
                              betas=(0.0, 0.5), replicates=0, protocol="paper")


def test_paper_protocol_searches_every_parameter_and_solves_each_subspace_once(zoo, data, monkeypatch):
    solved = []
    original = ctm_kernels.prepare_layers

    def counting(*args, **kwargs):
        solved.append((kwargs["rank"], kwargs["beta"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(ctm_kernels, "prepare_layers", counting)
    out = digits.run(zoo, data, TINY_PAPER, log=lambda *a: None)
    # one solve per (rank, beta), however many rules, top_k, p and lambdas use it
    assert sorted(solved) == [(4, 0.0), (4, 0.5)]
    grid = digits._param_grid(TINY_PAPER, "ctm", "dare_ties", 0)
    assert len(grid) == 2 * 2 * 2 and dict(grid[-1]) == {"beta": 0.5, "p": 0.6, "top_k": 1.0}
    assert digits._param_grid(TINY_PAPER, "mtc", "sum", None) == [()]
    for row in out["results"]:
        chosen = row["chosen"][0]
        assert chosen["lambda"] in TINY_PAPER.lambdas
        if row["method"] == "ctm":
            assert chosen["beta"] in TINY_PAPER.betas
        if row["rule"] == "dare_ties":
            assert chosen["p"] in TINY_PAPER.dare_ps and chosen["top_k"] in TINY_PAPER.top_ks


def test_paper_search_picks_the_best_validation_score(zoo, data):
    """_search's choice against a brute-force evaluation of every (params, lambda) pair through
    the plain forward pass."""
    ev = digits.Evaluator(zoo, data)
    merger = Merger(digits.layer_factors(zoo))
    grid = digits._param_grid(TINY_PAPER, "ctm", "sum", None)
    merged = {key: merger.merge("ctm", "sum", 4, **dict(key)) for key in grid}
    got = digits._search(ev, merged, TINY_PAPER.lambdas)
    scores = {}
    for key, Ms in merged.items():
        for lam in TINY_PAPER.lambdas:
            deltas = {n: (lam * M).float() for n, M in zip(zoo.config.lora_layers, Ms)}
            scores[key, lam] = sum(ev.normalised(ev.accuracies(deltas, "val"), "val")) / 3
    best = max(scores.values())
    assert got["val_norm_avg"] == pytest.approx(best, abs=1e-9)
    assert scores[(("beta", got["beta"]),), got["lambda"]] == pytest.approx(best, abs=1e-9)


def test_synthetic_grid_error_picks_the_least_validation_error():
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    M = dW.sum(0) + 0.1 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    xv, xt = torch.randn(5, 40, generator=g, dtype=torch.float64), torch.randn(5, 40, generator=g, dtype=torch.float64)
    lambdas = (0.0, 0.2, 0.35, 0.5, 1.0)
    val, test, lam = synthetic.grid_error(M, dW, xv, xt, lambdas)
    per = {l: float(((l * (M @ xv) - dW @ xv).norm(dim=-2) / (dW @ xv).norm(dim=-2)).mean()) for l in lambdas}
    assert lam == min(per, key=per.get) and val == pytest.approx(per[lam], rel=1e-12)
    assert test == pytest.approx(float(((lam * (M @ xt) - dW @ xt).norm(dim=-2) / (dW @ xt).norm(dim=-2)).mean()),
                                 rel=1e-12)
