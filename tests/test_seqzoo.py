"""The sequence zoo's tasks (known answers), model plumbing and a tiny end-to-end training."""
from __future__ import annotations

import pytest
import torch

from benchmarks.quality import digits, seqzoo, tables

X = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.mark.parametrize("task,want", [
    ("copy", [3, 1, 4, 1, 5, 9, 2, 6]), ("reverse", [6, 2, 9, 5, 1, 4, 1, 3]),
    ("add_one", [4, 2, 5, 2, 6, 0, 3, 7]), ("rotate_one", [1, 4, 1, 5, 9, 2, 6, 3]),
    ("sort", [1, 1, 2, 3, 4, 5, 6, 9]), ("times_three", [9, 3, 2, 3, 5, 7, 6, 8]),
    ("running_max", [3, 3, 4, 4, 5, 9, 9, 9]), ("add_mirror", [9, 3, 3, 6, 6, 3, 3, 9]),
    ("swap_pairs", [1, 3, 1, 4, 9, 5, 6, 2]), ("difference", [3, 8, 3, 7, 4, 4, 3, 4]),
    ("count", [1, 2, 1, 2, 1, 1, 1, 1]), ("rotate_three", [1, 5, 9, 2, 6, 3, 1, 4])])
def test_task_targets(task, want):
    assert seqzoo.target(task, X).tolist() == [want]


def test_deltas_enter_the_named_linear():
    torch.manual_seed(0)
    cfg = seqzoo.SeqConfig(d_model=16, heads=2, mlp=32, blocks=1)
    model = seqzoo.SeqModel(cfg)
    tok, _ = seqzoo.batch("sort", 4, torch.Generator().manual_seed(0))
    base = model(tok)
    assert base.shape == (4, 8, 10)
    for name in cfg.lora_layers:
        layer = model.lin[name.replace(".", "_")]
        delta = 0.1 * torch.randn_like(layer.weight)
        with torch.no_grad():
            layer.weight += delta
        moved = model(tok)
        with torch.no_grad():
            layer.weight -= delta
        assert torch.allclose(model(tok, {name: delta}), moved, atol=1e-5), name
        assert not torch.allclose(moved, base, atol=1e-4), name


def test_tiny_zoo_trains_saves_and_merges(tmp_path):
    cfg = seqzoo.SeqConfig(d_model=32, heads=2, mlp=64, blocks=1, rank=4, alpha=8.0, pretrain_steps=60,
                           adapter_steps=40, batch_size=32, eval_size=32, tasks=["sort", "swap_pairs", "count"])
    zoo = seqzoo.train_zoo(cfg, log=lambda *a: None)
    seqzoo.save_zoo(zoo, tmp_path / "z")
    back = seqzoo.load_zoo(tmp_path / "z")
    ev = seqzoo.SeqEvaluator(back)
    for a, stats_task in zip(back.adapters, cfg.tasks):
        assert ev.individual["test"][cfg.tasks.index(stats_task)] == pytest.approx(
            zoo.stats["tasks"][stats_task]["adapter_test"])
    run = digits.RunConfig(ranks=(4,), methods=("ctm", "mtc"), rules=("sum",), lambdas=(0.5, 1.0), replicates=0)
    out = digits.run(back, None, run, log=lambda *a: None, evaluator=ev)
    assert {(r["method"], r["rule"]) for r in out["results"]} == {("ctm", "sum"), ("mtc", "sum")}
    stats = tables.spectrum_stats(digits.layer_factors(back))
    assert 1 <= stats["directions_90_min"] <= stats["directions_90_mean"] <= 4
    assert 0 < stats["first_share_mean"] <= stats["first_share_max"] <= 1


def test_spectrum_stats_known_answer():
    """One module, two rank-2 adapters: dW_1 = diag(3, 1, 0) (first direction 90% of the energy,
    so 1 direction reaches 90%), dW_2 = diag(0, 0, 2) (one direction); |cos| between them 0."""
    from benchmarks.quality.merging import LayerFactors
    e = torch.eye(3, dtype=torch.float64)
    layer = LayerFactors([e[:2], e[1:]], [torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))[:, :2],
                                           torch.diag(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))[:, 1:]],
                         [1.0, 1.0])
    s = tables.spectrum_stats([layer])
    assert s["directions_90_mean"] == 1 and s["first_share_max"] == 1.0
    assert s["first_share_mean"] == pytest.approx((0.9 + 1.0) / 2) and s["overlap_mean_abs_cos"] == 0.0


def test_tables_quick_command(tmp_path):
    """The one command that regenerates both zoos' tables, in its quick mode (committed zoos)."""
    import json
    summaries = tables.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "quality_tables_quick.json").read_text())
    assert [s["zoo"] for s in payload["summaries"]] == ["digits", "seq"] == [s["zoo"] for s in summaries]
    for s in summaries:
        assert {(r["rule"], r["method"]) for r in s["rows"]} == {
            (rule, m) for rule in ("sum", "ties") for m in tables.METHODS}
        assert all(0 <= w["ctm_beats_mtc_on"] <= 1 for w in s["wins"])
    seq = summaries[1]["spectrum"][0]
    assert seq["adapter_rank"] == 16 and seq["directions_90_mean"] <= 16
    assert "seq zoo" in (tmp_path / "quality_tables_quick.md").read_text()
