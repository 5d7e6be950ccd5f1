"""The one place that picks a compute backend.

* ``triton``    : fused Triton kernels (CUDA devices; CPU only under TRITON_INTERPRET=1).
* ``torch``     : plain torch ops (any device; the default on CPU).
* ``reference`` : the float64 dense reference of ``ctm_kernels.reference`` (small inputs only).

``CTM_KERNELS_BACKEND`` forces one. An explicit request that cannot run raises; an
automatic fallback is logged once.
"""
from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("torch", "triton", "reference")
log = logging.getLogger("ctm_kernels")
_logged: set[str] = set()


def triton_available(device: torch.device) -> bool:
    """True when Triton kernels can run on ``device`` (CUDA, or CPU under the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


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
        if "no-triton" not in _logged:
            _logged.add("no-triton")
            log.warning("triton is not importable; using the torch backend on %s", device)
    return "torch"
