"""Train, save and load the digits adapter zoo: a base MLP plus one LoRA adapter and head per task.

``python -m benchmarks.quality.zoo [--out DIR]`` retrains it (seeded; a few minutes at most
on a 2-core CPU). The committed zoo lives in ``benchmarks/quality/zoo/``:

* ``base.safetensors``: backbone ``fc{1,2,3}.{weight,bias}`` stored in fp16. The base is
  rounded to fp16 *before* the adapters are trained, so the stored base is exactly the
  one they were trained on.
* ``<task>.safetensors``: ``fc{1,2,3}.lora_A [rank, in]``, ``fc{1,2,3}.lora_B [out, rank]``,
  ``head.weight [classes, hidden]``, ``head.bias [classes]`` (fp32).
* ``manifest.json``: configuration, seeds, the LoRA scaling, and the accuracies measured
  at training time (individual adapter, base-features probe).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import LAYERS, Backbone, attach_lora, detach_lora
from .tasks import TASKS, Digits, Split, Task, get_tasks

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


@dataclass
class ZooConfig:
    """Everything that determines a zoo (with the torch version and the data split)."""

    hidden: int = 256
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 64
    base_epochs: int = 60
    base_lr: float = 2e-3
    adapter_epochs: int = 40
    adapter_lr: float = 3e-3
    probe_epochs: int = 60
    probe_lr: float = 1e-2
    weight_decay: float = 1e-4
    base_seed: int = 0
    adapter_seed: int = 100
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lora_layers: list[str] = field(default_factory=lambda: ["fc2", "fc3"])


@dataclass
class Adapter:
    """One task's LoRA factors per layer (``A [rank, in]``, ``B [out, rank]``) and its head."""

    task: str
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: float
    head_weight: torch.Tensor  # [classes, hidden]
    head_bias: torch.Tensor  # [classes]
    seed: int

    def delta(self, layer: str) -> torch.Tensor:
        """Dense update ``scaling * B @ A`` ``[out, in]`` of one layer."""
        return self.scaling * self.B[layer] @ self.A[layer]

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.delta(name) for name in self.A}


@dataclass
class Zoo:
    config: ZooConfig
    backbone: Backbone
    adapters: list[Adapter]
    stats: dict  # per-task accuracies measured at training time

    @property
    def tasks(self) -> list[Task]:
        return get_tasks([a.task for a in self.adapters])


def accuracy(backbone: Backbone, deltas: dict[str, torch.Tensor] | None, head_weight: torch.Tensor,
             head_bias: torch.Tensor, split: Split) -> float:
    """Top-1 accuracy in percent of ``head(backbone + deltas)`` on ``split``."""
    with torch.no_grad():
        logits = nn.functional.linear(backbone.forward_with_deltas(split.x, deltas), head_weight, head_bias)
        return 100.0 * (logits.argmax(1) == split.y).float().mean().item()


