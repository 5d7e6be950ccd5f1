"""The sequence zoo's tasks (known answers), model plumbing and a tiny end-to-end training."""
from __future__ import annotations

import pytest
import torch

from benchmarks.quality import digits, seqzoo, tables

X = torch.tensor([[3, 1, 4, 1, 5, 59, 2, 63]])
EVERY = torch.arange(64).reshape(8, 8)          # each of the 64 symbols once


def test_copy_target():
    assert seqzoo.target("copy", X).tolist() == X.tolist()


@pytest.mark.parametrize("i", range(8))
def test_cipher_is_a_fixed_substitution(i):
    """cipher_i maps symbol s to perm[s] for the permutation drawn by seed 77 + i, position by
    position (so it commutes with reversing the sequence)."""
    out = seqzoo.target(f"cipher_{i}", EVERY).flatten()
    assert out.tolist() == torch.randperm(64, generator=torch.Generator().manual_seed(77 + i)).tolist()
    assert seqzoo.target(f"cipher_{i}", X.flip(1)).tolist() == seqzoo.target(f"cipher_{i}", X).flip(1).tolist()


@pytest.mark.parametrize("i", range(8))
def test_dialect_changes_32_symbols_of_its_cipher(i):
    """dialect_i agrees with cipher_i on 32 symbols; on the other 32 (the first 32 of the
    permutation drawn by seed 300 + i) symbol changed[k] gets cipher_i's output of changed[k-1]."""
    cipher = seqzoo.target(f"cipher_{i}", EVERY).flatten()
    dialect = seqzoo.target(f"dialect_{i}", EVERY).flatten()
    assert sorted(dialect.tolist()) == list(range(64))                   # still a substitution
    changed = torch.randperm(64, generator=torch.Generator().manual_seed(300 + i))[:32]
    for k in range(32):
        assert dialect[changed[k]] == cipher[changed[k - 1]]
    assert (dialect != cipher).sum() == 32


def test_tasks_tokens_and_batches():
    """Nine pre-training tokens after the 64 symbols; a dialect is asked for with its cipher's token."""
    assert [seqzoo.task_token(t) for t in seqzoo.PRETRAIN_TASKS] == list(range(64, seqzoo.VOCAB))
    assert seqzoo.task_token("dialect_3") == seqzoo.task_token("cipher_3") == 64 + 4
    tok, y = seqzoo.batch("dialect_5", 6, torch.Generator().manual_seed(1))
    assert (tok[:, 0] == 64 + 6).all() and (tok[:, 1:] < 64).all()
    assert y.tolist() == seqzoo.target("dialect_5", tok[:, 1:]).tolist()
    with pytest.raises(ValueError, match="unknown task"):
        seqzoo.target("sort", X)


def test_deltas_enter_the_named_linear():
    torch.manual_seed(0)
    cfg = seqzoo.SeqConfig(d_model=16, heads=2, mlp=32, blocks=1)
    model = seqzoo.SeqModel(cfg)
    tok, _ = seqzoo.batch("dialect_0", 4, torch.Generator().manual_seed(0))
    base = model(tok)
    assert base.shape == (4, 8, seqzoo.SYMBOLS)
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
                           adapter_steps=40, batch_size=32, eval_size=32, tasks=["dialect_0", "dialect_1", "dialect_2"])
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
