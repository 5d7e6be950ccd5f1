"""One declared model of the merge settings (ctm_kernels.options): a setting added there is an
option of ``ctm merge``, a key of config files, a keyword of the Python API and a line of every
output's resolved config, with no other change; its value is checked once, where the merge is
asked for."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

import ctm_kernels
from ctm_kernels import options
from ctm_kernels.cli import main
from ctm_kernels.integrations.peft import add_merged_adapter
from ctm_kernels.options import Option, Options, SettingError

ROOT = Path(ctm_kernels.__file__).resolve().parents[1]
TWO = [str(ROOT / "examples" / "adapters" / name) for name in ("math", "code")]


@pytest.fixture
def with_smoothing(monkeypatch):
    """The merge settings and one more, ``smoothing`` (a number in [0, 1]); returns the list
    of the values its check saw."""
    seen = []

    def check(v):
        seen.append(v)
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"smoothing must be in [0, 1], got {v!r}")
        return v

    extra = Option("smoothing", 0.5, "how much to smooth the merged update", float, check, "--smoothing", float,
                   "F", key="smoothing")
    monkeypatch.setattr(options, "MERGE", Options([*options.MERGE.options, extra], options.MERGE.rule_parameters))
    return seen


def test_a_new_option_is_in_the_help_the_schema_and_the_saved_config(with_smoothing, tmp_path, capsys):
    assert main(["merge", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--smoothing F how much to smooth the merged update (default: 0.5)" in help_text
    schema = options.MERGE.schema()["properties"]["smoothing"]
    assert schema == {"description": "how much to smooth the merged update", "default": 0.5}

    out = tmp_path / "out"
    assert main(["merge", *TWO, "-o", str(out), "--rank", "4", "--smoothing", "0.25", "--threads", "1", "-q"]) == 0
    assert with_smoothing == [0.25]                       # checked once, from the command line to the output
    saved = yaml.safe_load((out / "ctm_merge.yaml").read_text())
    assert saved["smoothing"] == 0.25 and list(saved)[-2:] == ["smoothing", "adapters"]

    # the saved config runs again (the loader knows the key) and records the value again
    again = tmp_path / "again"
    assert main(["merge", "--config", str(out / "ctm_merge.yaml"), "-o", str(again), "-q"]) == 0
    assert yaml.safe_load((again / "ctm_merge.yaml").read_text())["smoothing"] == 0.25
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()

    # a bad value in a config file is reported with the file and the key; from the API, as itself
    bad = tmp_path / "bad.yaml"
    bad.write_text((out / "ctm_merge.yaml").read_text().replace("smoothing: 0.25", "smoothing: 3"))
    assert main(["merge", "--config", str(bad), "-o", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.strip() == f"ctm: error: {bad}: smoothing: smoothing must be in [0, 1], got 3"
    with pytest.raises(SettingError, match=r"smoothing must be in \[0, 1\], got -1") as e:
        ctm_kernels.merge(TWO, rank=4, smoothing=-1)
    assert e.value.name == "smoothing"
    assert "smoothing must be in [0, 1], got 2" in ctm_kernels.plan_merge(TWO, rank=4, smoothing=2).problems
    assert not (tmp_path / "no").exists()


def test_the_api_signatures_are_the_declared_settings():
    names = [o.name for o in options.MERGE.options]
    for fn in (ctm_kernels.merge, ctm_kernels.plan_merge):
        params = inspect.signature(fn).parameters
        assert [n for n in params if n in names] == names
        assert params["rank"].default is inspect.Parameter.empty and params["method"].default == "ties"
        assert params["rule_params"].kind is inspect.Parameter.VAR_KEYWORD
    assert "progress" in inspect.signature(ctm_kernels.merge).parameters
    params = inspect.signature(add_merged_adapter).parameters
    assert "threads" in params and "output" not in params and "dtype" not in params
    with pytest.raises(TypeError, match="unexpected keyword argument 'output'"):
        add_merged_adapter(None, ["a"], "m", rank=4, output="x")


def test_validate_checks_each_setting_and_keeps_the_rest_as_rule_parameters():
    s = options.MERGE.validate({"rank": "8", "dtype": "auto", "format": "kohya", "top_k": 0.3, "weights": (1, 2)})
    assert (s.rank, s.dtype, s.format, s.weights, s.params) == (8, None, "kohya", [1.0, 2.0], {"top_k": 0.3})
    assert s.method == "ties" and s.max_group_bytes == 256 * 2**20 and s.tol is None
    with pytest.raises(TypeError, match="missing required keyword argument 'rank'"):
        options.MERGE.validate({})
    with pytest.raises(SettingError, match="beta must be in"):
        options.MERGE.validate({"rank": 4, "beta": 2})
    found = []
    s = options.MERGE.validate({"rank": 0, "stop": "angle", "pad_rank": "yes"}, found.append)
    assert [e.name for e in found] == ["rank", "stop", "pad_rank"]
    assert (s.rank, s.stop, s.pad_rank) == (None, "energy", False)


def test_dump_records_what_decides_the_bytes_in_order():
    s = options.MERGE.validate({"rank": 4, "method": "dare", "format": "peft", "threads": 2, "output": "x",
                                "device": "cpu"})
    s = dataclasses.replace(s, params={"seed": 0, "p": 0.5})
    data = options.MERGE.dump(s)
    assert list(data) == ["merge_method", "rank", "parameters", "beta", "scale", "stop", "tol", "max_iter", "dtype",
                          "format", "threads"]
    assert data["parameters"] == {"p": 0.5, "seed": 0} and list(data["parameters"]) == ["p", "seed"]
    kohya = options.MERGE.dump(options.MERGE.validate({"rank": 4, "format": "kohya", "pad_rank": True}))
    assert list(kohya)[-2:] == ["pad_rank", "kohya_prefix"] and kohya["kohya_prefix"] == "lora_unet"


def test_the_schema_is_what_the_loader_takes(tmp_path):
    schema = options.MERGE.schema()
    assert schema["required"] == ["rank"] and not schema["additionalProperties"]
    assert set(schema["properties"]["parameters"]["properties"]) == {"top_k", "p", "seed", "normalize"}
    assert schema["properties"]["max_group_mb"]["default"] == 256
    assert "weights" not in schema["properties"]                 # per adapter, under adapters
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"adapters": TWO, "rank": 4, "max_group_mb": 2, "pad_rank": True, "base_model": "x"}))
    from ctm_kernels.pipeline.config import load_config
    kw = load_config(cfg)
    assert kw["max_group_bytes"] == 2 * 2**20 and kw["pad_rank"] is True and "base_model" not in kw