def _fit(params: list[nn.Parameter], loss_fn, split: Split, epochs: int, lr: float, batch_size: int,
         weight_decay: float, seed: int) -> None:
    """Minibatch AdamW on ``loss_fn(x, y)``; the batch order comes from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(split.y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            optimiser.zero_grad()
            loss_fn(split.x[idx], split.y[idx]).backward()
            optimiser.step()


def train_base(cfg: ZooConfig, data: Digits) -> tuple[Backbone, float]:
    """Pretrain the backbone on plain digits; returns it (fp16-rounded, frozen) and its test accuracy."""
    torch.manual_seed(cfg.base_seed)
    backbone = Backbone(cfg.hidden)
    head = nn.Linear(cfg.hidden, 10)
    train = data.split(None, "train")
    _fit(list(backbone.parameters()) + list(head.parameters()),
         lambda x, y: nn.functional.cross_entropy(head(backbone(x)), y),
         train, cfg.base_epochs, cfg.base_lr, cfg.batch_size, cfg.weight_decay, cfg.base_seed)
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(p.half().float())  # the stored fp16 base is the trained-on base
            p.requires_grad_(False)
    return backbone, accuracy(backbone, None, head.weight, head.bias, data.split(None, "test"))


def train_adapter(backbone: Backbone, task: Task, cfg: ZooConfig, data: Digits, seed: int) -> Adapter:
    """Train a LoRA adapter on every backbone layer together with a fresh head for ``task``."""
    torch.manual_seed(seed)
    loras = attach_lora(backbone, cfg.rank, cfg.alpha, cfg.lora_layers)
    head = nn.Linear(cfg.hidden, task.n_classes)
    params = [p for m in loras.values() for p in (m.lora_A, m.lora_B)] + list(head.parameters())
    try:
        _fit(params, lambda x, y: nn.functional.cross_entropy(head(backbone(x)), y),
             data.split(task, "train"), cfg.adapter_epochs, cfg.adapter_lr, cfg.batch_size, cfg.weight_decay, seed)
    finally:
        detach_lora(backbone)
    return Adapter(task.name,
                   {n: m.lora_A.detach().clone() for n, m in loras.items()},
                   {n: m.lora_B.detach().clone() for n, m in loras.items()},
                   loras[cfg.lora_layers[0]].scaling, head.weight.detach().clone(), head.bias.detach().clone(), seed)


def train_probe(backbone: Backbone, task: Task, cfg: ZooConfig, data: Digits, seed: int) -> nn.Linear:
    """A head trained on the frozen base features: what the base model does on ``task`` without an adapter."""
    torch.manual_seed(seed)
    head = nn.Linear(cfg.hidden, task.n_classes)
    _fit(list(head.parameters()), lambda x, y: nn.functional.cross_entropy(head(backbone(x)), y),
         data.split(task, "train"), cfg.probe_epochs, cfg.probe_lr, cfg.batch_size, cfg.weight_decay, seed)
    return head


def train_zoo(cfg: ZooConfig, data: Digits | None = None, log=print) -> Zoo:
    """Pretrain the base, then train one adapter, head and probe per task (seeded)."""
    data = data or Digits()
    threads = torch.get_num_threads()
    # minibatches through 256-wide layers: more threads only add synchronisation
    torch.set_num_threads(1)
    try:
        return _train_zoo(cfg, data, log)
    finally:
        torch.set_num_threads(threads)


def _train_zoo(cfg: ZooConfig, data: Digits, log) -> Zoo:
    t0 = time.perf_counter()
    backbone, base_acc = train_base(cfg, data)
    log(f"base model: digits test accuracy {base_acc:.1f}% ({time.perf_counter() - t0:.1f} s)")
    adapters, stats = [], {"base_digits_test": base_acc, "tasks": {}}
    for i, task in enumerate(get_tasks(cfg.tasks)):
        t1 = time.perf_counter()
        seed = cfg.adapter_seed + i
        adapter = train_adapter(backbone, task, cfg, data, seed)
        probe = train_probe(backbone, task, cfg, data, seed)
        row = {}
        for part in ("val", "test"):
            split = data.split(task, part)
            row[f"adapter_{part}"] = accuracy(backbone, adapter.deltas(), adapter.head_weight, adapter.head_bias, split)
            row[f"probe_{part}"] = accuracy(backbone, None, probe.weight, probe.bias, split)
            # The adapter's own head on the base features: the lambda = 0 point of every merge.
            row[f"base_with_head_{part}"] = accuracy(backbone, None, adapter.head_weight, adapter.head_bias, split)
        stats["tasks"][task.name] = row
        adapters.append(adapter)
        log(f"  {task.name:18s} adapter {row['adapter_test']:5.1f}%  probe {row['probe_test']:5.1f}%  "
            f"base+head {row['base_with_head_test']:5.1f}%  ({time.perf_counter() - t1:.1f} s)")
    stats["train_seconds"] = time.perf_counter() - t0
    stats["torch"] = torch.__version__
    return Zoo(cfg, backbone, adapters, stats)


def save_zoo(zoo: Zoo, out: Path) -> None:
    """Write the zoo to ``out`` (a temporary folder renamed at the end, so no half-written zoo)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for stale in tmp.iterdir():  # left by an interrupted save
        stale.unlink()
    save_file({f"{n}.{k}": getattr(getattr(zoo.backbone, n), k).detach().half().contiguous()
               for n in LAYERS for k in ("weight", "bias")}, str(tmp / "base.safetensors"))
    for a in zoo.adapters:
        tensors = {f"{n}.lora_A": a.A[n].contiguous() for n in a.A}
        tensors |= {f"{n}.lora_B": a.B[n].contiguous() for n in a.B}
        tensors |= {"head.weight": a.head_weight.contiguous(), "head.bias": a.head_bias.contiguous()}
        save_file(tensors, str(tmp / f"{a.task}.safetensors"))
    manifest = {"config": asdict(zoo.config), "scaling": zoo.adapters[0].scaling if zoo.adapters else None,
                "seeds": {a.task: a.seed for a in zoo.adapters}, "stats": zoo.stats}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        os.replace(tmp, out)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, out)


def load_zoo(path: Path = ZOO_DIR) -> Zoo:
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise ValueError(f"{manifest_file}: missing; train the zoo with `python -m benchmarks.quality.zoo`")
    manifest = json.loads(manifest_file.read_text())
    cfg = ZooConfig(**manifest["config"])
    backbone = Backbone(cfg.hidden)
    base = load_file(str(path / "base.safetensors"))
    with torch.no_grad():
        for n in LAYERS:
            for k in ("weight", "bias"):
                key = f"{n}.{k}"
                if key not in base:
                    raise ValueError(f"{path / 'base.safetensors'}: missing key {key!r}")
                getattr(getattr(backbone, n), k).copy_(base[key].float())
    backbone.requires_grad_(False)
    adapters = []
    for task in cfg.tasks:
        file = path / f"{task}.safetensors"
        t = load_file(str(file))
        for key in [f"{n}.lora_{x}" for n in cfg.lora_layers for x in "AB"] + ["head.weight", "head.bias"]:
            if key not in t:
                raise ValueError(f"{file}: missing key {key!r}")
        adapters.append(Adapter(task, {n: t[f"{n}.lora_A"] for n in cfg.lora_layers},
                                {n: t[f"{n}.lora_B"] for n in cfg.lora_layers},
                                manifest["scaling"], t["head.weight"], t["head.bias"], manifest["seeds"][task]))
    return Zoo(cfg, backbone, adapters, manifest["stats"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits LoRA zoo.")
    parser.add_argument("--out", type=Path, default=ZOO_DIR)
    args = parser.parse_args(argv)
    zoo = train_zoo(ZooConfig())
    save_zoo(zoo, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
