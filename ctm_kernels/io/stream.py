"""Lazy adapter tensors, memory-bounded module groups, streaming safetensors writes, atomic outputs.

An adapter is read in two steps. Opening it reads only the safetensors header (names,
shapes, dtypes) and the config, validates them, and describes every adapted module as a
:class:`ModuleSpec`. The factors themselves are read later, a group of same-shape modules
at a time (:func:`plan_groups`), so the memory held at once is one group's factors, not
the adapters'.

Factor convention (the engine's): ``A [r, n]`` and ``B [m, r]`` with update
``dW = scale * B @ A`` as a map from the module's ``n`` inputs to its ``m`` outputs.
Conv factors are flattened to ``A [r, in * prod(kernel)]`` and ``B [out, r]``.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch


class AdapterError(ValueError):
    """Bad adapter input. The message names the file (or adapter) and the key."""


# safetensors dtype names <-> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    _ST_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    _ST_DTYPES["F8_E5M2"] = torch.float8_e5m2
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def st_dtype(name: str) -> torch.dtype | None:
    """torch dtype of a safetensors dtype name (None when torch has no such dtype)."""
    return _ST_DTYPES.get(name)


# ---------------------------------------------------------------------------------------------
# tensor stores: where an adapter's tensors live


class TensorStore:
    """Names, shapes and dtypes of an adapter's tensors; the data is read on request."""

    label: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SafetensorsStore(TensorStore):
    """A ``.safetensors`` file. Opening reads the header only; :meth:`get` reads the named
    tensors through ``safe_open`` (memory-mapped: only the requested bytes are touched)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.label = str(path)
        self._error = SafetensorError
        if not self.path.is_file():
            raise AdapterError(f"{self.label}: no such file")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    self._shapes[k] = tuple(int(s) for s in sl.get_shape())
                    dt = st_dtype(sl.get_dtype())
                    if dt is None:
                        raise AdapterError(f"{self.label}: {k}: unsupported dtype {sl.get_dtype()}")
                    self._dtypes[k] = dt
        except self._error as e:
            raise AdapterError(f"{self.label}: not a valid safetensors file ({e})") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{self.label}: cannot read as safetensors ({e})") from None

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        except self._error as e:
            raise AdapterError(f"{self.label}: cannot read tensor data ({e})") from None
        return out


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


@dataclass
class Adapter:
    """An opened adapter: its modules (lazy) and what an output needs from its config.

    ``passthrough`` maps tensor keys to full tensors that PEFT stores next to the LoRA
    factors and that a merged adapter must carry unchanged (an embedding's base weights,
    saved by PEFT when the embedding is targeted)."""

    label: str
    format: str                   # "peft" | "kohya"
    store: TensorStore
    modules: dict[str, ModuleSpec]
    config: dict = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Flattened factors ``{name: (A [r, n], B [m, r])}`` of the named modules, checked finite."""
        specs = [self.modules[n] for n in names]
        raw = self.store.get([k for s in specs for k in (s.a_key, s.b_key)])
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
# module plan and memory-bounded groups


@dataclass
class ModuleEntry:
    """One module of the merge: which adapters adapt it (indices into the adapter list)."""

    name: str
    specs: list[tuple[int, ModuleSpec]]

    @property
    def first(self) -> ModuleSpec:
        return self.specs[0][1]


def _natural_key(name: str):
    # layers.2 before layers.10
    parts = name.replace("_", ".").split(".")
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def _describe(spec: ModuleSpec) -> str:
    """Kind and update shape ``[out, in(, *kernel)]`` of a module, for comparisons and messages."""
    return f"{spec.kind} [{', '.join(map(str, (spec.out_features, *spec.a_shape[1:])))}]"


def plan_modules(adapters: list[Adapter]) -> list[ModuleEntry]:
    """The union of the adapters' modules; a module missing from an adapter has no entry for
    it (it contributes nothing there). Raises when adapters disagree on a module's shape."""
    entries: dict[str, ModuleEntry] = {}
    for i, ad in enumerate(adapters):
        for name, spec in ad.modules.items():
            e = entries.get(name)
            if e is None:
                entries[name] = ModuleEntry(name, [(i, spec)])
                continue
            j, ref = e.specs[0]
            if _describe(spec) != _describe(ref):
                raise AdapterError(
                    f"{ad.label}: {spec.a_key}: module {name} is {_describe(spec)} here but "
                    f"{_describe(ref)} in {adapters[j].label} ({ref.a_key}); adapters of one base "
                    "model must agree")
            e.specs.append((i, spec))
    return [entries[k] for k in sorted(entries, key=_natural_key)]


