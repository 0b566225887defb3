"""Helpers for tests and benchmarks: random 2:4 weights and the lane-level mma.sp emulator."""
from llmprune_kernels.testing.weights import random_24_weight

__all__ = ["random_24_weight"]
