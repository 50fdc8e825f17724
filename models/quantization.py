"""Blockwise quantization of frozen weights (QLoRA's base): NF4 with double quantization, and int8.

NF4 (Dettmers et al., 2023): each block of `block_size` consecutive weights (of the
flattened kernel) is scaled by its absolute maximum and each value replaced by the
nearest of 16 levels, the quantiles of a standard normal normalised to [-1, 1] with an
exact zero (`nf4_levels`). Two 4-bit codes share a byte. Double quantization: the
block maxima (one f32 per block) are themselves stored as int8, centred on the middle
of their range and scaled per group of 256 blocks, so the overhead is 8/64 + 32/(64 * 256) bits per
weight: about 4.13 bits (0.516 bytes) per weight in all.

int8: symmetric blockwise absmax int8 with an f32 maximum per block (8.5 bits).

The stored parts of a kernel are flat 1-D arrays (a kernel of N weights, padded to a
whole number of blocks): `codes`, `absmax` and, for NF4, `absmax_scale` and
`absmax_offset`. `dequantize` restores the kernel's shape in f32.
"""

import math
import statistics
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

DOUBLE_QUANT_GROUP = 256
KINDS = ('nf4', 'int8')


def nf4_levels() -> np.ndarray:
  """The 16 NF4 levels, built as the QLoRA paper (and bitsandbytes) does: 8 positive and
  7 negative quantiles of N(0, 1) from offset 0.9677 towards 0.5, plus an exact 0,
  normalised by the largest."""
  offset = 0.9677083
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(offset + (0.5 - offset) * i / 8) for i in range(8)]
  neg = [-ppf(offset + (0.5 - offset) * i / 7) for i in range(7)]
  levels = np.sort(np.asarray(pos + [0.0] + neg, np.float64))
  return (levels / levels.max()).astype(np.float32)


NF4 = nf4_levels()


def _blocks(w: jax.Array, block_size: int) -> Tuple[jax.Array, int]:
  flat = jnp.ravel(w).astype(jnp.float32)
  n = flat.shape[0]
  pad = -n % block_size
  return jnp.pad(flat, (0, pad)).reshape(-1, block_size), n


