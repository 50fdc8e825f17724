"""Flash attention for GPUs: Pallas kernels lowered through Triton.

Forward (FlashAttention-2 online softmax) and a two-kernel backward: one
kernel per K/V block accumulates dK and dV over every query block of every
query head in its group (GQA without repeating K/V, and without atomics), one
kernel per query block accumulates dQ and the T5 bias-table gradient.

Arrays arrive from `ops.py` already padded to whole blocks and to a
power-of-2 head_dim: q [batch, q_len, heads, head_dim], k/v [batch, kv_len,
kv_heads, head_dim]. Logits are kept in base 2 (scaled by log2(e)) so the
kernels use exp2; the saved log-sum-exp is in the same units.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import backend as backend_lib
from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention.tiles import Aux, Spec


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels (powers of 2, at least 16)."""
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 32
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 32
  num_warps: Optional[int] = None  # None: 4 for head_dim <= 64, else 8
  num_stages: int = 2

  def __post_init__(self):
    backend_lib.check_tiles(self, tiles.BLOCK_FIELDS, 'gpu')

  @classmethod
  def default(cls, head_dim: int) -> 'BlockSizes':
    # FlashAttention-2's Triton tuning: larger key tiles when head_dim is small.
    if head_dim <= 64:
      return cls(block_q=128, block_k=128, num_warps=4)
    return cls(block_q=128, block_k=64, num_warps=8)

  def clipped(self, q_len: int, kv_len: int) -> 'BlockSizes':
    """Blocks no larger than the (power-of-2 rounded) lengths."""
    lq = max(16, backend_lib.next_power_of_2(q_len))
    lk = max(16, backend_lib.next_power_of_2(kv_len))
    return dataclasses.replace(
        self, block_q=min(self.block_q, lq), block_k=min(self.block_k, lk),
        block_q_dkv=min(self.block_q_dkv, lq), block_k_dkv=min(self.block_k_dkv, lk),
        block_q_dq=min(self.block_q_dq, lq), block_k_dq=min(self.block_k_dq, lk))

  @property
  def q_multiple(self) -> int:
    return max(self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_multiple(self) -> int:
    return max(self.block_k, self.block_k_dkv, self.block_k_dq)


def head_dim_multiple(head_dim: int) -> int:
  """head_dim is zero-padded to this (Triton tiles are powers of 2)."""
  return max(16, backend_lib.next_power_of_2(head_dim))


def _dot(a, b, precision):
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype):
  # f32 inputs get exact f32 products (not TF32), so f32 matches the reference.
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


class _Refs:
  """The optional per-token refs of one kernel, by name."""

  NAMES = ('q_pos', 'kv_pos', 'q_seg', 'kv_seg', 'q_pre', 'kv_pre', 'slopes', 'table')

  def __init__(self, refs):
    for name, ref in zip(self.NAMES, refs):
      setattr(self, name, ref)


def _aux_arrays(spec: Spec, aux: Aux):
  """The aux inputs in _Refs order; absent ones are None (no ref, no spec)."""
  slopes = aux.alibi_slopes[:, None] if spec.has_alibi else None  # [heads, 1]
  return (aux.q_positions, aux.kv_positions,
          aux.q_segment_ids if spec.has_segments else None,
          aux.kv_segment_ids if spec.has_segments else None,
          aux.q_prefix if spec.has_prefix else None,
          aux.kv_prefix if spec.has_prefix else None,
          slopes, aux.rel_table if spec.has_t5 else None)


def _aux_specs(spec: Spec, q_len, kv_len, q_index, kv_index, head_index, q_block=None):
  """BlockSpecs for _aux_arrays: per-batch rows (a q block, or whole rows)."""
  qb = q_len if q_block is None else q_block
  q_spec = pl.BlockSpec((None, qb), q_index)
  kv_spec = pl.BlockSpec((None, kv_len), kv_index)
  return [q_spec, kv_spec,
          q_spec if spec.has_segments else None, kv_spec if spec.has_segments else None,
          q_spec if spec.has_prefix else None, kv_spec if spec.has_prefix else None,
          pl.BlockSpec((1, 1), head_index) if spec.has_alibi else None,
          pl.BlockSpec((1, spec.num_buckets), head_index) if spec.has_t5 else None]


