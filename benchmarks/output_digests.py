"""sha256 of every file the README's merges write, of a kohya round trip and of ``ctm plan``'s
output, so that a change that must keep outputs byte-identical can be checked against a
recorded run::

    python benchmarks/output_digests.py --write benchmarks/results/output_digests_cpu.json
    python benchmarks/output_digests.py --check benchmarks/results/output_digests_cpu.json

Everything runs in one fixed folder (``--work``, emptied first) holding a copy of
``examples/adapters``, so that the absolute paths recorded in the outputs' resolved configs are
the same from run to run and from checkout to checkout, and at fixed CPU thread counts (the merged bytes can depend on them). The digests hold on
the machine and torch build that recorded them; elsewhere, record them again at the commit to
compare against.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, ctm arguments): what README runs, at fixed thread counts, and a kohya round trip
COMMANDS = [
    ("readme_merge", "merge examples/adapters/chat examples/adapters/code examples/adapters/math "
     "examples/adapters/style -o merged --rank 16 --method ties --threads 1 -q"),
    ("readme_merge_t2", "merge examples/adapters/chat examples/adapters/code examples/adapters/math "
     "examples/adapters/style -o merged_t2 --rank 16 --method ties --threads 2 -q"),
    ("dare_ties_full", "merge examples/adapters/math examples/adapters/code -o dare_full --rank full "
     "--method dare_ties --p 0.3 --seed 1 --weights 1,0.5 --threads 1 -q"),
    ("kohya_out", "merge examples/adapters/chat examples/adapters/code examples/adapters/math "
     "examples/adapters/style -o kohya.safetensors --rank 8 --method tsv --threads 1 -q"),
    ("kohya_in_kohya_out", "merge kohya.safetensors -o kohya2.safetensors --rank 4 --method sum --threads 1 -q"),
    ("kohya_and_peft_in", "merge kohya.safetensors examples/adapters/chat examples/adapters/code "
     "examples/adapters/math examples/adapters/style -o mixed --rank 16 --method mean "
     "--stop subspace --threads 1 -q"),
    ("config_rerun", "merge --config merged/ctm_merge.yaml -o rerun --threads 1 -q"),
    ("to_overwrite", "merge examples/adapters/math examples/adapters/code -o ow --rank 8 --threads 1 -q"),
    ("overwrite", "merge examples/adapters/math examples/adapters/code -o ow --rank 12 --method iso_c "
     "--overwrite --threads 1 -q"),
    ("refused_overwrite", "merge examples/adapters/math -o examples/adapters/code --rank 8 --overwrite -q"),
    ("plan", "plan examples/adapters/chat examples/adapters/code examples/adapters/math examples/adapters/style "
     "--rank 16 --method ties --threads 1"),
    ("plan_json", "plan examples/adapters/chat examples/adapters/code examples/adapters/math "
     "examples/adapters/style --rank 16 --method ties --threads 1 --json"),
    ("plan_kohya", "plan kohya.safetensors examples/adapters/math -o out.safetensors --rank 16 --threads 1"),
    ("plan_problems", "plan examples/adapters/chat examples/adapters/code --rank 16 --method iso_cts "
     "-o merged --threads 1"),
]

API = """
import ctm_kernels as ck
adapters = ["examples/adapters/math", "examples/adapters/code"]
res = ck.merge(adapters, rank=16, method="ties", weights=[1.0, 0.5], threads=1)
res.save("api_saved")
res.save("api_saved.safetensors")
ck.merge(adapters, rank=16, method="ties", weights=[1.0, 0.5], threads=1, output="api_streamed")
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(work: Path) -> dict[str, str]:
    out = {}
    for p in sorted(work.rglob("*")):
        if p.is_file() and "examples" not in p.relative_to(work).parts:
            out[str(p.relative_to(work))] = _sha(p.read_bytes())
    return out


def run(work: Path) -> dict[str, str]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "examples" / "adapters", work / "examples" / "adapters")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    digests = {}
    for name, args in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "ctm_kernels", *args.split()], cwd=work, env=env,
                              capture_output=True)
        digests[f"{name}: exit"] = str(proc.returncode)
        digests[f"{name}: stdout"] = _sha(proc.stdout)
        digests[f"{name}: stderr"] = _sha(proc.stderr)
    proc = subprocess.run([sys.executable, "-c", API], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the API snippet failed:\n{proc.stderr}")
    digests.update({f"file {k}": v for k, v in _files(work).items()})
    return digests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctm_output_digests"), help="folder to run in (emptied)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", type=Path, metavar="JSON", help="record the digests")
    what.add_argument("--check", type=Path, metavar="JSON", help="compare with recorded digests")
    args = ap.parse_args()
    digests = run(args.work.resolve())
    if args.write:
        args.write.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        print(f"{len(digests)} digests written to {args.write}")
        return 0
    want = json.loads(args.check.read_text())
    bad = sorted(k for k in set(want) | set(digests) if want.get(k) != digests.get(k))
    for k in bad:
        print(f"differs: {k}: recorded {want.get(k)}, now {digests.get(k)}")
    print(f"{len(want) - len(bad)} of {len(want)} digests as recorded" if bad else f"all {len(want)} digests as recorded")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
