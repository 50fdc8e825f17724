"""Attention in plain jnp: the XLA path the models use by default (AttentionKernel.XLA).

It is also the specification the kernels must match (`ops.flash_attention`
takes the same arguments and returns the same values). Shapes use the logical
vocabulary: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
head_dim]. Grouped-query attention is computed by grouping query heads over
their shared K/V head, never by repeating K/V in memory. Logits, softmax and
the weighted sum accumulate in f32.
"""

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity": a fully masked row (padding) stays finite.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class RelativeBias:
  """T5 relative-position bias: a small [heads, num_buckets] table plus the
  bucketing rule; the [q_len, kv_len] bias is computed from positions."""
  table: jax.Array  # [heads, num_buckets]
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucketing of `memory_position - query_position` (Raffel et al.).

  Half the buckets (per direction) hold exact small distances; the rest grow
  logarithmically up to `max_distance`, beyond which everything shares the
  last bucket.
  """
  n = -relative_position.astype(jnp.int32)
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Where n < max_exact the log branch is unused; clamp to avoid log(0).
  scaled = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
            math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = max_exact + scaled.astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes (Press et al., 2022), including non-power-of-2 heads."""
  def power_of_2(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(num_heads).is_integer():
    slopes = power_of_2(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, dtype=np.float32)


def attention_bias(q_positions: jax.Array, kv_positions: jax.Array, *,
                   alibi: Optional[jax.Array] = None,
                   rel_bias: Optional[RelativeBias] = None) -> Optional[jax.Array]:
  """Position bias [batch, heads, q_len, kv_len] (f32) or None."""
  bias = None
  rel = kv_positions[:, None, :] - q_positions[:, :, None]  # [batch, q_len, kv_len]
  if alibi is not None:
    bias = -alibi.astype(jnp.float32)[None, :, None, None] * jnp.abs(rel)[:, None].astype(jnp.float32)
  if rel_bias is not None:
    buckets = relative_position_bucket(rel, rel_bias.bidirectional,
                                       rel_bias.num_buckets, rel_bias.max_distance)
    # [heads, buckets] gathered -> [batch, heads, q_len, kv_len]
    t5 = jnp.take(rel_bias.table.astype(jnp.float32), buckets, axis=1)
    t5 = jnp.transpose(t5, (1, 0, 2, 3))
    bias = t5 if bias is None else bias + t5
  return bias


def attention_mask(q_len: int, kv_len: int, *, batch: int,
                   q_positions: Optional[jax.Array] = None,
                   kv_positions: Optional[jax.Array] = None,
                   q_segment_ids: Optional[jax.Array] = None,
                   kv_segment_ids: Optional[jax.Array] = None,
                   causal: bool = False,
                   q_prefix: Optional[jax.Array] = None,
                   kv_prefix: Optional[jax.Array] = None) -> Optional[jax.Array]:
  """Boolean mask [batch, 1, q_len, kv_len]: True where attention is allowed.

  causal: a query sees keys at positions <= its own. With `q_prefix`/`kv_prefix`
  (prefix-LM, seqio's `decoder_causal_attention`), tokens of the prefix also see
  each other bidirectionally. Segment ids (packing) restrict attention to the
  same segment.
  """
  mask = None
  if causal:
    qp = q_positions if q_positions is not None else jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    kp = kv_positions if kv_positions is not None else jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    mask = kp[:, None, :] <= qp[:, :, None]
    if q_prefix is not None:
      kvp = kv_prefix if kv_prefix is not None else q_prefix
      mask = mask | (q_prefix[:, :, None].astype(bool) & kvp[:, None, :].astype(bool))
  if q_segment_ids is not None:
    kv_seg = kv_segment_ids if kv_segment_ids is not None else q_segment_ids
    seg = q_segment_ids[:, :, None] == kv_seg[:, None, :]
    mask = seg if mask is None else mask & seg
  return None if mask is None else mask[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              q_segment_ids: Optional[jax.Array] = None,
              kv_segment_ids: Optional[jax.Array] = None,
              q_positions: Optional[jax.Array] = None,
              kv_positions: Optional[jax.Array] = None,
              causal: bool = False,
              q_prefix: Optional[jax.Array] = None,
              kv_prefix: Optional[jax.Array] = None,
              alibi_slopes: Optional[jax.Array] = None,
              rel_bias: Optional[RelativeBias] = None,
              scale: Optional[float] = None,
              dropout_rate: float = 0.0,
              dropout_rng: Optional[jax.Array] = None,
              prefix_k: Optional[jax.Array] = None,
              prefix_v: Optional[jax.Array] = None) -> jax.Array:
  """Reference attention.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0.
    q_segment_ids, kv_segment_ids: [batch, q_len] / [batch, kv_len] int ids of
      packed sequences; attention only within equal ids.
    q_positions, kv_positions: [batch, len] int positions (default arange);
      used for causality and position biases.
    causal: mask future keys.
    q_prefix, kv_prefix: [batch, len] prefix-LM flags (bidirectional prefix).
    alibi_slopes: [heads] ALiBi slopes.
    rel_bias: T5 relative-position bias.
    scale: softmax scale; 1/sqrt(head_dim) by default.
    dropout_rate, dropout_rng: dropout on the attention probabilities.
    prefix_k, prefix_v: [prefix_len, kv_heads, head_dim] keys and values every
      query also attends to, in the same softmax, with no mask or position bias
      (prefix tuning, Li & Liang 2021).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; zeros for a query that no
    key may attend to.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'heads={heads} is not divisible by kv_heads={kv_heads}')
  groups = heads // kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))

  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  # [batch, kv_heads, groups, q_len, kv_len]
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', qg, k,
                      preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(batch, heads, q_len, kv_len)
  bias = attention_bias(q_positions, kv_positions, alibi=alibi_slopes, rel_bias=rel_bias)
  if bias is not None:
    logits = logits + bias
  mask = attention_mask(q_len, kv_len, batch=batch, q_positions=q_positions,
                        kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids, causal=causal,
                        q_prefix=q_prefix, kv_prefix=kv_prefix)
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  if prefix_k is not None:  # the prefix's logits first, visible to every query
    prefix_logits = jnp.einsum('bqhgd,khd->bhgqk', qg, prefix_k.astype(q.dtype),
                               preferred_element_type=jnp.float32) * scale
    logits = jnp.concatenate([prefix_logits.reshape(batch, heads, q_len, -1), logits], -1)
    v = jnp.concatenate([jnp.broadcast_to(prefix_v.astype(v.dtype)[None],
                                          (batch,) + prefix_v.shape), v], axis=1)
    kv_len = v.shape[1]
    mask = None  # (every query may attend to the prefix)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # A query with no allowed key (padding against another segment) attends to
    # nothing: output 0, as the flash kernels do, rather than a uniform average.
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  probs = probs.reshape(batch, kv_heads, groups, q_len, kv_len).astype(v.dtype)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', probs, v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     q_positions: jax.Array, *,
                     alibi_slopes: Optional[jax.Array] = None,
                     rel_bias: Optional[RelativeBias] = None,
                     scale: Optional[float] = None,
                     prefix_k: Optional[jax.Array] = None,
                     prefix_v: Optional[jax.Array] = None) -> jax.Array:
  """Causal attention of a few new queries over a heads-major KV cache (decoding).

  `attention` with causal=True and kv_positions = the slot numbers, computed in
  the cache's own layout, so no step transposes or copies the cache.

  Args:
    q: [batch, q_len, heads, head_dim] (q_len is 1 in a decode step).
    k_cache, v_cache: [batch, kv_heads, slots, head_dim]; slot i holds position i.
    q_positions: [batch, q_len].
    alibi_slopes, rel_bias, scale, prefix_k, prefix_v: as for `attention`.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
  groups = heads // kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  # Queries as rows [batch, kv_heads, q_len * groups, head_dim]: with one query
  # (a decode step) every reshape here is free, and each dot is a plain
  # batched matmul over (batch, kv_heads) (a q_len axis of its own in the
  # einsums makes XLA's CPU backend much slower).
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
  qg = qg.reshape(batch, kv_heads, q_len * groups, head_dim)
  logits = jnp.einsum('bkmd,bksd->bkms', qg, k_cache,
                      preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(batch, kv_heads, q_len, groups, slots)
  kv_positions = jnp.broadcast_to(jnp.arange(slots, dtype=q_positions.dtype), (batch, slots))
  bias = attention_bias(q_positions, kv_positions, alibi=alibi_slopes, rel_bias=rel_bias)
  if bias is not None:  # [batch, heads, q_len, slots]
    logits = logits + bias.reshape(batch, kv_heads, groups, q_len, slots).transpose(0, 1, 3, 2, 4)
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]  # [batch, q_len, slots]
  logits = jnp.where(mask[:, None, :, None], logits, MASK_VALUE)
  if prefix_k is None:
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
    probs = probs.reshape(batch, kv_heads, q_len * groups, slots)
    out = jnp.einsum('bkms,bksd->bkmd', probs, v_cache, preferred_element_type=jnp.float32)
  else:  # one softmax over the prefix and the cache
    n = prefix_k.shape[0]
    prefix_logits = jnp.einsum('bkmd,nkd->bkmn', qg, prefix_k.astype(qg.dtype),
                               preferred_element_type=jnp.float32) * scale
    logits = jnp.concatenate([prefix_logits.reshape(batch, kv_heads, q_len, groups, n),
                              logits], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
    probs = probs.reshape(batch, kv_heads, q_len * groups, n + slots)
    out = (jnp.einsum('bkmn,nkd->bkmd', probs[..., :n], prefix_v.astype(v_cache.dtype),
                      preferred_element_type=jnp.float32) +
           jnp.einsum('bkms,bksd->bkmd', probs[..., n:], v_cache,
                      preferred_element_type=jnp.float32))
  out = out.reshape(batch, kv_heads, q_len, groups, head_dim).transpose(0, 2, 1, 3, 4)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
