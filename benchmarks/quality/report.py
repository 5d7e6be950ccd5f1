"""Run metadata and result files shared by the quality benchmarks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import sklearn

import ctm_kernels
from benchmarks.common import header

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def metadata() -> dict:
    """Machine, library versions, commit and date of a run."""
    meta = header()
    meta["versions"].update({"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                             "ctm_kernels": ctm_kernels.__version__})
    return meta


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(header: list[str], rows: list[list], decimals: int = 1) -> str:
    """A GitHub markdown table; floats with ``decimals`` decimals."""
    fmt = lambda v: f"{v:.{decimals}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
