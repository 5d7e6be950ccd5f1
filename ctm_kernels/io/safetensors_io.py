"""safetensors files: the dtype table, the header (the package's one reader of it:
:func:`read_header`), a store that reads named tensors with positioned reads, and a writer that
puts each tensor at its offset as soon as it exists.

Opening a store parses its header twice: the safetensors library's reader validates it (offsets
inside the file, no holes or overlaps, sizes that match the shapes) but does not tell where each
tensor's bytes are, which the positioned reads need, so :func:`read_header` reads those. The
second parse costs little next to reading the factors, and the validation stays the format's own."""
from __future__ import annotations

import json
import os
import struct
from math import prod
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .adapter import AdapterError, TensorStore


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


def st_dtype(name: str) -> torch.dtype | None:
    """torch dtype of a safetensors dtype name (None when torch has no such dtype)."""
    return _ST_DTYPES.get(name)


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
            # safe_open validates the header (offsets inside the file, no overlaps, dtypes);
            # _read_offsets parses it again for the byte offsets safe_open does not expose
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


# ---------------------------------------------------------------------------------------------
# streaming writer


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
