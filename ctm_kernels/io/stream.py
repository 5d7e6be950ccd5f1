"""Lazy adapter tensors, memory-bounded module groups, streaming safetensors writes, atomic outputs.

An adapter is read in two steps. Opening it reads only the safetensors header (names,
shapes, dtypes) and the config, validates them, and describes every adapted module as a
:class:`ModuleSpec`. The factors themselves are read later (:meth:`Adapter.load`), a group
of same-shape modules at a time (:mod:`ctm_kernels.pipeline`), so the memory held at once
is one group's factors, not the adapters'.

Factor convention (the engine's): ``A [r, n]`` and ``B [m, r]`` with update
``dW = scale * B @ A`` as a map from the module's ``n`` inputs to its ``m`` outputs.
Conv factors are flattened to ``A [r, in * prod(kernel)]`` and ``B [out, r]``.
"""
from __future__ import annotations

import abc
import hashlib

import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
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


class SafetensorsStore(TensorStore):
    """A ``.safetensors`` file. Opening reads the header only; :meth:`get` reads the named
    tensors' bytes with plain positioned reads into fresh tensors (no memory map, so the
    process holds only the tensors it asked for, and the reads release the GIL)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.label = str(path)
        if not self.path.is_file():
            raise AdapterError(f"{self.label}: no such file")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        try:
            # safe_open validates the header (offsets inside the file, no overlaps, dtypes)
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    self._shapes[k] = tuple(int(s) for s in sl.get_shape())
                    dt = st_dtype(sl.get_dtype())
                    if dt is None:
                        raise AdapterError(f"{self.label}: {k}: unsupported dtype {sl.get_dtype()}")
                    self._dtypes[k] = dt
            self._data_start, self._offsets = _read_offsets(self.path)
        except SafetensorError as e:
            raise AdapterError(f"{self.label}: not a valid safetensors file ({e})") from None
        except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(f"{self.label}: cannot read as safetensors ({e})") from None

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = list(keys)
        out = {}
        try:
            with open(self.path, "rb", buffering=0) as f:
                for k in sorted(keys, key=lambda k: self._offsets[k][0]):    # in file order
                    start, end = self._offsets[k]
                    buf = torch.empty(end - start, dtype=torch.uint8)
                    _read_exactly(f, self._data_start + start, buf, self.label, k)
                    out[k] = buf.view(self._dtypes[k]).reshape(self._shapes[k])
        except OSError as e:
            raise AdapterError(f"{self.label}: cannot read tensor data ({e})") from None
        return {k: out[k] for k in keys}


# a larger header is not one a safetensors writer made (the format's own readers cap it too)
_MAX_HEADER = 100 * 2**20


def read_header(path: Path) -> tuple[int, dict]:
    """The JSON header of a safetensors file, and where its data section starts. Raises
    ``OSError``, ``ValueError``, ``struct.error`` or ``UnicodeDecodeError`` for what is not one."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: a header of {n} bytes")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    return 8 + n, header


def header_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file ({} when it has none), or None when it is not one."""
    try:
        _, header = read_header(path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def _read_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Start of the data section and ``{key: (start, end)}`` byte ranges within it."""
    start, header = read_header(path)
    return start, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def _read_exactly(f, pos: int, buf: torch.Tensor, label: str, key: str) -> None:
    """Fill the uint8 tensor ``buf`` with the file's bytes from ``pos`` on."""
    view = memoryview(buf.numpy())
    f.seek(pos)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise AdapterError(f"{label}: {key}: the file ends inside the tensor's data")
        done += got


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
# streaming safetensors writer


