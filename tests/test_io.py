"""Adapter readers and writers, streaming, atomic outputs, and ``ctm_kernels.merge`` on state dicts."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ctm_kernels
from ctm_kernels.api import merge
from ctm_kernels.io import AdapterError, LazyTensor, open_adapter, write_safetensors
from ctm_kernels.pipeline.plan import plan_groups, plan_modules
from ctm_kernels.io.peft import pattern_key, read_peft
from ctm_kernels.io.adapter import DictStore
from ctm_kernels.io.destination import atomic_dir, atomic_file

P = "base_model.model."


def _pair(m, n, r, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n, generator=g).to(dtype), torch.randn(m, r, generator=g).to(dtype)


def peft_folder(path: Path, modules: dict, config: dict) -> Path:
    """Write a PEFT adapter folder: ``modules`` maps module path -> (A [r, n], B [m, r])."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in modules.items():
        tensors[f"{P}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{P}{name}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted({k.split(".")[-1] for k in modules})}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------------------------
# PEFT scaling rules


@pytest.mark.parametrize("module, patterns", [
    ("model.layers.0.self_attn.q_proj", {"q_proj": 1, "v_proj": 2}),
    ("model.layers.10.self_attn.q_proj", {"layers.1.self_attn.q_proj": 1}),
    ("model.layers.1.self_attn.q_proj", {"layers.1.self_attn.q_proj": 1, "q_proj": 2}),
    ("model.layers.1.self_attn.q_proj", {"q_proj": 2, "layers.1.self_attn.q_proj": 1}),
    ("model.layers.3.mlp.down_proj", {r"layers\.[0-4]\..*down_proj": 5}),
    ("model.layers.3.mlp.down_proj", {"proj": 5}),
    ("model.layers.3.mlp.xdown_proj", {"down_proj": 5}),
    ("down_proj", {"down_proj": 5}),
    ("model.layers.0.self_attn.q_proj_x", {"q_proj": 1}),
    ("model.layers.10.self_attn.q_proj", {"layers.1": 1, "layers.10.self_attn": 2}),
    ("model.layers.0.mlp.up_proj_gate", {"up_proj": 1, "up_proj_gate": 2}),
], ids=["suffix", "no-partial-number", "specific-first", "generic-first", "regex", "partial-name",
        "no-name-prefix", "bare-name", "shared-prefix-name", "shared-prefix-path", "shared-prefix-second-key"])
def test_pattern_key_matches_peft(module, patterns):
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key

    ours = pattern_key(patterns, module)
    theirs = get_pattern_key(list(patterns), module)
    # PEFT returns the module name itself when nothing matches (then .get falls back to r)
    assert (ours if ours is not None else module) == theirs


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_scaling_with_patterns(tmp_path, rslora):
    mods = {
        "model.layers.0.self_attn.q_proj": _pair(16, 16, 4, 0),
        "model.layers.1.self_attn.q_proj": _pair(16, 16, 2, 1),
        "model.layers.0.self_attn.v_proj": _pair(8, 16, 4, 2),
    }
    cfg = {"r": 4, "lora_alpha": 8, "use_rslora": rslora,
           "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}}
    ad = read_peft(peft_folder(tmp_path / "a", mods, cfg))
    norm = (lambda a, r: a / math.sqrt(r)) if rslora else (lambda a, r: a / r)
    assert ad.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(norm(8, 4))
    assert ad.modules["model.layers.1.self_attn.q_proj"].scale == pytest.approx(norm(8, 2))
    assert ad.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(norm(3, 4))
    assert ad.modules["model.layers.1.self_attn.q_proj"].rank == 2


def test_pattern_keys_anchored_at_the_end_of_the_module_name(tmp_path):
    """``rank_pattern: {q_proj: 2}`` sets q_proj's rank, not that of a module whose name only starts
    with it (``q_proj_x``); PEFT reads the same adapter the same way."""
    mods = {"model.q_proj": _pair(8, 8, 2, 0), "model.q_proj_x": _pair(8, 8, 4, 1)}
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 6}}
    ad = read_peft(peft_folder(tmp_path / "a", mods, cfg))
    got = {n: (s.rank, s.alpha, s.scale) for n, s in ad.modules.items()}
    assert got == {"model.q_proj": (2, 6.0, 3.0), "model.q_proj_x": (4, 8.0, 2.0)}
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    for name, (r, alpha, _) in got.items():
        assert cfg["rank_pattern"].get(get_pattern_key(list(cfg["rank_pattern"]), name), cfg["r"]) == r
        assert cfg["alpha_pattern"].get(get_pattern_key(list(cfg["alpha_pattern"]), name), cfg["lora_alpha"]) == alpha


