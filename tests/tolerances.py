"""Relative-error bounds ``||out - ref||_F / ||ref||_F``, one table for the whole suite.

fp64/fp32 inputs: the CPU path computes in float64 from the given values, so the only
error is the fast path's own rounding (fp64) or the rounding of the output factors (fp32).
bf16/fp16 inputs: the reference is computed from the same (rounded) input values in
float64, and the bound is that of storing the output factors in 8 or 11 mantissa bits.
"""
import torch

MERGE_RTOL = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

# single ops (Gram, projection, lift) against their float64 counterpart
OP_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
