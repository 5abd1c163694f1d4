"""Benchmarks: kernels, recall grid, capacity, decode memory and speed."""
