"""Mask, bias and block-skipping math shared by the GPU and TPU kernels.

Everything here is plain jnp on small per-tile vectors, so the same functions
run inside a Triton kernel, a Mosaic kernel and the interpreter. Per-tile
vectors come already shaped for broadcasting: query-side ones as [block_q, 1],
key-side ones as [1, block_k]. Masks, ALiBi and T5 buckets are computed from
positions here and never exist as [q_len, kv_len] arrays in memory.
"""

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import xla

MASK_VALUE = xla.MASK_VALUE
LOG2E = math.log2(math.e)

# Block classes: what a (query block, key block) pair needs.
SKIP = 0  # no allowed pair: never loaded, never computed
FULL = 1  # every pair allowed: no mask needed
PARTIAL = 2  # some pairs allowed: apply the mask

# Positions given to padding rows/columns (added to reach a block multiple).
# Padded keys sit "after everything", so causal blocks of pure padding skip.
PAD_KV_POSITION = 1 << 30
PAD_Q_POSITION = -1
PAD_Q_SEGMENT = -1  # padding never matches a real segment, nor padded keys
PAD_KV_SEGMENT = -2

# The tile sizes every backend's BlockSizes has: forward, dK/dV and dQ kernels.
BLOCK_FIELDS = ('block_q', 'block_k', 'block_q_dkv', 'block_k_dkv', 'block_q_dq', 'block_k_dq')


class Aux(NamedTuple):
  """Per-token integer facts and small position-bias parameters.

  q_positions [batch, q_len] / kv_positions [batch, kv_len]: int32, always set.
  q_segment_ids / kv_segment_ids: int32 or None (both or neither).
  q_prefix / kv_prefix: int32 0/1 prefix-LM flags or None (both or neither).
  alibi_slopes: [heads] f32 or None.
  rel_table: [heads, num_buckets] f32 T5 bias table or None.
  """
  q_positions: jax.Array
  kv_positions: jax.Array
  q_segment_ids: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None
  q_prefix: Optional[jax.Array] = None
  kv_prefix: Optional[jax.Array] = None
  alibi_slopes: Optional[jax.Array] = None
  rel_table: Optional[jax.Array] = None


class Spec(NamedTuple):
  """Static description of one attention problem (hashable)."""
  causal: bool
  scale: float
  groups: int  # query heads per K/V head
  has_segments: bool
  has_prefix: bool
  has_alibi: bool
  has_t5: bool
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True

  @property
  def masked(self) -> bool:
    return self.causal or self.has_segments

  @property
  def biased(self) -> bool:
    return self.has_alibi or self.has_t5


def tile_mask(spec: Spec, q_pos, kv_pos, q_seg=None, kv_seg=None, q_pre=None,
              kv_pre=None) -> Optional[jax.Array]:
  """[block_q, block_k] bool, True where attention is allowed; None if unmasked."""
  mask = None
  if spec.causal:
    mask = kv_pos <= q_pos
    if spec.has_prefix:
      mask = mask | ((q_pre != 0) & (kv_pre != 0))
  if spec.has_segments:
    same = q_seg == kv_seg
    mask = same if mask is None else mask & same
  return mask


def t5_buckets(spec: Spec, q_pos, kv_pos) -> jax.Array:
  """[block_q, block_k] int32 T5 buckets of kv_pos - q_pos."""
  return xla.relative_position_bucket(kv_pos - q_pos, spec.bidirectional,
                                            spec.num_buckets, spec.max_distance)


def tile_bias(spec: Spec, q_pos, kv_pos, slope=None,
              table_value: Optional[Callable[[int], jax.Array]] = None,
              buckets: Optional[jax.Array] = None) -> Optional[jax.Array]:
  """[block_q, block_k] f32 position bias (natural-log units), or None.

  slope: this head's ALiBi slope (a scalar). table_value(b): this head's T5
  table entry for bucket b (a scalar read, so the table never becomes a tile
  gather). buckets: precomputed t5_buckets, to share with the backward pass.
  """
  bias = None
  if spec.has_alibi:
    dist = jnp.abs(kv_pos - q_pos).astype(jnp.float32)
    bias = -slope * dist
  if spec.has_t5:
    if buckets is None:
      buckets = t5_buckets(spec, q_pos, kv_pos)
    t5 = jnp.zeros(buckets.shape, jnp.float32)
    for b in range(spec.num_buckets):
      t5 = jnp.where(buckets == b, table_value(b), t5)
    bias = t5 if bias is None else bias + t5
  return bias


