"""Fast kernels (Triton launchers, wrappers of the C++/CUDA ops), one module per op."""
