"""A small MLP for 8x8 digit images and a plain-torch LoRA layer.

The backbone is ``fc1 [H, 64] -> ReLU -> fc2 [H, H] -> ReLU -> fc3 [H, H] -> ReLU``;
every task has its own linear head ``[classes, H]`` on the features. LoRA adapters
sit on the three backbone Linear layers (the layers that get merged); heads are
trained with their adapter and never merged, as in the vision setup of the CtM paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LAYERS = ("fc1", "fc2", "fc3")


class Backbone(nn.Module):
    """``x [N, 64] -> features [N, hidden]``."""

    def __init__(self, hidden: int = 128, in_features: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in LAYERS:
            x = torch.relu(getattr(self, name)(x))
        return x

    def forward_with_deltas(self, x: torch.Tensor, deltas: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Features with dense weight updates added: ``deltas[name]`` is ``[out, in]``.

        Merged adapters of every kind (rank-r, dense full-parameter) are evaluated through
        this one path, so methods differ only in the update they produce.
        """
        for name in LAYERS:
            layer = getattr(self, name)
            weight = layer.weight if deltas is None or name not in deltas else layer.weight + deltas[name]
            x = torch.relu(nn.functional.linear(x, weight, layer.bias))
        return x


    def features_over_scales(self, x: torch.Tensor, updates: dict[str, torch.Tensor], scales) -> list[torch.Tensor]:
        """``forward_with_deltas(x, {name: lam * updates[name]})`` for every ``lam`` of ``scales``.

        The layers before the first updated one, and the first updated layer's two products,
        do not depend on ``lam``: they are computed once (the scale grid of the paper's
        protocol has 81 values)."""
        names = [n for n in LAYERS if n in updates]
        first = LAYERS.index(names[0]) if names else len(LAYERS)
        for name in LAYERS[:first]:
            x = torch.relu(getattr(self, name)(x))
        if first == len(LAYERS):
            return [x for _ in scales]
        layer = getattr(self, LAYERS[first])
        base, delta = layer(x), nn.functional.linear(x, updates[LAYERS[first]])
        out = []
        for lam in scales:
            h = torch.relu(base + lam * delta)
            for name in LAYERS[first + 1:]:
                layer = getattr(self, name)
                weight = layer.weight + lam * updates[name] if name in updates else layer.weight
                h = torch.relu(nn.functional.linear(h, weight, layer.bias))
            out.append(h)
        return out


class LoRALinear(nn.Module):
    """Frozen ``base`` Linear ``W [out, in]`` plus ``scaling * B @ A``.

    ``A [rank, in]`` starts Kaiming-uniform and ``B [out, rank]`` starts at zero, so the
    adapted layer starts equal to the base; ``scaling = alpha / rank`` (standard LoRA).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scaling

    def delta(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` ``[out, in]``."""
        return self.scaling * self.lora_B @ self.lora_A


def attach_lora(backbone: Backbone, rank: int, alpha: float, layers=LAYERS) -> dict[str, LoRALinear]:
    """Replace the named backbone Linears by LoRALinears around them (in place); returns them by name."""
    wrapped = {}
    for name in layers:
        wrapped[name] = LoRALinear(getattr(backbone, name), rank, alpha)
        setattr(backbone, name, wrapped[name])
    return wrapped


def detach_lora(backbone: Backbone) -> None:
    """Put the plain base Linears back (undoes ``attach_lora``)."""
    for name in LAYERS:
        module = getattr(backbone, name)
        if isinstance(module, LoRALinear):
            setattr(backbone, name, module.base)
