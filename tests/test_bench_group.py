"""benchmarks/bench_group.py at a tiny size: it checks each layer of the batch against the
layer alone before timing, and against a base tree when asked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_group_small(tmp_path):
    out = tmp_path / "group.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_group.py"), "--m", "64", "--T", "3",
                           "--layers", "4", "--repeat", "1", "--threads", "1", "--base", "", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    row = res["row"]
    assert row["layers"] == 4 and len(res["sweeps"]) == 4 and row["sweeps_total"] == sum(res["sweeps"])
    assert 0 <= row["energy_rel_error_vs_alone"] <= 1e-6 and row["ctm_s"] > 0 and "base_s" not in row
