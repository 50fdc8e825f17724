"""Public flash attention: validation, padding, backend choice and the VJP.

`flash_attention` takes exactly the arguments of `xla.attention` (minus
dropout) plus `backend`, `block_sizes` and `interpret`, and returns the same
values within floating-point tolerance. On GPU it runs the Triton kernels of
`gpu.py`, on TPU the Mosaic kernels of `tpu.py`; on CPU it runs the GPU
kernels through the Pallas interpreter (slow: for tests and debugging; the
models use the XLA path on CPU by default).

A query row with no allowed key at all (for example a padding query whose
segment appears nowhere in the keys) returns zeros, as `xla.attention` does.
"""

import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib
from pallas_kernels.flash_attention import gpu
from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention import xla
from pallas_kernels.flash_attention.tiles import Aux, Spec


def _check_ids(name, x, batch, length):
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.shape != (batch, length):
    raise ValueError(f'{name} has shape {x.shape}; expected [batch, length] = '
                     f'{(batch, length)}')
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.int32)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{name} has dtype {x.dtype}; expected an integer dtype')
  return x.astype(jnp.int32)


def _check_pair(name, q_side, kv_side, batch, q_len, kv_len):
  """q_<name> and kv_<name>: both or neither; kv defaults to q for self-attention."""
  q_side = _check_ids(f'q_{name}', q_side, batch, q_len)
  kv_side = _check_ids(f'kv_{name}', kv_side, batch, kv_len)
  if kv_side is not None and q_side is None:
    raise ValueError(f'kv_{name} was given without q_{name}; pass both')
  if q_side is not None and kv_side is None:
    if q_len != kv_len:
      raise ValueError(f'q_{name} was given without kv_{name} and q_len != kv_len: '
                       f'pass kv_{name} too')
    kv_side = q_side
  return q_side, kv_side


