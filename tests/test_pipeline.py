"""The merge pipeline around the engine: output safety, formats, ranks per module, ``mean`` over
every adapter, the dry run, config files, Hub ids and the command's manners."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ctm_kernels
from ctm_kernels.cli import main
from ctm_kernels.io.safetensors_io import SafetensorsStore, SafetensorsWriter

from test_cli import _pair, kohya_file, kohya_updates, peft_folder, peft_updates

ROOT = Path(ctm_kernels.__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adapters"
P = "base_model.model."


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def two(tmp_path):
    a = peft_folder(tmp_path / "a", {"model.layers.0.q_proj": _pair(16, 24, 4, 0),
                                     "model.layers.0.v_proj": _pair(8, 24, 4, 1)})
    b = peft_folder(tmp_path / "b", {"model.layers.0.q_proj": _pair(16, 24, 4, 2)})
    return a, b


# ------------------------------------------------------------------------------------------
# 1. never over or inside an input; --overwrite replaces only a previous ctm output


@pytest.mark.parametrize("where", ["input", "inside", "holds"])
def test_output_never_touches_an_input(two, tmp_path, capsys, where):
    a, b = two
    before = {p: _tree(p) for p in (a, b)}
    out = {"input": a, "inside": a / "merged", "holds": tmp_path}[where]
    rc = main(["merge", str(a), str(b), "-o", str(out), "--rank", "2", "--overwrite", "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert {"input": "is the input", "inside": "lies inside the input", "holds": "holds the input"}[where] in err
    assert {p: _tree(p) for p in (a, b)} == before
    assert not (a / "merged").exists()


def test_overwrite_refuses_a_folder_with_other_files(two, tmp_path, capsys):
    a, b = two
    out = tmp_path / "out"
    assert main(["merge", str(a), str(b), "-o", str(out), "--rank", "2", "-q"]) == 0
    (out / "extra.txt").write_text("mine")
    before = _tree(out)
    assert main(["merge", str(a), str(b), "-o", str(out), "--rank", "2", "--overwrite", "-q"]) == 2
    assert "holds extra.txt, which ctm did not write" in capsys.readouterr().err
    assert _tree(out) == before
    # a folder that is not ctm's at all
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes(b"x")
    assert main(["merge", str(a), str(b), "-o", str(other), "--rank", "2", "--overwrite", "-q"]) == 2
    assert "not written by ctm" in capsys.readouterr().err
    # a previous ctm output is replaced
    (out / "extra.txt").unlink()
    assert main(["merge", str(a), str(b), "-o", str(out), "--rank", "3", "--overwrite", "-q"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


# ------------------------------------------------------------------------------------------
# 2, 3. formats: mixed inputs mapped or refused, output format from the name


def test_mixed_kohya_and_peft_map_to_the_peft_paths(tmp_path):
    q, v = _pair(16, 24, 4, 0), _pair(8, 24, 4, 1)
    a = peft_folder(tmp_path / "a", {"model.layers.0.q_proj": q, "model.layers.0.v_proj": v})
    k = kohya_file(tmp_path / "k.safetensors", {"lora_unet_model_layers_0_q_proj": _pair(16, 24, 2, 5)},
                   {"lora_unet_model_layers_0_q_proj": 1.0})
    out = tmp_path / "out"
    assert main(["merge", str(a), str(k), "-o", str(out), "--rank", "full", "--method", "sum", "-q"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.q_proj", "model.layers.0.v_proj"]
    got = {n: u for n, u in _updates_with_patterns(out).items()}
    want_a = peft_updates_plain(a)
    want_k = kohya_updates(k)["lora_unet_model_layers_0_q_proj"]
    torch.testing.assert_close(got["model.layers.0.q_proj"], want_a["model.layers.0.q_proj"] + want_k,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["model.layers.0.v_proj"], want_a["model.layers.0.v_proj"], rtol=1e-5, atol=1e-5)


def peft_updates_plain(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    return {k[len(P):-len(".lora_A.weight")]: cfg["lora_alpha"] / A.shape[0] *
            sd[k.replace("lora_A", "lora_B")].double() @ A.double() for k, A in sd.items() if k.endswith(".lora_A.weight")}


def _updates_with_patterns(folder):
    """PEFT updates of a merged folder (scaling 1 everywhere: alpha_pattern mirrors rank_pattern)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"]
    sd = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for k, A in sd.items():
        if k.endswith(".lora_A.weight"):
            name = k[len(P):-len(".lora_A.weight")]
            r = cfg["rank_pattern"].get(name.replace(".", "\\."), cfg["r"])
            assert r == A.shape[0]
            out[name] = sd[k.replace("lora_A", "lora_B")].double() @ A.double()
    return out


