"""Flash attention kernels against the reference: forward and every gradient.

On CPU the kernels run in the Pallas interpreter; with a GPU present
(`FLASH_TEST_COMPILED=1` on a GPU machine) the same cases run compiled.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import gpu
from pallas_kernels.flash_attention import ops
from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention import xla as ref

COMPILED = os.environ.get('FLASH_TEST_COMPILED') == '1'
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _backends():
  if COMPILED:
    return ['tpu' if jax.default_backend() == 'tpu' else 'gpu']
  return ['gpu', 'tpu']


def _small_blocks(backend):
  """Small blocks, so short test sequences still span several blocks."""
  if backend == 'gpu':
    return gpu.BlockSizes(16, 16, 16, 16, 16, 16)
  from pallas_kernels.flash_attention import tpu  # pylint: disable=g-import-not-at-top
  return tpu.BlockSizes(16, 16, 16, 16, 16, 16)


def _packed(batch, length, cuts):
  """Segment ids (1, 2, ...) and positions that restart at each cut; tail padding 0."""
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  for b in range(batch):
    bounds = [0] + list(cuts[b]) + [length]
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[b, lo:hi] = s + 1
      pos[b, lo:hi] = np.arange(hi - lo)
  return seg, pos


# name: (heads, kv_heads, q_len, kv_len, options)
CASES = {
    'mha': (4, 4, 48, 48, dict()),
    'mha_causal': (4, 4, 48, 48, dict(causal=True)),
    'gqa_causal_odd_length': (4, 2, 37, 37, dict(causal=True)),
    'mqa_cross_lengths': (4, 1, 24, 56, dict()),
    'gqa_causal_cross': (4, 2, 16, 40, dict(causal=True)),
    'gqa_packed_causal': (4, 2, 48, 48, dict(causal=True, packed=True)),
    'mqa_packed_bidirectional': (4, 1, 48, 48, dict(packed=True)),
    'gqa_prefix_lm': (4, 2, 48, 48, dict(causal=True, prefix=True)),
    'gqa_prefix_lm_packed': (4, 2, 48, 48, dict(causal=True, prefix=True, packed=True)),
    'alibi_causal': (4, 4, 40, 40, dict(causal=True, alibi=True)),
    'alibi_gqa_packed': (4, 2, 48, 48, dict(causal=True, alibi=True, packed=True)),
    't5_bidirectional': (4, 4, 40, 40, dict(t5=True)),
    't5_causal_packed': (4, 4, 48, 48, dict(causal=True, t5=True, packed=True)),
    't5_cross_packed': (4, 2, 32, 48, dict(t5=True, packed=True)),
    'alibi_and_t5_mqa_prefix': (4, 1, 33, 33, dict(causal=True, prefix=True, alibi=True,
                                                   t5=True)),
}


def _problem(name, dtype, seed=0):
  heads, kv_heads, q_len, kv_len, opt = CASES[name]
  batch, head_dim = 2, 16
  r = np.random.RandomState(seed)
  q = jnp.asarray(r.randn(batch, q_len, heads, head_dim), dtype)
  k = jnp.asarray(r.randn(batch, kv_len, kv_heads, head_dim), dtype)
  v = jnp.asarray(r.randn(batch, kv_len, kv_heads, head_dim), dtype)
  kw = dict(causal=opt.get('causal', False))
  if opt.get('packed'):
    q_seg, q_pos = _packed(batch, q_len, [(q_len // 3, q_len - 5), (q_len // 2,)])
    if q_len == kv_len:
      kv_seg, kv_pos = q_seg, q_pos
    else:  # cross-attention: the same segments, other lengths; padding only in q
      kv_seg, kv_pos = _packed(batch, kv_len, [(kv_len // 4, kv_len // 2), (kv_len // 3,)])
      q_seg = np.minimum(q_seg, 3)
      kv_seg[:, -3:] = 0  # padding keys
    kw.update(q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
              kv_positions=kv_pos)
  if opt.get('prefix'):
    pre = np.zeros((batch, q_len), np.int32)
    pre[0, :q_len // 3] = 1
    pre[1, :5] = 1
    if opt.get('packed'):  # a prefix at the start of the second segment too
      pre[0, q_len // 3:q_len // 3 + 4] = 1
    kw.update(q_prefix=pre, kv_prefix=pre)
  if opt.get('alibi'):
    kw['alibi_slopes'] = jnp.asarray(ref.alibi_slopes(heads))
  table = None
  if opt.get('t5'):
    table = jnp.asarray(r.randn(heads, 32), jnp.float32)
  return q, k, v, table, kw


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _compare(name, dtype, backend):
  q, k, v, table, kw = _problem(name, dtype)
  bidirectional = not kw['causal']
  cot = jnp.asarray(np.random.RandomState(1).randn(*q.shape), dtype)

  def run(fn, extra):
    def f(q, k, v, table):
      rb = None if table is None else ref.RelativeBias(table, 32, 128, bidirectional)
      return fn(q, k, v, rel_bias=rb, **kw, **extra)
    out, vjp = jax.vjp(f, q, k, v, table)
    return (out,) + vjp(cot)

  got = run(ops.flash_attention, dict(backend=backend, block_sizes=None if COMPILED else
                                      _small_blocks(backend)))
  # The reference runs in f32 on the same (possibly bf16-rounded) inputs.
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  q, k, v, cot = f32(q), f32(k), f32(v), f32(cot)
  want = run(ref.attention, {})
  for label, g, w in zip(('out', 'dq', 'dk', 'dv', 'dtable'), got, want):
    if w is None:
      assert g is None, label
      continue
    assert g.shape == w.shape, label
    err = _rel_err(g, w)
    assert err < TOL[dtype], f'{name} {backend} {dtype.__name__}: {label} relative error {err:.2e}'


@pytest.mark.rotate(3)
@pytest.mark.parametrize('backend', _backends())
@pytest.mark.parametrize('name', list(CASES))
def test_matches_reference_f32(name, backend):
  _compare(name, jnp.float32, backend)


@pytest.mark.rotate(2)
@pytest.mark.parametrize('backend', _backends())
@pytest.mark.parametrize('name', ['gqa_packed_causal', 't5_causal_packed', 'alibi_and_t5_mqa_prefix'])
def test_matches_reference_bf16(name, backend):
  _compare(name, jnp.bfloat16, backend)


def test_fully_masked_queries_give_zero():
  r = np.random.RandomState(0)
  q = jnp.asarray(r.randn(1, 20, 2, 16), jnp.float32)
  k = v = jnp.asarray(r.randn(1, 20, 2, 16), jnp.float32)
  q_seg = np.full((1, 20), 1, np.int32)
  q_seg[0, 12:] = 7  # segment 7 has no keys
  kv_seg = np.ones((1, 20), np.int32)
  out = ops.flash_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                            block_sizes=gpu.BlockSizes(16, 16, 16, 16, 16, 16))
  np.testing.assert_array_equal(out[0, 12:], 0.0)
  want = ref.attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  assert _rel_err(out, want) < 1e-5


def _brute_mask(spec, aux):
  m = ref.attention_mask(aux.q_positions.shape[1], aux.kv_positions.shape[1],
                         batch=aux.q_positions.shape[0], q_positions=aux.q_positions,
                         kv_positions=aux.kv_positions, q_segment_ids=aux.q_segment_ids,
                         kv_segment_ids=aux.kv_segment_ids, causal=spec.causal,
                         q_prefix=aux.q_prefix, kv_prefix=aux.kv_prefix)
  return np.asarray(m[:, 0])


@pytest.mark.parametrize('seed', range(4))
def test_block_classes_skip_and_full_are_exact(seed):
  """SKIP blocks hold no allowed pair and FULL blocks only allowed pairs."""
  r = np.random.RandomState(seed)
  batch, length, block = 2, 64, 8
  cuts = [sorted(r.choice(np.arange(1, length), 3, replace=False)) for _ in range(batch)]
  seg, pos = _packed(batch, length, cuts)
  pre = (r.rand(batch, length) < 0.2).astype(np.int32)
  for causal, segments, prefix in [(True, False, False), (True, True, False),
                                   (False, True, False), (True, True, True)]:
    aux = tiles.Aux(jnp.asarray(pos if segments else np.tile(np.arange(length), (batch, 1))),
                    jnp.asarray(pos if segments else np.tile(np.arange(length), (batch, 1))),
                    jnp.asarray(seg) if segments else None, jnp.asarray(seg) if segments else None,
                    jnp.asarray(pre) if prefix else None, jnp.asarray(pre) if prefix else None)
    spec = tiles.Spec(causal=causal, scale=1.0, groups=1, has_segments=segments,
                      has_prefix=prefix, has_alibi=False, has_t5=False)
    cls = np.asarray(tiles.block_classes(spec, aux, block, block))
    mask = _brute_mask(spec, aux).reshape(batch, length // block, block, length // block, block)
    allowed_any = mask.any(axis=(2, 4))
    allowed_all = mask.all(axis=(2, 4))
    assert not allowed_any[cls == tiles.SKIP].any()
    assert allowed_all[cls == tiles.FULL].all()
    if causal and not segments:  # plain causal: strictly upper blocks skip, diagonal partial
      nb = length // block
      expect = np.where(np.triu(np.ones((nb, nb), bool), 1), tiles.SKIP,
                        np.where(np.eye(nb, dtype=bool), tiles.PARTIAL, tiles.FULL))
      np.testing.assert_array_equal(cls[0], expect)


def _qkv(shape_q=(1, 16, 4, 16), shape_k=(1, 16, 2, 16), dtype=jnp.float32):
  return jnp.zeros(shape_q, dtype), jnp.zeros(shape_k, dtype), jnp.zeros(shape_k, dtype)


@pytest.mark.parametrize('call,message', [
    (lambda: ops.flash_attention(*_qkv(shape_q=(16, 4, 16))), r'^q must be \[batch'),
    (lambda: ops.flash_attention(*_qkv(shape_q=(1, 16, 3, 16))), 'not a multiple of the 2 K/V'),
    (lambda: ops.flash_attention(*_qkv(shape_k=(1, 16, 2, 8))), 'k has head_dim 8'),
    (lambda: ops.flash_attention(_qkv()[0], _qkv()[1], _qkv(shape_k=(1, 12, 2, 16))[2]),
     'k has shape .* but v has shape'),
    (lambda: ops.flash_attention(*_qkv(dtype=jnp.int32)), 'q has dtype int32'),
    (lambda: ops.flash_attention(*_qkv(), q_segment_ids=np.zeros((1, 15), np.int32)),
     r'q_segment_ids has shape \(1, 15\)'),
    (lambda: ops.flash_attention(*_qkv(), q_positions=np.zeros((1, 16), np.float32)),
     'q_positions has dtype float32'),
    (lambda: ops.flash_attention(*_qkv(), alibi_slopes=jnp.ones(3)), r'alibi_slopes has shape'),
    (lambda: ops.flash_attention(*_qkv(), rel_bias=ref.RelativeBias(jnp.ones((4, 16)))),
     r'rel_bias.table has shape \(4, 16\)'),
    (lambda: ops.flash_attention(*_qkv(), backend='cuda'), "backend='cuda' is not one of"),
    (lambda: ops.flash_attention(*_qkv(), interpret=False), 'interpret=False needs a GPU'),
    (lambda: ops.flash_attention(*_qkv(), scale=-1.0), 'scale=-1.0 must be'),
    (lambda: gpu.BlockSizes(block_q=48), r'BlockSizes.block_q=48 must be a power of 2'),
])
def test_bad_input_is_one_clear_error(call, message):
  if COMPILED:
    pytest.skip('CPU-only expectations (interpret=False is legal on a GPU)')
  with pytest.raises(ValueError, match=message):
    call()
