"""Make the bundled example adapters (examples/adapters/*): four PEFT LoRA adapters of a tiny
Llama-style model built from a transformers config with seeded random weights (no download).

    python examples/make_examples.py            # rewrites examples/adapters/
    ctm inspect examples/adapters/*
    ctm merge examples/adapters/* -o merged --rank 16

The adapters mimic fine-tunes of one base model: per module they share a few directions
(the common part of what fine-tunes of one model learn) plus directions of their own, and
they differ in rank, alpha (one uses rsLoRA, one a rank_pattern/alpha_pattern) and target
modules. To use the merged adapter::

    from peft import PeftModel
    from make_examples import base_model
    model = PeftModel.from_pretrained(base_model(), "merged")

Requires ``transformers`` and ``peft`` (the ``dev`` extra).
"""
from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = 6          # directions per module that every adapter draws on
DECAY = 0.8         # ratio of successive singular values of an adapter's own directions

ADAPTERS = {
    "math": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "code": dict(r=8, lora_alpha=16, use_rslora=True,
                 target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    "chat": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"],
                 rank_pattern={"down_proj": 8}, alpha_pattern={"down_proj": 8}),
    "style": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}


def base_model():
    """The tiny Llama-style base model of the examples (same weights on every call)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _fill(peft_model, shared: dict, gen: torch.Generator):
    """Write factors into every LoRA layer: B = [Bs M | own], A = [N As ; own] mixes, so that
    dW_t shares the per-module directions ``shared[name]`` with the other adapters."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, mod in peft_model.base_model.model.named_modules():
            if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
                continue
            A = mod.lora_A["default"].weight
            B = mod.lora_B["default"].weight
            r, n = A.shape
            m = B.shape[0]
            if name not in shared:
                shared[name] = (torch.randn(m, SHARED, generator=gen), torch.randn(SHARED, n, generator=gen))
            Bs, As = shared[name]
            k = min(r, SHARED) // 2 or 1              # a part of each adapter's rank is shared
            mix = torch.randn(SHARED, k, generator=gen)
            newB = torch.randn(m, r, generator=gen)
            newA = torch.randn(r, n, generator=gen)
            newB[:, :k] = Bs @ mix
            newA[:k] = torch.linalg.pinv(mix) @ As
            # trained LoRAs have decaying spectra, not flat ones
            newB[:, k:] *= DECAY ** torch.arange(1, r - k + 1, dtype=newB.dtype)
            # a fine-tune's update is small next to the base weights
            A.copy_(newA * 0.05 / n ** 0.5)
            B.copy_(newB * 0.5 / (SHARED ** 0.5))


def make(out: Path = HERE / "adapters") -> list[Path]:
    """Write the example adapters under ``out`` (replacing what is there)."""
    from peft import LoraConfig, get_peft_model

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1234)
    shared: dict = {}
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cfg in ADAPTERS.items():
            pm = get_peft_model(base_model(), LoraConfig(task_type="CAUSAL_LM", **cfg))
            _fill(pm, shared, gen)
            pm.save_pretrained(out / name)
            readme = out / name / "README.md"          # PEFT's model-card template: not needed here
            if readme.exists():
                readme.unlink()
            paths.append(out / name)
    return paths


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "adapters", help="folder to (re)write")
    args = p.parse_args()
    paths = make(args.out)
    total = sum(f.stat().st_size for p in paths for f in p.iterdir())
    print(f"wrote {len(paths)} adapters under {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
