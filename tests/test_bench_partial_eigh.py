"""benchmarks/bench_partial_eigh.py at its quick size: it checks the partial pairs against a
float64 full decomposition before timing, and refuses to time a solver that disagrees."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_partial_eigh  # noqa: E402


def test_bench_partial_eigh_quick(tmp_path):
    out = tmp_path / "partial.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_partial_eigh.py"), "--quick",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["dtype"], r["p"]) for r in rows} == {(d, p) for d in ("float32", "float64") for p in (128, 256)}
    for r in rows:
        assert r["full_ms"] > 0 and r["partial_ms"] > 0 and r["proj_err"] <= bench_partial_eigh.TOL[getattr(torch, r["dtype"])]


def test_bench_partial_eigh_refuses_a_wrong_solver(monkeypatch):
    """The correctness gate fails when the partial solver returns the wrong pairs (bottom k)."""
    from ctm_kernels.ops import eig

    monkeypatch.setattr(eig, "partial_topk", lambda M, k: tuple(X[..., :k] for X in torch.linalg.eigh(M)))
    M, _ = bench_partial_eigh.psd(64, "flat", torch.float64, seed=0)
    with pytest.raises(SystemExit, match="disagrees"):
        bench_partial_eigh.check(M, 4)