def test_config_without_r_or_alpha_takes_peft_defaults(tmp_path):
    """A config that leaves out ``lora_alpha`` (and ``r``) means what ``peft.LoraConfig()`` means
    by default (alpha 8, r 8), not alpha = r."""
    peft = pytest.importorskip("peft")
    default = peft.LoraConfig()
    mods = {"model.q_proj": _pair(8, 12, 4, 0)}
    folder = peft_folder(tmp_path / "a", mods, {})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    spec = read_peft(folder).modules["model.q_proj"]
    assert (spec.alpha, spec.scale) == (default.lora_alpha, default.lora_alpha / 4)
    wide = peft_folder(tmp_path / "b", {"model.q_proj": _pair(8, 12, default.r, 1)}, {})
    (wide / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    spec = read_peft(wide).modules["model.q_proj"]
    assert (spec.rank, spec.alpha, spec.scale) == (default.r, default.lora_alpha, default.lora_alpha / default.r)
    ad = open_adapter(({f"{P}model.q_proj.lora_A.weight": mods["model.q_proj"][0],
                        f"{P}model.q_proj.lora_B.weight": mods["model.q_proj"][1]}, {"r": 4}), label="sd")
    assert ad.modules["model.q_proj"].scale == default.lora_alpha / 4


def test_rank_differs_from_config(tmp_path):
    mods = {"model.layers.0.q_proj": _pair(8, 8, 2, 0)}
    with pytest.raises(AdapterError, match=r"a/adapter_model.safetensors: .*q_proj.lora_A.weight: rank 2"):
        read_peft(peft_folder(tmp_path / "a", mods, {"r": 4}))


def test_factor_shapes_disagree(tmp_path):
    A, _ = _pair(8, 8, 4, 0)
    _, B = _pair(8, 8, 3, 1)
    with pytest.raises(AdapterError, match=r"q_proj.lora_B.weight: shape \(8, 3\) does not match the rank 4"):
        read_peft(peft_folder(tmp_path / "a", {"model.q_proj": (A, B)}, {}))


def test_embedding_and_conv_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {f"{P}embed.lora_embedding_A": torch.randn(4, 50, generator=g),
         f"{P}embed.lora_embedding_B": torch.randn(16, 4, generator=g),
         f"{P}embed.base_layer.weight": torch.randn(50, 16, generator=g),
         f"{P}conv.lora_A.weight": torch.randn(4, 3, 3, 3, generator=g),
         f"{P}conv.lora_B.weight": torch.randn(8, 4, 1, 1, generator=g)}
    (tmp_path / "a").mkdir()
    save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    ad = read_peft(tmp_path / "a")
    e, c = ad.modules["embed"], ad.modules["conv"]
    assert (e.kind, e.out_features, e.in_features) == ("embedding", 16, 50)
    assert (c.kind, c.out_features, c.in_features) == ("conv", 8, 27)
    assert ad.passthrough == [f"{P}embed.base_layer.weight"]
    A, B = ad.load(["conv"])["conv"]
    assert A.shape == (4, 27) and B.shape == (8, 4)
    assert torch.equal(A, t[f"{P}conv.lora_A.weight"].reshape(4, 27))


def test_grouped_conv_refused(tmp_path):
    # PEFT's lora_B of a conv with groups=2 is [out, r / groups, 1, 1]
    t = {f"{P}conv.lora_A.weight": torch.ones(4, 8, 3, 3), f"{P}conv.lora_B.weight": torch.ones(8, 2, 1, 1)}
    (tmp_path / "a").mkdir()
    save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(AdapterError, match=r"conv.lora_B.weight: shape \(8, 2, 1, 1\) does not match"):
        read_peft(tmp_path / "a")


def test_peft_state_dict_input_needs_config():
    sd = {"m.lora_A.weight": torch.ones(2, 4), "m.lora_B.weight": torch.ones(4, 2)}
    with pytest.raises(AdapterError, match="need their config"):
        open_adapter(sd, label="x")
    ad = open_adapter((sd, {"r": 2, "lora_alpha": 4, "use_rslora": True}), label="x")
    assert ad.modules["m"].scale == pytest.approx(4 / math.sqrt(2))


# ------------------------------------------------------------------------------------------
# kohya


def test_kohya_reader_alpha_and_default(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"lora_unet_a.lora_down.weight": torch.randn(4, 10, generator=g),
         "lora_unet_a.lora_up.weight": torch.randn(6, 4, generator=g),
         "lora_unet_a.alpha": torch.tensor(2.0, dtype=torch.float16),
         "lora_te_b.lora_down.weight": torch.randn(8, 10, generator=g),
         "lora_te_b.lora_up.weight": torch.randn(6, 8, generator=g),
         "lora_unet_c.lora_down.weight": torch.randn(4, 3, 3, 3, generator=g),
         "lora_unet_c.lora_up.weight": torch.randn(5, 4, 1, 1, generator=g),
         "lora_unet_c.alpha": torch.tensor([8.0])}
    save_file(t, str(tmp_path / "k.safetensors"))
    ad = open_adapter(tmp_path / "k.safetensors")
    assert ad.format == "kohya"
    assert ad.modules["lora_unet_a"].scale == pytest.approx(0.5)
    assert ad.modules["lora_te_b"].scale == 1.0          # no alpha: alpha = rank
    c = ad.modules["lora_unet_c"]
    assert (c.kind, c.in_features, c.scale) == ("conv", 27, 2.0)


@pytest.mark.parametrize("key, message", [
    ("lora_unet_a.dora_scale", "DoRA"),
    ("lora_unet_a.lora_mid.weight", "lora_mid"),
    ("lora_unet_a.hada_w1_a", "LoHa"),
    ("lora_unet_a.lora_A.weight", "adapter_config.json"),
], ids=["dora", "locon-mid", "loha", "peft-keys-without-config"])
def test_kohya_refuses_other_networks(tmp_path, key, message):
    t = {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
         key: torch.ones(4, 2)}
    save_file(t, str(tmp_path / "k.safetensors"))
    with pytest.raises(AdapterError, match=rf"k.safetensors: {key.replace('.', '[.]')}: .*{message}"):
        open_adapter(tmp_path / "k.safetensors")


# ------------------------------------------------------------------------------------------
# safetensors writer, atomic outputs


def test_write_safetensors_reads_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.tensor(4.0), "d": torch.randn(2, 2, generator=g).half(), "e": torch.zeros(0, 3),
               "f": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    lazy_src = torch.randn(4, 4, generator=g)
    calls = []
    lazy = LazyTensor(torch.float32, (4, 4), lambda: calls.append(1) or lazy_src)
    write_safetensors(tmp_path / "x.safetensors", {**tensors, "lazy": lazy}, {"format": "pt", "n": 3})
    back = load_file(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert torch.equal(back["lazy"], lazy_src) and calls == [1]
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}


def test_write_safetensors_checks_lazy_shape(tmp_path):
    lazy = LazyTensor(torch.float32, (4, 4), lambda: torch.zeros(4, 5))
    with pytest.raises(ValueError, match="expected torch.float32 \\(4, 4\\)"):
        write_safetensors(tmp_path / "x.safetensors", {"lazy": lazy})


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_overwrite_keeps_old_on_failure(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        with atomic_dir(dest):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dest / "old").exists()
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in dest.iterdir()) == ["new"]