def validate(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
             kv_positions=None, causal=False, q_prefix=None, kv_prefix=None,
             alibi_slopes=None, rel_bias=None, scale=None) -> tuple[Aux, Spec]:
  """Checks every argument and returns the normalised aux arrays and spec."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must be [batch, length, heads, head_dim]; got shape '
                       f'{getattr(x, "shape", None)}')
    backend_lib.check_float_array(name, x, '[batch, length, heads, head_dim]')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}')
  batch, q_len, heads, head_dim = q.shape
  if k.shape != v.shape:
    raise ValueError(f'k has shape {k.shape} but v has shape {v.shape}; they must match')
  if k.shape[0] != batch:
    raise ValueError(f'k has batch {k.shape[0]} but q has batch {batch}')
  if k.shape[3] != head_dim:
    raise ValueError(f'k has head_dim {k.shape[3]} but q has head_dim {head_dim}')
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'q has {heads} heads, not a multiple of the {kv_heads} K/V heads of k')
  if q_len == 0 or kv_len == 0:
    raise ValueError(f'q_len={q_len} and kv_len={kv_len} must be positive')

  q_seg, kv_seg = _check_pair('segment_ids', q_segment_ids, kv_segment_ids, batch, q_len,
                              kv_len)
  q_pos = _check_ids('q_positions', q_positions, batch, q_len)
  kv_pos = _check_ids('kv_positions', kv_positions, batch, kv_len)
  if q_pos is None:
    q_pos = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
  if kv_pos is None:
    kv_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
  q_pre = kv_pre = None
  if causal:  # the prefix only widens a causal mask (as in xla.attention)
    q_pre, kv_pre = _check_pair('prefix', q_prefix, kv_prefix, batch, q_len, kv_len)

  slopes = None
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes)
    if slopes.shape != (heads,):
      raise ValueError(f'alibi_slopes has shape {slopes.shape}; expected [heads] = ({heads},)')
    slopes = slopes.astype(jnp.float32)
  table = None
  num_buckets, max_distance, bidirectional = 32, 128, True
  if rel_bias is not None:
    if not isinstance(rel_bias, xla.RelativeBias):
      raise ValueError(f'rel_bias must be an xla.RelativeBias; got {type(rel_bias)}')
    num_buckets, max_distance = int(rel_bias.num_buckets), int(rel_bias.max_distance)
    bidirectional = bool(rel_bias.bidirectional)
    table = jnp.asarray(rel_bias.table)
    if table.shape != (heads, num_buckets):
      raise ValueError(f'rel_bias.table has shape {table.shape}; expected [heads, '
                       f'num_buckets] = {(heads, num_buckets)}')
    if not jnp.issubdtype(table.dtype, jnp.floating):
      raise ValueError(f'rel_bias.table has dtype {table.dtype}; expected a float dtype')
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  if not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale) and scale > 0):
    raise ValueError(f'scale={scale!r} must be a positive Python float (a static value)')

  spec = Spec(causal=bool(causal), scale=float(scale), groups=heads // kv_heads,
              has_segments=q_seg is not None, has_prefix=q_pre is not None,
              has_alibi=slopes is not None, has_t5=table is not None,
              num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
  aux = Aux(q_pos, kv_pos, q_seg, kv_seg, q_pre, kv_pre, slopes, table)
  return aux, spec


def _pad(q, k, v, aux: Aux, spec: Spec, q_multiple: int, kv_multiple: int,
         head_multiple: int):
  """Pads lengths to whole blocks (padding masked by segment ids) and head_dim."""
  batch, q_len = aux.q_positions.shape
  kv_len = aux.kv_positions.shape[1]
  lq = backend_lib.round_up(q_len, q_multiple)
  lk = backend_lib.round_up(kv_len, kv_multiple)
  dp = backend_lib.round_up(q.shape[-1], head_multiple)
  q = tiles.pad_to(tiles.pad_to(q, 1, lq, 0), 3, dp, 0)
  k = tiles.pad_to(tiles.pad_to(k, 1, lk, 0), 3, dp, 0)
  v = tiles.pad_to(tiles.pad_to(v, 1, lk, 0), 3, dp, 0)
  q_seg, kv_seg = aux.q_segment_ids, aux.kv_segment_ids
  if lk != kv_len or (lq != q_len and q_seg is not None):
    if q_seg is None:  # padded keys must be masked: segment 0 for every real token
      q_seg = jnp.zeros((batch, q_len), jnp.int32)
      kv_seg = jnp.zeros((batch, kv_len), jnp.int32)
      spec = spec._replace(has_segments=True)
    q_seg = tiles.pad_to(q_seg, 1, lq, tiles.PAD_Q_SEGMENT)
    kv_seg = tiles.pad_to(kv_seg, 1, lk, tiles.PAD_KV_SEGMENT)
  aux = aux._replace(
      q_positions=tiles.pad_to(aux.q_positions, 1, lq, tiles.PAD_Q_POSITION),
      kv_positions=tiles.pad_to(aux.kv_positions, 1, lk, tiles.PAD_KV_POSITION),
      q_segment_ids=q_seg, kv_segment_ids=kv_seg,
      q_prefix=tiles.pad_to(aux.q_prefix, 1, lq, 0),
      kv_prefix=tiles.pad_to(aux.kv_prefix, 1, lk, 0))
  return q, k, v, aux, spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, table, aux, spec, kernels):
  out, _ = kernels.module.forward(q, k, v, aux._replace(rel_table=table), spec,
                                  kernels.block_sizes, kernels.interpret)
  return out


def _flash_fwd(q, k, v, table, aux, spec, kernels):
  out, lse = kernels.module.forward(q, k, v, aux._replace(rel_table=table), spec,
                                    kernels.block_sizes, kernels.interpret)
  return out, (q, k, v, table, aux, out, lse)


def _flash_bwd(spec, kernels, res, do):
  q, k, v, table, aux, out, lse = res
  dq, dk, dv, dtable = kernels.module.backward(
      q, k, v, aux._replace(rel_table=table), spec, kernels.block_sizes, out, lse, do,
      kernels.interpret)
  if table is not None:
    dtable = dtable.astype(table.dtype)
  daux = jax.tree.map(lambda x: None, aux)
  return dq, dk, dv, dtable, daux


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    q_segment_ids: Optional[jax.Array] = None,
                    kv_segment_ids: Optional[jax.Array] = None,
                    q_positions: Optional[jax.Array] = None,
                    kv_positions: Optional[jax.Array] = None,
                    causal: bool = False,
                    q_prefix: Optional[jax.Array] = None,
                    kv_prefix: Optional[jax.Array] = None,
                    alibi_slopes: Optional[jax.Array] = None,
                    rel_bias: Optional[xla.RelativeBias] = None,
                    scale: Optional[float] = None,
                    backend: Optional[str] = None,
                    block_sizes: Optional[Union['gpu.BlockSizes', object]] = None,
                    interpret: Optional[bool] = None) -> jax.Array:
  """Memory-efficient exact attention (FlashAttention-2) as Pallas kernels.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0 (GQA/MQA
      index the shared K/V head inside the kernel).
    q_segment_ids, kv_segment_ids: [batch, q_len] / [batch, kv_len] packed
      sequence ids; attention only within equal ids.
    q_positions, kv_positions: [batch, len] int positions (default arange), for
      causality and position biases.
    causal: mask keys at later positions.
    q_prefix, kv_prefix: [batch, len] prefix-LM flags (causal only).
    alibi_slopes: [heads] ALiBi slopes (not differentiated).
    rel_bias: T5 relative-position bias; its table gets a gradient.
    scale: softmax scale, 1/sqrt(head_dim) by default.
    backend: 'gpu' (Triton) or 'tpu' (Mosaic); None picks the default device's.
    block_sizes: the backend's BlockSizes (`gpu.BlockSizes`, `tpu.BlockSizes`);
      None: its default for this head_dim.
    interpret: run in the Pallas interpreter; None: only when the default
      device cannot run the backend (CPU).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.

  Lengths need not divide the block sizes: inputs are padded to whole blocks
  and the padding is masked out.
  """
  aux, spec = validate(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       q_positions=q_positions, kv_positions=kv_positions, causal=causal,
                       q_prefix=q_prefix, kv_prefix=kv_prefix, alibi_slopes=alibi_slopes,
                       rel_bias=rel_bias, scale=scale)
  q_len, head_dim = q.shape[1], q.shape[3]
  kernels = backend_lib.select('pallas_kernels.flash_attention.{}', backend, interpret,
                               block_sizes, default=(head_dim,), clip=(q_len, k.shape[1]))
  bs = kernels.block_sizes
  qp, kp, vp, aux, spec = _pad(q, k, v, aux, spec, bs.q_multiple, bs.kv_multiple,
                               kernels.module.head_dim_multiple(head_dim))
  table = aux.rel_table
  out = _flash(qp, kp, vp, table, aux._replace(rel_table=None), spec, kernels)
  return out[:, :q_len, :, :head_dim]