def _by_class(spec: Spec, cls, compute, carry):
  """Runs one tile by its block class: SKIP leaves the carry alone, FULL
  computes without a mask (most causal tiles), PARTIAL with it."""
  if not spec.masked:
    return compute(carry, False)
  return lax.switch(cls, [lambda c: c, lambda c: compute(c, False), lambda c: compute(c, True)],
                    carry)


def _scores(spec: Spec, r: _Refs, q, k, q_sl, kv_sl, head_in_ref, precision, masked=True):
  """Base-2 logits [block_q, block_k] and the mask (or None) of one tile.

  head_in_ref: index of this head inside the slopes/table refs (0 when the
  BlockSpec already selected the head; the head itself when it did not).
  """
  q_pos = r.q_pos[q_sl][:, None]
  kv_pos = r.kv_pos[kv_sl][None, :]
  s = _dot(q, k.T, precision) * (spec.scale * tiles.LOG2E)
  slope = r.slopes[head_in_ref, 0] if spec.has_alibi else None
  bias = tiles.tile_bias(spec, q_pos, kv_pos, slope=slope,
                         table_value=lambda b: r.table[head_in_ref, b])
  if bias is not None:
    s = s + bias * tiles.LOG2E
  mask = None
  if spec.masked and masked:
    mask = tiles.tile_mask(
        spec, q_pos, kv_pos,
        r.q_seg[q_sl][:, None] if spec.has_segments else None,
        r.kv_seg[kv_sl][None, :] if spec.has_segments else None,
        r.q_pre[q_sl][:, None] if spec.has_prefix else None,
        r.kv_pre[kv_sl][None, :] if spec.has_prefix else None)
  return s, mask, q_pos, kv_pos


# ---------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, cls_ref, lo_ref, hi_ref, *refs, spec: Spec,
                bs: BlockSizes):
  r = _Refs(refs[:8])
  o_ref, lse_ref = refs[8:]
  block_q, block_k = bs.block_q, bs.block_k
  head_dim = q_ref.shape[-1]
  precision = _precision(q_ref.dtype)
  q = q_ref[...]  # [block_q, head_dim]
  q_sl = slice(None)

  def body(j, carry):
    def compute(carry, masked):
      acc, m, l = carry
      kv_sl = pl.ds(j * block_k, block_k)
      k = k_ref[kv_sl, :]  # [block_k, head_dim]
      v = v_ref[kv_sl, :]
      s, mask, _, _ = _scores(spec, r, q, k, q_sl, kv_sl, 0, precision, masked)
      if mask is not None:
        s = jnp.where(mask, s, tiles.MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp2(s - m_new[:, None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a row with nothing allowed yet adds nothing
      alpha = jnp.exp2(m - m_new)
      l = alpha * l + jnp.sum(p, axis=-1)
      acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, precision)
      return acc, m_new, l

    return _by_class(spec, cls_ref[j], compute, carry)

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), tiles.MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(lo_ref[0], hi_ref[0], body, init)
  empty = l == 0.0  # no allowed key: output 0, and the backward pass sees p = 0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _classes(spec: Spec, aux: Aux, block_q: int, block_k: int):
  """Block classes [batch, nq, nk] and each q block's [lo, hi) key-block range."""
  batch, q_len = aux.q_positions.shape
  nq, nk = q_len // block_q, aux.kv_positions.shape[1] // block_k
  if spec.masked:
    cls = tiles.block_classes(spec, aux, block_q, block_k)
  else:
    cls = jnp.full((batch, nq, nk), tiles.FULL, jnp.int32)
  lo, hi = tiles.block_range(cls)
  return cls, lo[..., None], hi[..., None]  # lo/hi [batch, nq, 1]


def forward(q, k, v, aux: Aux, spec: Spec, bs: BlockSizes, interpret: bool = False):
  """Returns out [batch, q_len, heads, head_dim] and base-2 lse [batch, heads, q_len]."""
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  groups = spec.groups
  nq = q_len // bs.block_q
  cls, lo, hi = _classes(spec, aux, bs.block_q, bs.block_k)
  nk = cls.shape[-1]
  grid = (nq, batch, heads)
  in_specs = [
      pl.BlockSpec((None, bs.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
      pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
      pl.BlockSpec((None, None, nk), lambda i, b, h: (b, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0)),
  ] + _aux_specs(spec, q_len, kv_len, lambda i, b, h: (b, i), lambda i, b, h: (b, 0),
                 lambda i, b, h: (h, 0), q_block=bs.block_q)
  out_specs = [
      pl.BlockSpec((None, bs.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, None, bs.block_q), lambda i, b, h: (b, h, i)),
  ]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
  num_warps = bs.num_warps or (4 if head_dim <= 64 else 8)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, bs=bs),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=bs.num_stages),
      interpret=interpret, name='flash_attention_fwd',
  )(q, k, v, cls, lo, hi, *_aux_arrays(spec, aux))


