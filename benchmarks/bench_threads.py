"""Thread count against time for a small whole-adapter merge, idle and beside a busy process.

Each run is a fresh ``python -m ctm_kernels merge ... --threads N`` over a synthetic set
(``benchmarks/synth.py``: tiny Llama layout, 7 adapters of ranks 8 and 16, TIES, rank 16); the
merge's own seconds come from its ``--report``, the wall time includes the process start.
"Loaded" runs start one busy Python loop (``while True: pass``) per ``--competitors`` first
and stop it afterwards. Writes medians and every run to ``--out`` (JSON).

    python benchmarks/bench_threads.py --threads 1,2,4 --repeats 3 --out benchmarks/results/threads_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_set(folder: Path, layers: int) -> list[str]:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "synth.py"), str(folder), "--layout", "tiny",
                    "--adapters", "7", "--ranks", "8,16", "--layers", str(layers)], check=True,
                   stdout=subprocess.DEVNULL)
    return sorted(str(p) for p in folder.iterdir() if p.is_dir())


def one_run(adapters: list[str], threads: int, work: Path) -> dict:
    out, report = work / f"out-{time.monotonic_ns()}", work / "report.json"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ctm_kernels", "merge", *adapters, "-o", str(out), "--rank", "16",
                    "--method", "ties", "--threads", str(threads), "--report", str(report), "-q"], check=True)
    wall = time.perf_counter() - t0
    merge_s = json.loads(report.read_text())["seconds"]
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    return {"threads": threads, "merge_seconds": merge_s, "wall_seconds": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--competitors", type=int, default=1, help="busy loops in the loaded runs")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    counts = [int(x) for x in a.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapters = make_set(work / "set", a.layers)
        for load in ("idle", "loaded"):
            busy = []
            if load == "loaded":
                busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.competitors)]
                time.sleep(1.0)
            try:
                for rep in range(a.repeats):
                    for t in counts:                       # interleaved, so drift hits every count alike
                        r = one_run(adapters, t, work)
                        r.update(load=load, repeat=rep, loadavg=os.getloadavg()[0])
                        rows.append(r)
                        print(json.dumps(r), flush=True)
            finally:
                for b in busy:
                    b.kill()
                    b.wait()
    summary = []
    for load in ("idle", "loaded"):
        for t in counts:
            ms = [r["merge_seconds"] for r in rows if r["load"] == load and r["threads"] == t]
            ws = [r["wall_seconds"] for r in rows if r["load"] == load and r["threads"] == t]
            summary.append({"load": load, "threads": t, "merge_median": statistics.median(ms),
                            "merge_min": min(ms), "merge_max": max(ms), "wall_median": statistics.median(ws)})
    meta = {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
            "command": "python benchmarks/bench_threads.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    Path(a.out).write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2) + "\n")
    for s in summary:
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
