"""Sparse upcycling: the mapping, its step-0 equivalence, its errors and the gin run."""

import functools
import os

import jax
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from t5x_like import checkpoints
from t5x_like import gin_utils
from t5x_like import train as train_lib
from t5x_like import upcycle

import testing_utils as tu

# LLaMA-like tiny decoders of 4 layers, so that with experts every 2nd layer
# the scanned MoE stack has 2 groups (dense layers 1 and 3 feed `sublayer_1`).
LLAMA_LIKE = dict(num_kv_heads=1, tie_embeddings=False, norm_epsilon=1e-5, num_layers=4)
LENGTHS = {'inputs': 12, 'targets': 16}


def _abstract(model):
  batch = tu.random_batch(model, 2, LENGTHS)
  return jax.eval_shape(lambda: tu.init_params(model, batch))


def _random_params(model, seed):
  """Random values in the model's parameter shapes (no init compile: faster, and
  any values must upcycle to the same function)."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: (0.3 * rng.randn(*x.shape)).astype(x.dtype), _abstract(model))


def _cross_entropy(model, params, batch):
  """The loss sum without the weighted router losses (the dense model has none)."""
  loss_sum, metrics = jax.jit(model.loss_fn)(params, batch)
  return float(loss_sum - metrics['moe_loss'].total)


@functools.lru_cache(maxsize=None)
def _dense(scan: bool):
  """(model, params, batch, loss) of the dense decoder, shared by the cases."""
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(**LLAMA_LIKE, scan_layers=scan))
  params = _random_params(model, seed=0)
  batch = tu.random_batch(model, 2, LENGTHS, seed=1)
  return model, params, batch, _cross_entropy(model, params, batch)


@pytest.mark.parametrize('moe_scan,dense_scan,interval,impl', [
    (True, True, 1, 'dropless'),  # Mixtral's layout and execution
    (False, False, 1, 'ragged_dot'),
    (True, True, 2, 'capacity'),
    (False, True, 2, 'ragged_dot'),  # a scanned dense run into an unrolled MoE model
])
def test_upcycled_decoder_loss_equals_dense_loss(moe_scan, dense_scan, interval, impl):
  dense_model, dense_params, batch, dense_loss = _dense(dense_scan)
  config = tu.tiny_decoder(
      **LLAMA_LIKE, scan_layers=moe_scan, num_experts=4, num_experts_per_token=2,
      moe_layer_interval=interval, renormalize_gates=True, moe_impl=impl,
      capacity_factor=2.0)  # capacity: experts / k slots per token, so nothing drops
  moe_model = model_lib.DecoderOnlyModel(config)
  init = _random_params(moe_model, seed=2)
  params = upcycle.upcycle_params(dense_params, init, config)
  # The top-2 gates sum to 1 and both chosen experts are the dense MLP.
  assert _cross_entropy(moe_model, params, batch) == pytest.approx(dense_loss, rel=1e-5)

  flat, dense_flat = upcycle._flat(params), upcycle._flat(dense_params)  # pylint: disable=protected-access
  layer_of = lambda i: (('layers_%d' % i,) if not moe_scan else (
      ('layers',) if interval == 1 else ('layers', f'sublayer_{i % interval}')))
  for i in range(config.num_layers):
    if not config.is_moe_layer(i):
      continue
    for name in ('wi_0', 'wi_1', 'wo'):
      experts = np.asarray(flat[('decoder', 'stack') + layer_of(i) + ('moe', name)])
      if moe_scan:
        experts = experts[i // interval]
      dense_path = ('decoder', 'stack', 'layers' if dense_scan else f'layers_{i}', 'mlp', name,
                    'kernel')
      mlp = np.asarray(dense_flat[dense_path])
      mlp = mlp[i] if dense_scan else mlp
      for e in range(config.num_experts):
        np.testing.assert_array_equal(experts[e], mlp)
    router = ('decoder', 'stack') + layer_of(i) + ('moe', 'router')
    np.testing.assert_array_equal(flat[router], upcycle._flat(init)[router])  # pylint: disable=protected-access


def test_upcycled_switch_encoder_decoder():
  dense_model = gin_utils.model_from_gin(['models/t5_1_1/tiny.gin'])
  dense_params = _random_params(dense_model, seed=0)
  batch = tu.random_batch(dense_model, 2, LENGTHS, seed=1)
  dense_loss = _cross_entropy(dense_model, dense_params, batch)

  # Switch proper gates its one expert by the router probability p < 1, so the
  # upcycled model at step 0 is the dense one with each MoE layer's MLP output
  # scaled by p, not the dense function (and capacity 1.25 drops overflow).
  # Renormalised top-1 (gate 1) with room for every token is exactly dense.
  exact = gin_utils.model_from_gin(['models/switch_t5/tiny.gin'], [
      'model_config.EncoderDecoderConfig.renormalize_gates = True',
      'model_config.EncoderDecoderConfig.capacity_factor = 8.0'])  # experts / k: nothing drops
  params = upcycle.upcycle_params(dense_params, _random_params(exact, seed=2), exact.config)
  assert _cross_entropy(exact, params, batch) == pytest.approx(dense_loss, rel=1e-5)
  assert {k[0] for k in upcycle._flat(params) if 'moe' in k} == {'encoder', 'decoder'}  # pylint: disable=protected-access


def _moe_config(**overrides):
  return tu.tiny_decoder(**{**LLAMA_LIKE, 'num_experts': 4, **overrides})


@pytest.mark.parametrize('dense,moe,match', [
    (dict(emb_dim=48), {}, r'decoder/decoder_norm/scale of shape \(48,\) but the MoE model '
     r'expects \(32,\)'),
    (dict(mlp_dim=96), {}, r'decoder/stack/layers/mlp/wi_0/kernel of shape \(4, 32, 96\) but '
     r'the MoE model expects \(4, 32, 64\) \(copied into decoder/stack/layers/moe/wi_0 as every '
     'expert\\)'),
    (dict(num_layers=6), dict(moe_layer_interval=2, scan_layers=False),
     r'decoder/stack/layers/mlp/wi_0/kernel of shape \(6, 32, 64\) but the MoE model expects '
     r'\(4, 32, 64\) \(copied into decoder/stack/layers_0/mlp/wi_0/kernel\)'),
    (dict(num_layers=6, scan_layers=False), dict(scan_layers=False),
     'has decoder/stack/layers_4/mlp/wi_0/kernel that the MoE model has no place for'),
    (dict(num_experts=4), {}, "has no 'decoder/stack/layers/mlp/wi_0/kernel' that the MoE "
     'model needs'),
    (dict(use_bias=True), dict(use_bias=True), r'mlp/wi_0/bias that the MoE model has no place '
     r'for \(MoE experts have no biases\)'),
])
def test_mismatched_dense_params_name_the_parameter(dense, moe, match):
  moe_config = _moe_config(**moe)
  dense_abstract = _abstract(model_lib.DecoderOnlyModel(tu.tiny_decoder(**{**LLAMA_LIKE,
                                                                          **dense})))
  moe_abstract = _abstract(model_lib.DecoderOnlyModel(moe_config))
  with pytest.raises(checkpoints.CheckpointError, match=match) as e:
    upcycle.check_shapes(dense_abstract, moe_abstract, moe_config)
  assert '\n' not in str(e.value) and 'num_experts = 0' in str(e.value)


def test_upcycling_needs_an_moe_model():
  config = tu.tiny_decoder(**LLAMA_LIKE)
  abstract = _abstract(model_lib.DecoderOnlyModel(config))
  with pytest.raises(cfg.ConfigError, match='needs an MoE model'):
    upcycle.upcycle_params(abstract, abstract, config)


# --- end to end: runs/upcycle.gin ---------------------------------------------------------

def _bindings(model_dir, steps, *extra):
  return [f'TRAIN_STEPS = {steps}', f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8',
          'WARMUP_STEPS = 1', "MIXTURE_OR_TASK_NAME = 'stdlib_lm'",
          "TASK_FEATURE_LENGTHS = {'targets': 32}", 'train_lib.train.log_every = 1',
          'train_lib.train.eval_split = None', 'train_lib.train.peak_flops = 1e11',
          'optimizers.warmup_cosine.decay_steps = 10', *extra]


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('dense'))
  train_lib.run(['models/llama/tiny.gin', 'runs/pretrain.gin'], _bindings(model_dir, 2))
  return model_dir


def _params(model_dir):
  return checkpoints.restore_params(*checkpoints.resolve(model_dir))


def test_upcycle_run_starts_the_experts_at_the_dense_mlps(tmp_path, dense_run):
  model_dir = str(tmp_path / 'moe')
  # Learning rate 0: the saved parameters are the upcycled ones. ragged_dot is
  # dropless like the config's Pallas kernel, and compiles faster on CPU.
  result = train_lib.run(['models/mixtral/tiny.gin', 'runs/upcycle.gin'], _bindings(
      model_dir, 1, f"INITIAL_CHECKPOINT = '{dense_run}'", 'LEARNING_RATE = 0.0',
      "model_config.DecoderConfig.moe_impl = 'ragged_dot'"))
  assert result['step'] == 1 and np.isfinite(result['train_loss'])
  dense, moe = _params(dense_run), _params(model_dir)
  dense_layers, moe_layers = dense['decoder']['stack']['layers'], moe['decoder']['stack']['layers']
  for name in ('wi_0', 'wi_1', 'wo'):
    experts, mlp = moe_layers['moe'][name], dense_layers['mlp'][name]['kernel']
    assert experts.shape == (2, 8) + mlp.shape[1:]  # [layers, experts, ...]
    np.testing.assert_array_equal(experts, np.broadcast_to(mlp[:, None], experts.shape))
  for key in ('self_attention', 'pre_self_attention_norm', 'pre_mlp_norm'):
    jax.tree.map(np.testing.assert_array_equal, dense_layers[key], moe_layers[key])
  for key in ('token_embedder', ):
    jax.tree.map(np.testing.assert_array_equal, dense[key], moe[key])
  jax.tree.map(np.testing.assert_array_equal, dense['decoder']['logits_dense'],
               moe['decoder']['logits_dense'])
  assert moe_layers['moe']['router'].shape == (2, 32, 8)


def test_dense_run_of_another_width_fails_before_writing(tmp_path, dense_run, capsys):
  bad = str(tmp_path / 'bad')
  with pytest.raises(SystemExit) as e:
    train_lib.console_main([
        '--gin_file=models/mixtral/tiny.gin', '--gin_file=runs/upcycle.gin',
        *[f'--gin.{b.replace(" = ", "=", 1)}' for b in _bindings(
            bad, 1, f"INITIAL_CHECKPOINT = '{dense_run}'",
            'model_config.DecoderConfig.mlp_dim = 96')]])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith('error: checkpoint step 2 in ') and (
      'has decoder/stack/layers/mlp/wi_0/kernel of shape (2, 32, 64) but the MoE model expects '
      '(2, 32, 96)') in err, err
  assert not os.path.exists(bad)
  # The flag without an MoE model, and without a checkpoint, fail before writing too.
  with pytest.raises(cfg.ConfigError, match='needs an MoE model'):
    train_lib.run(['models/llama/tiny.gin', 'runs/upcycle.gin'],
                  _bindings(bad, 1, f"INITIAL_CHECKPOINT = '{dense_run}'"))
  with pytest.raises(cfg.ConfigError, match='needs train.initial_checkpoint'):
    train_lib.run(['models/mixtral/tiny.gin', 'runs/pretrain.gin'], _bindings(
        bad, 1, 'train_lib.train.initial_checkpoint_upcycle = True'))
  assert not os.path.exists(bad)