def test_mixed_formats_refused_when_a_name_does_not_map(two, tmp_path, capsys):
    k = kohya_file(tmp_path / "k.safetensors", {"lora_unet_model_layers_0_mlp_down_proj": _pair(16, 24, 2, 5)}, {})
    assert main(["merge", str(two[0]), str(k), "-o", str(tmp_path / "o"), "--rank", "2", "-q"]) == 2
    err = capsys.readouterr().err
    assert "k.safetensors: lora_unet_model_layers_0_mlp_down_proj.lora_down.weight: kohya module" in err
    assert "matches no module path of the PEFT inputs" in err and not (tmp_path / "o").exists()


def test_kohya_input_to_peft_folder_refused_and_no_overlap_refused(two, tmp_path, capsys):
    k = kohya_file(tmp_path / "k.safetensors", {"lora_unet_x": _pair(6, 10, 3, 0)}, {})
    assert main(["merge", str(k), "-o", str(tmp_path / "o"), "--rank", "2", "-q"]) == 2
    assert "flattened paths that a PEFT adapter cannot target" in capsys.readouterr().err
    c = peft_folder(tmp_path / "c", {"model.layers.5.k_proj": _pair(16, 24, 4, 9)})
    assert main(["merge", str(two[1]), str(c), "-o", str(tmp_path / "o"), "--rank", "2", "-q"]) == 2
    assert "no module is adapted by more than one of the 2 adapters" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_safetensors_output_name_means_kohya(two, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["merge", *map(str, two), "-o", str(out), "--rank", "2", "-q"]) == 0
    assert out.is_file() and "model_layers_0_q_proj" in " ".join(load_file(str(out)))
    assert main(["merge", *map(str, two), "-o", str(tmp_path / "q.safetensors"), "--format", "peft", "--rank", "2"]) == 2
    assert "a PEFT adapter is a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# 4. permissions follow the umask


def test_outputs_follow_the_umask(two, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["merge", *map(str, two), "-o", str(tmp_path / "o"), "--rank", "2", "-q"]) == 0
        assert main(["merge", *map(str, two), "-o", str(tmp_path / "k.safetensors"), "--rank", "2", "-q"]) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)      # noqa: E731
    assert mode(tmp_path / "o") == 0o755
    assert {f.name: mode(f) for f in (tmp_path / "o").iterdir()} == {
        "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644, "ctm_merge.yaml": 0o644}
    assert mode(tmp_path / "k.safetensors") == 0o644


# ------------------------------------------------------------------------------------------
# 5. devices and pipes


def test_unusable_device_is_bad_input(two, tmp_path, capsys):
    assert main(["merge", *map(str, two), "-o", str(tmp_path / "o"), "--rank", "2", "--device", "mps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ctm: error: device 'mps': the merge runs on cpu or cuda"]


def test_closed_pipe_ends_quietly():
    # enough output to fill the pipe (64 KiB) after the reader has gone
    argv = [sys.executable, "-m", "ctm_kernels", "inspect", "--json", "--no-values", *[str(EXAMPLES / "chat")] * 40]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


# ------------------------------------------------------------------------------------------
# 6. biases refused, lm_head LoRA accepted like embed_tokens


def test_bias_lora_only_refused(tmp_path, capsys):
    f = peft_folder(tmp_path / "b", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2, "bias": "lora_only"})
    assert main(["merge", str(f), "-o", str(tmp_path / "o"), "--rank", "2"]) == 2
    assert "b/adapter_config.json: bias: 'lora_only': the adapter trains the base layers' biases" in \
        capsys.readouterr().err


def test_lm_head_base_weights_carried(tmp_path):
    head = torch.randn(12, 8)
    mods = {"lm_head": _pair(12, 8, 2, 0), "model.q_proj": _pair(8, 8, 2, 1)}
    a = peft_folder(tmp_path / "a", mods, {"r": 2}, {f"{P}lm_head.base_layer.weight": head})
    b = peft_folder(tmp_path / "b", {"lm_head": _pair(12, 8, 2, 2)}, {"r": 2},
                    {f"{P}lm_head.base_layer.weight": head})
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "o"), "--rank", "2", "-q"]) == 0
    sd = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    assert torch.equal(sd[f"{P}lm_head.base_layer.weight"], head)


# ------------------------------------------------------------------------------------------
# 7, 8. rank per module; mean over every adapter given


