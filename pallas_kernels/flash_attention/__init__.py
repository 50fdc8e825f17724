"""Attention: the XLA path the models use by default, and FlashAttention-2 as Pallas kernels.

xla.py    plain jnp attention (`AttentionKernel.XLA`), also the kernels' spec;
tiles.py  the per-tile mask, bias and block-skipping math of both backends;
gpu.py    the Triton kernels; tpu.py the Mosaic kernels;
ops.py    `flash_attention` (`AttentionKernel.FLASH`): validation, padding,
          backend choice and the custom VJP.
"""