def test_atomic_file_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "x.safetensors") as tmp:
            tmp.write_bytes(b"123")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# merge() on state dicts: module union, scaling, streaming


def _adapters(seed=0):
    """Three PEFT state dicts with different ranks, alphas and modules (one rsLoRA)."""
    shapes = {"model.layers.0.q": (24, 32), "model.layers.1.q": (24, 32), "model.layers.0.up": (40, 32),
              "model.layers.1.up": (40, 32), "model.emb": (32, 60)}
    plan = [({"r": 4, "lora_alpha": 8}, ["model.layers.0.q", "model.layers.1.q", "model.layers.0.up"]),
            ({"r": 6, "lora_alpha": 6, "use_rslora": True}, ["model.layers.0.q", "model.layers.1.up", "model.emb"]),
            ({"r": 2, "lora_alpha": 1, "rank_pattern": {"layers.1.q": 3}}, ["model.layers.1.q", "model.layers.0.up",
                                                                             "model.layers.1.up"])]
    out = []
    for t, (cfg, mods) in enumerate(plan):
        sd = {}
        for j, name in enumerate(mods):
            r = cfg.get("rank_pattern", {}).get(name.removeprefix("model."), cfg["r"])
            m, n = shapes[name]
            A, B = _pair(m, n, r, 100 * seed + 10 * t + j)
            if name == "model.emb":
                sd[f"{P}{name}.lora_embedding_A"], sd[f"{P}{name}.lora_embedding_B"] = A, B
            else:
                sd[f"{P}{name}.lora_A.weight"], sd[f"{P}{name}.lora_B.weight"] = A, B
        out.append((sd, cfg))
    return out


def _factors(sd, name):
    """(A, B) of module ``name`` in a PEFT state dict, or None."""
    for a, b in ((f"{P}{name}.lora_A.weight", f"{P}{name}.lora_B.weight"),
                 (f"{P}{name}.lora_embedding_A", f"{P}{name}.lora_embedding_B")):
        if a in sd:
            return sd[a], sd[b]
    return None


def _scale(cfg, r):
    return cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)


def test_merge_matches_merge_layer_per_module():
    ads = _adapters()
    weights = [1.0, 0.5, 2.0]
    res = merge(ads, rank=5, method="ties", weights=weights, top_k=0.5)
    got = {mm.name: mm for mm in res.modules}
    assert sorted(got) == sorted({"model.layers.0.q", "model.layers.1.q", "model.layers.0.up",
                                  "model.layers.1.up", "model.emb"})
    for name, mm in got.items():
        A, B, s, w, adapting = [], [], [], [], []
        for t, (sd, cfg) in enumerate(ads):
            f = _factors(sd, name)
            if f is not None:
                A.append(f[0]), B.append(f[1]), s.append(_scale(cfg, f[0].shape[0])), w.append(weights[t])
                adapting.append(t)
        ref = ctm_kernels.merge_layer(A, B, rank=5, method="ties", scales=s, weights=w, top_k=0.5)
        torch.testing.assert_close(mm.update(), ref.B @ ref.A, rtol=1e-5, atol=1e-6)
        assert mm.kind == ("embedding" if name == "model.emb" else "linear")
        # what the merge did there: the engine's report, per adapter in the order of info.adapters
        info = mm.info
        assert info.adapters == tuple(adapting)
        assert (info.iterations, info.converged, info.stopped_by) == (ref.info.iterations, ref.info.converged,
                                                                        ref.info.stopped_by)
        assert info.energy_kept == pytest.approx(ref.info.energy_kept, rel=1e-6)
        assert info.share_after_rule == pytest.approx(ref.share_after_rule, rel=1e-5)
        assert info.norms == pytest.approx(ref.info.norms, rel=1e-6)