class LazyTensor:
    """A tensor known by dtype and shape, read only when written (passthrough tensors)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], load: Callable[[], torch.Tensor]):
        self.dtype, self.shape, self._load = dtype, tuple(shape), load

    def load(self) -> torch.Tensor:
        return self._load()


class SafetensorsWriter:
    """A safetensors file written tensor by tensor, in any order.

    ``layout`` maps every name, in file order, to something with ``dtype`` and ``shape`` (a
    meta tensor, a :class:`LazyTensor`, the tensor itself). The header is computed from it
    and written first and the file is sized; :meth:`write` then puts each tensor's bytes at
    its offset as soon as the tensor exists, so a producer can hand over tensors as it makes
    them and drop them. The bytes on disk depend on ``layout`` and the tensors only, never
    on the order of the writes. :meth:`close` checks that every tensor was written."""

    def __init__(self, path: str | os.PathLike, layout: Mapping, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, t in layout.items():
            if t.dtype not in _TORCH_TO_ST:
                raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
            shape = tuple(int(d) for d in t.shape)
            nbytes = prod(shape) * t.dtype.itemsize
            header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (offset, t.dtype, shape)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)              # the format pads the header to 8 bytes
        self._data_start = 8 + len(blob)
        self._pending = set(self._slots)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _pwrite_all(self._fd, struct.pack("<Q", len(blob)) + blob, 0)
            os.ftruncate(self._fd, self._data_start + offset)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def pending(self) -> set[str]:
        """Names not written yet."""
        return set(self._pending)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise ValueError(f"{self.path}: {name}: not in the file's layout")
        offset, dtype, shape = self._slots[name]
        data = tensor.detach().to("cpu").contiguous()
        if tuple(data.shape) != shape or data.dtype != dtype:
            raise ValueError(f"{name}: expected {dtype} {shape}, got {data.dtype} {tuple(data.shape)}")
        if data.numel():
            _pwrite_all(self._fd, memoryview(data.reshape(-1).view(torch.uint8).numpy()), self._data_start + offset)
        self._pending.discard(name)

    def close(self) -> None:
        """Check that every tensor was written, flush to disk, close."""
        if self._fd < 0:
            return
        try:
            if self._pending:
                missing = sorted(self._pending)
                raise ValueError(f"{self.path}: {len(missing)} tensors never written (first: {missing[0]})")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close without the checks (the caller removes the file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | LazyTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format, one tensor in memory at a time.

    The header is computed from shapes alone, so :class:`LazyTensor` entries are read just
    before their bytes are written."""
    with SafetensorsWriter(path, tensors, metadata) as w:
        for name, t in tensors.items():
            w.write(name, t.load() if isinstance(t, LazyTensor) else t)


# ---------------------------------------------------------------------------------------------
# atomic outputs


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise ValueError(f"{dest}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not dest.parent.is_dir():
        raise ValueError(f"{dest.parent}: no such directory for the output")


# Temporary outputs are named ``.OUT.tmp-ctm<pid>.<start>.<host>-XXXXXXXX``: the process that
# owns one (its id, its start time since boot, a hash of the host name), so that a later run
# can tell one left by a killed process (SIGKILL, power loss) from one still being written.
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-ctm(?P<pid>\d+)\.(?P<start>\d+)\.(?P<host>[0-9a-f]{8})-[a-z0-9_]{8}$")


def _start_time(pid: int) -> int:
    """A process's start time (clock ticks since boot, from /proc), or 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_prefix(dest: Path) -> str:
    pid = os.getpid()
    return f".{dest.name}.tmp-ctm{pid}.{_start_time(pid)}.{_host()}-"


def _owner_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                   # exists, another user's
    return start == 0 or _start_time(pid) in (0, start)


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary outputs of ``dest`` (next to it, named as this module names them)
    whose process is gone on this host; returns what was removed. Anything else is left alone:
    other names, other hosts' temporaries, ones whose process still runs, folders holding a
    folder or a link."""
    dest = Path(dest)
    removed = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TMP.match(entry.name)
        if m is None or m["name"] != dest.name or m["host"] != host:
            continue
        if _owner_alive(int(m["pid"]), int(m["start"])):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir():
                children = list(entry.iterdir())
                if any(c.is_symlink() or not c.is_file() for c in children):
                    continue
                for c in children:
                    c.unlink()
                entry.rmdir()
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success rename it to ``dest``.

    On any failure the temporary folder is removed and ``dest`` is untouched: there is
    never a half-written output. With ``overwrite``, an existing ``dest`` is replaced only
    after the new folder is complete."""
    dest = Path(dest)
    _check_destination(dest, overwrite)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest), dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())          # mkdtemp makes it private (0700)
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
    remove_stale_temporaries(dest)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(dest), dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes it private (0600)
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