def test_rank_capped_per_module_and_full_rank(tmp_path):
    a = peft_folder(tmp_path / "a", {"m.k_proj": _pair(32, 64, 16, 0), "m.q_proj": _pair(64, 64, 16, 1)}, {"r": 16})
    b = peft_folder(tmp_path / "b", {"m.k_proj": _pair(32, 64, 16, 2), "m.q_proj": _pair(64, 64, 16, 3)}, {"r": 16})
    res = ctm_kernels.merge([a, b], rank=34, method="sum", output=tmp_path / "o", pad_rank=True)
    assert {mm.name: mm.rank for mm in res.modules} == {"m.k_proj": 32, "m.q_proj": 34}
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["r"] == 34 and cfg["rank_pattern"] == {"m\\.k_proj": 32}
    plan = ctm_kernels.plan_merge([a, b], rank=34, pad_rank=True)
    assert plan.notes == ["rank 34 capped at min(m, n) = 32 on 1 linear module of shape 32x64"]
    # full: min(sum of input ranks, m, n) per module, and the sum is exact
    full = ctm_kernels.merge([a, b], rank="full", method="sum")
    assert {mm.name: mm.rank for mm in full.modules} == {"m.k_proj": 32, "m.q_proj": 32}
    want = {n: peft_updates(a)[n] + peft_updates(b)[n] for n in ("m.k_proj", "m.q_proj")}
    for mm in full.modules:
        torch.testing.assert_close(mm.update().double(), want[mm.name], rtol=1e-5, atol=1e-5)


def test_mean_divides_by_every_adapter_given(tmp_path):
    a = peft_folder(tmp_path / "a", {"m.q": _pair(16, 24, 4, 0), "m.v": _pair(8, 24, 4, 1)})
    b = peft_folder(tmp_path / "b", {"m.q": _pair(16, 24, 4, 2)})
    c = peft_folder(tmp_path / "c", {"m.q": _pair(16, 24, 4, 3)})
    res = ctm_kernels.merge([a, b, c], rank="full", method="mean")
    ua, ub, uc = peft_updates(a), peft_updates(b), peft_updates(c)
    got = {mm.name: mm.update().double() for mm in res.modules}
    torch.testing.assert_close(got["m.q"], (ua["m.q"] + ub["m.q"] + uc["m.q"]) / 3, rtol=1e-5, atol=1e-6)
    # v is adapted by a alone: its mean over the three adapters is a third of a's update
    torch.testing.assert_close(got["m.v"], ua["m.v"] / 3, rtol=1e-5, atol=1e-6)
    assert res.energy_kept == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


# ------------------------------------------------------------------------------------------
# dry run


def _sparse_zoo(root: Path, adapters: int) -> list[Path]:
    """Llama-3-8B-layout rank-16 bf16 PEFT adapters whose factor bytes are never written
    (sparse files: a header and a hole), for plans that must not read them."""
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
              "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
    out = []
    for t in range(adapters):
        folder = root / f"a{t:02d}"
        folder.mkdir(parents=True)
        layout = {}
        for layer in range(32):
            for mod, (m, n) in shapes.items():
                part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                name = f"{P}model.layers.{layer}.{part}.{mod}"
                layout[f"{name}.lora_A.weight"] = torch.empty(16, n, dtype=torch.bfloat16, device="meta")
                layout[f"{name}.lora_B.weight"] = torch.empty(m, 16, dtype=torch.bfloat16, device="meta")
        SafetensorsWriter(folder / "adapter_model.safetensors", layout, {"format": "pt"}).abort()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
        out.append(folder)
    return out


def test_plan_of_the_8b_layout_is_fast_and_reads_no_factor(tmp_path, monkeypatch, capsys):
    zoo = _sparse_zoo(tmp_path / "zoo", 16)

    def no_read(self, keys):
        raise AssertionError(f"{self.label}: the plan read {list(keys)[:2]}")

    monkeypatch.setattr(SafetensorsStore, "get", no_read)
    t0 = time.perf_counter()
    rc = main(["plan", *map(str, zoo), "--rank", "16", "-o", str(tmp_path / "out")])
    seconds = time.perf_counter() - t0
    text = capsys.readouterr().out
    assert rc == 0, text
    assert seconds < 2.0, seconds
    assert "224 modules (224 adapted by more than one adapter)" in text and "no problems found" in text
    assert "estimated peak factor memory" in text
    assert not (tmp_path / "out").exists()
    plan = ctm_kernels.plan_merge(list(map(str, zoo)), rank=16)
    # the time model is calibrated on this very merge (README: 49 s); bf16 factors peak at 7x a group
    assert plan.estimated_seconds() == pytest.approx(49.0, rel=1e-9)
    assert plan.estimated_peak_bytes() == 7 * max(plan.group_bytes())
    assert max(plan.group_bytes()) <= 256 * 2**20 and len(plan.groups) == 7


