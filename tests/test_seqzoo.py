"""The sequence zoo's tasks (known answers), model plumbing and a tiny end-to-end training."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.quality import digits, seqzoo, tables

X = torch.tensor([[3, 1, 4, 1, 5, 59, 2, 63]])
EVERY = torch.arange(64).reshape(8, 8)          # each of the 64 symbols once


def test_copy_target():
    assert seqzoo.target("copy", X).tolist() == X.tolist()


@pytest.mark.parametrize("i", [0, 1, 7, 8, 47])
def test_cipher_is_a_fixed_substitution(i):
    """cipher_i maps symbol s to perm[s] for the permutation drawn by seed 77 + i, position by
    position (so it commutes with reversing the sequence)."""
    out = seqzoo.target(f"cipher_{i}", EVERY).flatten()
    assert out.tolist() == torch.randperm(64, generator=torch.Generator().manual_seed(77 + i)).tolist()
    assert seqzoo.target(f"cipher_{i}", X.flip(1)).tolist() == seqzoo.target(f"cipher_{i}", X).flip(1).tolist()


@pytest.mark.parametrize("i", [0, 1, 7, 8, 47])
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
    """Copy's token, then one per cipher after the 64 symbols (9 in the seq zoo, 49 in the
    families zoo); a dialect is asked for with its cipher's token."""
    for name, count in (("seq", 9), ("seq_families", 49)):
        cfg = seqzoo.ZOOS[name]
        assert len(cfg.pretrain_tasks) == count and cfg.vocab == 64 + count
        assert [seqzoo.task_token(t) for t in cfg.pretrain_tasks] == list(range(64, cfg.vocab))
    assert seqzoo.task_token("dialect_3") == seqzoo.task_token("cipher_3") == 64 + 4
    assert seqzoo.task_token("dialect_47") == 64 + 48
    tok, y = seqzoo.batch("dialect_5", 6, torch.Generator().manual_seed(1))
    assert (tok[:, 0] == 64 + 6).all() and (tok[:, 1:] < 64).all()
    assert y.tolist() == seqzoo.target("dialect_5", tok[:, 1:]).tolist()
    for bad in ("sort", "cipher_48", "dialect_x"):
        with pytest.raises(ValueError, match="unknown task"):
            seqzoo.target(bad, X)


def test_zoo_tasks_and_families():
    """seq: eight one-dialect tasks; seq_families: family_i is dialects 6i .. 6i+5, so every
    dialect (and every cipher token) belongs to exactly one family."""
    seq, fam = seqzoo.ZOOS["seq"], seqzoo.ZOOS["seq_families"]
    assert seq.tasks == [f"dialect_{i}" for i in range(8)] and seq.members("dialect_3") == ["dialect_3"]
    assert fam.tasks == [f"family_{i}" for i in range(8)]
    assert fam.members("family_2") == [f"dialect_{j}" for j in range(12, 18)]
    members = [d for t in fam.tasks for d in fam.members(t)]
    assert sorted(int(d.split("_")[1]) for d in members) == list(range(48))
    for bad, message in (({"family_size": 5}, "families of 5"), ({"family_size": 0}, "families of 0"),
                         ({"ciphers": 49}, "ciphers must be in")):
        with pytest.raises(ValueError, match=message):
            seqzoo.SeqConfig(**{"ciphers": 48, **bad})
    # a config made from another by dataclasses.replace has a task list of its own
    again = dataclasses.replace(fam, seed=2)
    assert again.tasks == fam.tasks and again.tasks is not fam.tasks


def test_family_batch_takes_its_dialects_in_turn():
    """Row j of a family batch is dialect j mod 6 of the family: its cipher's token, that
    dialect's outputs."""
    members = seqzoo.ZOOS["seq_families"].members("family_1")
    tok, y = seqzoo.batch(members, 14, torch.Generator().manual_seed(3))
    for j in range(14):
        dialect = members[j % 6]
        assert tok[j, 0] == seqzoo.task_token(dialect) == 64 + 1 + 6 + j % 6
        assert y[j].tolist() == seqzoo.target(dialect, tok[j:j + 1, 1:])[0].tolist()


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


@pytest.mark.parametrize("family_size", [1, 2])
def test_tiny_zoo_trains_saves_and_merges(tmp_path, family_size):
    cfg = seqzoo.SeqConfig(ciphers=6, family_size=family_size, d_model=32, heads=2, mlp=64, blocks=1, rank=4,
                           alpha=8.0, pretrain_steps=60, adapter_steps=40, batch_size=32, eval_size=32)
    cfg.tasks = cfg.tasks[:3]
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
    zoos = ["digits", "seq", "seq_families"]
    assert [s["zoo"] for s in payload["summaries"]] == zoos == [s["zoo"] for s in summaries]
    for s in summaries:
        assert {(r["rule"], r["method"]) for r in s["rows"]} == {
            (rule, m) for rule in ("sum", "ties") for m in tables.METHODS}
        assert all(0 <= w["ctm_beats_mtc_on"] <= 1 for w in s["wins"])
    seq, families = summaries[1]["spectrum"][0], summaries[2]["spectrum"][0]
    assert seq["adapter_rank"] == families["adapter_rank"] == 16
    assert families["directions_90_mean"] >= 8 and families["first_share_mean"] <= 0.3    # what the zoo is for
    assert "seq_families zoo" in (tmp_path / "quality_tables_quick.md").read_text()


def test_interference_sums_the_first_k_adapters():
    """k = 1, 2, 4, then all T: the first k adapters' updates summed at lambda 1, scored on
    their own k tasks (a fake evaluator whose task i scores the summed update's entry i)."""
    from types import SimpleNamespace

    adapters = [SimpleNamespace(deltas=lambda i=i: {"w": torch.eye(5)[i] * (i + 1)}) for i in range(5)]

    class Ev:
        def accuracies(self, deltas, part):
            return deltas["w"].tolist()

        def normalised(self, accs, part):
            return [10 * a for a in accs]

    got = tables.interference(SimpleNamespace(adapters=adapters), Ev())
    # the first k tasks score 10 (i + 1) each when their adapter is in the sum
    assert got == {1: 10.0, 2: 15.0, 4: 25.0, 5: 30.0}
