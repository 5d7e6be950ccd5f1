"""Test setup shared by all test files.

TRITON_INTERPRET must be in the environment before triton is first imported (triton reads
it when a kernel is decorated), so it is set here, at collection start, on machines
without CUDA: the ``interpret`` tests then run the Triton kernels on the CPU. On a CUDA
machine it is left alone so that the ``gpu`` tests compile the kernels for real (the
``interpret`` tests skip there). An explicit TRITON_INTERPRET in the environment wins.

Markers (registered in pyproject.toml): ``interpret``, ``gpu``, ``slow``.
"""
from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
