"""Helpers for tests and benchmarks: random 2:4 weights and the lane-level mma.sp emulator."""
