"""Synthetic LoRA adapter sets on disk, shaped like real ones, for benchmarks and tests.

Each adapter is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) for a
Llama-style ``LlamaForCausalLM``: per decoder layer ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` with their real shapes, keys as PEFT saves them
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``...).

The updates have the structure that makes merging meaningful and that HOOI sees in trained
adapters: per module, ``dW_t = U_s diag(sigma_s) M_t V_s^T + U_t diag(sigma_t) V_t^T`` with

* ``U_s [m, k], V_s [n, k]``: ``k = --shared`` directions common to every adapter (seeded by
  the module alone), each adapter using the first ``min(k, r_t // 2)`` with its own mixing
  ``M_t = I + 0.3 N`` (the adapters agree on the subspace, roughly on the coordinates);
* ``U_t, V_t``: the adapter's own directions, orthogonal to the shared ones;
* spectra decaying geometrically (``DECAY ** i``), shared components twice as strong, and a
  per-adapter strength (log-normal), so the adapters' norms differ as real ones do.

The factors are ``B = [U_s | U_t] core Q^T``, ``A = Q [V_s | V_t]^T`` with a random orthogonal
``Q`` (the factors are not the SVD, as trained ones are not). Everything is drawn on the fly,
module by module, from seeds derived from (seed, adapter, module): the same arguments give
the same files, and one adapter is in memory at a time.

    python benchmarks/synth.py /tmp/ctm_synth/tiny --layout tiny --adapters 4
    python benchmarks/synth.py /tmp/ctm_synth/8b --layout llama3-8b --adapters 16 --ranks 16
    python benchmarks/synth.py OUT --adapters 8 --ranks 8,16,32,64     # ranks cycle over the adapters
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DECAY = 0.85              # ratio of successive singular values of an adapter's update
MANIFEST = "synth.json"


@dataclass(frozen=True)
class Layout:
    """Decoder shapes of a Llama-style model."""
    layers: int
    hidden: int
    kv: int                # k_proj / v_proj outputs: kv heads x head dim
    intermediate: int
    base_model: str


LAYOUTS = {
    "tiny": Layout(layers=2, hidden=256, kv=64, intermediate=896, base_model="synthetic/tiny-llama"),
    "llama3-8b": Layout(layers=32, hidden=4096, kv=1024, intermediate=14336, base_model="meta-llama/Meta-Llama-3-8B"),
}


def module_shapes(layout: Layout, targets=MODULES, layers: int | None = None) -> list[tuple[str, int, int]]:
    """``(module path, out_features, in_features)`` of every targeted module, in model order."""
    h, kv, f = layout.hidden, layout.kv, layout.intermediate
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    out = []
    for i in range(layout.layers if layers is None else layers):
        for name in MODULES:
            if name in targets:
                block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                out.append((f"model.layers.{i}.{block}.{name}", *shapes[name]))
    return out


def _gen(*key: int) -> torch.Generator:
    """One reproducible stream per key (seed, adapter, module), the same in every process."""
    h = 0x9E3779B97F4A7C15
    for k in key:
        h = (h * 1_000_003 + k + 2) % 2**63
    return torch.Generator().manual_seed(h)


def _orthonormal(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X).Q


def module_factors(seed: int, t: int, j: int, m: int, n: int, r: int, shared: int, strength: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``t``'s factors ``A [r, n]``, ``B [m, r]`` (fp32) for module number ``j``."""
    k = min(shared, m, n)
    s = min(k, r // 2)
    g = _gen(seed, -1, j)                                   # the module's shared directions
    Us = _orthonormal(torch.randn(m, k, generator=g))[:, :s]
    Vs = _orthonormal(torch.randn(n, k, generator=g))[:, :s]
    g = _gen(seed, t, j)
    own = r - s

    def away(X, S):                                         # own directions orthogonal to the shared ones
        return _orthonormal(X - S @ (S.mT @ X))

    Ut = away(torch.randn(m, own, generator=g), Us)
    Vt = away(torch.randn(n, own, generator=g), Vs)
    core = torch.zeros(r, r)
    sig_s = 2.0 * strength * DECAY ** torch.arange(s, dtype=torch.float32)
    mix = torch.eye(s) + 0.3 * torch.randn(s, s, generator=g) / max(1, s) ** 0.5
    core[:s, :s] = sig_s[:, None] * mix
    core[s:, s:] = torch.diag(strength * DECAY ** torch.arange(own, dtype=torch.float32))
    Q = _orthonormal(torch.randn(r, r, generator=g))
    B = torch.cat([Us, Ut], 1) @ core @ Q.mT
    A = Q @ torch.cat([Vs, Vt], 1).mT
    return A.contiguous(), B.contiguous()


def adapter_config(layout: Layout, r: int, targets) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": layout.base_model,
            "revision": None, "r": r, "lora_alpha": 2 * r, "use_rslora": False, "lora_dropout": 0.05,
            "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
            "inference_mode": True}


