"""Triton block-sparse attention kernels (forward and backward), imported as ``volumevlm_kernels``."""