def test_dry_run_lists_every_problem(two, tmp_path, capsys):
    nan = peft_folder(tmp_path / "n", {"model.layers.0.q_proj": _pair(16, 24, 4, 0)}, {"use_dora": True})
    rc = main(["merge", *map(str, two), str(nan), str(tmp_path / "missing"), "--rank", "2", "--method", "ties",
               "--weights", "1,2", "-o", str(two[0]), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 2
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert any("use_dora" in p for p in problems) and any("missing: no such file" in p for p in problems)
    assert any("2 weights for 4 adapters" in p for p in problems) and any("is the input" in p for p in problems)


# ------------------------------------------------------------------------------------------
# config file


def test_config_file_merge_is_byte_identical_to_flags(tmp_path):
    flags = tmp_path / "flags"
    assert main(["merge", str(EXAMPLES / "math"), str(EXAMPLES / "code"), "-o", str(flags), "--rank", "8",
                 "--method", "dare_ties", "--p", "0.3", "--seed", "1", "--top-k", "0.5", "--weights", "1,0.5",
                 "--no-normalize", "-q"]) == 0
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"""\
merge_method: dare_ties
rank: 8
parameters:
  density: 0.7      # mergekit's share kept: p = 0.3
  seed: 1
  top_k: 0.5
models:
  - model: {EXAMPLES / 'math'}
    parameters: {{weight: 1.0}}
  - model: {EXAMPLES / 'code'}
    parameters: {{weight: 0.5}}
output: from_config
""")
    assert main(["merge", "--config", str(cfg), "-q"]) == 0
    assert _tree(tmp_path / "from_config") == _tree(flags)
    # the resolved config in the output repeats the merge
    again = tmp_path / "again"
    assert main(["merge", "--config", str(flags / "ctm_merge.yaml"), "-o", str(again), "-q"]) == 0
    assert _tree(again) == _tree(flags)


def test_config_file_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_methd: ties\nrank: 4\nadapters: [a]\n")
    assert main(["merge", "--config", str(cfg), "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"ctm: error: {cfg}: merge_methd: unknown key (did you mean merge_method?)"
    cfg.write_text("rank: 4\nadapters:\n  - {adapter: a, parameters: {top_k: 0.1}}\n  - {adapter: b, parameters: {top_k: 0.2}}\n")
    assert main(["merge", "--config", str(cfg), "-o", str(tmp_path / "o")]) == 2
    assert "adapters[0].parameters.top_k: the merge rules take one top_k for all adapters" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Hub ids from a cache built here


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(tmp_path, monkeypatch, repo_id="someone/math-lora", example="math"):
    """A local Hub cache (offline) holding the example adapter ``example`` as ``repo_id`` at
    ``HUB_COMMIT``, with the working folder at ``tmp_path``; returns the cache folder."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (snap / f).write_bytes((EXAMPLES / example / f).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_id_resolved_from_the_local_cache(tmp_path, monkeypatch):
    _fake_hub(tmp_path, monkeypatch)
    a = ctm_kernels.merge(["someone/math-lora", str(EXAMPLES / "code")], rank=8, method="sum")
    b = ctm_kernels.merge([str(EXAMPLES / "math"), str(EXAMPLES / "code")], rank=8, method="sum")
    for x, y in zip(a.modules, b.modules):
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
    assert a.adapters[0] == "someone/math-lora"
    with pytest.raises(ValueError, match="someone/missing: no such file or folder, and not in the Hugging Face cache"):
        ctm_kernels.merge(["someone/missing"], rank=8)


# ------------------------------------------------------------------------------------------
# the command's manners


def test_help_imports_no_torch_and_shows_defaults():
    code = ("import sys; from ctm_kernels import cli; p = cli.build_parser(); "
            "sub = p._subparsers._group_actions[0].choices['merge']; print(sub.format_help()); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for default in ("(default: 0.2)", "(default: 0.5)", "(default: 0)", "(default: ties)", "(default: energy)", "(default 1e-6)", "(default 1e-4)", "(default: 1000)", "(default: 256)",
                    "(default: auto)", "(default: lora_unet)"):
        assert default in text, default


def test_torch_free_option_lists_match_the_library():
    from ctm_kernels import options
    from ctm_kernels.io.formats import FORMATS
    from ctm_kernels.pipeline.plan import DTYPES

    assert options.METHODS == tuple(ctm_kernels.RULES)
    assert options.DTYPE_NAMES == tuple(DTYPES)
    assert options.FORMAT_NAMES == tuple(FORMATS)
    declared = {p.name: p for p in options.MERGE.rule_parameters}
    for rule in ctm_kernels.RULES.values():
        for param in rule.params:
            assert declared[param.name] is param, param.name


def test_version_did_you_mean_and_no_abbreviations(two, tmp_path, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ctm {ctm_kernels.__version__}"
    base = ["merge", *map(str, two), "-o", str(tmp_path / "o"), "--rank", "2"]
    assert main([*base, "--methd", "sum"]) == 2
    assert "unrecognized arguments: --methd sum (did you mean --method?)" in capsys.readouterr().err
    assert main([*base, "--method", "tise"]) == 2
    assert "unknown merge method 'tise' (did you mean ties?)" in capsys.readouterr().err
    assert main([*base, "--meth", "sum"]) == 2                # no silent abbreviation
    assert "unrecognized arguments: --meth" in capsys.readouterr().err
    assert main([*base[:-2], "--rnak", "2"]) == 2
    assert "(did you mean --rank?)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_error_prefix(two, tmp_path, capsys):
    cases = [["merge", str(two[0]), "-o", str(tmp_path / "o"), "--rank", "x"],     # argparse
             ["merge", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--rank", "2"],   # bad input
             ["inspect"], ["frobnicate"]]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ctm: error: "), err


def test_inspect_reports_nonfinite_and_refused_adapters(tmp_path, capsys):
    A, B = _pair(8, 8, 2, 0)
    B[1, 1] = float("nan")
    B[2, 0] = float("inf")
    f = peft_folder(tmp_path / "f", {"model.q_proj": (A, B)}, {"r": 2})
    d = peft_folder(tmp_path / "d", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2, "use_dora": True},
                    {f"{P}model.q_proj.lora_magnitude_vector": torch.ones(8)})
    s = peft_folder(tmp_path / "s", {"model.q_proj": _pair(8, 8, 2, 0)}, {"r": 2, "modules_to_save": ["lm_head"]},
                    {f"{P}lm_head.modules_to_save.default.weight": torch.ones(8, 8)})
    assert main(["inspect", str(f), str(d), str(s)]) == 0
    text = capsys.readouterr().out
    assert f"{P}model.q_proj.lora_B.weight: 1 NaN and 1 Inf values" in text
    assert "d/adapter_model.safetensors: peft, 3 tensors; the merge refuses it:" in text and "use_dora: DoRA" in text
    assert f"{P}model.q_proj.lora_magnitude_vector  float32 [8]" in text
    assert "modules_to_save: the adapter saves full trained copies" in text
    assert main(["inspect", "--json", str(d)]) == 0
    rep = json.loads(capsys.readouterr().out)[0]
    assert rep["mergeable"] is False and "DoRA" in rep["refused"] and len(rep["tensors"]) == 3


def test_kohya_output_carries_the_resolved_config(two, tmp_path):
    out = tmp_path / "k.safetensors"
    assert main(["merge", *map(str, two), "-o", str(out), "--rank", "2", "-q"]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert "merge_method: ties" in meta["ctm_config"] and "format: kohya" in meta["ctm_config"]


def test_one_adapter_grammar(two, tmp_path, capsys):
    assert main(["merge", str(two[1]), "-o", str(tmp_path / "o"), "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "merged 1 adapter into 1 module at rank 2" in text and "1 module group;" in text


# ------------------------------------------------------------------------------------------
# what users rely on: the full rank's cap, a config's weights, flags over a config, local paths over Hub ids


def test_full_rank_capped_at_min_m_n_when_the_input_ranks_sum_above_it(tmp_path):
    """Three rank-6 adapters: on a 16 x 24 module R = 18 > min(m, n) = 16, so ``full`` is 16 (a
    rank-16 LoRA already holds any 16 x 24 update); on a 40 x 32 one it is the sum, 18, and the sum
    is exact there. (On the capped module the three row spaces span 18 > 16 directions, so no
    rank-16 V holds every adapter: CtM's sum is not exact there, and is not asserted.)"""
    ads = [peft_folder(tmp_path / f"a{t}", {"m.q": _pair(16, 24, 6, 3 * t), "m.v": _pair(40, 32, 6, 3 * t + 1)},
                       {"r": 6}) for t in range(3)]
    res = ctm_kernels.merge(ads, rank="full", method="sum")
    assert {mm.name: mm.rank for mm in res.modules} == {"m.q": 16, "m.v": 18}
    ups = [peft_updates(a) for a in ads]
    got = {mm.name: mm.update().double() for mm in res.modules}
    torch.testing.assert_close(got["m.v"], sum(u["m.v"] for u in ups), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["weight-key", "parameters-weight"])
def test_config_weights_give_the_bytes_of_the_weights_flag(two, tmp_path, form):
    """Both spellings of an adapter's weight in a config (``weight: w`` and ``parameters: {weight: w}``)
    weigh the adapter exactly as ``--weights`` does."""
    a, b = two
    flags = tmp_path / "flags"
    assert main(["merge", str(a), str(b), "-o", str(flags), "--rank", "3", "--method", "sum",
                 "--weights", "0.5,-2", "-q"]) == 0
    spell = (lambda w: f"weight: {w}") if form == "weight-key" else (lambda w: f"parameters: {{weight: {w}}}")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: sum\nrank: 3\nadapters:\n  - adapter: {a}\n    {spell(0.5)}\n"
                   f"  - adapter: {b}\n    {spell(-2)}\noutput: from_config\n")
    assert main(["merge", "--config", str(cfg), "-q"]) == 0
    assert _tree(tmp_path / "from_config") == _tree(flags)


def test_command_line_flags_override_the_config_file(two, tmp_path):
    """README: options given on the command line override the config's: rank, method, weights and
    output from the flags give the bytes of the same merge without a config."""
    a, b = two
    flags = tmp_path / "flags"
    assert main(["merge", str(a), str(b), "-o", str(flags), "--rank", "2", "--method", "mean",
                 "--weights", "1,3", "-q"]) == 0
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: sum\nrank: 4\nadapters:\n  - {{adapter: {a}, weight: 2}}\n  - {b}\n"
                   "output: from_config\n")
    line = tmp_path / "line"
    assert main(["merge", "--config", str(cfg), "--rank", "2", "--method", "mean", "--weights", "1,3",
                 "-o", str(line), "-q"]) == 0
    assert not (tmp_path / "from_config").exists()
    assert _tree(line) == _tree(flags)
    res = ctm_kernels.merge([a, b], rank=4, method="sum")      # and the config's own settings differ
    assert {mm.rank for mm in res.modules} == {4}


def test_local_folder_named_like_a_hub_id_is_read_locally(tmp_path, monkeypatch):
    """In a folder holding ``someone/lora/``, the source ``someone/lora`` is that folder, even when the
    Hugging Face cache holds a repository of the same id (another adapter)."""
    _fake_hub(tmp_path, monkeypatch, "someone/lora", "code")
    work = tmp_path / "work"
    (work / "someone" / "lora").mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (work / "someone" / "lora" / f).write_bytes((EXAMPLES / "math" / f).read_bytes())
    monkeypatch.chdir(work)
    from ctm_kernels.io import hub
    # someone/ exists here, so someone/other is a local path too (missing); hf:// names the Hub
    assert hub.hub_id("someone/lora") is None and hub.hub_id("someone/other") is None
    assert hub.hub_id("hf://someone/other") == ("someone/other", None)
    got = ctm_kernels.merge(["someone/lora"], rank=8, method="sum")
    want = ctm_kernels.merge([str(EXAMPLES / "math")], rank=8, method="sum")
    for x, y in zip(got.modules, want.modules, strict=True):
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)


# ------------------------------------------------------------------------------------------
# what a new user trips on: mergekit's dare_ties, local paths and Hub ids, ranks the inputs span


def test_mergekit_dare_ties_density_means_what_it_means_in_mergekit(tmp_path):
    """mergekit's dare_ties with density d: a random drop keeping a share d (survivors rescaled),
    sign election, the agreeing entries summed; no magnitude trim. The saved config shows it."""
    from ctm_kernels.pipeline.config import load_config
    from ctm_kernels.rules import apply_rule

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: dare_ties\nrank: 8\nparameters: {{density: 0.7}}\n"
                   f"models: [{{model: {EXAMPLES / 'math'}}}, {{model: {EXAMPLES / 'code'}}}]\noutput: out\n")
    kw = load_config(cfg)
    assert (kw["p"], kw["top_k"], kw["normalize"]) == (0.3, 1.0, False)
    # one adapter through the rule: about 70% of the entries survive, rescaled by 1 / 0.7
    C = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    out = apply_rule("dare_ties", C, **{k: kw[k] for k in ("p", "top_k", "normalize")}, seed=0)
    kept = out != 0
    assert 0.6 < kept.double().mean().item() < 0.8
    torch.testing.assert_close(out[kept], (C[:, 0] / 0.7)[kept])
    # two adapters: agreeing entries summed, not averaged
    C2 = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    assert apply_rule("dare_ties", C2, p=0.0, top_k=1.0, normalize=False).eq(2.0).all()
    assert main(["merge", "--config", str(cfg), "-q"]) == 0
    saved = (tmp_path / "out" / "ctm_merge.yaml").read_text()
    assert "normalize: false" in saved and "p: 0.3" in saved and "top_k: 1.0" in saved
    flags = tmp_path / "flags"
    assert main(["merge", str(EXAMPLES / "math"), str(EXAMPLES / "code"), "-o", str(flags), "--rank", "8",
                 "--method", "dare_ties", "--p", "0.3", "--top-k", "1", "--no-normalize", "-q"]) == 0
    assert load_file(str(flags / "adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "out" / "adapter_model.safetensors")).keys()
    for k, v in load_file(str(flags / "adapter_model.safetensors")).items():
        assert torch.equal(v, load_file(str(tmp_path / "out" / "adapter_model.safetensors"))[k]), k


def test_mistyped_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    """A missing path that looks local (its parent folder exists, or it starts with . or /) is
    'no such file or folder' at once, without asking the Hub; hf:// forces a Hub id."""
    from ctm_kernels.io import hub

    def no_network(source):
        raise AssertionError(f"asked the Hub for {source}")

    monkeypatch.setattr(hub, "resolve", no_network)
    (tmp_path / "adapters").mkdir()
    monkeypatch.chdir(tmp_path)
    for source in ("adapters/typo_dir", "./typo", "adapters/typo@v1"):
        with pytest.raises(ValueError, match=f"^{source}: no such file or folder"):
            ctm_kernels.merge([source, str(EXAMPLES / "code")], rank=8)
    plan = ctm_kernels.plan_merge(["adapters/typo_dir"], rank=8)
    assert plan.problems[0].startswith("adapters/typo_dir: no such file or folder (read as a local path because "
                                       "the folder adapters/ exists here; write hf://adapters/typo_dir")
    assert hub.hub_id("hf://adapters/typo_dir") == ("adapters/typo_dir", None)
    assert hub.hub_id("someone/lora@main") == ("someone/lora", "main")


def test_hub_inputs_recorded_as_id_at_commit(tmp_path, monkeypatch):
    """A saved config names a Hub input as org/name@commit (not the cache path), and runs again."""
    cache = _fake_hub(tmp_path, monkeypatch)
    commit = HUB_COMMIT
    out = tmp_path / "out"
    assert main(["merge", "someone/math-lora", str(EXAMPLES / "code"), "-o", str(out), "--rank", "8", "-q"]) == 0
    import yaml
    saved = yaml.safe_load((out / "ctm_merge.yaml").read_text())
    assert saved["adapters"][0]["adapter"] == f"someone/math-lora@{commit}"
    assert str(cache) not in (out / "ctm_merge.yaml").read_text()
    again = tmp_path / "again"
    assert main(["merge", "--config", str(out / "ctm_merge.yaml"), "-o", str(again), "-q"]) == 0
    assert _tree(again) == _tree(out)


def test_rank_capped_at_what_the_inputs_span_unless_padded(tmp_path):
    """A module adapted by one rank-4 adapter gets rank 4 at --rank 16 (not 12 zero rows), and the
    plan says so; pad_rank keeps 16."""
    a = peft_folder(tmp_path / "a", {"m.q_proj": _pair(64, 64, 4, 0), "m.k_proj": _pair(32, 64, 4, 1)}, {"r": 4})
    b = peft_folder(tmp_path / "b", {"m.q_proj": _pair(64, 64, 4, 2)}, {"r": 4})
    plan = ctm_kernels.plan_merge([a, b], rank=16)
    assert {e.name: e.rank for e in plan.modules} == {"m.k_proj": 4, "m.q_proj": 8}
    assert any("capped at 4, the sum of the input ranks" in n for n in plan.notes)
    assert "note: rank 16 capped at 4, the sum of the input ranks" in plan.describe()
    res = ctm_kernels.merge([a, b], rank=16, method="sum", output=tmp_path / "o")
    sd = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    assert sd[f"{P}m.k_proj.lora_A.weight"].shape == (4, 64) and sd[f"{P}m.q_proj.lora_A.weight"].shape == (8, 64)
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["r"] in (4, 8) and len(cfg["rank_pattern"]) == 1
    # sum is exact at the capped ranks
    ua, ub = peft_updates(a), peft_updates(b)
    got = {mm.name: mm for mm in ctm_kernels.merge([a, b], rank=16, method="sum").modules}
    torch.testing.assert_close(got["m.q_proj"].update().double(), ua["m.q_proj"] + ub["m.q_proj"], rtol=1e-5, atol=1e-5)
    padded = ctm_kernels.merge([a, b], rank=16, method="sum", pad_rank=True)
    assert {mm.name: mm.rank for mm in padded.modules} == {"m.k_proj": 16, "m.q_proj": 16}
    assert res.plan.settings.pad_rank is False


def test_overwrite_refuses_real_adapters_that_ctm_did_not_write(two, tmp_path, capsys):
    """``--overwrite`` replaces only a previous ctm output: a PEFT adapter saved by PEFT (a valid
    safetensors file with PEFT's metadata) and a kohya file from another tool are left as they are."""
    a, b = two
    peft_made = peft_folder(tmp_path / "peft_made", {"model.layers.0.q_proj": _pair(16, 24, 4, 9)})
    kohya_made = kohya_file(tmp_path / "kohya_made.safetensors", {"lora_unet_q": _pair(16, 24, 4, 9)}, {})
    for dest in (peft_made, kohya_made):
        before = _tree(dest) if dest.is_dir() else dest.read_bytes()
        assert main(["merge", str(a), str(b), "-o", str(dest), "--rank", "2", "--overwrite", "-q"]) == 2
        assert "not" in capsys.readouterr().err
        assert (_tree(dest) if dest.is_dir() else dest.read_bytes()) == before


def test_config_density_means_top_k_for_ties(two, tmp_path):
    """mergekit's ``density`` in a ``ties`` config is the share each task keeps, ``top_k``: the bytes
    of ``--top-k``."""
    a, b = two
    flags = tmp_path / "flags"
    assert main(["merge", str(a), str(b), "-o", str(flags), "--rank", "3", "--method", "ties", "--top-k", "0.3",
                 "-q"]) == 0
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: ties\nrank: 3\nparameters: {{density: 0.3}}\nadapters: [{a}, {b}]\n"
                   "output: from_config\n")
    assert main(["merge", "--config", str(cfg), "-q"]) == 0
    assert _tree(tmp_path / "from_config") == _tree(flags)


def test_config_paths_are_relative_to_the_config_file(two, tmp_path, monkeypatch):
    """Relative adapter and output paths in a config are read from the config's folder, wherever the
    command runs."""
    a, b = two
    flags = tmp_path / "flags"
    assert main(["merge", str(a), str(b), "-o", str(flags), "--rank", "3", "--method", "sum", "-q"]) == 0
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("merge_method: sum\nrank: 3\nadapters: [a, b]\noutput: from_config\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", "--config", str(cfg), "-q"]) == 0
    assert _tree(tmp_path / "from_config") == _tree(flags) and not list(elsewhere.iterdir())


