"""Figures for the README from the benchmark JSON files.

    python benchmarks/plot.py                      # every figure whose results exist
    python benchmarks/plot.py --layer benchmarks/results/layer_cpu.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"ctm_s": "CtM (this engine)", "mtc_full_svd_s": "Merge-then-Compress (full SVD)",
          "full_param_s": "full-parameter merge (no SVD)", "core_mtc_s": "core-space MtC",
          "reference_s": "fp64 dense reference CtM"}


def plot_layer(path: Path, out: Path):
    data = json.loads(path.read_text())
    rows = data["rows"]
    kinds = sorted({(r["kind"], r["T"], r["r"]) for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, (kind, T, r) in zip(axes[0], kinds):
        sel = sorted((x for x in rows if (x["kind"], x["T"], x["r"]) == (kind, T, r)), key=lambda x: x["m"])
        for key, label in LABELS.items():
            pts = [(x["m"], x[key]) for x in sel if key in x]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("m = n")
        ax.set_ylabel("seconds per layer (median)")
        ax.set_title(f"{kind} adapters, T={T}, r={r}, {rows[0]['rule']}, {rows[0]['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = data["machine"]
    fig.suptitle(f"one layer on {m.get('gpu') or m['cpu']} ({m['cores']} cores), commit {data['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default=str(RESULTS / "layer_cpu.json"))
    a = p.parse_args(argv)
    if Path(a.layer).exists():
        plot_layer(Path(a.layer), Path(a.layer).with_suffix(".png"))


if __name__ == "__main__":
    main()
