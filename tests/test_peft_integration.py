"""Real-client tests: adapters saved by PEFT itself on tiny transformers models (random
weights from a config, seeded, no download), merged by ``ctm``, loaded back by PEFT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import ctm_kernels  # noqa: E402
from ctm_kernels.cli import main  # noqa: E402
from ctm_kernels.integrations.peft import add_merged_adapter  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

NAMES = ("a", "b", "c")


def llama():
    """Tiny Llama-style model, random weights, same for every call."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomise_lora(model, seed):
    """PEFT starts lora_B (lora_embedding_A) at zero; give every factor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


CONFIGS = {
    # different ranks, alphas, target modules; a rank_pattern and an alpha_pattern
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
              rank_pattern={"layers.1.self_attn.q_proj": 8}, alpha_pattern={"v_proj": 3}),
    # rsLoRA, with an embedding LoRA
    "b": dict(r=6, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "embed_tokens"]),
    "c": dict(r=2, lora_alpha=1, target_modules=["v_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(NAMES):
            pm = get_peft_model(llama(), LoraConfig(task_type="CAUSAL_LM", **CONFIGS[name]))
            _randomise_lora(pm, 10 + i)
            pm.save_pretrained(root / name)
            paths.append(root / name)
    return paths


def _all_loaded(paths):
    """The base model with the three adapters loaded by PEFT under names a, b, c."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(llama(), str(paths[0]), adapter_name="a")
        for name, p in zip(NAMES[1:], paths[1:]):
            pm.load_adapter(str(p), adapter_name=name)
    return pm.eval()


def _factors(module, name):
    if name in module.lora_A:
        return module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
    if name in module.lora_embedding_A:
        return module.lora_embedding_A[name].detach(), module.lora_embedding_B[name].detach()
    return None