@dataclass(frozen=True)
class SynthSpec:
    """What a synthetic set is made of; a folder holding a set made from an equal spec is reused."""
    layout: str = "tiny"
    adapters: int = 4
    ranks: tuple[int, ...] = (16,)
    dtype: str = "bf16"
    seed: int = 0
    layers: int | None = None
    targets: tuple[str, ...] = MODULES
    shared: int = 8

    def check(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.adapters < 1:
            raise ValueError(f"adapters must be at least 1, got {self.adapters}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive, got {self.ranks}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        bad = [t for t in self.targets if t not in MODULES]
        if bad or not self.targets:
            raise ValueError(f"targets must be among {', '.join(MODULES)}, got {', '.join(self.targets) or 'none'}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be at least 1, got {self.layers}")

    def rank_of(self, t: int) -> int:
        return self.ranks[t % len(self.ranks)]

    def factor_bytes(self) -> int:
        """Bytes of all adapters' factors."""
        item = DTYPES[self.dtype].itemsize
        shapes = module_shapes(LAYOUTS[self.layout], self.targets, self.layers)
        return sum(self.rank_of(t) * (m + n) * item for t in range(self.adapters) for _, m, n in shapes)


def write_adapter(folder: Path, spec: SynthSpec, t: int) -> None:
    """Adapter ``t`` of ``spec`` as a PEFT folder."""
    from safetensors.torch import save_file

    layout = LAYOUTS[spec.layout]
    r = spec.rank_of(t)
    strength = math.exp(0.3 * torch.randn(1, generator=_gen(spec.seed, t, -1)).item())
    tensors = {}
    for j, (name, m, n) in enumerate(module_shapes(layout, spec.targets, spec.layers)):
        A, B = module_factors(spec.seed, t, j, m, n, r, spec.shared, strength)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(DTYPES[spec.dtype])
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(DTYPES[spec.dtype])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(layout, r, spec.targets), indent=2) + "\n")


def _manifest(spec: SynthSpec) -> dict:
    d = asdict(spec)
    d["ranks"], d["targets"] = list(spec.ranks), list(spec.targets)
    return d


def adapter_dirs(out: Path, spec: SynthSpec) -> list[Path]:
    return [out / f"adapter_{t:03d}" for t in range(spec.adapters)]


def generate(out: str | Path, spec: SynthSpec, *, reuse: bool = True, log=None) -> list[Path]:
    """The adapter folders of ``spec`` under ``out``: made there (replacing what ``out`` held),
    or with ``reuse`` taken as they are when ``out`` holds a complete set of an equal spec."""
    spec.check()
    out = Path(out)
    dirs = adapter_dirs(out, spec)
    manifest = out / MANIFEST
    if reuse and manifest.is_file():
        try:
            same = json.loads(manifest.read_text()).get("spec") == _manifest(spec)
        except json.JSONDecodeError:
            same = False
        if same and all((d / "adapter_model.safetensors").is_file() for d in dirs):
            return dirs
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    # many small ops (tall QRs of a few columns): one thread is fastest, and the same draws
    # on every machine; on a busy 2-core machine two threads made them 60x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t, d in enumerate(dirs):
            write_adapter(d, spec, t)
            if log:
                log(f"  adapter {t + 1}/{spec.adapters} written ({time.perf_counter() - t0:.1f} s)")
    finally:
        torch.set_num_threads(threads)
    # written last: a set interrupted before this is never reused
    manifest.write_text(json.dumps({"spec": _manifest(spec), "factor_bytes": spec.factor_bytes(),
                                    "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    return dirs


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a set of synthetic PEFT LoRA adapters for a Llama-style layout.")
    p.add_argument("out", help="folder for the set (adapter_000, adapter_001, ... and synth.json)")
    p.add_argument("--layout", default="tiny", choices=list(LAYOUTS))
    p.add_argument("--adapters", type=int, default=4, help="number of adapters T (default 4)")
    p.add_argument("--ranks", type=_ints, default=(16,), help="LoRA ranks, cycled over the adapters (default 16)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the layout's)")
    p.add_argument("--targets", default=",".join(MODULES), help="target modules (default: all seven)")
    p.add_argument("--shared", type=int, default=8, help="directions shared by all adapters per module (default 8)")
    p.add_argument("--no-reuse", action="store_true", help="regenerate even if OUT holds this set")
    a = p.parse_args(argv)
    spec = SynthSpec(layout=a.layout, adapters=a.adapters, ranks=a.ranks, dtype=a.dtype, seed=a.seed,
                     layers=a.layers, targets=tuple(x for x in a.targets.split(",") if x), shared=a.shared)
    try:
        spec.check()
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter()
    dirs = generate(a.out, spec, reuse=not a.no_reuse, log=print)
    print(f"{len(dirs)} adapters, {len(module_shapes(LAYOUTS[a.layout], spec.targets, spec.layers))} modules each, "
          f"{spec.factor_bytes() / 2**30:.3f} GiB of {a.dtype} factors in {a.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
