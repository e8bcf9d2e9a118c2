"""Kernels and autograd functions of the fast path: tensors and constants in, tensors out.
Installing them on a model is tasks/fast/patch.py's."""