def test_module_info_as_a_user_reads_it(tmp_path):
    import dataclasses

    from ctm_kernels.io import ModuleInfo

    ads = _adapters(seed=5)
    kept = merge(ads, rank=4, method="mean")
    written = merge(ads, rank=4, method="mean", output=tmp_path / "out")
    for a, b in zip(kept.modules, written.modules):
        assert isinstance(a.info, ModuleInfo) and a.info == b.info          # a written output's result has it too
        plain = json.loads(json.dumps(dataclasses.asdict(a.info)))        # plain data, for a report
        assert plain["adapters"] == list(a.info.adapters) and plain["iterations"] == a.info.iterations
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.info.iterations = 0
    # mean merges a module adapted by k of 3 adapters with weights k / 3; the norms are the
    # adapters' own (weight 1), and the result's energy_kept is the modules' weighted by norm^2
    emb = next(mm.info for mm in kept.modules if mm.name == "model.emb")
    assert emb.adapters == (1,)
    A, B = _factors(ads[1][0], "model.emb")
    assert emb.norms[0] == pytest.approx(_scale(ads[1][1], A.shape[0]) * torch.linalg.matrix_norm(B @ A).item(),
                                         rel=1e-5)
    for t in range(3):
        parts = [(m.info.energy_kept[j], m.info.norms[j] ** 2) for m in kept.modules
                 for j, i in enumerate(m.info.adapters) if i == t]
        assert kept.energy_kept[t] == pytest.approx(sum(e * w for e, w in parts) / sum(w for _, w in parts))


def test_merge_sum_full_rank_is_exact():
    # rank >= the summed ranks of every module: CtM with sum keeps every update exactly
    ads = _adapters(seed=1)
    res = merge(ads, rank=13, method="sum")
    for mm in res.modules:
        want = 0
        for sd, cfg in ads:
            f = _factors(sd, mm.name)
            if f is not None:
                want = want + _scale(cfg, f[0].shape[0]) * f[1].double() @ f[0].double()
        torch.testing.assert_close(mm.update().double(), want, rtol=1e-5, atol=1e-5)
    assert all(k == pytest.approx(1.0, abs=1e-6) for k in res.energy_kept)


class _RecordingStore(DictStore):
    """A state dict that records which tensors each read asks for."""

    def __init__(self, tensors, label, log):
        super().__init__(tensors, label)
        self.log = log

    def get(self, keys):
        keys = list(keys)
        self.log.append((self.label, keys, sum(self._t[k].numel() * self._t[k].element_size() for k in keys)))
        return super().get(keys)


def test_merge_streams_one_group_at_a_time():
    ads = _adapters(seed=2)
    log = []
    opened = []
    for i, (sd, cfg) in enumerate(ads):
        ad = open_adapter((sd, cfg), label=f"ad{i}")
        ad.store = _RecordingStore(sd, f"ad{i}", log)
        opened.append(ad)
    entries = plan_modules(opened)
    budget = 2000                                      # bytes: one or two modules of a shape
    groups = plan_groups(entries, budget)
    assert len(groups) > len({e.first.shape_key for e in entries})   # the budget splits groups
    ticks = []
    res = merge(opened, rank=4, method="mean", max_group_bytes=budget,
                progress=lambda done, total, desc: ticks.append((done, total)))
    assert ticks == [(i + 1, len(groups)) for i in range(len(groups))]
    # every factor read exactly once, in reads that each belong to one group within budget
    read = [k for _, keys, _ in log for k in keys]
    factor_keys = [k for sd, _ in ads for k in sd]
    assert sorted(read) == sorted(factor_keys)
    group_keys = [{k for e in g for _, s in e.specs for k in (s.a_key, s.b_key)} for g in groups]
    per_group = {}
    for label, keys, nbytes in log:
        gi = next(i for i, gk in enumerate(group_keys) if set(keys) <= gk)
        per_group[gi] = per_group.get(gi, 0) + nbytes
    for gi, nbytes in per_group.items():
        assert nbytes <= max(budget, max(sum(s.nbytes for _, s in e.specs) for e in groups[gi]))
    assert len(res.modules) == len(entries)


def test_merge_rejects_bad_options():
    ads = _adapters()
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        merge(ads, rank=0)
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        merge(ads, rank=4, method="nope")
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        merge(ads, rank=4, weights=[1, 2])
    with pytest.raises(ValueError, match="rank must be a positive integer or 'full', got 'two'"):
        merge(ads, rank="two")
    with pytest.raises(ValueError, match="takes no parameter 'top_k'"):
        merge(ads, rank=4, method="sum", top_k=0.3)


