"""Pallas kernels (Triton for GPUs, Mosaic for TPUs), each package beside its XLA implementation.

`backend.py` picks the backend, compiled or interpreted, and the block sizes
for every package; `flash_attention/` and `moe_routing/` hold the kernels.
"""
