"""Multi-head (MHA/MQA/GQA) attention and the one attention-kernel dispatch."""

import dataclasses
import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import struct

from models import config as cfg
from models import layers
from pallas_kernels.flash_attention import blockwise
from pallas_kernels.flash_attention import ops as flash_ops
from pallas_kernels.flash_attention import xla
from partitioning import axes as ax
from partitioning import partitioner

Array = jax.Array
_KV_AXES = (ax.BATCH, ax.LENGTH, ax.KV_HEADS, ax.HEAD_DIM)
_CACHE_AXES = (ax.BATCH, ax.KV_HEADS, ax.LENGTH, ax.HEAD_DIM)


@struct.dataclass
class Context:
  """Per-token facts attention needs about one sequence axis.

  positions: [batch, length] int positions (reset per packed segment).
  segment_ids: [batch, length] packed-sequence ids (0 = padding), or None.
  prefix: [batch, length] prefix-LM flags (True: bidirectional input token), or None.
  token_ids: [batch, length] input token ids (hash-routed experts read them), or None.
  decode: '' for a full forward; 'prefill' or 'step' while decoding against the
    `cache` collection (static). Both write this call's keys and values into the
    cache at slots = positions and attend over every cached slot; cross-attention
    projects the encoder output once, at 'prefill', and reads it back at 'step'.
  """
  positions: Array
  segment_ids: Optional[Array] = None
  prefix: Optional[Array] = None
  token_ids: Optional[Array] = None
  decode: str = struct.field(pytree_node=False, default='')


def dot_product_attention(kernel: cfg.AttentionKernel, q: Array, k: Array, v: Array, *,
                          q_ctx: Context, kv_ctx: Context, causal: bool,
                          alibi_slopes: Optional[Array] = None,
                          rel_bias: Optional[xla.RelativeBias] = None,
                          dropout_rate: float = 0.0,
                          dropout_rng: Optional[Array] = None,
                          scale: Optional[float] = None,
                          prefix: Optional[Tuple[Array, Array]] = None,
                          block_size: int = 0, max_blocks: int = 0) -> Array:
  """The single place an attention implementation is chosen.

  q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim].
  The XLA kernel runs causal self-attention in blocks of `block_size` query rows,
  made larger where that leaves more than `max_blocks` blocks (`blockwise.block_for`),
  where `blockwise.eligible` allows, else `xla.attention`.
  """
  masks = dict(q_segment_ids=q_ctx.segment_ids, kv_segment_ids=kv_ctx.segment_ids,
               q_positions=q_ctx.positions, kv_positions=kv_ctx.positions, causal=causal,
               q_prefix=q_ctx.prefix if causal else None,
               kv_prefix=kv_ctx.prefix if causal else None, scale=scale)
  match kernel:
    case cfg.AttentionKernel.XLA:
      block_size = blockwise.block_for(q.shape[1], block_size, max_blocks)
      if not q_ctx.decode and blockwise.eligible(
          q.shape[1], k.shape[1], causal=causal, block=block_size,
          has_prefix=masks['q_prefix'] is not None,
          has_bias=alibi_slopes is not None or rel_bias is not None,
          dropout=dropout_rate > 0.0 and dropout_rng is not None,
          has_prefix_kv=prefix is not None):
        return blockwise.attention(
            q, k, v, q_segment_ids=q_ctx.segment_ids, kv_segment_ids=kv_ctx.segment_ids,
            q_positions=q_ctx.positions, kv_positions=kv_ctx.positions, scale=scale,
            block=block_size)
      prefix_k, prefix_v = prefix if prefix is not None else (None, None)
      return xla.attention(q, k, v, **masks, alibi_slopes=alibi_slopes,
                           rel_bias=rel_bias, dropout_rate=dropout_rate,
                           dropout_rng=dropout_rng, prefix_k=prefix_k, prefix_v=prefix_v)
    case cfg.AttentionKernel.FLASH:
      if prefix is not None:
        raise ValueError("attention_kernel=flash has no prefix-tuning path: use 'xla'")
      if dropout_rng is not None and dropout_rate > 0.0:
        raise ValueError('attention_kernel=flash does not apply attention dropout: '
                         'set dropout_rate = 0.0 or attention_kernel = "xla"')
      return _sharded_flash_attention(q, k, v, masks, alibi_slopes, rel_bias)
  raise NotImplementedError(kernel)


