"""Whole model, disk to disk: T synthetic adapters for a Llama-style layout merged by ``ctm merge``
into a PEFT folder, in a fresh process, as a user runs it.

Measured: wall time of the command (interpreter start to exit), the merge's own time, peak
RSS of the merging process (``wait4`` on it: the kernel's high-water mark, whatever was
allocated where; under ``--nproc`` the largest rank's), and from the merge's report the factor
bytes read, the seconds inside the read calls, the seconds the merge loop waited on reads
(reading not hidden behind merging), the number of module groups and the HOOI iterations.
The adapters are made by ``benchmarks/synth.py`` and cached under ``--workdir``.

    python benchmarks/bench_model.py --quick                        # tiny layout (a test runs this)
    python benchmarks/bench_model.py --layout llama3-8b --adapters 16 --ranks 16 --rank 16
    python benchmarks/bench_model.py --layout llama3-8b --cold      # adapters evicted from the page cache first
    python benchmarks/bench_model.py --layout tiny --nproc 2        # torchrun, 2 CPU ranks
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, header, table, write_json  # noqa: E402
from benchmarks.synth import LAYOUTS, SynthSpec, _ints, generate, module_shapes  # noqa: E402

TARGET_RSS_GIB = 3.0          # the whole-model target: 16 rank-16 adapters of the 8B layout under 3 GiB


def set_name(spec: SynthSpec) -> str:
    layers = f"-L{spec.layers}" if spec.layers else ""
    return f"{spec.layout}{layers}-T{spec.adapters}-r{'_'.join(map(str, spec.ranks))}-{spec.dtype}-s{spec.seed}"


def evict(paths: list[Path]) -> bool:
    """Ask the kernel to drop the files' cached pages, so the merge reads them from the disk.
    Best effort (clean pages only, no privileges needed); False where not supported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def run_merge(cmd: list[str], log_dir: Path, env: dict) -> dict:
    """Run ``cmd``; its wall time, exit status and peak RSS (the process and the children it
    waited for: with torchrun, the largest rank)."""
    with open(log_dir / "stdout.txt", "w") as out, open(log_dir / "stderr.txt", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)      # reaped here, not by Popen
    return {"wall_s": wall, "returncode": proc.returncode,
            "peak_rss_mib": usage.ru_maxrss / 1024.0}        # Linux: KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="llama3-8b", choices=list(LAYOUTS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the layout's)")
    p.add_argument("--adapters", type=int, default=16, help="T (default 16)")
    p.add_argument("--ranks", type=_ints, default=(16,), help="adapter ranks, cycled (default 16)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16, help="merged rank (default 16)")
    p.add_argument("--method", default="ties")
    p.add_argument("--max-group-mb", type=int, default=None, help="passed to ctm merge (default: its default)")
    p.add_argument("--no-prefetch", action="store_true", help="passed to ctm merge")
    p.add_argument("--threads", type=int, default=None, help="passed to ctm merge (default: its default)")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun, gloo on CPU)")
    p.add_argument("--cold", action="store_true", help="drop the adapters from the page cache before merging")
    p.add_argument("--workdir", default="/tmp/ctm_synth", help="cache of synthetic sets and scratch space")
    p.add_argument("--keep-output", action="store_true", help="keep the merged adapter")
    p.add_argument("--quick", action="store_true", help="tiny layout, 4 adapters of ranks 8 and 16, rank 8")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/model_<set>.json)")
    a = p.parse_args(argv)
    if a.quick:
        a.layout, a.adapters, a.ranks, a.rank, a.layers = "tiny", 4, (8, 16), 8, None

    head = header()                     # machine load and commit as the run starts
    spec = SynthSpec(layout=a.layout, adapters=a.adapters, ranks=tuple(a.ranks), dtype=a.dtype, seed=a.seed,
                     layers=a.layers)
    spec.check()
    work = Path(a.workdir)
    name = set_name(spec)
    t0 = time.perf_counter()
    made = []
    dirs = generate(work / name, spec, reuse=True, log=lambda msg: (made.append(msg), print(msg, flush=True)))
    gen_s = time.perf_counter() - t0
    files = [d / "adapter_model.safetensors" for d in dirs]
    modules = len(module_shapes(LAYOUTS[spec.layout], spec.targets, spec.layers))
    print(f"{len(dirs)} adapters x {modules} modules, {spec.factor_bytes() / 2**30:.3f} GiB of {spec.dtype} factors "
          f"({'generated' if made else 'reused'} in {gen_s:.1f} s) under {work / name}", flush=True)

    scratch = work / f"run-{name}-{os.getpid()}"
    scratch.mkdir(parents=True)
    out = scratch / "merged"
    report = scratch / "report.json"
    cmd = ["-m", "ctm_kernels", "merge", *map(str, dirs), "--rank", str(a.rank), "--method", a.method,
           "-o", str(out), "--report", str(report), "-q"]
    if a.max_group_mb is not None:
        cmd += ["--max-group-mb", str(a.max_group_mb)]
    if a.no_prefetch:
        cmd.append("--no-prefetch")
    if a.threads is not None:
        cmd += ["--threads", str(a.threads)]
    launch = [sys.executable] if a.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    evicted = evict(files) if a.cold else False
    try:
        run = run_merge([*launch, *cmd], scratch, env)
        if run["returncode"] != 0:
            print((scratch / "stderr.txt").read_text()[-3000:], file=sys.stderr)
            raise SystemExit(f"ctm merge failed with status {run['returncode']}")
        rep = json.loads(report.read_text())
        written = sum(f.stat().st_size for f in out.iterdir())
    finally:
        if not a.keep_output:
            shutil.rmtree(scratch, ignore_errors=True)

    st = rep["stats"]
    row = {
        "layout": spec.layout, "layers": spec.layers or LAYOUTS[spec.layout].layers, "modules": rep["modules"],
        "T": spec.adapters, "ranks": "/".join(map(str, spec.ranks)), "dtype": spec.dtype, "rank": a.rank,
        "method": a.method, "nproc": a.nproc, "prefetch": not a.no_prefetch, "cold": a.cold,
        "factor_gib": spec.factor_bytes() / 2**30,
        "wall_s": run["wall_s"], "merge_s": rep["seconds"],
        "peak_rss_mib": run["peak_rss_mib"], "peak_rss_gib": run["peak_rss_mib"] / 1024,
        "groups": st["groups"], "bytes_read": st["bytes_read"],
        "read_s": st["read_seconds"], "load_s": st["load_seconds"], "wait_s": st["wait_seconds"],
        "engine_s": st["merge_seconds"], "write_s": st["write_seconds"],
        # shares of the merge's wall time: inside read calls (overlapped with compute on
        # the reader thread), and waited for by the merge loop (not hidden)
        "read_share": st["read_seconds"] / rep["seconds"], "wait_share": st["wait_seconds"] / rep["seconds"],
        "read_mib_s": st["bytes_read"] / 2**20 / st["read_seconds"] if st["read_seconds"] > 0 else None,
        "iterations_mean": rep["iterations_mean"], "iterations_max": rep["iterations_max"],
        "unconverged": rep["unconverged"], "output_bytes": written,
        "energy_kept_mean": sum(rep["energy_kept"]) / len(rep["energy_kept"]),
    }
    if (spec.layout, spec.layers, spec.adapters, spec.ranks, a.nproc) == ("llama3-8b", None, 16, (16,), 1):
        row["target_rss_gib"] = TARGET_RSS_GIB
        row["target_met"] = row["peak_rss_gib"] < TARGET_RSS_GIB
    if st["bytes_read"] != spec.factor_bytes():
        raise SystemExit(f"the merge read {st['bytes_read']} bytes, the adapters hold {spec.factor_bytes()}")

    print(table([row], ["layout", "modules", "T", "ranks", "factor_gib", "groups", "wall_s", "merge_s", "peak_rss_gib",
                        "read_s", "read_share", "wait_share", "iterations_mean"]))
    payload = {**head, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()},
               "set": name, "generated": bool(made), "generate_s": gen_s, "page_cache_evicted": evicted,
               "result": row, "report": {k: v for k, v in rep.items() if k not in ("adapters", "output")}}
    path = write_json("model_quick.json" if a.quick and not a.out else f"model_{name}.json", payload, a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
