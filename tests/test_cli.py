"""The ``ctm`` command: merge and inspect, output formats, exit codes, every bad input."""
from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctm_kernels import api
from ctm_kernels.cli import main

P = "base_model.model."


def _pair(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)


def peft_folder(path: Path, modules: dict, config: dict | None = None, extra: dict | None = None) -> Path:
    """PEFT adapter folder; ``modules`` maps module path -> (A [r, n], B [m, r])."""
    path.mkdir(parents=True)
    t = {}
    for name, (A, B) in modules.items():
        t[f"{P}{name}.lora_A.weight"], t[f"{P}{name}.lora_B.weight"] = A, B
    t.update(extra or {})
    save_file(t, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": next(iter(modules.values()))[0].shape[0], "lora_alpha": 8,
           "target_modules": sorted({k.rsplit(".", 1)[-1] for k in modules}), "base_model_name_or_path": "tiny"}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def kohya_file(path: Path, modules: dict, alphas: dict) -> Path:
    t = {}
    for name, (A, B) in modules.items():
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = A, B
        if name in alphas:
            t[f"{name}.alpha"] = torch.tensor(float(alphas[name]))
    save_file(t, str(path))
    return path


def peft_updates(folder: Path) -> dict[str, torch.Tensor]:
    """Per module path, the update PEFT applies (scale * B @ A, conv flattened)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("use_rslora")
    sd = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for k, A in sd.items():
        if k.endswith(".lora_A.weight"):
            B = sd[k.replace("lora_A", "lora_B")]
            s = cfg["lora_alpha"] / cfg["r"]
            out[k[len(P):-len(".lora_A.weight")]] = s * B.reshape(B.shape[0], -1).double() @ A.reshape(A.shape[0], -1).double()
    return out


def kohya_updates(path: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(path))
    out = {}
    for k, A in sd.items():
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            B = sd[f"{name}.lora_up.weight"]
            alpha = sd[f"{name}.alpha"].item() if f"{name}.alpha" in sd else A.shape[0]
            out[name] = alpha / A.shape[0] * B.reshape(B.shape[0], -1).double() @ A.reshape(A.shape[0], -1).double()
    return out


@pytest.fixture
def three(tmp_path):
    """Three PEFT adapters: different ranks, alphas (one rsLoRA), modules."""
    a = peft_folder(tmp_path / "a", {"model.layers.0.q_proj": _pair(16, 24, 4, 0),
                                     "model.layers.0.v_proj": _pair(8, 24, 4, 1)}, {"lora_alpha": 8})
    b = peft_folder(tmp_path / "b", {"model.layers.0.q_proj": _pair(16, 24, 6, 2),
                                     "model.layers.1.q_proj": _pair(16, 24, 6, 3)},
                    {"lora_alpha": 12, "use_rslora": True})
    c = peft_folder(tmp_path / "c", {"model.layers.0.v_proj": _pair(8, 24, 2, 4),
                                     "model.layers.1.q_proj": _pair(16, 24, 2, 5)}, {"lora_alpha": 1})
    return [a, b, c]


# ------------------------------------------------------------------------------------------
# success paths


def test_merge_writes_peft_folder_and_summary(three, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", *map(str, three), "-o", str(out), "--rank", "4", "--method", "ties", "--top-k", "0.5",
               "--weights", "1,0.5,2"])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["peft_type"]) == (4, 4, False, "LORA")
    assert cfg["target_modules"] == ["model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.q_proj"]
    assert cfg["base_model_name_or_path"] == "tiny"
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert sd[f"{P}model.layers.0.v_proj.lora_A.weight"].shape == (4, 24)
    assert sd[f"{P}model.layers.0.v_proj.lora_B.weight"].shape == (8, 4)
    # same numbers as the Python API (the CLI adds nothing of its own)
    res = api.merge(three, rank=4, method="ties", top_k=0.5, weights=[1, 0.5, 2])
    for mm in res.modules:
        torch.testing.assert_close(sd[f"{P}{mm.name}.lora_A.weight"], mm.A)
    text = capsys.readouterr().out
    assert "merged 3 adapters into 3 modules at rank 4 with ties (top_k=0.5)" in text
    for folder, kept in zip(three, res.energy_kept):
        assert f"  {folder} " in text and f"{100 * kept:6.2f} %" in text      # named as given


def test_base_model_dropped_when_inputs_disagree(three, tmp_path):
    cfg = json.loads((three[2] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "other"
    (three[2] / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["merge", *map(str, three), "-o", str(tmp_path / "m"), "--rank", "2", "-q"]) == 0
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_overwrite(three, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["merge", str(three[0]), "-o", str(out), "--rank", "2", "-q"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists (pass overwrite=True / --overwrite to replace a previous ctm output)" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--method", "sum"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "m"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "ctm_merge.yaml"]


def test_inspect(three, tmp_path, capsys):
    k = kohya_file(tmp_path / "k.safetensors", {"lora_unet_x": _pair(6, 10, 3, 0)}, {"lora_unet_x": 1.5})
    assert main(["inspect", str(three[1]), str(k)]) == 0
    text = capsys.readouterr().out
    assert "b/adapter_model.safetensors: peft, 2 modules, ranks [6], dtypes ['float32'], 480 parameters, rsLoRA" in text
    assert "model.layers.1.q_proj" in text and f"{12 / math.sqrt(6):.4g}" in text
    assert "k.safetensors: kohya, 1 module, ranks [3], dtypes ['float32'], 48 parameters" in text
    assert main(["inspect", "--json", str(k)]) == 0
    rep = json.loads(capsys.readouterr().out)[0]
    assert rep["mergeable"] is True and rep["nonfinite"] == []
    assert rep["modules"][0] == {"name": "lora_unet_x", "kind": "linear", "out": 6, "in": 10, "rank": 3,
                                 "alpha": 1.5, "scale": 0.5, "dtype": "float32", "params": 48}


def test_kohya_round_trip(tmp_path):
    mods = {"lora_unet_blocks_0_to_q": _pair(12, 20, 4, 0), "lora_unet_blocks_0_conv": None}
    g = torch.Generator().manual_seed(9)
    mods["lora_unet_blocks_0_conv"] = (torch.randn(4, 3, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g))
    k = kohya_file(tmp_path / "in.safetensors", mods, {"lora_unet_blocks_0_to_q": 2.0, "lora_unet_blocks_0_conv": 8})
    want = kohya_updates(k)
    # kohya in, kohya out (the format follows the output's name): the names come back unchanged
    assert main(["merge", str(k), "-o", str(tmp_path / "out.safetensors"), "--rank", "4", "--method", "sum", "-q"]) == 0
    conv = load_file(str(tmp_path / "out.safetensors"))["lora_unet_blocks_0_conv.lora_down.weight"]
    assert conv.shape == (4, 3, 3, 3)
    back = kohya_updates(tmp_path / "out.safetensors")
    assert sorted(back) == sorted(want)
    for name in want:
        torch.testing.assert_close(back[name], want[name], rtol=1e-5, atol=1e-5)


def test_peft_in_kohya_out_names_and_updates(three, tmp_path):
    out = tmp_path / "k.safetensors"
    assert main(["merge", str(three[1]), "-o", str(out), "--format", "kohya", "--rank", "6", "--method", "sum",
                 "--kohya-prefix", "lora_te", "-q"]) == 0
    got = kohya_updates(out)
    want = {f"lora_te_{k.replace('.', '_')}": v for k, v in peft_updates_rs(three[1]).items()}
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def peft_updates_rs(folder: Path):
    """Updates of an rsLoRA PEFT folder (alpha / sqrt(r))."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    return {k[len(P):-len(".lora_A.weight")]: cfg["lora_alpha"] / math.sqrt(A.shape[0]) *
            sd[k.replace("lora_A", "lora_B")].double() @ A.double()
            for k, A in sd.items() if k.endswith(".lora_A.weight")}