def _lora_modules(pm):
    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _merged_against_summed(Net, merged, paths, x):
    """``Net()``'s output on ``x`` with the merged adapter folder ``merged`` loaded, and with the
    two adapters of ``paths`` added to its weights; and the PeftModel holding those two (as
    ``"x"`` and ``"y"``)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        got = PeftModel.from_pretrained(Net(), str(merged)).eval()(x)
        pm = PeftModel.from_pretrained(Net(), str(paths[0]), adapter_name="x")
        pm.load_adapter(str(paths[1]), adapter_name="y")
        base = Net()
        for name, mod in _lora_modules(pm).items():
            base.get_submodule(name).weight += mod.get_delta_weight("x") + mod.get_delta_weight("y")
        return got, base(x), pm


def _load_merged(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(llama(), str(path)).eval()


TIES = ["--rank", "8", "--method", "ties", "--top-k", "0.4", "--weights", "1,0.7,1.5"]


@pytest.fixture(scope="module")
def ties_merged(adapters, tmp_path_factory):
    """The three adapters merged by ``ctm merge`` (TIES, weighted) into a PEFT folder."""
    out = tmp_path_factory.mktemp("merged") / "ties"
    assert main(["merge", *map(str, adapters), "-o", str(out), *TIES, "-q"]) == 0
    return out


TOKENS = torch.tensor([[1, 5, 9, 33, 70, 2, 64, 11], [3, 3, 80, 41, 7, 95, 0, 12]])


def test_peft_round_trip_matches_merge_layer(adapters, ties_merged):
    out = ties_merged
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == cfg["lora_alpha"]
    merged = _lora_modules(_load_merged(out))
    ref = _lora_modules(_all_loaded(adapters))
    assert sorted(merged) == sorted(ref)      # the union of the adapters' modules
    weights = dict(zip(NAMES, (1.0, 0.7, 1.5)))
    for name, mod in ref.items():
        A, B, s, w = [], [], [], []
        for ad in NAMES:
            f = _factors(mod, ad)
            if f is not None:                  # a module an adapter does not target gets nothing from it
                A.append(f[0]), B.append(f[1]), s.append(mod.scaling[ad]), w.append(weights[ad])
        # rank 8, capped at the directions the module's inputs span (the sum of their ranks)
        r = min(8, sum(a.shape[0] for a in A))
        want = ctm_kernels.merge_layer(A, B, rank=r, method="ties", top_k=0.4, scales=s, weights=w)
        got = merged[name].get_delta_weight("default")
        if name.endswith("embed_tokens"):
            got = got.T                         # PEFT returns the embedding update as [vocab, dim]
        torch.testing.assert_close(got, want.B @ want.A, rtol=1e-5, atol=1e-6)
    assert {n for n in ref if "embed" in n} == {"model.embed_tokens"}


def test_sum_at_full_rank_equals_base_plus_updates(adapters, tmp_path):
    out = tmp_path / "sum"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(ctm_kernels.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "ctm_kernels", "merge", *map(str, adapters), "-o", str(out),
                           "--rank", "16", "--method", "sum"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "merged 3 adapters into" in proc.stdout and "100.00 %" in proc.stdout
    with torch.no_grad():
        got = _load_merged(out)(TOKENS).logits
        # base model + sum of every adapter's update, folded into the weights by hand
        pm = _all_loaded(adapters)
        base = llama()
        for name, mod in _lora_modules(pm).items():
            delta = sum(mod.get_delta_weight(ad) for ad in NAMES if _factors(mod, ad) is not None)
            base.get_submodule(name).weight += delta
        want = base(TOKENS).logits
        # PEFT's own concatenation of the adapters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_weighted_adapter(list(NAMES), [1.0, 1.0, 1.0], "cat", combination_type="cat")
        pm.set_adapter("cat")
        cat = pm(TOKENS).logits
        pm.set_adapter("a")
        only_a = pm(TOKENS).logits
    torch.testing.assert_close(want, cat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, cat, rtol=1e-4, atol=1e-4)
    assert (got - only_a).abs().max() > 1e-2      # the other adapters' updates are really in there


def test_add_merged_adapter_in_memory(adapters, ties_merged):
    pm = _all_loaded(adapters)
    res = add_merged_adapter(pm, list(NAMES), "ctm", rank=8, method="ties", top_k=0.4, weights=[1, 0.7, 1.5])
    assert len(res.energy_kept) == 3 and all(0 < k <= 1 for k in res.energy_kept)
    # same numbers as the command line on the saved adapters
    saved = _lora_modules(_load_merged(ties_merged))
    for name, mod in _lora_modules(pm).items():
        torch.testing.assert_close(mod.get_delta_weight("ctm"), saved[name].get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)
    pm.set_adapter("ctm")
    with torch.no_grad():
        a = pm(TOKENS).logits
    with torch.no_grad():
        b = _load_merged(ties_merged)(TOKENS).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        add_merged_adapter(pm, ["a"], "ctm", rank=4)
    with pytest.raises(ValueError, match="'zz' is not loaded"):
        add_merged_adapter(pm, ["zz"], "new", rank=4)


def test_add_merged_adapter_refuses_dora():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="x")
        pm.add_adapter("d", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="adapter 'd' config: use_dora: DoRA|adapter 'd': use_dora: DoRA"):
        add_merged_adapter(pm, ["x", "d"], "m", rank=2)


def test_gpt2_fan_in_fan_out(tmp_path):
    """GPT-2 Conv1D stores [in, out] weights; its LoRA factors are still A [r, in], B [out, r]."""
    def gpt2():
        torch.manual_seed(1)
        cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (r, targets) in enumerate([(4, ["c_attn", "c_proj"]), (3, ["c_attn", "c_fc"])]):
            pm = get_peft_model(gpt2(), LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets,
                                                   fan_in_fan_out=True))
            _randomise_lora(pm, 20 + i)
            pm.save_pretrained(tmp_path / f"g{i}")
            paths.append(tmp_path / f"g{i}")
    assert main(["merge", *map(str, paths), "-o", str(tmp_path / "m"), "--rank", "7", "--method", "sum", "-q"]) == 0
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        got = PeftModel.from_pretrained(gpt2(), str(tmp_path / "m")).eval()(TOKENS).logits
        pm = PeftModel.from_pretrained(gpt2(), str(paths[0]), adapter_name="x")
        pm.load_adapter(str(paths[1]), adapter_name="y")
        base = gpt2()
        for name, mod in _lora_modules(pm).items():
            # get_delta_weight returns the update in the stored [in, out] layout of Conv1D
            base.get_submodule(name).weight += sum(mod.get_delta_weight(a) for a in ("x", "y") if a in mod.lora_A)
        want = base(TOKENS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_conv_lora_exact(tmp_path):
    """Conv2d LoRA (kernel A, 1x1 B) merges exactly through the flattened factors."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Linear(8 * 6 * 6, 10)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).flatten(1))

    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, r in enumerate((3, 5)):
            pm = get_peft_model(Net(), LoraConfig(r=r, lora_alpha=r + 2, target_modules=["conv", "head"]))
            _randomise_lora(pm, 30 + i)
            pm.save_pretrained(tmp_path / f"n{i}")
            paths.append(tmp_path / f"n{i}")
    assert main(["merge", *map(str, paths), "-o", str(tmp_path / "m"), "--rank", "8", "--method", "sum", "-q"]) == 0
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    got, want, _ = _merged_against_summed(Net, tmp_path / "m", paths, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_conv1d_lora_round_trip_through_peft(tmp_path):
    """Conv1d LoRA (A ``[r, in, k]``, B ``[out, r, 1]``): PEFT saves two adapters, the merge reads them
    as kernels (not linear factors), writes factors of the stored layout, and PEFT loads the merged
    adapter to the base plus both updates; merged in memory (``add_merged_adapter``), the same."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.conv = torch.nn.Conv1d(3, 6, 4, padding=1)
            self.head = torch.nn.Linear(6 * 7, 5)

        def forward(self, x):
            return self.head(torch.tanh(self.conv(x)).flatten(1))

    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, r in enumerate((2, 3)):
            pm = get_peft_model(Net(), LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["conv"]))
            _randomise_lora(pm, 40 + i)
            pm.save_pretrained(tmp_path / f"c{i}")
            paths.append(tmp_path / f"c{i}")
    res = ctm_kernels.merge(list(map(str, paths)), rank=5, method="sum", output=tmp_path / "m")
    (mm,) = res.modules
    assert (mm.kind, tuple(mm.A.shape), tuple(mm.B.shape)) == ("conv", (5, 3, 4), (6, 5, 1))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    got, want, pm = _merged_against_summed(Net, tmp_path / "m", paths, x)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        plain = Net()(x)
        # in memory too: the loaded Conv1d adapters merged into the model they are loaded in
        add_merged_adapter(pm, ["x", "y"], "ctm", rank=5, method="sum")
        conv = _lora_modules(pm)["conv"]
        torch.testing.assert_close(conv.get_delta_weight("ctm"), conv.get_delta_weight("x") + conv.get_delta_weight("y"),
                                   rtol=1e-4, atol=1e-5)
        pm.set_adapter("ctm")
        mem = pm(x)
    assert float((want - plain).abs().max()) > 1e-2          # the updates matter to the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mem, want, rtol=1e-4, atol=1e-4)


def test_real_dora_and_modules_to_save_refused(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cfg in (("dora", dict(use_dora=True)), ("mts", dict(modules_to_save=["lm_head"]))):
            pm = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], **cfg))
            pm.save_pretrained(tmp_path / name)
    for name, key in (("dora", "use_dora"), ("mts", "modules_to_save")):
        assert main(["merge", str(tmp_path / name), "-o", str(tmp_path / f"out_{name}"), "--rank", "2"]) == 2
        assert f"{tmp_path / name / 'adapter_config.json'}: {key}:" in capsys.readouterr().err
        assert not (tmp_path / f"out_{name}").exists()


def _examples_module():
    import importlib.util

    path = Path(ctm_kernels.__file__).parents[1] / "examples" / "make_examples.py"
    spec = importlib.util.spec_from_file_location("make_examples", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bundled_examples(tmp_path):
    """The committed example adapters are what examples/make_examples.py makes, and the
    README's ``ctm merge examples/adapters/* -o merged --rank 16`` works on them."""
    from safetensors.torch import load_file

    ex = _examples_module()
    bundled = sorted(p for p in (Path(ex.__file__).parent / "adapters").iterdir())
    assert [p.name for p in bundled] == sorted(ex.ADAPTERS)
    assert sum(f.stat().st_size for p in bundled for f in p.iterdir()) < 4e6
    fresh = {p.name: p for p in ex.make(tmp_path / "fresh")}
    lora_fields = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "task_type")
    for p in bundled:
        got, want = load_file(str(p / "adapter_model.safetensors")), load_file(str(fresh[p.name] / "adapter_model.safetensors"))
        # equal up to float32 rounding: the generator's products round differently on CPUs with
        # other BLAS kernels (up to 2.4e-7 absolute, measured between two x86 machines)
        assert sorted(got) == sorted(want), p.name
        for k in got:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (p.name, k)
            err = (got[k].double() - want[k].double()).norm() / want[k].double().norm()
            assert err <= 1e-6, (p.name, k, float(err))
        cg, cw = (json.loads((q / "adapter_config.json").read_text()) for q in (p, fresh[p.name]))
        assert {k: cg.get(k) for k in lora_fields} == {k: cw.get(k) for k in lora_fields}
        assert sorted(cg["target_modules"]) == sorted(cw["target_modules"])
    out = tmp_path / "merged"
    assert main(["merge", *map(str, bundled), "-o", str(out), "--rank", "16", "-q"]) == 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        tokens = torch.arange(24).reshape(2, 12)
        merged = PeftModel.from_pretrained(ex.base_model(), str(out)).eval()(tokens).logits
        base = ex.base_model()(tokens).logits
    assert torch.isfinite(merged).all() and (merged - base).abs().max() > 1e-3


