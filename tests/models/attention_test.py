"""AttentionKernel.FLASH, chosen in gin, gives the XLA path's loss and gradients.

Covers every shipped family's tiny config (T5 with the relative bias, BLOOM
with ALiBi, LLaMA with GQA and RoPE, PaLM with MQA and a parallel block),
packed and not, and the GQA decoder sharded over 8 fake devices. On CPU the
kernels run in the Pallas interpreter.
"""

import jax
import numpy as np
import pytest

from models import config as cfg
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import gin_utils

import testing_utils as tu

# gin file -> (config class, extra bindings, feature lengths)
FAMILIES = {
    't5_1_1': ('models/t5_1_1/tiny.gin', 'EncoderDecoderConfig', [],
               {'inputs': 24, 'targets': 32}),
    'bloom_alibi': ('models/bloom/tiny.gin', 'DecoderConfig', [], {'targets': 32}),
    'llama_gqa': ('models/llama/tiny.gin', 'DecoderConfig',
                  ['num_heads = 4', 'num_kv_heads = 2', 'head_dim = 8'], {'targets': 32}),
    'palm_mqa': ('models/palm/tiny.gin', 'DecoderConfig', [], {'targets': 32}),
}


def _model(family, kernel):
  path, config, extra, _ = FAMILIES[family]
  bindings = [f'model_config.{config}.{b}' for b in extra]
  bindings.append(f"model_config.{config}.attention_kernel = '{kernel}'")
  return gin_utils.model_from_gin([path], bindings)


def _loss_and_grads(model, params, batch):
  def mean_loss(p):
    loss_sum, metrics = model.loss_fn(p, batch)
    return loss_sum / metrics['loss'].weight
  return jax.jit(jax.value_and_grad(mean_loss))(params)


def _assert_close(got, want):
  (gl, gg), (wl, wg) = got, want
  np.testing.assert_allclose(gl, wl, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gg), jax.tree.leaves(wg)):
    # Relative to the leaf's largest entry; the absolute floor is for gradients
    # that are zero in exact arithmetic (a key bias: softmax ignores a per-row
    # constant), where both paths return rounding noise of ~1e-9.
    diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    limit = 1e-5 * float(np.max(np.abs(b))) + 1e-8
    assert diff <= limit, f'{jax.tree_util.keystr(path)}: max difference {diff:.2e} > {limit:.2e}'


@pytest.mark.rotate(2)
@pytest.mark.parametrize('packed', [False, True], ids=['unpacked', 'packed'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_flash_equals_xla(family, packed):
  flash, xla = _model(family, 'flash'), _model(family, 'xla')
  assert flash.config.attention_kernel == cfg.AttentionKernel.FLASH
  lengths = FAMILIES[family][3]
  batch = tu.random_batch(xla, 2, lengths, seed=1, packed=packed)
  if 'decoder_causal_attention' in batch and packed:  # a prefix-LM example too
    batch['decoder_causal_attention'][0, :5] = 1
  params = tu.init_params(xla, batch)
  _assert_close(_loss_and_grads(flash, params, batch), _loss_and_grads(xla, params, batch))


@pytest.fixture(scope='module')
def gqa_reference():
  xla = _model('llama_gqa', 'xla')
  batch = tu.random_batch(xla, 8, {'targets': 32}, seed=2, packed=True)
  params = tu.init_params(xla, batch)
  return batch, params, _loss_and_grads(xla, params, batch)


# (data, fsdp, tensor): tensor=2 shards the 4 heads and 2 K/V heads; tensor=8
# divides neither, so heads stay whole and only the batch is split.
@pytest.mark.rotate(2)
@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)])
def test_sharded_flash_equals_single_device_xla(gqa_reference, mesh):
  batch, params, want = gqa_reference
  flash = _model('llama_gqa', 'flash')
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh(mesh))
  with part.context():
    got = _loss_and_grads(flash, params, part.shard_batch(batch, 8))
  _assert_close(got, want)


def test_flash_with_attention_dropout_is_a_config_error():
  with pytest.raises(cfg.ConfigError, match='attention_kernel=flash does not drop attention'):
    tu.tiny_decoder(attention_kernel='flash', dropout_rate=0.1)