# ------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the file and the key, no output


def _bad(name, tmp_path):
    """Build the bad-input case ``name``; returns (argv adapters + options, expected substrings)."""
    ok = peft_folder(tmp_path / "ok", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2})
    if name == "missing-file":
        return [str(tmp_path / "nope")], [f"{tmp_path / 'nope'}: no such file"]
    if name == "corrupt-safetensors":
        (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        return [str(tmp_path / "bad.safetensors")], ["bad.safetensors: not a valid safetensors file"]
    if name == "truncated-safetensors":
        f = peft_folder(tmp_path / "t", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2})
        data = (f / "adapter_model.safetensors").read_bytes()
        (f / "adapter_model.safetensors").write_bytes(data[:-20])
        return [str(f)], ["t/adapter_model.safetensors: not a valid safetensors file"]
    if name == "missing-config":
        f = peft_folder(tmp_path / "nc", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2})
        (f / "adapter_config.json").unlink()
        return [str(f)], ["nc/adapter_config.json: missing"]
    if name == "shape-mismatch":
        f = peft_folder(tmp_path / "sm", {"model.q_proj": _pair(6, 8, 2, 0)}, {"r": 2})
        return [str(ok), str(f)], ["sm/adapter_model.safetensors", f"{P}model.q_proj.lora_A.weight",
                                   "ok/adapter_model.safetensors"]
    if name in ("nan", "inf"):
        A, B = _pair(8, 8, 2, 1)
        B[3, 1] = float("nan") if name == "nan" else float("inf")
        f = peft_folder(tmp_path / name, {"model.q_proj": (A, B), "model.a_first": _pair(8, 8, 2, 2)}, {"r": 2})
        return [str(ok), str(f)], [f"{name}/adapter_model.safetensors", f"{P}model.q_proj.lora_B.weight",
                                   "NaN" if name == "nan" else "Inf"]
    if name == "dora":
        f = peft_folder(tmp_path / "d", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2, "use_dora": True},
                        {f"{P}model.q_proj.lora_magnitude_vector": torch.ones(8)})
        return [str(f)], ["d/adapter_config.json: use_dora: DoRA"]
    if name == "dora-key":
        f = peft_folder(tmp_path / "d", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2},
                        {f"{P}model.q_proj.lora_magnitude_vector": torch.ones(8)})
        return [str(f)], [f"d/adapter_model.safetensors: {P}model.q_proj.lora_magnitude_vector: DoRA"]
    if name == "bias":
        f = peft_folder(tmp_path / "b", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2, "bias": "all"},
                        {f"{P}model.q_proj.base_layer.bias": torch.ones(8)})
        return [str(f)], ["b/adapter_config.json: bias: 'all': the adapter trains the base layers' biases"]
    if name == "lora-bias":
        f = peft_folder(tmp_path / "b", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2, "lora_bias": True},
                        {f"{P}model.q_proj.lora_B.bias": torch.ones(8)})
        return [str(f)], ["b/adapter_config.json: lora_bias:"]
    if name == "modules-to-save":
        f = peft_folder(tmp_path / "mts", {"model.q_proj": _pair(8, 8, 2, 0)},
                        {"r": 2, "modules_to_save": ["lm_head"]}, {f"{P}lm_head.weight": torch.ones(8, 8)})
        return [str(f)], ["mts/adapter_config.json: modules_to_save:"]
    if name == "full-weight-key":
        f = peft_folder(tmp_path / "fw", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2},
                        {f"{P}lm_head.weight": torch.ones(8, 8)})
        return [str(f)], [f"fw/adapter_model.safetensors: {P}lm_head.weight: not a LoRA factor"]
    if name == "bin-folder":
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"r": 2}))
        torch.save({"x": torch.ones(1)}, tmp_path / "bin" / "adapter_model.bin")
        return [str(tmp_path / "bin")], ["bin/adapter_model.bin: pickled weights"]
    if name == "bin-file":
        torch.save({"x": torch.ones(1)}, tmp_path / "lora.bin")
        return [str(tmp_path / "lora.bin")], ["lora.bin: pickled weights"]
    if name == "unknown-method":
        return [str(ok), "--method", "nope"], ["unknown merge method 'nope'"]
    if name == "method-param":
        return [str(ok), "--method", "sum", "--top-k", "0.3"], ["method 'sum' takes no parameter 'top_k'"]
    if name == "bad-top-k":
        return [str(ok), "--top-k", "1.5"], ["top_k=1.5 is invalid"]
    if name == "rank-zero":
        return [str(ok), "--rank", "0"], ["rank must be a positive integer or 'full', got 0"]
    if name == "rank-not-int":
        return [str(ok), "--rank", "two"], ["--rank: expected a positive integer or 'full', got 'two'"]
    if name == "weights-count":
        return [str(ok), "--weights", "1,2"], ["2 weights for 1 adapter"]
    if name == "weights-text":
        return [str(ok), "--weights", "1,x"], ["expected comma-separated numbers"]
    if name == "kohya-output-name":
        return [str(ok), "--format", "kohya"], ["outputs/merged: a kohya LoRA is one file; give a path ending in .safetensors"]
    if name == "cuda-missing" and not torch.cuda.is_available():
        return [str(ok), "--device", "cuda"], ["CUDA is not available"]
    if name == "bad-dtype":
        return [str(ok), "--dtype", "int8"], ["--dtype: invalid choice: 'int8'"]
    raise AssertionError(name)


