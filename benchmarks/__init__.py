"""Benchmarks of ctm_kernels: speed, memory, scaling and merge quality."""
