"""Causal self-attention in blocks, in plain jnp: what the XLA path runs for long causal inputs.

`xla.attention` materialises every [q_len, kv_len] logit and keeps the softmax
for the backward pass. For causal self-attention this module splits the queries
into blocks of `block` rows; block i attends only to keys [0, (i + 1) * block),
so the blocks above the diagonal, where every logit is masked, are never
computed (about half the logits at long lengths: (n + 1) / 2n of them for n
blocks). Its backward pass is written out (a custom VJP, as in flash
attention): the forward saves only the output and the per-row log-sum-exp, and
the backward recomputes each block's probabilities from them, so no
[length, length] array outlives the layer. Everything accumulates in f32.

The mask is `xla.attention_mask`'s (key position <= query position, equal
segment ids) and also key index <= query index: the two agree whenever positions
increase along each segment, as they do in every batch the data pipeline makes
(packed or not) and in a full forward. `eligible()` says when the XLA path uses
this (`models/attention.py`): causal self-attention of at least two blocks,
without prefix-LM flags, position biases, attention dropout or prefix-tuning
keys; anything else takes `xla.attention`. Equivalence with `xla.attention`
(values and gradients, packed and GQA) is tested in
tests/pallas_kernels/flash_attention/blockwise_test.py.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

BLOCK = 128  # query rows per block (measured on the 2-core CPU: docs/benchmarks.md)
MAX_BLOCKS = 8  # (DecoderConfig.attention_max_blocks: see block_for)


def block_for(length: int, block: int = BLOCK, max_blocks: int = MAX_BLOCKS) -> int:
  """The block size `attention` uses for `length` query rows: `block`, doubled while
  that leaves more than `max_blocks` blocks and the doubled block still divides the
  length (0 or a negative `max_blocks`: no limit). The blocks are unrolled, so their
  number sets the compile time, and past ~8 blocks splitting finer skips little more
  work ((n - 1) / 2n of the logits for n blocks: 44% at 8, 47% at 16). Measured on the
  20.5M comparison model (2-core CPU, train step at 2 x 2048): 8 blocks of 256 against
  16 of 128 compile in 6 s instead of 10 s at the same step time and 640 MB of
  temporaries instead of 637; at 1 x 4096, 8 blocks of 512 compile in 5.5 s instead
  of 18.7 s for 865 MB of temporaries instead of 786 (docs/efficiency.md)."""
  if block <= 0 or max_blocks <= 0:
    return block
  while length // block > max_blocks and length % (2 * block) == 0:
    block *= 2
  return block


def eligible(q_len: int, kv_len: int, *, causal: bool, block: int = BLOCK,
             has_prefix: bool = False, has_bias: bool = False, dropout: bool = False,
             has_prefix_kv: bool = False) -> bool:
  """Whether `attention` computes this case (else `xla.attention` does)."""
  return (causal and q_len == kv_len and block > 0 and q_len % block == 0
          and q_len >= 2 * block and not (has_prefix or has_bias or dropout or has_prefix_kv))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              q_segment_ids: Optional[jax.Array] = None,
              kv_segment_ids: Optional[jax.Array] = None,
              q_positions: Optional[jax.Array] = None,
              kv_positions: Optional[jax.Array] = None,
              scale: Optional[float] = None, block: int = BLOCK) -> jax.Array:
  """Causal self-attention; q [batch, len, heads, head_dim], k/v [batch, len, kv_heads, head_dim].

  Returns [batch, len, heads, head_dim] in q's dtype (see the module docstring
  for the mask).
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'heads={heads} is not divisible by kv_heads={kv_heads}')
  if not eligible(length, k.shape[1], causal=True, block=block):
    raise ValueError(f'blockwise attention needs self-attention over a multiple of {block} '
                     f'tokens (at least 2 blocks); got q {length}, kv {k.shape[1]}')
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  arange = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  qp = arange if q_positions is None else q_positions.astype(jnp.int32)
  kp = arange if kv_positions is None else kv_positions.astype(jnp.int32)
  qs = None if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
  ks = None if qs is None else (qs if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32))
  return _attention(q, k, v, qp, kp, qs, ks, scale, block)


def _mask(i: int, block: int, qp, kp, qs, ks):
  """[batch, 1, 1, block, end] allowed pairs of query block i (keys [0, end))."""
  end = (i + 1) * block
  q_pos = qp[:, i * block:end, None]
  k_pos = kp[:, None, :end]
  rows = jnp.arange(i * block, end, dtype=jnp.int32)[:, None]
  cols = jnp.arange(end, dtype=jnp.int32)[None, :]
  mask = (k_pos <= q_pos) & (cols <= rows)[None]
  if qs is not None:
    mask = mask & (qs[:, i * block:end, None] == ks[:, None, :end])
  return mask[:, None, None]


