"""Triton kernels of san_fast, installed as the subpackage ``san_fast.kernels``."""
