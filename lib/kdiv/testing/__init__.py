"""Utilities for kdiv's tests and benchmarks: :mod:`.plain`, every divergence written the usual way with autograd
(the memory and time baseline of ``bench/``, and a second, independent torch implementation for the tests)."""
