"""The XLA attention (the models' path and the kernels' reference) against loop-level formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import xla as ref


def naive_attention(q, k, v, mask=None, bias=None, scale=None):
  """Per-batch, per-head numpy softmax attention with K/V heads repeated."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, h, d = q.shape
  groups = h // k.shape[2]
  k = np.repeat(k, groups, axis=2)
  v = np.repeat(v, groups, axis=2)
  scale = 1 / math.sqrt(d) if scale is None else scale
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi].T * scale
      if bias is not None:
        s = s + bias[bi, hi]
      if mask is not None:
        s = np.where(mask[bi], s, -1e30)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, hi]
  return out


def _qkv(b=2, lq=8, lk=8, h=4, kvh=2, d=16, seed=0):
  r = np.random.RandomState(seed)
  return (r.randn(b, lq, h, d).astype(np.float32), r.randn(b, lk, kvh, d).astype(np.float32),
          r.randn(b, lk, kvh, d).astype(np.float32))


@pytest.mark.parametrize('kvh', [4, 2, 1])
def test_gqa_equals_repeated_kv(kvh):
  q, k, v = _qkv(kvh=kvh)
  np.testing.assert_allclose(ref.attention(q, k, v), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_causal_and_cross_lengths():
  q, k, v = _qkv(lq=5, lk=9)
  np.testing.assert_allclose(ref.attention(q, k, v), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)
  q, k, v = _qkv()
  mask = np.tril(np.ones((8, 8), bool))[None].repeat(2, 0)
  np.testing.assert_allclose(ref.attention(q, k, v, causal=True), naive_attention(q, k, v, mask),
                             rtol=1e-5, atol=1e-5)


def test_prefix_and_segment_masks():
  q, k, v = _qkv(b=1, lq=6, lk=6)
  prefix = np.array([[1, 1, 1, 0, 0, 0]], bool)
  seg = np.array([[1, 1, 1, 1, 2, 2]])
  pos = np.array([[0, 1, 2, 3, 0, 1]])
  mask = np.zeros((1, 6, 6), bool)
  for i in range(6):
    for j in range(6):
      same = seg[0, i] == seg[0, j]
      allowed = pos[0, j] <= pos[0, i] or (prefix[0, i] and prefix[0, j])
      mask[0, i, j] = same and allowed
  got = ref.attention(q, k, v, causal=True, q_prefix=prefix, kv_prefix=prefix, q_segment_ids=seg,
                      kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
  np.testing.assert_allclose(got, naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
  # Row 1 (inside the prefix) sees token 2, which a causal mask would hide.
  assert mask[0, 1, 2] and not mask[0, 3, 4]


def test_alibi_matches_formula():
  np.testing.assert_allclose(ref.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
  # Non-power-of-2: the 4 slopes of 4 heads then every other slope of 8 heads.
  np.testing.assert_allclose(ref.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                   2 ** -1, 2 ** -3], rtol=1e-6)
  q, k, v = _qkv(h=4, kvh=4)
  slopes = ref.alibi_slopes(4)
  i = np.arange(8)
  bias = -slopes[None, :, None, None] * np.abs(i[None, :] - i[:, None])[None, None]
  bias = np.repeat(bias, 2, 0)
  mask = np.tril(np.ones((8, 8), bool))[None].repeat(2, 0)
  got = ref.attention(q, k, v, causal=True, alibi_slopes=jnp.asarray(slopes))
  np.testing.assert_allclose(got, naive_attention(q, k, v, mask, bias), rtol=1e-5, atol=1e-5)


def t5_bucket_scalar(rel, bidirectional, num_buckets, max_distance):
  """T5's bucket function for one relative position, written out directly."""
  ret = 0
  n = -rel
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_t5_buckets_match_formula(bidirectional):
  rel = np.arange(-300, 301)
  got = np.asarray(ref.relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128))
  want = [t5_bucket_scalar(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(got, want)


def test_t5_bias_in_attention():
  q, k, v = _qkv(h=2, kvh=2, lq=7, lk=7)
  table = np.random.RandomState(1).randn(2, 32).astype(np.float32)
  i = np.arange(7)
  buckets = np.array([[t5_bucket_scalar(j - qi, True, 32, 128) for j in i] for qi in i])
  bias = np.repeat(table[:, buckets][None], 2, 0)  # [batch, heads, q, k]
  got = ref.attention(q, k, v, rel_bias=ref.RelativeBias(jnp.asarray(table), 32, 128, True))
  np.testing.assert_allclose(got, naive_attention(q, k, v, bias=bias), rtol=1e-5, atol=1e-5)


def test_gradients_match_repeated_kv():
  q, k, v = _qkv(kvh=2)

  def loss_gqa(q, k, v):
    return jnp.sum(ref.attention(q, k, v, causal=True) ** 2)

  def loss_rep(q, k, v):
    return jnp.sum(ref.attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), causal=True) ** 2)

  g1 = jax.grad(loss_gqa, argnums=(0, 1, 2))(q, k, v)
  g2 = jax.grad(loss_rep, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_stay_finite():
  q, k, v = _qkv(b=1, lq=4, lk=4)
  seg_q = np.array([[1, 1, 0, 0]])
  seg_k = np.array([[1, 1, 2, 2]])
  out = ref.attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_k)
  assert np.all(np.isfinite(out))
  # Queries of segment 0 match no key: they attend to nothing.
  np.testing.assert_array_equal(out[0, 2:], 0.0)
  grads = jax.grad(lambda q, k, v: jnp.sum(ref.attention(
      q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_k)))(q, k, v)
  assert np.all(np.isfinite(grads))


@pytest.mark.parametrize('kvh', [4, 2, 1])
@pytest.mark.parametrize('bias', ['none', 'alibi', 't5'])
def test_cached_attention_equals_causal_attention_over_the_slots(kvh, bias):
  """The decode path (queries against a heads-major cache, slot = position)
  equals `attention` with causal masking by those positions, one or several
  queries per row at different positions."""
  q, k, v = _qkv(b=3, lq=3, lk=11, h=4, kvh=kvh, seed=kvh)
  q_positions = jnp.asarray([[4, 5, 6], [0, 1, 2], [8, 9, 10]])
  kw = {}
  if bias == 'alibi':
    kw['alibi_slopes'] = jnp.asarray(ref.alibi_slopes(4))
  if bias == 't5':
    kw['rel_bias'] = ref.RelativeBias(
        jnp.asarray(np.random.RandomState(3).randn(4, 32).astype(np.float32)), 32, 128, False)
  want = ref.attention(q, k, v, q_positions=q_positions,
                       kv_positions=jnp.broadcast_to(jnp.arange(11), (3, 11)), causal=True,
                       scale=0.3, **kw)
  heads_major = lambda x: jnp.swapaxes(jnp.asarray(x), 1, 2)
  for rows in (slice(0, 3), slice(1, 2)):  # several queries; a single decode-step query
    got = ref.cached_attention(q[:, rows], heads_major(k), heads_major(v), q_positions[:, rows],
                               scale=0.3, **kw)
    np.testing.assert_allclose(got, want[:, rows], rtol=1e-6, atol=1e-6)
