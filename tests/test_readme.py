"""The README runs as written: its Python snippets, shell commands and YAML config, in the order
they appear, from a folder that has the repository's ``examples/`` and ``benchmarks/`` (as a
fresh clone has them), the Python snippets in one namespace.

Left out of the run, each for its reason: installing (``pip install``: the environment is
installed already, and no network), the test suite itself (``python -m pytest``), commands whose
comment says ``slow`` (gigabytes of synthetic adapters) and the quality benchmarks
(``python -m benchmarks.quality...``: minutes to an hour, and they rewrite the committed result
files)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ctm_kernels

ROOT = Path(ctm_kernels.__file__).resolve().parents[1]


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(snippets()) >= 4


def blocks() -> list[tuple[str, str]]:
    """Every fenced block of README with a language, ``(language, text)``, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


SKIPPED = (re.compile(r"^pip install "), re.compile(r"^python -m pytest\b"), re.compile(r"#.*\bslow\b"),
           re.compile(r"^python -m benchmarks\.quality"))


def commands(text: str) -> list[str]:
    return [line for line in (ln.strip() for ln in text.splitlines())
            if line and not line.startswith("#") and not any(p.search(line) for p in SKIPPED)]


def test_readme_runs_in_order(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(sys.path))      # the snippet adds examples/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    bindir = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])      # ctm, torchrun of this environment
    namespace: dict = {}
    ran = []
    for i, (lang, text) in enumerate(blocks()):
        if lang == "python":
            exec(compile(text, f"README.md python block {i + 1}", "exec"), namespace)
        elif lang == "bash":
            for cmd in commands(text):
                if cmd.startswith("python "):
                    cmd = f"{sys.executable} {cmd[len('python '):]}"
                proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env, timeout=300)
                assert proc.returncode == 0, f"README: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
                ran.append(cmd)
        elif lang == "yaml":
            (tmp_path / "merge.yaml").write_text(text)
            from ctm_kernels.cli import main
            assert main(["merge", "--config", "merge.yaml", "-q"]) == 0
    assert any(" merge examples/adapters/* -o merged " in f" {c} " for c in ran)
    assert any(c.startswith("torchrun ") for c in ran) and any("synth.py zoo" in c for c in ran)
    assert (tmp_path / "merged" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged_2proc" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged_from_config" / "ctm_merge.yaml").is_file()
    assert (tmp_path / "merged_api" / "adapter_model.safetensors").is_file()
    assert "merged" in namespace["peft_model"].peft_config