def stored_shapes(num_weights: int, kind: str, block_size: int) -> Dict[str, Tuple[tuple, str]]:
  """name -> (shape, dtype) of the stored parts of a kernel of `num_weights` weights."""
  blocks = -(-num_weights // block_size)
  if kind == 'nf4':
    padded = blocks * block_size
    return {'codes': ((padded // 2,), 'uint8'), 'absmax': ((blocks,), 'int8'),
            'absmax_scale': ((-(-blocks // DOUBLE_QUANT_GROUP),), 'float32'),
            'absmax_offset': ((), 'float32')}
  return {'codes': ((blocks * block_size,), 'int8'), 'absmax': ((blocks,), 'float32')}


def quantize(w: jax.Array, kind: str, block_size: int = 64) -> Dict[str, jax.Array]:
  """The stored parts of kernel `w` (any shape)."""
  blocks, _ = _blocks(w, block_size)  # [num_blocks, block]
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [num_blocks]
  safe = jnp.where(absmax > 0, absmax, 1.0)[:, None]
  if kind == 'int8':
    codes = jnp.clip(jnp.round(blocks / safe * 127), -127, 127).astype(jnp.int8)
    return {'codes': jnp.ravel(codes), 'absmax': absmax}
  if kind != 'nf4':
    raise ValueError(f'unknown quantization {kind!r}: use one of {", ".join(KINDS)}')
  normed = blocks / safe  # in [-1, 1]
  # The nearest level: the number of midpoints between levels below the value.
  midpoints = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
  idx = jnp.searchsorted(midpoints, normed, side='left').astype(jnp.uint8)
  idx = jnp.ravel(idx)
  codes = (idx[0::2] << 4) | idx[1::2]  # two 4-bit codes per byte, the first in the high half
  # Double quantization of the block maxima: int8 around the middle of their range, a
  # scale per group. (The middle, not the mean as in bitsandbytes: max and min are exact in
  # any order, so the stored parts are the same bits on any mesh or under any compilation,
  # which the digest of a QLoRA run's frozen base relies on; it also minimises the largest
  # centred value that sets the scale.)
  offset = (jnp.max(absmax) + jnp.min(absmax)) / 2
  centred = absmax - offset
  groups = -(-absmax.shape[0] // DOUBLE_QUANT_GROUP)
  padded = jnp.pad(centred, (0, groups * DOUBLE_QUANT_GROUP - absmax.shape[0]))
  scale = jnp.max(jnp.abs(padded.reshape(groups, DOUBLE_QUANT_GROUP)), axis=1) / 127
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.round(padded.reshape(groups, -1) / safe_scale[:, None])
  q = jnp.clip(q, -127, 127).astype(jnp.int8).reshape(-1)[:absmax.shape[0]]
  return {'codes': codes.astype(jnp.uint8), 'absmax': q, 'absmax_scale': scale,
          'absmax_offset': offset}


def block_maxima(stored: Dict[str, jax.Array]) -> jax.Array:
  """The (dequantized) absolute maximum of every block [num_blocks] f32."""
  if 'absmax_scale' not in stored:
    return stored['absmax'].astype(jnp.float32)
  n = stored['absmax'].shape[-1]
  scale = jnp.repeat(stored['absmax_scale'], DOUBLE_QUANT_GROUP, axis=-1)[..., :n]
  return stored['absmax'].astype(jnp.float32) * scale + stored['absmax_offset']


def dequantize(stored: Dict[str, jax.Array], shape: Tuple[int, ...]) -> jax.Array:
  """The f32 kernel of `shape` that `stored` (from `quantize`) holds."""
  absmax = block_maxima(stored)
  num_blocks = absmax.shape[0]
  n = math.prod(shape)
  if 'absmax_scale' in stored:
    codes = stored['codes']
    idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1).astype(jnp.int32)
    values = jnp.take(jnp.asarray(NF4), idx)
  else:
    values = stored['codes'].astype(jnp.float32) / 127
  w = values.reshape(num_blocks, -1) * absmax[:, None]
  return jnp.ravel(w)[:n].reshape(shape)


def dequantize_rows(stored: Dict[str, jax.Array], shape: Tuple[int, int], ids: jax.Array,
                    block: int) -> jax.Array:
  """`jnp.take(dequantize(stored, shape), ids, axis=0)` [*ids.shape, shape[1]] f32, decoding
  only the gathered rows when each row is a whole number of blocks (an embedding lookup)."""
  rows, dim = shape
  if dim % block:
    return jnp.take(dequantize(stored, shape), ids, axis=0)
  absmax = block_maxima(stored)[:rows * dim // block].reshape(rows, dim // block)
  absmax = jnp.take(absmax, ids, axis=0)[..., None]  # [*ids, blocks per row, 1]
  if 'absmax_scale' in stored:
    codes = jnp.take(stored['codes'][:rows * dim // 2].reshape(rows, dim // 2), ids, axis=0)
    idx = jnp.stack([codes >> 4, codes & 15], axis=-1).astype(jnp.int32)
    values = jnp.take(jnp.asarray(NF4), idx)
  else:
    codes = jnp.take(stored['codes'][:rows * dim].reshape(rows, dim), ids, axis=0)
    values = codes.astype(jnp.float32) / 127
  values = values.reshape(ids.shape + (dim // block, block))
  return (values * absmax).reshape(ids.shape + (dim,))


def quantize_stacked(w: jax.Array, lead: int, kind: str, block_size: int
                     ) -> Dict[str, jax.Array]:
  """`quantize` of each matrix of `w` whose first `lead` dims stack matrices (scanned
  layers, experts): parts of shape w.shape[:lead] + the one matrix's part shape."""
  parts = jax.vmap(lambda m: quantize(m, kind, block_size))(
      w.reshape((-1,) + w.shape[lead:]))
  return {k: v.reshape(w.shape[:lead] + v.shape[1:]) for k, v in parts.items()}


def dequantize_stacked(stored: Dict[str, jax.Array], shape: Tuple[int, ...],
                       lead: int) -> jax.Array:
  """Inverse of `quantize_stacked`: the f32 array of `shape`."""
  flat = {k: v.reshape((-1,) + v.shape[lead:]) for k, v in stored.items()}
  w = jax.vmap(lambda p: dequantize(p, tuple(shape[lead:])))(flat)
  return w.reshape(shape)


def stored_bytes(stored: Dict[str, jax.Array]) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(stored)))
