"""The adapter model: what an opened adapter is, before and after the merge.

An adapter is read in two steps. Opening it reads only its header (names, shapes, dtypes) and
config, validates them, and describes every adapted module as a :class:`ModuleSpec`. The
factors themselves are read later (:meth:`Adapter.load`), a group of same-shape modules at a
time (:mod:`ctm_kernels.pipeline`), so the memory held at once is one group's factors, not
the adapters'. Where the tensors live is a :class:`TensorStore` (a safetensors file,
:mod:`.safetensors_io`, or a state dict in memory).

Factor convention (the engine's): ``A [r, n]`` and ``B [m, r]`` with update
``dW = scale * B @ A`` as a map from the module's ``n`` inputs to its ``m`` outputs.
Conv factors are flattened to ``A [r, in * prod(kernel)]`` and ``B [out, r]``.
"""
from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Iterable, Mapping

import torch


class AdapterError(ValueError):
    """Bad adapter input. The message names the file (or adapter) and the key."""


FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# tensor stores: where an adapter's tensors live


class TensorStore(abc.ABC):
    """Names, shapes and dtypes of an adapter's tensors; the data is read on request."""

    label: str

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every tensor name."""

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` (no data read)."""

    @abc.abstractmethod
    def dtype(self, key: str) -> torch.dtype:
        """Dtype of tensor ``key`` (no data read)."""

    @abc.abstractmethod
    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, read now."""


class DictStore(TensorStore):
    """An in-memory state dict (the Python API's input)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str):
        self.label = label
        self._t = {}
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise AdapterError(f"{label}: {k}: not a tensor ({type(v).__name__})")
            self._t[k] = v
        self.metadata = {}

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: self._t[k].detach() for k in keys}


# ---------------------------------------------------------------------------------------------
# adapters and their modules


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module of one adapter, from the header (no tensor data).

    ``a_shape``/``b_shape`` are the stored shapes; ``rank``, ``out_features`` (m) and
    ``in_features`` (n, ``in * prod(kernel)`` for conv) are those of the flattened factors
    ``A [rank, n]``, ``B [m, rank]``. ``scale`` is the LoRA scaling (alpha/r or alpha/sqrt(r)).
    """

    name: str
    kind: str                     # "linear" | "embedding" | "conv"
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: torch.dtype
    rank: int
    out_features: int
    in_features: int
    alpha: float
    scale: float

    @property
    def shape_key(self) -> tuple:
        """Modules with equal keys are one batched problem (same m, n, kind, kernel)."""
        return (self.kind, self.out_features, self.in_features, self.a_shape[2:])

    @property
    def nbytes(self) -> int:
        return (prod(self.a_shape) + prod(self.b_shape)) * self.dtype.itemsize


class ReadStats:
    """Factor bytes read from the adapters' stores and the seconds spent in those reads."""

    def __init__(self):
        self.bytes = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes += nbytes
            self.seconds += seconds


@dataclass
class Adapter:
    """An opened adapter: its modules (lazy) and what an output needs from its config.

    ``passthrough`` maps tensor keys to full tensors that PEFT stores next to the LoRA
    factors and that a merged adapter must carry unchanged (an embedding's base weights,
    saved by PEFT when the embedding is targeted). ``origin``: for an adapter from the Hugging
    Face Hub, its id at the commit read (what a resolved config records). ``source``: the file or
folder it was read from (None when it is in memory)."""

    label: str
    format: str                   # "peft" | "kohya"
    store: TensorStore
    modules: dict[str, ModuleSpec]
    config: dict = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)
    origin: str | None = None     # a Hub input: ``org/name@commit``, the snapshot read
    source: Path | None = None    # the file (kohya) or folder (PEFT) read; None for one in memory

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None, stats: ReadStats | None = None
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Flattened factors ``{name: (A [r, n], B [m, r])}`` of the named modules, checked finite.
        ``stats`` (if given) counts the bytes and the seconds of the store's read call."""
        specs = [self.modules[n] for n in names]
        t0 = time.perf_counter()
        raw = self.store.get([k for s in specs for k in (s.a_key, s.b_key)])
        if stats is not None:
            stats.add(sum(t.numel() * t.element_size() for t in raw.values()), time.perf_counter() - t0)
        out = {}
        for s in specs:
            pair = []
            for key, shape in ((s.a_key, (s.rank, s.in_features)), (s.b_key, (s.out_features, s.rank))):
                t = raw.pop(key)
                if not bool(torch.isfinite(t).all()):
                    bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                    raise AdapterError(f"{self.label}: {key}: factor contains {bad}")
                t = t.reshape(shape)
                pair.append(t if dtype is None else t.to(dtype))
            out[s.name] = (pair[0], pair[1])
        return out