def _sharded_flash_attention(q, k, v, masks, alibi_slopes, rel_bias):
  """Flash attention per device under the current mesh.

  A pallas_call has no partitioning rule of its own, so it runs inside
  shard_map over the batch and head shards the rules give q, k and v. Heads
  stay sharded only where both heads and K/V heads divide (or K/V is a single
  shared head), so each device's query heads map onto its own K/V heads.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return flash_ops.flash_attention(q, k, v, **masks, alibi_slopes=alibi_slopes,
                                     rel_bias=rel_bias)
  batch, _, heads, _ = q.shape
  kv_heads = k.shape[2]
  batch_axes, _, head_axes, _ = partitioner.mesh_axes_in_context(
      (ax.BATCH, ax.LENGTH, ax.HEADS, ax.HEAD_DIM), q.shape)
  kv_axes = partitioner.mesh_axes_in_context(
      (ax.BATCH, ax.LENGTH, ax.KV_HEADS, ax.HEAD_DIM), k.shape)[2]
  if kv_heads == 1:
    kv_axes = None
  elif kv_axes != head_axes:
    head_axes = kv_axes = None
  P = jax.sharding.PartitionSpec
  qs, kvs, rows = P(batch_axes, None, head_axes, None), P(batch_axes, None, kv_axes, None), \
      P(batch_axes, None)
  args = dict(masks)
  causal = args.pop('causal')
  scale = args.pop('scale')
  ids = {name: x for name, x in args.items() if x is not None}
  table = None if rel_bias is None else rel_bias.table

  def local(q, k, v, ids, slopes, table):
    rb = None if table is None else dataclasses.replace(rel_bias, table=table)
    return flash_ops.flash_attention(q, k, v, **ids, causal=causal, alibi_slopes=slopes,
                                     rel_bias=rb, scale=scale)

  return jax.shard_map(
      local, in_specs=(qs, kvs, kvs, {name: rows for name in ids},
                       None if alibi_slopes is None else P(head_axes),
                       None if table is None else P(head_axes, None)),
      out_specs=qs, check_vma=False)(q, k, v, ids, alibi_slopes, table)


class MultiHeadAttention(nn.Module):
  """Attention with `num_kv_heads` K/V heads shared by groups of query heads.

  Parameters: query [embed, heads, head_dim], key/value [embed, kv_heads,
  head_dim], out [heads, head_dim, embed].
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  position_encoding: cfg.PositionEncoding = cfg.PositionEncoding.NONE
  rope: Optional[layers.Rope] = None  # with position_encoding ROPE
  query_scale: Optional[float] = None  # None: 1/sqrt(head_dim)
  kernel: cfg.AttentionKernel = cfg.AttentionKernel.XLA
  block_size: int = 0  # the XLA kernel's causal blocks (DecoderConfig.attention_block_size)
  max_blocks: int = 0  # ... at most this many, made larger (DecoderConfig.attention_max_blocks)
  use_bias: bool = False
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  value_init_scale: float = 1.0  # DeepNorm beta on value and out
  cross_attention: bool = False  # keys/values from another sequence (the encoder)
  peft: Optional[cfg.PeftConfig] = None  # LoRA / IA3 on the projections it targets

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, *, q_ctx: Context,
               kv_ctx: Context, causal: bool,
               rel_bias: Optional[xla.RelativeBias] = None) -> Array:
    """inputs_q [batch, q_len, embed], inputs_kv [batch, kv_len, embed] -> [batch, q_len, embed]."""
    emb = inputs_q.shape[-1]
    dense = functools.partial(layers.DenseGeneral, use_bias=self.use_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype, peft=self.peft,
                              deterministic=self.deterministic)
    q = dense((self.num_heads, self.head_dim), (ax.EMBED, ax.HEADS, ax.HEAD_DIM),
              name='query')(inputs_q)  # [batch, q_len, heads, head_dim]
    q = nn.with_logical_constraint(q, (ax.BATCH, ax.LENGTH, ax.HEADS, ax.HEAD_DIM))
    q = checkpoint_name(q, 'query_proj')  # (what named remat policies save: transformer.py)
    if self.cross_attention and q_ctx.decode == 'step':
      # The encoder output's keys and values were projected once, at prefill.
      k, v = self.get_variable('cache', 'cached_key'), self.get_variable('cache', 'cached_value')
    else:
      k = dense((self.num_kv_heads, self.head_dim), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM),
                name='key')(inputs_kv)  # [batch, kv_len, kv_heads, head_dim]
      v = dense((self.num_kv_heads, self.head_dim), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM),
                init_scale=self.value_init_scale, name='value')(inputs_kv)
      k = checkpoint_name(nn.with_logical_constraint(k, _KV_AXES), 'key_proj')
      v = checkpoint_name(nn.with_logical_constraint(v, _KV_AXES), 'value_proj')

    prefix = None
    if (self.peft is not None and self.peft.method == cfg.PeftMethod.PREFIX and
        not self.cross_attention):
      # Prefix tuning: learned keys and values every query attends to (no positions).
      shape = (self.peft.num_virtual_tokens, self.num_kv_heads, self.head_dim)
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                          (ax.ADAPTER, ax.KV_HEADS, ax.HEAD_DIM))
      prefix = (jnp.asarray(self.param('prefix_key', init, shape, self.param_dtype), self.dtype),
                jnp.asarray(self.param('prefix_value', init, shape, self.param_dtype), self.dtype))

    alibi = None
    match self.position_encoding:
      case cfg.PositionEncoding.ROPE:
        q = layers.apply_rope(q, q_ctx.positions, self.rope)
        k = layers.apply_rope(k, kv_ctx.positions, self.rope)
      case cfg.PositionEncoding.ALIBI:
        alibi = jnp.asarray(xla.alibi_slopes(self.num_heads))
      case _:
        pass  # T5 bias arrives as rel_bias; learned positions were added to the embeddings.
    if q_ctx.decode and self.cross_attention:
      if q_ctx.decode == 'prefill':
        self._cache_var('cached_key', k.shape, k.dtype, _KV_AXES).value = k
        self._cache_var('cached_value', v.shape, v.dtype, _KV_AXES).value = v
    elif q_ctx.decode:
      k, v, kv_ctx = self._attend_to_cache(k, v, q_ctx)
      q_ctx = q_ctx.replace(segment_ids=None)  # causality alone masks the cache (see there)
      if q_ctx.decode == 'prefill':
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    if q_ctx.decode == 'step' and not self.cross_attention:
      # Over the cache in its own layout (no step transposes or copies it), causal.
      prefix_k, prefix_v = prefix if prefix is not None else (None, None)
      out = xla.cached_attention(q, k, v, q_ctx.positions, alibi_slopes=alibi,
                                 rel_bias=rel_bias, scale=self.query_scale,
                                 prefix_k=prefix_k, prefix_v=prefix_v)
    else:
      dropout_rng = None
      if not self.deterministic and self.dropout_rate > 0.0:
        dropout_rng = self.make_rng('dropout')
      out = dot_product_attention(
          self.kernel, q, k, v, q_ctx=q_ctx, kv_ctx=kv_ctx, causal=causal,
          alibi_slopes=alibi, rel_bias=rel_bias, dropout_rate=self.dropout_rate,
          dropout_rng=dropout_rng, scale=self.query_scale,
          prefix=prefix, block_size=self.block_size, max_blocks=self.max_blocks)  # [batch, q_len, heads, head_dim]
    out = nn.with_logical_constraint(out, (ax.BATCH, ax.LENGTH, ax.HEADS, ax.HEAD_DIM))
    out = checkpoint_name(out, 'attention_out')
    return checkpoint_name(dense((emb,), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), axis=(-2, -1),
                                 init_scale=self.value_init_scale, name='out')(out), 'out_proj')

  def _cache_var(self, name, shape, dtype, names):
    # Created (zeros) by the model's init_cache at the full decode length.
    return self.variable('cache', name, nn.with_logical_partitioning(jnp.zeros, names),
                         shape, dtype)

  def _attend_to_cache(self, k: Array, v: Array, q_ctx: Context):
    """Writes this call's keys and values at slots = their positions; returns the
    whole cache, heads-major [batch, kv_heads, slots, head_dim], and the Context
    of its slots.

    Slot i holds the token at position i, so a row's prompt fills slots
    [0, prompt_length) at prefill (positions from 0) and each step one more;
    rows of different prompt lengths advance independently. No segment ids are
    needed: a query at position p sees slots <= p only (causal), and a row's
    slots up to p hold its prompt and the tokens decoded since (a shorter
    prompt's padding slots are overwritten before any query reaches them). At
    prefill the prompt's prefix-LM flags mark its slots bidirectional.
    """
    batch, n = k.shape[:2]
    # Stored heads-major, [batch, kv_heads, length, head_dim]: the layout the
    # attention matmuls read, so no step transposes the whole cache.
    shape = (batch, k.shape[2], n, k.shape[3])
    ck = self._cache_var('cached_key', shape, k.dtype, _CACHE_AXES)
    cv = self._cache_var('cached_value', shape, v.dtype, _CACHE_AXES)
    length = ck.value.shape[2]
    start = q_ctx.positions[:, 0]  # a decode call's positions are consecutive
    write = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice_in_dim(
        c, jnp.swapaxes(x, 0, 1).astype(c.dtype), s, axis=1))
    ck.value = nn.with_logical_constraint(write(ck.value, k, start), _CACHE_AXES)
    cv.value = nn.with_logical_constraint(write(cv.value, v, start), _CACHE_AXES)
    prefix = None
    if q_ctx.prefix is not None:  # prefill of a prefix LM (its positions start at 0)
      prefix = jnp.pad(q_ctx.prefix, ((0, 0), (0, length - n)))
    kv_ctx = Context(positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                                (batch, length)), prefix=prefix)
    return ck.value, cv.value, kv_ctx
