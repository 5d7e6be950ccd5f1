"""Figures for the README from the benchmark JSON files.

    python benchmarks/plot.py                      # every figure whose results exist
    python benchmarks/plot.py --layer benchmarks/results/layer_cpu.json
    python benchmarks/plot.py --many benchmarks/results/many_m2048.json
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


MANY_LABELS = {"ctm": "CtM (this engine)", "mtc_full_svd": "Merge-then-Compress (full SVD)",
               "core_mtc": "core-space MtC"}


def plot_many(path: Path, out: Path):
    """Time and peak RSS against T (log-log), one line per method and adapter kind; runs that
    did not fit or finish are left out (the JSON says which)."""
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for method, label in MANY_LABELS.items():
        for kind, style in (("structured", "-"), ("gaussian", "--")):
            sel = sorted((r for r in rows if r["method"] == method and r["kind"] == kind), key=lambda r: r["T"])
            if sel:
                T = [r["T"] for r in sel]
                ax_t.plot(T, [r["seconds"] for r in sel], style, marker="o", label=f"{label}, {kind}")
                ax_m.plot(T, [r["peak_mib"] / 1024 for r in sel], style, marker="o", label=f"{label}, {kind}")
    for ax, what in ((ax_t, "seconds"), (ax_m, "peak RSS above the inputs (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("adapters T (rank 16 each)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    m, a = data["machine"], data["args"]
    fig.suptitle(f"one {a['m']}x{a['m']} layer, TIES, fp32, on {m.get('gpu') or m['cpu']} ({m['cores']} cores), "
                 f"commit {data['commit']}; missing points did not fit", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default=str(RESULTS / "layer_cpu.json"))
    p.add_argument("--many", default=str(RESULTS / "many_m2048.json"))
    a = p.parse_args(argv)
    if Path(a.layer).exists():
        plot_layer(Path(a.layer), Path(a.layer).with_suffix(".png"))
    if Path(a.many).exists():
        plot_many(Path(a.many), Path(a.many).with_suffix(".png"))


if __name__ == "__main__":
    main()