def test_merge_shape_mismatch_between_adapters():
    a = ({f"{P}m.lora_A.weight": torch.ones(2, 8), f"{P}m.lora_B.weight": torch.ones(6, 2)}, {"r": 2})
    b = ({f"{P}m.lora_A.weight": torch.ones(2, 8), f"{P}m.lora_B.weight": torch.ones(5, 2)}, {"r": 2})
    with pytest.raises(AdapterError, match=r"adapter\[1\]: base_model.model.m.lora_A.weight: module m is linear "
                                           r"\[5, 8\] here but linear \[6, 8\] in adapter\[0\]"):
        merge([a, b], rank=2)


def test_merge_nan_names_key():
    A, B = _pair(6, 8, 2, 0)
    A[1, 3] = float("nan")
    a = ({f"{P}m.lora_A.weight": A, f"{P}m.lora_B.weight": B}, {"r": 2})
    with pytest.raises(AdapterError, match=r"adapter\[0\]: base_model.model.m.lora_A.weight: factor contains NaN"):
        merge([a], rank=2)


def test_result_state_dict_formats():
    res = merge(_adapters()[:1], rank=2, method="sum")
    sd = res.state_dict()
    assert set(sd) == {f"{P}model.layers.{i}.{p}.lora_{x}.weight" for i, p in ((0, "q"), (1, "q"), (0, "up"))
                       for x in "AB"}
    ko = res.state_dict("kohya")
    assert ko["lora_unet_model_layers_0_q.alpha"].item() == 2.0
    torch.testing.assert_close(ko["lora_unet_model_layers_0_q.lora_down.weight"],
                               sd[f"{P}model.layers.0.q.lora_A.weight"])
    with pytest.raises(ValueError, match="unknown format"):
        res.state_dict("diffusers")


