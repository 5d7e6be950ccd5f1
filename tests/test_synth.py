"""The synthetic adapter sets of ``benchmarks/synth.py`` and the whole-model benchmark's quick mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ctm_kernels
from ctm_kernels.io import open_adapter

ROOT = Path(ctm_kernels.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.synth import LAYOUTS, MODULES, SynthSpec, generate, module_factors, module_shapes  # noqa: E402


def test_llama3_8b_layout_shapes_and_size():
    shapes = module_shapes(LAYOUTS["llama3-8b"])
    assert len(shapes) == 32 * 7 == 224
    by_name = {name: (m, n) for name, m, n in shapes}
    assert by_name["model.layers.0.self_attn.q_proj"] == (4096, 4096)
    assert by_name["model.layers.7.self_attn.k_proj"] == (1024, 4096)
    assert by_name["model.layers.31.self_attn.v_proj"] == (1024, 4096)
    assert by_name["model.layers.3.self_attn.o_proj"] == (4096, 4096)
    assert by_name["model.layers.3.mlp.gate_proj"] == (14336, 4096)
    assert by_name["model.layers.3.mlp.up_proj"] == (14336, 4096)
    assert by_name["model.layers.31.mlp.down_proj"] == (4096, 14336)
    # 16 rank-16 bf16 adapters: 41.9 M factor entries each
    assert SynthSpec(layout="llama3-8b", adapters=16, ranks=(16,)).factor_bytes() == 16 * 32 * 16 * 2 * (
        2 * 8192 + 2 * 5120 + 3 * 18432)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = SynthSpec(layout="tiny", adapters=3, ranks=(8, 16, 16), dtype="fp32")
    return spec, generate(tmp_path_factory.mktemp("synth") / "set", spec)


def test_tiny_set_is_a_set_of_peft_adapters(tiny):
    spec, dirs = tiny
    assert [d.name for d in dirs] == ["adapter_000", "adapter_001", "adapter_002"]
    for t, d in enumerate(dirs):
        ad = open_adapter(d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        r = spec.rank_of(t)
        assert cfg["r"] == r and cfg["lora_alpha"] == 2 * r and cfg["target_modules"] == sorted(MODULES)
        assert len(ad.modules) == 14
        for name, m, n in module_shapes(LAYOUTS["tiny"]):
            s = ad.modules[name]
            assert (s.out_features, s.in_features, s.rank, s.scale) == (m, n, r, 2.0)
            assert s.a_key == f"base_model.model.{name}.lora_A.weight"
    assert sum((d / "adapter_model.safetensors").stat().st_size for d in dirs) > spec.factor_bytes()


def test_adapters_share_directions_and_have_their_own(tiny):
    spec, dirs = tiny
    name = "model.layers.1.mlp.down_proj"
    Bs = [load_file(str(d / "adapter_model.safetensors"))[f"base_model.model.{name}.lora_B.weight"].double()
          for d in dirs]
    Q = [torch.linalg.qr(B).Q for B in Bs]
    # cosines of the principal angles between two adapters' output spaces: the shared
    # directions (min(8, r // 2) = 4 for the rank-8 adapter) are common, the rest orthogonal
    cos = torch.linalg.svdvals(Q[0].mT @ Q[1])
    assert (cos > 1 - 1e-9).sum() == 4 and (cos[4:] < 0.5).all()
    cos = torch.linalg.svdvals(Q[1].mT @ Q[2])           # two rank-16 adapters: 8 shared
    assert (cos > 1 - 1e-9).sum() == 8 and (cos[8:] < 0.5).all()


def test_update_spectrum_decays():
    A, B = module_factors(0, 1, 2, 512, 256, 16, 8, 1.0)
    s = torch.linalg.svdvals(B.double() @ A.double())
    assert (s[:16] > 0).all() and s[16:].abs().max() < 1e-5 * s[0]
    assert s[0] / s[15] > 5                           # a spread spectrum, not a flat one
    A2, B2 = module_factors(0, 1, 2, 512, 256, 16, 8, 1.0)
    assert torch.equal(A, A2) and torch.equal(B, B2)      # reproducible


def test_generate_reuses_an_equal_set_and_remakes_a_different_one(tmp_path):
    spec = SynthSpec(layout="tiny", adapters=2, ranks=(8,), layers=1, targets=("q_proj", "v_proj"))
    dirs = generate(tmp_path / "s", spec)
    stamp = [(d / "adapter_model.safetensors").stat().st_mtime_ns for d in dirs]
    again = generate(tmp_path / "s", spec)
    assert again == dirs and [(d / "adapter_model.safetensors").stat().st_mtime_ns for d in dirs] == stamp
    other = SynthSpec(layout="tiny", adapters=2, ranks=(8,), layers=1, targets=("q_proj", "v_proj"), seed=1)
    generate(tmp_path / "s", other)
    a = load_file(str(dirs[0] / "adapter_model.safetensors"))
    assert len(a) == 4 and json.loads((tmp_path / "s" / "synth.json").read_text())["spec"]["seed"] == 1
    with pytest.raises(ValueError, match="targets must be among"):
        generate(tmp_path / "bad", SynthSpec(targets=("qkv",)))


def test_peft_loads_a_synthetic_adapter_into_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    spec = SynthSpec(layout="tiny", adapters=1, ranks=(8,))
    (d,) = generate(tmp_path / "s", spec)
    lay = LAYOUTS["tiny"]
    cfg = transformers.LlamaConfig(hidden_size=lay.hidden, intermediate_size=lay.intermediate,
                                   num_hidden_layers=lay.layers, num_attention_heads=4,
                                   num_key_value_heads=lay.kv // (lay.hidden // 4), vocab_size=64)
    torch.manual_seed(0)
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(cfg), str(d))
    sd = load_file(str(d / "adapter_model.safetensors"))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.lora_A["default"].weight, sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    assert torch.equal(layer.lora_B["default"].weight, sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])


def test_bench_model_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "model_quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--quick",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    row = res["result"]
    spec = SynthSpec(layout="tiny", adapters=4, ranks=(8, 16))
    assert row["bytes_read"] == spec.factor_bytes() and row["modules"] == 14 and row["groups"] >= 4
    assert 100 < row["peak_rss_mib"] < 4096 and row["wall_s"] >= row["merge_s"] > 0
    assert 0 <= row["read_share"] <= 1 and 0 <= row["wait_share"] <= 1
    assert row["output_bytes"] > 0 and res["generated"] and res["machine"]["cores"] >= 1
    # the scratch folder is removed, the synthetic set is kept for the next run
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["tiny-T4-r8_16-bf16-s0"]
