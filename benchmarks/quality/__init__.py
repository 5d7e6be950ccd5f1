"""Merge-quality benchmarks: synthetic adapter sets and a digits LoRA zoo (see README_SECTION.md)."""