def factor_error(adapter: str, key: str, problem: str) -> AdapterError:
    return AdapterError(f"{adapter}: {key}: {problem}")


def check_factor_shapes(label: str, name: str, kind: str, a_key: str, b_key: str,
                        a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(rank, m, n)`` of a factor pair with stored shapes ``a_shape``, ``b_shape``.

    linear/embedding: ``A [r, n]``, ``B [m, r]``. conv: ``A [r, in, *kernel]``,
    ``B [out, r, 1, ...]`` (a 1x1 up-projection, as PEFT and kohya store it; anything else,
    a grouped conv for one, has no exact rank-r flattening and is refused)."""
    if kind == "conv":
        if len(a_shape) < 3 or len(b_shape) != len(a_shape) or any(d != 1 for d in b_shape[2:]):
            raise factor_error(label, b_key, f"conv LoRA factors {a_shape} / {b_shape} are not a "
                               "kernel down-projection followed by a 1x1 up-projection")
        r, n, m = a_shape[0], prod(a_shape[1:]), b_shape[0]
    else:
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise factor_error(label, a_key if len(a_shape) != 2 else b_key,
                               f"expected 2-d factors, got {a_shape} and {b_shape}")
        r, n, m = a_shape[0], a_shape[1], b_shape[0]
    if b_shape[1] != r:
        raise factor_error(label, b_key, f"shape {b_shape} does not match the rank {r} of {a_key} {a_shape}")
    if r == 0 or n == 0 or m == 0:
        raise factor_error(label, a_key, f"empty factor {a_shape} / {b_shape}")
    return r, m, n


# ---------------------------------------------------------------------------------------------
# merged output


@dataclass(frozen=True)
class ModuleInfo:
    """What the merge did at one module (:attr:`MergedModule.info`; ``dataclasses.asdict`` makes
    it plain data).

    ``adapters``: the indices, among the merge's adapters, of the ``k`` adapters that adapt the
    module (the others add nothing here); the three per-adapter tuples have one entry for each,
    in that order. With ``t = adapters[j]``, ``dW_t = w_t s_t B_t A_t`` its weighted update
    ``[m, n]`` and ``dW`` the merged one:

    * ``energy_kept[j]``: ``||U^T dW_t V||_F^2 / ||dW_t||_F^2``, the share of ``dW_t`` that lies in
      the merged subspaces ``U``, ``V`` (in [0, 1]);
    * ``share_after_rule[j]``: ``<dW_t, dW> / ||dW_t||_F^2``, how much of ``dW_t`` the merged
      update carries after the rule and the scale (1: at full strength);
    * ``norms[j]``: ``||dW_t||_F``.

    ``iterations``: the sweeps of the subspace search; ``stopped_by``: the test that ended it
    (``"energy"``, ``"flat"``, ``"subspace"`` or ``"max_iter"``); ``converged``: whether a stop
    test passed before ``max_iter``."""

    adapters: tuple[int, ...]
    iterations: int
    converged: bool
    stopped_by: str
    energy_kept: tuple[float, ...]
    share_after_rule: tuple[float, ...]
    norms: tuple[float, ...]


@dataclass
class MergedModule:
    """One merged module, factors in the stored layout of its kind: ``A [rank, n]`` and
    ``B [m, rank]`` (conv: ``A [rank, in, *kernel]``, ``B [out, rank, 1, ...]``), update
    ``B @ A`` at scaling 1 (written with ``lora_alpha = r``). ``info``: what the merge did
    there (:class:`ModuleInfo`; None only while the merge is still running)."""

    name: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    info: ModuleInfo | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def update(self) -> torch.Tensor:
        """Dense update ``[m, n]`` (``n`` flattened for conv): for tests and small modules."""
        return self.B.reshape(self.B.shape[0], -1) @ self.A.reshape(self.A.shape[0], -1)