def t5_table_grad(spec: Spec, buckets: jax.Array, ds: jax.Array) -> jax.Array:
  """[num_buckets] f32: the T5 table gradient of one tile (sum of ds per bucket)."""
  lanes = jnp.arange(spec.num_buckets, dtype=jnp.int32)
  out = jnp.zeros((spec.num_buckets,), jnp.float32)
  for b in range(spec.num_buckets):
    total = jnp.sum(jnp.where(buckets == b, ds, 0.0))
    out = jnp.where(lanes == b, total, out)
  return out


def block_classes(spec: Spec, aux: Aux, block_q: int, block_k: int) -> jax.Array:
  """[batch, q_len // block_q, kv_len // block_k] int32 of SKIP/FULL/PARTIAL.

  Built from per-block minima and maxima (O(length) work), so it is
  conservative: PARTIAL may hold no allowed pair, but SKIP and FULL are exact.
  """
  batch, q_len = aux.q_positions.shape
  kv_len = aux.kv_positions.shape[1]
  nq, nk = q_len // block_q, kv_len // block_k

  def blocks(x, n, size):
    return x.reshape(batch, n, size)

  any_ok = jnp.ones((batch, nq, nk), bool)
  all_ok = jnp.ones((batch, nq, nk), bool)
  if spec.causal:
    qp = blocks(aux.q_positions, nq, block_q)
    kp = blocks(aux.kv_positions, nk, block_k)
    q_max, q_min = qp.max(-1)[:, :, None], qp.min(-1)[:, :, None]
    k_max, k_min = kp.max(-1)[:, None, :], kp.min(-1)[:, None, :]
    c_any = k_min <= q_max
    c_all = k_max <= q_min
    if spec.has_prefix:
      qpre = blocks(aux.q_prefix, nq, block_q) != 0
      kpre = blocks(aux.kv_prefix, nk, block_k) != 0
      c_any = c_any | (qpre.any(-1)[:, :, None] & kpre.any(-1)[:, None, :])
      c_all = c_all | (qpre.all(-1)[:, :, None] & kpre.all(-1)[:, None, :])
    any_ok, all_ok = any_ok & c_any, all_ok & c_all
  if spec.has_segments:
    qs = blocks(aux.q_segment_ids, nq, block_q)
    ks = blocks(aux.kv_segment_ids, nk, block_k)
    qs_max, qs_min = qs.max(-1)[:, :, None], qs.min(-1)[:, :, None]
    ks_max, ks_min = ks.max(-1)[:, None, :], ks.min(-1)[:, None, :]
    any_ok = any_ok & (qs_min <= ks_max) & (ks_min <= qs_max)
    all_ok = all_ok & (qs_min == qs_max) & (ks_min == ks_max) & (qs_min == ks_min)
  return jnp.where(any_ok, jnp.where(all_ok, FULL, PARTIAL), SKIP).astype(jnp.int32)


def block_range(classes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last non-SKIP block along the last axis: int32 [...] each.

  Rows with nothing to do get (0, 0).
  """
  n = classes.shape[-1]
  live = classes != SKIP
  idx = jnp.arange(n, dtype=jnp.int32)
  lo = jnp.min(jnp.where(live, idx, n), axis=-1)
  hi = jnp.max(jnp.where(live, idx + 1, 0), axis=-1)
  lo = jnp.minimum(lo, hi)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def pad_to(x: Optional[jax.Array], axis: int, size: int, value) -> Optional[jax.Array]:
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=np.asarray(value, dtype=x.dtype))