def test_embedding_passthrough_must_agree(tmp_path):
    def folder(name, base):
        g = torch.Generator().manual_seed(len(name))
        t = {f"{P}e.lora_embedding_A": torch.randn(2, 10, generator=g),
             f"{P}e.lora_embedding_B": torch.randn(4, 2, generator=g), f"{P}e.base_layer.weight": base}
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "adapter_model.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
        return tmp_path / name

    base = torch.randn(10, 4)
    res = merge([folder("a", base), folder("b", base.clone())], rank=2, method="sum")
    res.save(tmp_path / "out")
    assert torch.equal(load_file(str(tmp_path / "out" / "adapter_model.safetensors"))[f"{P}e.base_layer.weight"], base)
    res = merge([folder("c", base), folder("d", base + 1)], rank=2, method="sum")
    with pytest.raises(AdapterError, match=r"d/adapter_model.safetensors: base_model.model.e.base_layer.weight: differs"):
        res.save(tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with pytest.raises(ValueError, match="no kohya representation"):
        res.save(tmp_path / "k.safetensors", format="kohya")


def test_merge_group_whose_modules_converge_at_different_steps():
    # two same-shape modules solved as one batch: "low" (adapters of effective rank 2 under
    # rank-8 factors) converges at once, "full" takes many steps; the early one must not
    # break the batch
    g = torch.Generator().manual_seed(0)
    ads = []
    for t in range(2):
        sd = {}
        for name, eff in (("low", 2), ("full", 8)):
            A, B = torch.randn(8, 32, generator=g), torch.randn(24, 8, generator=g)
            B[:, eff:] = 0
            sd[f"{P}{name}.lora_A.weight"], sd[f"{P}{name}.lora_B.weight"] = A, B
        ads.append((sd, {"r": 8, "lora_alpha": 8}))
    res = merge(ads, rank=6, method="ties")
    for mm in res.modules:
        A = [sd[f"{P}{mm.name}.lora_A.weight"] for sd, _ in ads]
        B = [sd[f"{P}{mm.name}.lora_B.weight"] for sd, _ in ads]
        ref = ctm_kernels.merge_layer(A, B, rank=6, method="ties", scales=[1.0, 1.0])
        assert mm.info.iterations == ref.info.iterations
        torch.testing.assert_close(mm.update(), ref.B @ ref.A, rtol=1e-5, atol=1e-6)


def test_dare_masks_do_not_depend_on_group_sizes():
    ads = _adapters(seed=3)
    whole = merge(ads, rank=4, method="dare", p=0.5, seed=7)
    split = merge(ads, rank=4, method="dare", p=0.5, seed=7, max_group_bytes=1)   # one module per group
    again = merge(ads, rank=4, method="dare", p=0.5, seed=7)
    other = merge(ads, rank=4, method="dare", p=0.5, seed=8)
    for a, b, c, d in zip(whole.modules, split.modules, again.modules, other.modules):
        assert torch.equal(a.A, c.A) and torch.equal(a.B, c.B)
        torch.testing.assert_close(a.update(), b.update(), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(a.update(), d.update())


@pytest.mark.parametrize("dtypes, requested, expected", [
    ((torch.bfloat16, torch.bfloat16), None, torch.bfloat16),
    ((torch.bfloat16, torch.float16), None, torch.float32),     # no common half type: promote
    ((torch.float32, torch.float32), "bf16", torch.bfloat16),
], ids=["keep-bf16", "mixed-halves", "requested"])
def test_merge_dtype(dtypes, requested, expected):
    ads = []
    for t, dt in enumerate(dtypes):
        A, B = _pair(24, 32, 4, t, dt)
        ads.append(({f"{P}m.lora_A.weight": A, f"{P}m.lora_B.weight": B}, {"r": 4, "lora_alpha": 4}))
    res = merge(ads, rank=8, method="sum", dtype=requested)
    mm = res.modules[0]
    assert mm.A.dtype == mm.B.dtype == expected
    want = sum(B.double() @ A.double() for A, B in (_pair(24, 32, 4, t, dt) for t, dt in enumerate(dtypes)))
    torch.testing.assert_close(mm.update().double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


# ------------------------------------------------------------------------------------------
# streaming: positioned reads, out-of-order writes, read-ahead, output written as groups finish


def test_safetensors_store_reads_what_safetensors_wrote(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {"z": torch.randn(3, 7, generator=g).to(torch.bfloat16), "a": torch.randn(5, generator=g),
               "m": torch.randn(2, 2, 2, generator=g).half(), "e": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    from ctm_kernels.io.safetensors_io import SafetensorsStore
    store = SafetensorsStore(tmp_path / "x.safetensors")
    got = store.get(["m", "z", "e", "a"])
    assert list(got) == ["m", "z", "e", "a"]                    # in the order asked for
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_safetensors_store_file_cut_after_open(tmp_path):
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(tmp_path / "x.safetensors"))
    from ctm_kernels.io.safetensors_io import SafetensorsStore
    store = SafetensorsStore(tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-100])
    with pytest.raises(AdapterError, match=r"x\.safetensors: b: the file ends inside the tensor's data"):
        store.get(["a", "b"])


def test_writer_bytes_do_not_depend_on_write_order(tmp_path):
    from ctm_kernels.io.safetensors_io import SafetensorsWriter
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(i + 1, 3, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(6)}
    write_safetensors(tmp_path / "in_order.safetensors", tensors, {"k": "v"})
    layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    with SafetensorsWriter(tmp_path / "shuffled.safetensors", layout, {"k": "v"}) as w:
        for k in ["t3", "t0", "t5", "t1", "t4", "t2"]:
            w.write(k, tensors[k])
    assert (tmp_path / "in_order.safetensors").read_bytes() == (tmp_path / "shuffled.safetensors").read_bytes()
    w = SafetensorsWriter(tmp_path / "short.safetensors", layout)
    w.write("t0", tensors["t0"])
    with pytest.raises(ValueError, match="5 tensors never written"):
        w.close()
    with SafetensorsWriter(tmp_path / "wrong.safetensors", layout) as w:
        with pytest.raises(ValueError, match="t1: expected torch.bfloat16"):
            w.write("t1", tensors["t1"].float())
        with pytest.raises(ValueError, match="nope: not in the file's layout"):
            w.write("nope", tensors["t1"])
        for k, v in tensors.items():
            w.write(k, v)


def _no_embedding(ads):
    return [({k: v for k, v in sd.items() if ".emb." not in k}, cfg) for sd, cfg in ads]


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_streamed_output_is_what_save_writes(fmt, tmp_path):
    ads = _no_embedding(_adapters(seed=4)) if fmt == "kohya" else _adapters(seed=4)
    name = "out.safetensors" if fmt == "kohya" else "out"
    kept = merge(ads, rank=4, method="ties", top_k=0.5, max_group_bytes=2000)
    kept.save(tmp_path / f"saved_{name}", format=fmt)
    streamed = merge(ads, rank=4, method="ties", top_k=0.5, max_group_bytes=2000,
                     output=tmp_path / f"streamed_{name}", format=fmt)
    if fmt == "peft":
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / f"saved_{name}" / f).read_bytes() == (tmp_path / f"streamed_{name}" / f).read_bytes()
    else:
        assert (tmp_path / f"saved_{name}").read_bytes() == (tmp_path / f"streamed_{name}").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"saved_{name}", f"streamed_{name}"])
    # the streamed result describes the output but holds no factors
    assert streamed.output == tmp_path / f"streamed_{name}" and streamed.format == fmt
    assert [mm.name for mm in streamed.modules] == [mm.name for mm in kept.modules]
    assert all(mm.A.is_meta and mm.B.is_meta for mm in streamed.modules)
    assert streamed.energy_kept == pytest.approx(kept.energy_kept)
    assert streamed.stats.groups == kept.stats.groups == len(plan_groups(plan_modules(
        [open_adapter(a) for a in ads]), 2000))
    with pytest.raises(ValueError, match="written to .*streamed_.* not kept in memory"):
        streamed.save(tmp_path / "again")


