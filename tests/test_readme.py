"""The README's Python snippets run as written (from a folder that has the repository's
``examples/``), in order, in one namespace."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import ctm_kernels

ROOT = Path(ctm_kernels.__file__).resolve().parents[1]


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(snippets()) >= 4


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))      # the snippet adds examples/
    namespace: dict = {}
    for i, code in enumerate(snippets()):
        exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
    assert (tmp_path / "merged_api" / "adapter_model.safetensors").is_file()
    assert "merged" in namespace["peft_model"].peft_config


def test_readme_config_file_runs(tmp_path):
    from ctm_kernels.cli import main

    [config] = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "merge.yaml").write_text(config)
    assert main(["merge", "--config", str(tmp_path / "merge.yaml"), "-q"]) == 0
    assert (tmp_path / "merged" / "ctm_merge.yaml").is_file()