def _queries_heads_major(x, kv_heads: int):
  """[batch, len, heads, d] -> [batch, kv_heads, groups, len, d]."""
  batch, length, heads, head_dim = x.shape
  return x.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def _heads_major(q, k, v):
  """q [batch, len, heads, d] -> [batch, kv_heads, groups, len, d]; k, v [batch, len,
  kv_heads, d] -> [batch, kv_heads, len, d]. Transposed once per call, so each block's
  matmuls take row slices of these: transposing every block's slice of the keys instead
  cost ~12% of a train step of the 20.5M comparison model (docs/efficiency.md)."""
  return (_queries_heads_major(q, k.shape[2]), k.transpose(0, 2, 1, 3),
          v.transpose(0, 2, 1, 3))


def _from_heads_major(x, shape):
  """[batch, kv_heads, groups, len, d] -> [batch, len, heads, d] (`shape`)."""
  return x.transpose(0, 3, 1, 2, 4).reshape(shape)


def _logits(qh_blk, kh, i, block, scale):
  """[batch, kv_heads, groups, block, end] f32 scaled logits of query block i."""
  end = (i + 1) * block
  return jnp.einsum('bhgqd,bhkd->bhgqk', qh_blk, kh[:, :, :end],
                    preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, qp, kp, qs, ks, scale, block):
  length = q.shape[1]
  qh, kh, vh = _heads_major(q, k, v)
  outs, lses = [], []
  for i in range(length // block):
    start, end = i * block, (i + 1) * block
    s = _logits(qh[:, :, :, start:end], kh, i, block, scale)
    s = jnp.where(_mask(i, block, qp, kp, qs, ks), s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)  # finite: a query always sees itself
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum('bhgqk,bhkd->bhgqd', p.astype(v.dtype), vh[:, :, :end],
                   preferred_element_type=jnp.float32)
    outs.append(o / denom)
    lses.append((m + jnp.log(denom))[..., 0])
  out = _from_heads_major(jnp.concatenate(outs, axis=3), q.shape).astype(q.dtype)
  return out, jnp.concatenate(lses, axis=-1)  # lse [batch, kv_heads, groups, length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q, k, v, qp, kp, qs, ks, scale, block):
  return _forward(q, k, v, qp, kp, qs, ks, scale, block)[0]


def _attention_fwd(q, k, v, qp, kp, qs, ks, scale, block):
  out, lse = _forward(q, k, v, qp, kp, qs, ks, scale, block)
  return out, (q, k, v, qp, kp, qs, ks, out, lse)


def _attention_bwd(scale, block, res, d_out):
  q, k, v, qp, kp, qs, ks, out, lse = res
  length = q.shape[1]
  qh, kh, vh = _heads_major(q, k, v)
  kv_heads = k.shape[2]
  doh, outh = _queries_heads_major(d_out, kv_heads), _queries_heads_major(out, kv_heads)
  # delta = rowsum(dO * O) [batch, kv_heads, groups, length]
  delta = jnp.einsum('bhgqd,bhgqd->bhgq', doh.astype(jnp.float32), outh.astype(jnp.float32))
  dq_blocks = []
  dkh = jnp.zeros(kh.shape, jnp.float32)
  dvh = jnp.zeros(vh.shape, jnp.float32)
  for i in range(length // block):
    start, end = i * block, (i + 1) * block
    qh_blk, do_blk = qh[:, :, :, start:end], doh[:, :, :, start:end]
    s = _logits(qh_blk, kh, i, block, scale)
    s = jnp.where(_mask(i, block, qp, kp, qs, ks), s, -jnp.inf)
    p = jnp.exp(s - lse[..., start:end, None])
    dvh = dvh.at[:, :, :end].add(jnp.einsum('bhgqk,bhgqd->bhkd', p.astype(v.dtype), do_blk,
                                            preferred_element_type=jnp.float32))
    dp = jnp.einsum('bhgqd,bhkd->bhgqk', do_blk, vh[:, :, :end],
                    preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., start:end, None]) * scale
    dq_blocks.append(jnp.einsum('bhgqk,bhkd->bhgqd', ds.astype(k.dtype), kh[:, :, :end],
                                preferred_element_type=jnp.float32))
    dkh = dkh.at[:, :, :end].add(jnp.einsum('bhgqk,bhgqd->bhkd', ds.astype(q.dtype), qh_blk,
                                            preferred_element_type=jnp.float32))
  dq = _from_heads_major(jnp.concatenate(dq_blocks, axis=3), q.shape)
  zeros = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  return (dq.astype(q.dtype), dkh.transpose(0, 2, 1, 3).astype(k.dtype),
          dvh.transpose(0, 2, 1, 3).astype(v.dtype),
          zeros(qp), zeros(kp), zeros(qs), zeros(ks))


_attention.defvjp(_attention_fwd, _attention_bwd)
