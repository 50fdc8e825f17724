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
  """A trained PEFT model equals the plain model with its changes folded into the kernels."""
  tuned = model_lib.DecoderOnlyModel(tu.tiny_decoder(peft=peft_config, **overrides))
  plain_model = tuned.without_peft()
  batch = tu.random_batch(tuned, 2, {'targets': 16})
  params = tu.init_params(tuned, batch)
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 99))
  params = peft.unflat({k: (v + 0.3 * jax.random.normal(next(keys), v.shape) if k.endswith(
      ('lora_b', 'ia3_scale')) else v) for k, v in peft.flat(params).items()})
  plain = jax.eval_shape(lambda: tu.init_params(plain_model, batch))
  merged = peft.merge_into_base(params, peft_config, plain)
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, plain)
  np.testing.assert_allclose(plain_model.apply(merged, batch), tuned.apply(params, batch),
                             rtol=1e-5, atol=1e-5)


def test_adapters_cannot_merge():
  with pytest.raises(cfg.ConfigError, match='adapters add layers'):
    peft.merge_into_base({}, cfg.PeftConfig(method='adapters'), {})