def test_lm_head_lora_and_full_rank(tmp_path):
    """LoRA on lm_head, saved by PEFT with the head's base weights (as for embed_tokens), merges
    and loads back; ``rank="full"`` (per module min(R, m, n)) keeps the exact sum, on the command
    line and in add_merged_adapter alike."""
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(2):
            pm = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
            _randomise_lora(pm, 40 + i)
            pm.save_pretrained(tmp_path / f"h{i}")
            paths.append(tmp_path / f"h{i}")
    from safetensors import safe_open
    with safe_open(str(paths[0] / "adapter_model.safetensors"), framework="pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in f.keys()
    out = tmp_path / "merged"
    assert main(["merge", *map(str, paths), "-o", str(out), "--rank", "full", "--method", "sum", "-q"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(llama(), str(paths[0]), adapter_name="a")
        pm.load_adapter(str(paths[1]), adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    add_merged_adapter(pm, ["a", "b"], "ctm", rank="full", method="sum")
    with torch.no_grad():
        got = _load_merged(out)(TOKENS).logits
        pm.set_adapter("cat")
        cat = pm(TOKENS).logits
        pm.set_adapter("ctm")
        mine = pm(TOKENS).logits
    torch.testing.assert_close(got, cat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine, cat, rtol=1e-4, atol=1e-4)


def test_add_merged_adapter_threads(adapters, ties_merged, monkeypatch):
    """``threads`` as ``ctm --threads``: the merge runs at it and torch's setting comes back; with the
    thread count of the command line's merge, the same factors bit for bit."""
    from ctm_kernels.pipeline import run

    seen = []
    real = run.merge_group
    monkeypatch.setattr(run, "merge_group", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    other = 3 if before != 3 else 2
    pm = _all_loaded(adapters)
    res = add_merged_adapter(pm, list(NAMES), "ctm", rank=8, method="ties", top_k=0.4, weights=[1, 0.7, 1.5],
                             threads=other)
    assert set(seen) == {other} and torch.get_num_threads() == before and res.plan.settings.threads == other
    import yaml
    t = yaml.safe_load((ties_merged / "ctm_merge.yaml").read_text())["threads"]
    pm2 = _all_loaded(adapters)
    add_merged_adapter(pm2, list(NAMES), "ctm", rank=8, method="ties", top_k=0.4, weights=[1, 0.7, 1.5], threads=t)
    saved = _lora_modules(_load_merged(ties_merged))
    for name, mod in _lora_modules(pm2).items():
        assert torch.equal(mod.get_delta_weight("ctm"), saved[name].get_delta_weight("default")), name