def test_resolved_config_repeats_a_merge_with_every_solver_setting(two, tmp_path):
    """The ``ctm_merge.yaml`` an output carries records beta, scale, stop, tol and max_iter when they
    are not the defaults, and merging from it gives the same bytes."""
    a, b = two
    out = tmp_path / "out"
    assert main(["merge", str(a), str(b), "-o", str(out), "--rank", "3", "--method", "sum", "--beta", "0.3",
                 "--scale", "0.7", "--stop", "subspace", "--tol", "0.01", "--max-iter", "40", "-q"]) == 0
    import yaml
    saved = yaml.safe_load((out / "ctm_merge.yaml").read_text())
    assert {k: saved[k] for k in ("beta", "scale", "stop", "tol", "max_iter")} == \
        {"beta": 0.3, "scale": 0.7, "stop": "subspace", "tol": 0.01, "max_iter": 40}
    again = tmp_path / "again"
    assert main(["merge", "--config", str(out / "ctm_merge.yaml"), "-o", str(again), "-q"]) == 0
    assert _tree(again) == _tree(out)


def test_the_engine_does_not_check_again_what_the_pipeline_checked(monkeypatch):
    """The plan checks the settings and the reader every factor (finite, shapes): the merge stage
    hands them to the engine's unchecked entry, so a model's factors are scanned once. The
    engine's public entry still checks (a direct caller's boundary)."""
    from ctm_kernels import engine

    def refuse(*args, **kwargs):
        raise AssertionError("the engine checked a layer the reader had checked")
    checked = engine.check_layer
    monkeypatch.setattr(engine, "check_layer", refuse)
    res = ctm_kernels.merge([str(EXAMPLES / "math"), str(EXAMPLES / "code")], rank=8, method="ties")
    assert len(res.modules) > 0
    with pytest.raises(AssertionError, match="checked a layer"):
        engine.merge_layers([([torch.zeros(2, 4)], [torch.zeros(4, 2)])], rank=2)
    monkeypatch.setattr(engine, "check_layer", checked)
    with pytest.raises(ValueError, match="NaN"):
        engine.merge_layers([([torch.full((2, 4), float("nan"))], [torch.zeros(4, 2)])], rank=2)
