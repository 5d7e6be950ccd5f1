"""Interrupted runs: SIGTERM cleans up like SIGINT, and a later run removes the temporary outputs
that killed runs (SIGKILL) left, only its own and only when no process owns them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ctm_kernels
from ctm_kernels.cli import main
from ctm_kernels.io import destination

ROOT = Path(ctm_kernels.__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adapters"

# a merge whose module groups each wait 60 s: time to send a signal while its output is half written
SLOW = """
import sys, time
from ctm_kernels.pipeline import run
real = run.merge_group
def slow(*a, **k):
    time.sleep(60)
    return real(*a, **k)
run.merge_group = slow
from ctm_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_slow(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", SLOW, "merge", str(EXAMPLES / "math"), str(EXAMPLES / "code"),
                             "-o", str(out), "--rank", "8", "-q"], stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_temporary(folder: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tmps = [p for p in folder.iterdir() if ".tmp-" in p.name]
        if tmps and any(tmps[0].iterdir()):
            return tmps[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no temporary output appeared")


def test_sigterm_removes_the_temporary_output(tmp_path):
    folder = tmp_path / "outs"
    folder.mkdir()
    proc = _start_slow(folder / "merged")
    try:
        _wait_for_temporary(folder, proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 143, proc.stderr.read()
    assert proc.stderr.read().strip() == "ctm: error: terminated"
    assert list(folder.iterdir()) == []


def test_later_run_removes_stale_temporaries_of_its_own_only(tmp_path):
    folder = tmp_path / "outs"
    folder.mkdir()
    # what SIGKILL leaves: a temporary output with a partial file, its process gone
    proc = _start_slow(folder / "merged")
    try:
        left = _wait_for_temporary(folder, proc)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert left.exists()
    host = destination._host()
    live = folder / f".merged.tmp-ctm{os.getpid()}.{destination._start_time(os.getpid())}.{host}-abcd1234"
    other_host = folder / f".merged.tmp-ctm{proc.pid}.1.{'0' * 8 if host != '0' * 8 else '1' * 8}-abcd1234"
    other_output = folder / f".other.tmp-ctm{proc.pid}.1.{host}-abcd1234"
    foreign = folder / ".merged.tmp-abcd1234"             # not named by this version of ctm
    for d in (live, other_host, other_output, foreign):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"partial")
    kohya_left = folder / f".merged.safetensors.tmp-ctm{proc.pid}.1.{host}-abcd1234"
    kohya_left.write_bytes(b"partial")
    assert main(["merge", str(EXAMPLES / "math"), str(EXAMPLES / "code"), "-o", str(folder / "merged"),
                 "--rank", "8", "-q"]) == 0
    assert main(["merge", str(EXAMPLES / "math"), str(EXAMPLES / "code"), "-o",
                 str(folder / "merged.safetensors"), "--rank", "8", "-q"]) == 0
    assert not left.exists() and not kohya_left.exists()
    assert all(d.exists() for d in (live, other_host, other_output, foreign))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["merged", "merged.safetensors", live.name, other_host.name, other_output.name, foreign.name])