# --------------------------------------------------------------- backward


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cls_ref, lo_ref, hi_ref,
                 *refs, spec: Spec, bs: BlockSizes):
  """One K/V block of one K/V head: dK, dV over its query heads and blocks."""
  r = _Refs(refs[:8])
  dk_ref, dv_ref = refs[8:]
  block_q = bs.block_q_dkv
  precision = _precision(k_ref.dtype)
  kv_head = pl.program_id(2)
  k = k_ref[...]  # [block_k, head_dim]
  v = v_ref[...]
  kv_sl = slice(None)

  def q_block(i, carry, g):
    def compute(carry, masked):
      dk, dv = carry
      h = kv_head * spec.groups + g
      q_sl = pl.ds(i * block_q, block_q)
      q = q_ref[q_sl, g, :]  # [block_q, head_dim]
      do = do_ref[q_sl, g, :]
      lse = lse_ref[g, q_sl]  # [block_q]
      delta = delta_ref[g, q_sl]
      s, mask, _, _ = _scores(spec, r, q, k, q_sl, kv_sl, h, precision, masked)
      p = jnp.exp2(s - lse[:, None])  # [block_q, block_k]
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv = dv + _dot(p.astype(do.dtype).T, do, precision)
      dp = _dot(do, v.T, precision)
      ds = p * (dp - delta[:, None])
      dk = dk + _dot(ds.astype(q.dtype).T, q, precision)
      return dk, dv

    return _by_class(spec, cls_ref[i], compute, carry)

  def group(g, carry):
    return lax.fori_loop(lo_ref[0], hi_ref[0], functools.partial(q_block, g=g), carry)

  shape = k.shape
  dk, dv = lax.fori_loop(0, spec.groups, group,
                         (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)))
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, cls_ref, lo_ref, hi_ref,
               *refs, spec: Spec, bs: BlockSizes):
  """One query block of one head: dQ and this block's T5 table gradient."""
  r = _Refs(refs[:8])
  dq_ref = refs[8]
  dtable_ref = refs[9] if spec.has_t5 else None
  block_k = bs.block_k_dq
  precision = _precision(q_ref.dtype)
  q = q_ref[...]  # [block_q, head_dim]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_sl = slice(None)

  def body(j, carry):
    def compute(carry, masked):
      dq, dtable = carry
      kv_sl = pl.ds(j * block_k, block_k)
      k = k_ref[kv_sl, :]
      v = v_ref[kv_sl, :]
      s, mask, q_pos, kv_pos = _scores(spec, r, q, k, q_sl, kv_sl, 0, precision, masked)
      p = jnp.exp2(s - lse[:, None])
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dp = _dot(do, v.T, precision)
      ds = p * (dp - delta[:, None])  # d loss / d (natural-log logits)
      dq = dq + _dot(ds.astype(k.dtype), k, precision)
      if spec.has_t5:
        dtable = dtable + tiles.t5_table_grad(spec, tiles.t5_buckets(spec, q_pos, kv_pos), ds)
      return dq, dtable

    return _by_class(spec, cls_ref[j], compute, carry)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((spec.num_buckets,), jnp.float32))
  dq, dtable = lax.fori_loop(lo_ref[0], hi_ref[0], body, init)
  dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)
  if dtable_ref is not None:
    dtable_ref[...] = dtable


