"""The one place that picks a compute backend.

* ``triton``    : fused Triton kernels (CUDA devices; CPU only under TRITON_INTERPRET=1).
* ``torch``     : plain torch ops (any device; the default on CPU).
* ``reference`` : the float64 dense reference of ``ctm_kernels.reference`` (small inputs only);
  the ops run their torch code under it.

``CTM_KERNELS_BACKEND`` forces one. An explicit request that cannot run raises; an
automatic fallback is logged once.

The optional compiled ops (``ctm_kernels._C``, built by setup.py from csrc/) are found
here too: :func:`compiled_op` says whether an op has a kernel for a device.
``CTM_KERNELS_NO_EXT=1`` makes the package ignore a built extension.
"""
from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("torch", "triton", "reference")
log = logging.getLogger("ctm_kernels")
_logged: set[str] = set()


def _log_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1, read at triton import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device) -> bool:
    """True when Triton kernels can run on ``device`` (CUDA, or CPU under the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def resolve(device, requested: str | None = None) -> str:
    """Backend for ``device``: ``requested`` or $CTM_KERNELS_BACKEND if given, else by device."""
    device = torch.device(device)
    explicit = requested or os.environ.get("CTM_KERNELS_BACKEND") or None
    if explicit is not None:
        if explicit not in BACKENDS:
            raise ValueError(f"unknown backend {explicit!r}; choose one of {', '.join(BACKENDS)}")
        if explicit == "triton" and not triton_available(device):
            raise ValueError(f"backend 'triton' cannot run on {device} (needs CUDA or TRITON_INTERPRET=1)")
        return explicit
    if device.type == "cuda":
        if triton_available(device):
            return "triton"
        _log_once("no-triton", logging.WARNING, "triton is not importable; using the torch backend on %s", device)
    return "torch"


_ext_state: dict[str, object] = {}


def extension():
    """The compiled ops module ``ctm_kernels._C``, or None when it is not built, was built
    against another torch, or ``CTM_KERNELS_NO_EXT=1``. Importing it registers
    ``torch.ops.ctm_kernels.*``."""
    if os.environ.get("CTM_KERNELS_NO_EXT") == "1":
        return None
    if "module" not in _ext_state:
        try:
            from . import _C
        except (ImportError, OSError) as exc:
            _C = None
            _log_once("no-ext", logging.INFO, "compiled ops not available (%s); using torch.linalg", exc)
        _ext_state["module"] = _C
    return _ext_state["module"]


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def compiled_op(name: str, device) -> bool:
    """True when ``torch.ops.ctm_kernels.<name>`` is loaded and has a kernel for ``device``
    (a CPU-only build has none for CUDA)."""
    key = _DISPATCH_KEYS.get(torch.device(device).type)
    if key is None or extension() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ctm_kernels::{name}", key)
