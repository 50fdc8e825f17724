"""Blockwise causal attention (the XLA path for long causal inputs) == xla.attention:
values and gradients, packed and unpacked, MHA/GQA/MQA, and how the models dispatch to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention as attn
from models import config as cfg
from pallas_kernels.flash_attention import blockwise
from pallas_kernels.flash_attention import xla


def _packed(batch, length, seed, pad=0):
  """Segment ids and positions as the pipeline packs them (padding: segment 0, position 0)."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  for r in range(batch):
    i, s = 0, 1
    while i < length - pad:
      n = min(int(rng.integers(1, length // 2)), length - pad - i)
      seg[r, i:i + n], pos[r, i:i + n] = s, np.arange(n)
      i, s = i + n, s + 1
  return jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize('heads,kv_heads,block,packed', [
    (4, 4, 8, True), (4, 2, 16, True), (6, 1, 8, False), (4, 4, 32, False)])
def test_values_and_gradients_equal_reference(heads, kv_heads, block, packed):
  batch, length, dim = 2, 64, 16
  ks = jax.random.split(jax.random.PRNGKey(heads * 7 + block), 4)
  q = jax.random.normal(ks[0], (batch, length, heads, dim))
  k = jax.random.normal(ks[1], (batch, length, kv_heads, dim))
  v = jax.random.normal(ks[2], (batch, length, kv_heads, dim))
  w = jax.random.normal(ks[3], (batch, length, heads, dim))
  seg, pos = _packed(batch, length, block) if packed else (None, None)
  ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
  ref = lambda q, k, v: xla.attention(q, k, v, causal=True, scale=0.3, **ids)
  new = lambda q, k, v: blockwise.attention(q, k, v, scale=0.3, block=block, **ids)
  np.testing.assert_allclose(new(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  g_new = jax.grad(loss(new), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_new, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_padding_rows_see_only_earlier_padding():
  """The one documented difference: trailing padding (segment 0, position 0) attends to
  the padding before it, not after; every real token's output is the reference's."""
  batch, length, pad = 2, 32, 5
  seg, pos = _packed(batch, length, 3, pad=pad)
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (batch, length, 2, 8)) for i in range(3))
  ids = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
  ref = xla.attention(q, k, v, causal=True, **ids)
  new = blockwise.attention(q, k, v, block=8, **ids)
  np.testing.assert_allclose(new[:, :length - pad], ref[:, :length - pad], rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(new)))


def test_bf16_accumulates_in_f32():
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 64, 2, 16)).astype(jnp.bfloat16)
             for i in range(3))
  out = blockwise.attention(q, k, v, block=16)
  assert out.dtype == jnp.bfloat16
  ref = xla.attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)


def test_eligibility():
  assert blockwise.eligible(256, 256, causal=True, block=128)
  assert not blockwise.eligible(128, 128, causal=True, block=128)  # one block: nothing to skip
  assert not blockwise.eligible(300, 300, causal=True, block=128)  # not a multiple
  assert not blockwise.eligible(256, 256, causal=False, block=128)
  assert not blockwise.eligible(256, 512, causal=True, block=128)  # not self-attention
  assert not blockwise.eligible(256, 256, causal=True, block=0)
  for feature in ('has_prefix', 'has_bias', 'dropout', 'has_prefix_kv'):
    assert not blockwise.eligible(256, 256, causal=True, block=128, **{feature: True})
  with pytest.raises(ValueError, match='multiple of 16'):
    blockwise.attention(*(jnp.ones((1, 24, 2, 4)) for _ in range(3)), block=16)


def test_block_for_limits_the_number_of_blocks():
  assert blockwise.block_for(512, 128, 8) == 128  # 4 blocks: kept
  assert blockwise.block_for(2048, 128, 8) == 256  # 16 -> 8
  assert blockwise.block_for(4096, 128, 8) == 512
  assert blockwise.block_for(2048, 128, 0) == 128  # no limit
  assert blockwise.block_for(1536, 128, 4) == 512  # 12 -> 6 -> 3
  assert blockwise.block_for(384, 128, 2) == 128  # 3 blocks, but 256 would not divide 384
  assert blockwise.block_for(2048, 0, 8) == 0  # off stays off


@pytest.mark.parametrize('block,max_blocks,blocks', [(0, 0, 0), (16, 0, 4), (8, 2, 2)])
def test_dispatch_equals_reference(block, max_blocks, blocks):
  """models/attention.py picks blockwise for eligible inputs, in at most `max_blocks`
  blocks; either way the value is xla.attention's."""
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 64, 4, 8)) for i in range(3))
  seg, pos = _packed(2, 64, 5)
  ctx = attn.Context(positions=pos, segment_ids=seg)
  run = lambda q: attn.dot_product_attention(cfg.AttentionKernel.XLA, q, k, v, q_ctx=ctx,
                                             kv_ctx=ctx, causal=True, block_size=block,
                                             max_blocks=max_blocks)
  ref = xla.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                      q_positions=pos, kv_positions=pos)
  np.testing.assert_allclose(run(q), ref, rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(run)(q)
  assert ('custom_vjp_call' in str(jaxpr)) == (block > 0)
  if blocks:  # (one exp per query block in the forward)
    inner = jaxpr.eqns[-1].params['call_jaxpr']
    assert sum(e.primitive.name == 'exp' for e in inner.eqns) == blocks