def backward(q, k, v, aux: Aux, spec: Spec, bs: BlockSizes, out, lse, do,
             interpret: bool = False):
  """Returns dq, dk, dv and the T5 table gradient [heads, num_buckets] (or None)."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = spec.groups
  num_warps = bs.num_warps or (4 if head_dim <= 64 else 8)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=bs.num_stages)
  # delta = rowsum(dO * O): O(length) work, left to XLA.
  delta = jnp.einsum('bqhd,bqhd->bhq', do.astype(jnp.float32), out.astype(jnp.float32))
  aux_arrays = _aux_arrays(spec, aux)

  # dK, dV: grid over (key block, batch, K/V head); q/do/lse/delta of the whole group.
  bq, bk = bs.block_q_dkv, bs.block_k_dkv
  cls, _, _ = _classes(spec, aux, bq, bk)
  cls_t = jnp.swapaxes(cls, 1, 2)  # [batch, nk, nq]
  lo_t, hi_t = tiles.block_range(cls_t)
  nk, nq = cls_t.shape[1], cls_t.shape[2]
  q5 = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  do5 = do.reshape(batch, q_len, kv_heads, groups, head_dim)
  lse4 = lse.reshape(batch, kv_heads, groups, q_len)
  delta4 = delta.reshape(batch, kv_heads, groups, q_len)
  group_spec = pl.BlockSpec((None, q_len, None, groups, head_dim),
                            lambda j, b, g: (b, 0, g, 0, 0))
  row_spec = pl.BlockSpec((None, None, groups, q_len), lambda j, b, g: (b, g, 0, 0))
  kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, g: (b, j, g, 0))
  in_specs = [
      group_spec, kv_spec, kv_spec, group_spec, row_spec, row_spec,
      pl.BlockSpec((None, None, nq), lambda j, b, g: (b, j, 0)),
      pl.BlockSpec((None, None, 1), lambda j, b, g: (b, j, 0)),
      pl.BlockSpec((None, None, 1), lambda j, b, g: (b, j, 0)),
  ] + _aux_specs(spec, q_len, bk, lambda j, b, g: (b, 0), lambda j, b, g: (b, j),
                 lambda j, b, g: (0, 0))
  # The kernel indexes slopes/table by the absolute head: give it all heads.
  if spec.has_alibi:
    in_specs[-2] = pl.BlockSpec((heads, 1), lambda j, b, g: (0, 0))
  if spec.has_t5:
    in_specs[-1] = pl.BlockSpec((heads, spec.num_buckets), lambda j, b, g: (0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, spec=spec, bs=bs),
      grid=(nk, batch, kv_heads), in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name='flash_attention_dkdv',
  )(q5, k, v, do5, lse4, delta4, cls_t, lo_t[..., None], hi_t[..., None], *aux_arrays)

  # dQ (and the T5 table gradient): grid over (query block, batch, head).
  bq, bk = bs.block_q_dq, bs.block_k_dq
  cls, lo, hi = _classes(spec, aux, bq, bk)
  nq, nk = cls.shape[1], cls.shape[2]
  q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_full = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
  row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  in_specs = [
      q_spec, kv_full, kv_full, q_spec, row, row,
      pl.BlockSpec((None, None, nk), lambda i, b, h: (b, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0)),
  ] + _aux_specs(spec, q_len, kv_len, lambda i, b, h: (b, i), lambda i, b, h: (b, 0),
                 lambda i, b, h: (h, 0), q_block=bq)
  out_specs = [q_spec]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if spec.has_t5:
    out_specs.append(pl.BlockSpec((None, None, None, spec.num_buckets),
                                  lambda i, b, h: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, nq, spec.num_buckets), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, bs=bs),
      grid=(nq, batch, heads), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=params, interpret=interpret, name='flash_attention_dq',
  )(q, k, v, do, lse, delta, cls, lo, hi, *aux_arrays)
  dtable = outs[1].sum(axis=(0, 2)) if spec.has_t5 else None
  return outs[0], dk, dv, dtable