def test_merge_stats_count_every_factor_byte():
    ads = _adapters(seed=6)
    res = merge(ads, rank=4, method="sum", max_group_bytes=3000)
    want = sum(v.numel() * v.element_size() for sd, _ in ads for v in sd.values())
    st = res.stats
    assert st.bytes_read == want
    assert st.modules == len(res.modules) and st.world_size == 1 and st.peak_rss_bytes > 0
    assert st.groups == len(plan_groups(plan_modules([open_adapter(a) for a in ads]), 3000))
    assert 0 <= st.read_seconds <= st.load_seconds and st.merge_seconds > 0
    assert "module groups; read" in res.summary()
    rep = res.report()
    assert rep["stats"]["bytes_read"] == want and rep["modules"] == len(res.modules)
    json.dumps(rep)


class _GatedStore(DictStore):
    """A state dict whose reads are logged (by group) and can signal when a group's read starts."""

    def __init__(self, tensors, label, group_of, events, started):
        super().__init__(tensors, label)
        self.group_of, self.events, self.started = group_of, events, started

    def get(self, keys):
        keys = list(keys)
        g = self.group_of[keys[0]]
        self.events.append(("read", g))
        self.started[g].set()
        return super().get(keys)


def test_reader_runs_one_group_ahead_and_no_further(monkeypatch):
    import threading
    from ctm_kernels.pipeline import merge as merge_stage

    ads = _adapters(seed=2)
    budget = 2000
    opened = [open_adapter(a, label=f"ad{i}") for i, a in enumerate(ads)]
    groups = plan_groups(plan_modules(opened), budget)
    assert len(groups) >= 4
    group_of = {k: gi for gi, g in enumerate(groups) for e in g for _, s in e.specs for k in (s.a_key, s.b_key)}
    events = []
    started = [threading.Event() for _ in groups]
    for ad, (sd, _) in zip(opened, ads):
        ad.store = _GatedStore(sd, ad.label, group_of, events, started)
    real = merge_stage.merge_group
    overlapped = []

    def merge_group(plan, loaded):
        gi = loaded.index
        assert plan.groups[gi][0].name == groups[gi][0].name
        if gi + 1 < len(groups):
            # the next group is read while this one merges (the reader does not wait for it)
            overlapped.append(started[gi + 1].wait(timeout=20))
        return real(plan, loaded)

    monkeypatch.setattr("ctm_kernels.pipeline.run.merge_group", merge_group)
    merge(opened, rank=4, method="mean", max_group_bytes=budget,
          progress=lambda done, total, desc: events.append(("done", done - 1)))
    assert overlapped == [True] * (len(groups) - 1)
    # group g is read only after group g - 2 is merged: two groups in memory at most
    for i, (kind, g) in enumerate(events):
        if kind == "read" and g >= 2:
            assert ("done", g - 2) in events[:i], events


def test_streamed_failure_in_a_late_group_leaves_nothing(tmp_path):
    ads = _adapters(seed=7)
    sd, cfg = ads[2]
    bad = dict(sd)
    key = f"{P}model.layers.1.up.lora_B.weight"
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    ads[2] = (bad, cfg)
    ticks = []
    with pytest.raises(AdapterError, match=r"adapter\[2\]: base_model\.model\.model\.layers\.1\.up\.lora_B\.weight: "
                                           "factor contains NaN"):
        merge(ads, rank=4, method="sum", max_group_bytes=1, output=tmp_path / "out",
              progress=lambda done, total, desc: ticks.append(done))
    assert ticks                                  # some groups were merged and written before the failure
    assert list(tmp_path.iterdir()) == []


def test_merge_without_prefetch_is_the_same():
    ads = _adapters(seed=8)
    a = merge(ads, rank=4, method="ties", max_group_bytes=2000)
    b = merge(ads, rank=4, method="ties", max_group_bytes=2000, prefetch=False)
    for x, y in zip(a.modules, b.modules):
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
    assert b.stats.bytes_read == a.stats.bytes_read


# ------------------------------------------------------------------------------------------
# what the merge refuses and how it orders what it plans


REFUSED_FIELDS = ["use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                  "layer_replication", "use_qalora", "alora_invocation_tokens", "velora_config", "monteclora_config",
                  "use_bdlora", "arrow_config", "kasa_config"]


@pytest.mark.parametrize("field", REFUSED_FIELDS)
def test_every_refused_config_field_is_refused_by_name(tmp_path, field):
    """Every PEFT setting that makes the update something other than ``scale * B @ A`` is refused,
    naming the config and the field (never merged as a plain LoRA). The list is written out here, so
    a setting dropped from the reader's list fails its case."""
    folder = peft_folder(tmp_path / "a", {"model.q_proj": _pair(8, 8, 4, 0)}, {field: True})
    with pytest.raises(AdapterError, match=rf"adapter_config.json: {field}: .*cannot merge it exactly"):
        read_peft(folder)