BAD = ["missing-file", "corrupt-safetensors", "truncated-safetensors", "missing-config", "shape-mismatch", "nan",
       "inf", "dora", "dora-key", "bias", "lora-bias", "modules-to-save", "full-weight-key", "bin-folder",
       "bin-file", "unknown-method", "method-param", "bad-top-k", "rank-zero", "rank-not-int",
       "weights-count", "weights-text", "kohya-output-name", "bad-dtype"]
if not torch.cuda.is_available():
    BAD.append("cuda-missing")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exit_2_one_line_no_output(case, tmp_path, capsys):
    argv, expected = _bad(case, tmp_path)
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    out = outdir / "merged"
    if "--rank" not in argv:
        argv = argv + ["--rank", "2"]
    rc = main(["merge", *argv, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for s in expected:
        assert s in lines[0], (s, lines[0])
    assert list(outdir.iterdir()) == []          # no output, no temporary leftovers


def test_bad_input_in_inspect(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"ctm: error: {tmp_path / 'nope'}: no such file or folder"


def test_internal_error_exit_1(three, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")
    monkeypatch.setattr("ctm_kernels.pipeline.merge.merge_checked_layers", boom)
    rc = main(["merge", str(three[0]), "-o", str(tmp_path / "m"), "--rank", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines() == ["ctm: error: internal error: RuntimeError: kernel exploded second line"]
    assert not (tmp_path / "m").exists()
    assert main(["--traceback", "merge", str(three[0]), "-o", str(tmp_path / "m"), "--rank", "2"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert main([]) == 0                                  # bare ctm: the help
    assert capsys.readouterr().out.startswith("usage: ctm")
    assert main(["merge", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ctm: error: --rank is required (or rank: in --config)"]
    assert main(["merge", "x", "--rank", "2"]) == 2
    assert capsys.readouterr().err.strip() == "ctm: error: -o/--output is required (or output: in --config)"
    assert main(["--help"]) == 0
    assert "merge" in capsys.readouterr().out


def test_stop_option_reaches_the_engine(tmp_path):
    """--stop picks the subspace search's stop test; the report says which test ended each
    module, and the default is the energy test."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    adapters = [str(p) for p in sorted((root / "examples" / "adapters").iterdir())]
    for stop, extra in (("energy", []), ("subspace", ["--stop", "subspace", "--tol", "1e-9"])):
        report = tmp_path / f"{stop}.json"
        out = tmp_path / f"merged-{stop}"
        proc = subprocess.run([sys.executable, "-m", "ctm_kernels", "merge", *adapters, "-o", str(out), "--rank", "8",
                               "-q", "--report", str(report), *extra], capture_output=True, text=True, cwd=root)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(report.read_text())
        assert set(data["stopped_by"]) == {stop}, data["stopped_by"]
        assert len(data["share_after_rule"]) == len(adapters)
        assert all(0 < s < 1.5 for s in data["share_after_rule"]), data["share_after_rule"]
        assert f"stop: {stop}" in (out / "ctm_merge.yaml").read_text()       # the resolved config records it


# ------------------------------------------------------------------------------------------
# the dry run sees what the merge refuses; the summary; small manners


def test_plan_takes_every_option_of_merge(three, tmp_path, capsys):
    from ctm_kernels.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    opts = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.items()}
    assert opts["merge"] <= opts["plan"], sorted(opts["merge"] - opts["plan"])
    report = tmp_path / "plan.json"
    assert main(["plan", *map(str, three), "--rank", "4", "--threads", "2", "--no-prefetch", "--report", str(report),
                 "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "2 CPU threads" in out and "no problems found" in out
    assert json.loads(report.read_text())["threads"] == 2
    assert main(["plan", *map(str, three), "--rank", "4", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "o").exists()


def test_plan_sees_an_output_folder_it_cannot_write(three, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:          # root may write anywhere: answer as the folder's mode says for others
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked and mode & os.W_OK
                            else real(p, mode, *a, **k))
    try:
        out = str(locked / "merged")
        assert main(["plan", *map(str, three), "--rank", "4", "-o", out]) == 2
        assert f"problem: {locked}: no permission to write the output there" in capsys.readouterr().out
        assert main(["merge", *map(str, three), "--rank", "4", "-o", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ctm: error: {locked}: no permission to write the output")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_plan_sees_iso_cts_short_of_adapters_at_a_module(three, tmp_path, capsys):
    args = [*map(str, three), "--rank", "2", "--method", "iso_cts"]
    assert main(["plan", *args]) == 2
    assert ("problem: model.layers.0.q_proj: iso_cts needs fewer adapters at a module than its merged rank; "
            "2 of the 3 adapters adapt it at rank 2") in capsys.readouterr().out
    assert main(["merge", *args, "-o", str(tmp_path / "o")]) == 2
    assert "ctm: error: model.layers.0.q_proj: iso_cts needs fewer adapters" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_plan_refuses_a_scale_that_is_not_finite(scale, three, tmp_path, capsys):
    args = [*map(str, three), "--rank", "2", f"--scale={scale}"]
    assert main(["plan", *args, "-q"]) == 2
    assert capsys.readouterr().out == f"problem: scale must be finite, got {float(scale)!r}\n"
    assert main(["merge", *args, "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"ctm: error: scale must be finite, got {float(scale)!r}\n"
    assert not (tmp_path / "o").exists()


def test_summary_explains_shares_above_100_and_names_adapters_as_given(tmp_path, capsys, monkeypatch):
    a = peft_folder(tmp_path / "a", {"m.q": _pair(16, 24, 4, 0)})
    b = tmp_path / "b"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())       # the same update twice: sum carries each at 200 %
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "a", "b/", "-o", "o", "--rank", "8", "--method", "sum"]) == 0
    text = capsys.readouterr().out
    assert "  a   100.00 %   200.00 %" in text and "  b/  100.00 %   200.00 %" in text
    assert "adapter_model.safetensors" not in text
    assert "above 100 %: other adapters' updates point the same way" in text
    assert "(at most 100 %)" in text


def test_small_manners(three, tmp_path, capsys):
    base = [*map(str, three), "-o", str(tmp_path / "o"), "--rank", "4"]
    assert main(["merge", *base, "--method", "TIES"]) == 2
    assert "unknown merge method 'TIES' (did you mean ties?)" in capsys.readouterr().err
    assert main(["merg", *base]) == 2
    assert "(did you mean merge?)" in capsys.readouterr().err
    assert main(["merge", *base, "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ctm: error: unknown device 'gpu' (did you mean cuda?); the merge runs on cpu or cuda (cuda:N)"
    # a PEFT folder without its config is not called kohya
    (three[0] / "adapter_config.json").unlink()
    assert main(["inspect", str(three[0])]) == 0
    out = capsys.readouterr().out
    assert "peft folder without adapter_config.json, 4 tensors; the merge refuses it" in out and "kohya" not in out