def plan_groups(entries: list[ModuleEntry], max_bytes: int) -> list[list[ModuleEntry]]:
    """Split the modules into groups of the same shape whose factors (all adapters) take at
    most ``max_bytes`` (a single module larger than that is a group of its own)."""
    by_shape: dict[tuple, list[ModuleEntry]] = {}
    for e in entries:
        by_shape.setdefault(e.first.shape_key, []).append(e)
    groups = []
    for members in by_shape.values():
        cur, size = [], 0
        for e in members:
            b = sum(s.nbytes for _, s in e.specs)
            if cur and size + b > max_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += b
        groups.append(cur)
    return groups


def load_group(adapters: list[Adapter], group: list[ModuleEntry], dtype: torch.dtype | None
               ) -> list[list[tuple[int, torch.Tensor, torch.Tensor, float]]]:
    """Factors of one group: per module, ``(adapter index, A [r, n], B [m, r], scale)`` for the
    adapters that adapt it. Each adapter's file is opened once for the whole group."""
    wanted: dict[int, list[str]] = {}
    for e in group:
        for i, s in e.specs:
            wanted.setdefault(i, []).append(e.name)
    loaded = {i: adapters[i].load(names, dtype) for i, names in wanted.items()}
    out = []
    for e in group:
        out.append([(i, *loaded[i][e.name], s.scale) for i, s in e.specs])
    return out


# ---------------------------------------------------------------------------------------------
# streaming safetensors writer


class LazyTensor:
    """A tensor known by dtype and shape, read only when written (passthrough tensors)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], load: Callable[[], torch.Tensor]):
        self.dtype, self.shape, self._load = dtype, tuple(shape), load

    def load(self) -> torch.Tensor:
        return self._load()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | LazyTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format, one tensor in memory at a time.

    The header (names, dtypes, shapes, byte ranges) is computed from shapes alone, so
    :class:`LazyTensor` entries are read just before their bytes are written."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _TORCH_TO_ST:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = prod(t.shape) * t.dtype.itemsize
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)              # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors.items():
            data = t.load() if isinstance(t, LazyTensor) else t
            data = data.detach().to("cpu").contiguous()
            if tuple(data.shape) != tuple(t.shape) or data.dtype != t.dtype:
                raise ValueError(f"{name}: expected {t.dtype} {tuple(t.shape)}, "
                                 f"got {data.dtype} {tuple(data.shape)}")
            if data.numel():
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# atomic outputs


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise ValueError(f"{dest}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not dest.parent.is_dir():
        raise ValueError(f"{dest.parent}: no such directory for the output")


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success rename it to ``dest``.

    On any failure the temporary folder is removed and ``dest`` is untouched: there is
    never a half-written output. With ``overwrite``, an existing ``dest`` is replaced only
    after the new folder is complete."""
    dest = Path(dest)
    _check_destination(dest, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists() or dest.is_symlink():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``dest``; on success move it onto ``dest``."""
    dest = Path(dest)
    _check_destination(dest, overwrite)
    if dest.is_dir():
        raise ValueError(f"{dest}: is a directory, expected a file path")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# merged output


@dataclass
class MergedModule:
    """One merged module, factors in the stored layout of its kind: ``A [rank, n]`` and
    ``B [m, rank]`` (conv: ``A [rank, in, *kernel]``, ``B [out, rank, 1, ...]``), update
    ``B @ A`` at scaling 1 (written with ``lora_alpha = r``). ``info``: the engine's report
    for this module (``iterations``, ``converged``, and per contributing adapter, listed by
    index in ``adapters``: ``energy_kept`` and ``norms`` = ``||w_t s_t B_t A_t||_F``)."""

    name: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def update(self) -> torch.Tensor:
        """Dense update ``[m, n]`` (``n`` flattened for conv): for tests and small modules."""
        return self.B.reshape(self.B.shape[0], -1) @ self.A.reshape(self.A.shape[0], -1)