def test_base_weights_of_a_module_without_lora_are_refused(tmp_path):
    """PEFT saves ``<module>.base_layer.weight`` only beside that module's LoRA (a targeted embedding
    or lm_head); base weights of a module the adapter does not adapt are a full trained weight."""
    mods = {"model.q_proj": _pair(8, 8, 4, 0)}
    ok = peft_folder(tmp_path / "ok", mods, {})
    save_file({f"{P}model.q_proj.lora_A.weight": mods["model.q_proj"][0],
               f"{P}model.q_proj.lora_B.weight": mods["model.q_proj"][1],
               f"{P}model.q_proj.base_layer.weight": torch.ones(8, 8)}, str(ok / "adapter_model.safetensors"))
    assert read_peft(ok).passthrough == [f"{P}model.q_proj.base_layer.weight"]
    bad = peft_folder(tmp_path / "bad", mods, {})
    save_file({f"{P}model.q_proj.lora_A.weight": mods["model.q_proj"][0],
               f"{P}model.q_proj.lora_B.weight": mods["model.q_proj"][1],
               f"{P}lm_head.base_layer.weight": torch.ones(8, 8)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=rf"{P}lm_head.base_layer.weight: not a LoRA factor"):
        read_peft(bad)


def test_conv_lora_whose_up_projection_is_not_1x1_is_refused(tmp_path):
    """A conv LoRA merges as ``B [out, r] @ A [r, in * kernel]`` only when B is a 1x1 convolution; a
    B with a kernel of its own has no such flattening and is refused naming the key."""
    t = {f"{P}conv.lora_A.weight": torch.ones(4, 3, 3, 3), f"{P}conv.lora_B.weight": torch.ones(8, 4, 3, 3)}
    (tmp_path / "a").mkdir()
    save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(AdapterError, match=r"conv.lora_B.weight: conv LoRA factors .* 1x1 up-projection"):
        read_peft(tmp_path / "a")


def test_conv_and_linear_lora_of_one_flattened_shape_do_not_merge(tmp_path):
    """A conv LoRA ``[r, 3, 3, 3]`` and a linear one ``[r, 27]`` on a module of the same name flatten to
    the same 8 x 27 update but adapt different layers: a problem naming both, never a merge."""
    conv = {f"{P}m.lora_A.weight": torch.ones(4, 3, 3, 3), f"{P}m.lora_B.weight": torch.ones(8, 4, 1, 1)}
    (tmp_path / "c").mkdir()
    save_file(conv, str(tmp_path / "c" / "adapter_model.safetensors"))
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    lin = peft_folder(tmp_path / "l", {"m": _pair(8, 27, 4, 0)}, {})
    plan = ctm_kernels.plan_merge([tmp_path / "c", lin], rank=2)
    assert any("module m is linear [8, 27] here but conv [8, 3, 3, 3]" in p for p in plan.problems), plan.problems
    with pytest.raises(ValueError, match="module m is linear"):
        merge([tmp_path / "c", lin], rank=2)


def test_modules_planned_in_natural_order():
    """Modules come out in natural order (``layers.2`` before ``layers.10``): the order of the output
    file and of the module ids that seed DARE masks."""
    names = [f"model.layers.{i}.{p}" for i in (10, 2, 1, 0) for p in ("v_proj", "q_proj")]
    sd = {}
    for k, name in enumerate(names):
        A, B = _pair(4, 4, 2, k)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = A, B
    ad = open_adapter((sd, {"r": 2, "lora_alpha": 2}), label="x")
    got = [e.name for e in plan_modules([ad])]
    assert got == [f"model.layers.{i}.{p}" for i in (0, 1, 2, 10) for p in ("q_proj", "v_proj")]


def test_dry_run_weights_stay_with_their_adapters(tmp_path):
    """A dry run with an adapter that does not open keeps each weight beside its own adapter."""
    a = peft_folder(tmp_path / "a", {"model.q_proj": _pair(8, 8, 4, 0)}, {})
    b = peft_folder(tmp_path / "b", {"model.q_proj": _pair(8, 8, 4, 1)}, {})
    plan = ctm_kernels.plan_merge([tmp_path / "missing", a, b], rank=2, weights=[5.0, 2.0, 3.0])
    assert any("missing: no such file" in p for p in plan.problems)
    assert plan.weights == [2.0, 3.0]
    assert "weight 2, " in plan.describe() and "weight 5" not in plan.describe()


def test_dare_masks_of_same_shape_modules_do_not_depend_on_their_batch():
    """Modules of one shape are merged as one batch or, under a small ``max_group_bytes``, one by one:
    each draws its DARE mask from its own module id either way (never from its place in the batch)."""
    mods = [f"model.layers.{i}.q_proj" for i in range(3)]
    ads = [open_adapter(({f"{P}{n}.lora_{w}.weight": f for n in mods
                          for w, f in zip("AB", _pair(12, 10, 3, 10 * t + mods.index(n)))}, {"r": 3, "lora_alpha": 3}),
                        label=f"a{t}") for t in range(2)]
    whole = merge(ads, rank=4, method="dare", p=0.5, seed=7)
    split = merge(ads, rank=4, method="dare", p=0.5, seed=7, max_group_bytes=1)
    assert len(whole.plan.groups) == 1 and len(split.plan.groups) == 3
    for a, b in zip(whole.modules, split.modules, strict=True):
        torch.testing.assert_close(a.update(), b.update(), rtol=1e-6, atol=1e-6)
