"""CPU threads: the default from the cores this process may use, the ``threads`` argument of the
API and the PEFT integration, and outputs that a re-run of their saved config writes again."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

import ctm_kernels
from ctm_kernels import threads as th
from ctm_kernels.cli import main

EXAMPLES = Path(ctm_kernels.__file__).resolve().parents[1] / "examples" / "adapters"
THREE = [str(EXAMPLES / n) for n in ("math", "code", "chat")]


def _fake_root(tmp_path: Path, cgroup: str, files: dict, loadavg: str = "0.00 0.00 0.00 1/100 1") -> Path:
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/loadavg").write_text(loadavg)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_available_cpus_from_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # cgroup v2: cpu.max of the process's group (1.5 CPUs -> 2)
    v2 = _fake_root(tmp_path / "v2", "0::/jobs/me\n", {"sys/fs/cgroup/jobs/me/cpu.max": "150000 100000\n"})
    assert th.available_cpus(v2) == 2
    # a parent's quota is tighter
    v2p = _fake_root(tmp_path / "v2p", "0::/jobs/me\n", {"sys/fs/cgroup/jobs/me/cpu.max": "max 100000\n",
                                                          "sys/fs/cgroup/jobs/cpu.max": "300000 100000\n"})
    assert th.available_cpus(v2p) == 3
    # cgroup v1: cfs quota / period
    v1 = _fake_root(tmp_path / "v1", "4:cpu,cpuacct:/box\n", {"sys/fs/cgroup/cpu/box/cpu.cfs_quota_us": "400000\n",
                                                               "sys/fs/cgroup/cpu/box/cpu.cfs_period_us": "100000\n"})
    assert th.available_cpus(v1) == 4
    # no quota: the affinity
    free = _fake_root(tmp_path / "free", "0::/\n", {"sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert th.available_cpus(free) == 64
    # the default leaves the busy cores (1-minute load, rounded up) and shares the rest between local ranks
    busy = _fake_root(tmp_path / "busy", "0::/\n", {}, loadavg="3.20 1.00 0.50 4/300 9")
    assert th.default_threads(busy) == 60
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert th.default_threads(busy) == 15
    full = _fake_root(tmp_path / "full", "0::/jobs/me\n", {"sys/fs/cgroup/jobs/me/cpu.max": "200000 100000\n"},
                      loadavg="7.5 7 7 9/300 9")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert th.default_threads(full) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "6")            # set by the user (or torchrun): the default
    assert th.default_threads(full) == 6


def _record_threads(monkeypatch) -> list[int]:
    """torch's thread count seen by every module group's merge."""
    from ctm_kernels.pipeline import run

    seen: list[int] = []
    real = run.merge_group

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(run, "merge_group", spy)
    return seen


def test_api_threads_argument_runs_at_it_and_restores(monkeypatch):
    seen = _record_threads(monkeypatch)
    before = torch.get_num_threads()
    other = 3 if before != 3 else 2
    res = ctm_kernels.merge(THREE[:2], rank=8, method="ties", threads=other)
    assert seen and set(seen) == {other} and torch.get_num_threads() == before
    assert res.plan.settings.threads == other
    # the default: default_threads(), whatever torch's own setting is
    monkeypatch.setattr(th, "default_threads", lambda root="/": 1)
    seen.clear()
    ctm_kernels.merge(THREE[:2], rank=8, method="ties")
    assert set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        ctm_kernels.merge(THREE[:2], rank=8, threads=0)
    assert "threads must be a positive integer" in " ".join(ctm_kernels.plan_merge(THREE[:2], rank=8,
                                                                                  threads=-1).problems)


def test_cli_default_threads_recorded_in_the_output(tmp_path, monkeypatch):
    seen = _record_threads(monkeypatch)
    monkeypatch.setattr(th, "default_threads", lambda root="/": 3)
    assert main(["merge", *THREE, "-o", str(tmp_path / "o"), "--rank", "8", "-q"]) == 0
    assert set(seen) == {3}
    assert yaml.safe_load((tmp_path / "o" / "ctm_merge.yaml").read_text())["threads"] == 3


def _tree(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_saved_config_rerun_writes_the_same_bytes_at_1_2_4_threads(tmp_path, monkeypatch):
    """Each output records its thread count; its config re-run (no --threads, torch and the default
    set to something else) and the API with the same count write the same bytes."""
    monkeypatch.setattr(th, "default_threads", lambda root="/": 5)
    before = torch.get_num_threads()
    trees = {}
    try:
        for t in (1, 2, 4):
            out = tmp_path / f"t{t}"
            assert main(["merge", *THREE, "-o", str(out), "--rank", "16", "--method", "dare_ties", "--p", "0.3",
                         "--threads", str(t), "-q"]) == 0
            assert yaml.safe_load((out / "ctm_merge.yaml").read_text())["threads"] == t
            torch.set_num_threads(7 - t)
            again = tmp_path / f"again{t}"
            assert main(["merge", "--config", str(out / "ctm_merge.yaml"), "-o", str(again), "-q"]) == 0
            assert _tree(again) == _tree(out)
            api = tmp_path / f"api{t}"
            ctm_kernels.merge(THREE, rank=16, method="dare_ties", p=0.3, threads=t, output=api)
            assert _tree(api) == _tree(out)
            trees[t] = _tree(out)
    finally:
        torch.set_num_threads(before)
    # the outputs differ at least in the recorded count
    assert trees[1]["ctm_merge.yaml"] != trees[2]["ctm_merge.yaml"]
