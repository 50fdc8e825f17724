"""PEFT methods start as the base model; LoRA merges and unmerges; bad configs fail in one line."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from models import peft

import testing_utils as tu

LENGTHS = {'inputs': 8, 'targets': 16}


def _models(encdec, peft_config, **overrides):
  make = tu.tiny_encdec if encdec else tu.tiny_decoder
  cls = model_lib.EncoderDecoderModel if encdec else model_lib.DecoderOnlyModel
  base = cls(make(**overrides))
  return base, cls(make(peft=peft_config, **overrides))


@pytest.mark.rotate(2)
@pytest.mark.parametrize('encdec', [False, True], ids=['decoder', 'encdec'])
@pytest.mark.parametrize('method,targets,overrides', [
    ('lora', '.', {}),
    ('lora', 'query|value', dict(num_kv_heads=1, scan_layers=False)),
    ('ia3', None, {}),
    ('ia3', '.', dict(mlp='gelu', use_bias=True)),
    ('adapters', None, dict(parallel_block=True)),
    ('lora', 'wo|logits_dense', dict(tie_embeddings=False, num_experts=2, moe_layer_interval=2)),
])
def test_starts_as_the_base_model(encdec, method, targets, overrides):
  """The added parameters start at the identity (B = 0, scales 1, up-projections 0): the
  model with the base's parameters computes exactly the base's logits."""
  base, tuned = _models(encdec, cfg.PeftConfig(method=method, targets=targets), **overrides)
  batch = tu.random_batch(base, 2, LENGTHS, packed=True)
  base_params = tu.init_params(base, batch)
  params = tu.init_params(tuned, batch, seed=1)
  added, rest = peft.split(params, peft.added_pattern(tuned.config.peft))
  assert peft.flat(added), 'the method added no parameters'
  assert jax.tree.map(jnp.shape, rest) == jax.tree.map(jnp.shape, base_params)
  want = base.apply(base_params, batch)
  got = tuned.apply(peft.combine(added, base_params), batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('encdec', [False, True], ids=['decoder', 'encdec'])
def test_merged_lora_equals_unmerged(encdec):
  lora = cfg.PeftConfig(method='lora', targets='.', rank=4, alpha=8.0)
  base, tuned = _models(encdec, lora, num_kv_heads=1)
  batch = tu.random_batch(base, 2, LENGTHS, packed=True)
  params = tu.init_params(tuned, batch)
  # Non-zero B: as after training.
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 64))
  params = peft.unflat({k: (0.3 * jax.random.normal(next(keys), v.shape) if k.endswith('lora_b')
                            else v) for k, v in peft.flat(params).items()})
  unmerged = tuned.apply(params, batch)
  merged_params = peft.merge_lora(params, lora)
  assert not any('lora' in k for k in peft.flat(merged_params))
  merged = base.apply(merged_params, batch)
  assert float(jnp.max(jnp.abs(unmerged - base.apply(peft.split(params, 'lora')[1], batch)))) > 1e-2
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), rtol=1e-5, atol=1e-5)
  back = peft.unmerge_lora(merged_params, params, lora)
  for k, v in peft.flat(params).items():
    np.testing.assert_allclose(np.asarray(peft.flat(back)[k]), np.asarray(v), rtol=1e-5,
                               atol=1e-6)


def test_lora_dropout_draws_only_while_training():
  lora = cfg.PeftConfig(method='lora', targets='.', dropout=0.5)
  _, tuned = _models(False, lora)
  assert tuned.needs_rng
  batch = tu.random_batch(tuned, 2, LENGTHS)
  params = tu.init_params(tuned, batch)
  params = peft.unflat({k: (jnp.ones_like(v) if k.endswith('lora_b') else v)
                        for k, v in peft.flat(params).items()})
  a = tuned.apply(params, batch, jax.random.PRNGKey(0))
  b = tuned.apply(params, batch, jax.random.PRNGKey(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(tuned.apply(params, batch), tuned.apply(params, batch))


@pytest.mark.parametrize('peft_config,overrides,match', [
    (cfg.PeftConfig(method='lora', targets='qurey'), {},
     r"targets='qurey' matches no dense layer .*close matches: .*query"),
    (cfg.PeftConfig(method='ia3', targets='attention/kee'), {}, 'matches no dense layer'),
    (cfg.PeftConfig(method='lora', rank=40), {},
     r'rank=40 is larger than dense layer decoder/stack/layers/self_attention/query \(32 -> 32\)'),
    (cfg.PeftConfig(method='bitfit'), {}, 'bitfit trains the biases .* has none'),
])
def test_bad_peft_configs_fail_in_one_line(peft_config, overrides, match):
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(peft=peft_config, **overrides))
  batch = model.dummy_batch(2, {'targets': 16})
  with pytest.raises(cfg.ConfigError) as e:
    jax.eval_shape(lambda: model.init_variables(jax.random.PRNGKey(0), batch))
  # (JAX appends a note on its frames after the first line; the CLI prints the first.)
  assert re.search(match, str(e.value).splitlines()[0])


def test_bad_peft_fields():
  with pytest.raises(cfg.ConfigError, match="method='lorra' is not one of"):
    cfg.PeftConfig(method='lorra')
  with pytest.raises(cfg.ConfigError, match='not a regular expression'):
    cfg.PeftConfig(targets='query(')
  with pytest.raises(cfg.ConfigError, match='rank=0 must be at least 1'):
    cfg.PeftConfig(rank=0)


def test_bitfit_trains_dense_biases():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(use_bias=True, norm='layer',
                                                     peft=cfg.PeftConfig(method='bitfit')))
  batch = tu.random_batch(model, 2, {'targets': 16})
  params = tu.init_params(model, batch)
  trained, frozen = peft.split(params, peft.trainable_pattern(model.config.peft))
  assert all(k.endswith('/bias') for k in peft.flat(trained))
  assert not any(k.endswith('/bias') for k in peft.flat(frozen))


@pytest.mark.parametrize('peft_config,overrides', [
    (cfg.PeftConfig(method='ia3'), {}),
    (cfg.PeftConfig(method='ia3', targets='.'), dict(scan_layers=False, use_bias=True)),
    (cfg.PeftConfig(method='lora', targets='.', quantization='nf4'), {}),
    (cfg.PeftConfig(method='lora', targets='.'), dict(use_bias=True, num_kv_heads=1)),
], ids=['ia3', 'ia3-unrolled-bias', 'qlora', 'lora-bias'])
def test_merged_into_the_plain_model(peft_config, overrides):
  """A trained PEFT model equals the plain model with its changes folded into the kernels.
  In float64: folding changes the order of the arithmetic, and in float32 the two differ
  by round-off alone (up to 1.3e-5 on a 2-core AVX-512 CPU, whose kernels sum in another
  order), which says nothing about the fold."""
  with jax.enable_x64(True):
    tuned = model_lib.DecoderOnlyModel(tu.tiny_decoder(
        peft=peft_config, dtype='float64', param_dtype='float64', **overrides))
    plain_model = tuned.without_peft()
    batch = tu.random_batch(tuned, 2, {'targets': 16})
    params = tu.init_params(tuned, batch)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 99))
    params = peft.unflat({k: (v + 0.3 * jax.random.normal(next(keys), v.shape, v.dtype)
                              if k.endswith(('lora_b', 'ia3_scale')) else v)
                          for k, v in peft.flat(params).items()})
    plain = jax.eval_shape(lambda: tu.init_params(plain_model, batch))
    merged = peft.merge_into_base(params, peft_config, plain)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, plain)
    assert {v.dtype for v in jax.tree.leaves(merged)} == {jnp.dtype('float64')}
    np.testing.assert_allclose(plain_model.apply(merged, batch), tuned.apply(params, batch),
                               rtol=1e-5, atol=1e-5)


def test_adapters_cannot_merge():
  with pytest.raises(cfg.ConfigError, match='adapters add what the plain model does not have'):
    peft.merge_into_base({}, cfg.PeftConfig(method='adapters'), {})


def _reference_attention_with_prefix(q, k, v, pk, pv, allowed, scale):
  """Plain numpy: one softmax over [prefix; keys], the prefix visible to every query."""
  b, ql, h, d = q.shape
  kvh = k.shape[2]
  g = h // kvh
  n = pk.shape[0]
  keys = np.concatenate([np.broadcast_to(pk, (b,) + pk.shape), k], axis=1)
  values = np.concatenate([np.broadcast_to(pv, (b,) + pv.shape), v], axis=1)
  keys, values = np.repeat(keys, g, axis=2), np.repeat(values, g, axis=2)
  logits = np.einsum('bqhd,bkhd->bhqk', q, keys) * scale
  mask = np.concatenate([np.ones((b, ql, n), bool), allowed], axis=-1)[:, None]
  logits = np.where(mask, logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, values)


def test_attention_with_a_prefix_equals_the_reference():
  from pallas_kernels.flash_attention import xla  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  b, ql, h, kvh, d, n = 2, 6, 4, 2, 8, 3
  q, k, v = (rng.randn(b, ql, x, d).astype(np.float32) for x in (h, kvh, kvh))
  pk, pv = rng.randn(n, kvh, d).astype(np.float32), rng.randn(n, kvh, d).astype(np.float32)
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  pos = np.array([[0, 1, 2, 0, 1, 0], list(range(6))])
  allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) &
             (pos[:, None, :] <= pos[:, :, None]))
  got = xla.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                      kv_positions=pos, causal=True, prefix_k=pk, prefix_v=pv)
  want = _reference_attention_with_prefix(q, k, v, pk, pv, allowed, 1 / np.sqrt(d))
  real = seg > 0  # (what a padding query computes is never read)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5)
  # The decode path over a cache: the same, one query at a time.
  cache_k, cache_v = np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2)
  qpos = np.full((b, 1), 4)
  step = xla.cached_attention(q[:, 4:5], cache_k, cache_v, qpos, prefix_k=pk, prefix_v=pv)
  causal = np.broadcast_to(np.arange(ql)[None, None, :] <= 4, (b, 1, ql))
  want = _reference_attention_with_prefix(q[:, 4:5], k, v, pk, pv, causal, 1 / np.sqrt(d))
  np.testing.assert_allclose(np.asarray(step), want, rtol=1e-5, atol=1e-5)


def test_prefix_tuned_model_decodes_as_it_scores():
  from t5x_like import decoding  # pylint: disable=g-import-not-at-top
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(
      num_kv_heads=1, peft=cfg.PeftConfig(method='prefix', num_virtual_tokens=3)))
  batch = tu.random_batch(model, 2, {'targets': 12})
  params = tu.init_params(model, batch)
  assert {k.rsplit('/', 1)[-1] for k in peft.flat(peft.split(
      params, model.trainable_pattern())[0])} == {'prefix_key', 'prefix_value'}
  tokens = batch['decoder_input_tokens']
  full = model.apply(params, {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens})
  state, logits, positions = model.prefill(params, {'prompt_tokens': tokens[:, :5],
                                                    'prompt_lengths': np.array([5, 5])}, 12)
  np.testing.assert_allclose(logits, full[:, 4], rtol=1e-4, atol=1e-4)
  for t in range(5, 9):
    logits, state = model.decode_step(params, state, tokens[:, t], positions)
    positions = positions + 1
    np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)
  del decoding
  with pytest.raises(cfg.ConfigError, match="attention_kernel = 'xla'"):
    tu.tiny_decoder(attention_kernel='flash', peft=cfg.PeftConfig(method='prefix'))


def test_prompt_tuning_zero_length_is_the_base_and_decodes_as_it_scores():
  base = model_lib.DecoderOnlyModel(tu.tiny_decoder(num_kv_heads=1))
  empty = model_lib.DecoderOnlyModel(tu.tiny_decoder(
      num_kv_heads=1, peft=cfg.PeftConfig(method='prompt', num_virtual_tokens=0)))
  batch = tu.random_batch(base, 2, {'targets': 12})
  params = tu.init_params(base, batch)
  np.testing.assert_array_equal(empty.apply(params, batch), base.apply(params, batch))
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(
      num_kv_heads=1, peft=cfg.PeftConfig(method='prompt', num_virtual_tokens=4)))
  params = tu.init_params(model, batch)
  assert params['decoder']['soft_prompt'].shape == (4, 32)
  tokens = batch['decoder_input_tokens']
  full = model.apply(params, {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens})
  assert full.shape == (2, 12, 256)
  assert not np.allclose(full, base.apply(peft.split(params, 'soft_prompt')[1], batch))
  state, logits, positions = model.prefill(params, {'prompt_tokens': tokens[:, :5],
                                                    'prompt_lengths': np.array([5, 3])}, 12)
  np.testing.assert_allclose(logits[0], full[0, 4], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits[1], full[1, 2], rtol=1e-4, atol=1e-4)
  step_tokens = np.array([tokens[0, 5], tokens[1, 3]])
  logits, state = model.decode_step(params, state, step_tokens, positions)
  np.testing.assert_allclose(logits[0], full[0, 5], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits[1], full[1, 3], rtol=1e-4, atol=1e-4)
  with pytest.raises(cfg.ConfigError, match='decoder-only'):
    model_lib.EncoderDecoderModel(tu.tiny_encdec(peft=cfg.PeftConfig(method='prompt')))
