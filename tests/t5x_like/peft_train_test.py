"""PEFT training: only the chosen parameters train and hold optimizer state, the frozen
ones stay bit-identical, and sharded steps equal single-device steps."""

import jax
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from models import peft
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import adapters
from t5x_like import checkpoints
from t5x_like import gin_utils
from t5x_like import infer as infer_lib
from t5x_like import hf
from t5x_like import optimizers
from t5x_like import train as train_lib
from t5x_like import trainer as trainer_lib
from t5x_like import utils

import testing_utils as tu

LORA = cfg.PeftConfig(method='lora', targets='query|value|wo', rank=4)


def _trainer(model, batches, mesh=(1, 1, 1), optimizer=None, **kwargs):
  devices = jax.devices()[:int(np.prod(mesh))]
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh(mesh, devices=devices))
  shapes = {k: v.shape for k, v in batches[0].items()}
  return trainer_lib.Trainer(model, optimizer or optimizers.sgd(0.5, momentum=0.9), part,
                             shapes, **kwargs)


def _bits(tree):
  return {k: np.asarray(v).reshape(-1).view(np.uint8).copy() for k, v in peft.flat(jax.device_get(tree)).items()}


@pytest.mark.parametrize('method,overrides,extra', [
    (LORA, {}, None),
    (cfg.PeftConfig(method='ia3'), dict(num_kv_heads=1), None),
    (cfg.PeftConfig(method='adapters', adapter_dim=8), {}, None),
    (cfg.PeftConfig(method='bitfit'), dict(use_bias=True), None),
    (LORA, {}, r'lora_|decoder_norm'),
    (cfg.PeftConfig(method='lora', targets='.', quantization='nf4'), {}, None),
    (cfg.PeftConfig(method='prefix', num_virtual_tokens=4), {}, None),
    (cfg.PeftConfig(method='prompt', num_virtual_tokens=4), {}, None),
])
def test_only_the_chosen_parameters_train(method, overrides, extra):
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(peft=method, **overrides))
  # (prompt tuning reads one sequence per row)
  packed = method.method != cfg.PeftMethod.PROMPT
  batches = [tu.random_batch(model, 8, {'targets': 32}, packed=packed)] * 4  # fits it: loss falls
  trainer = _trainer(model, batches, optimizer=optimizers.adamw(1e-2), trainable_params=extra)
  state = trainer.init_state()
  pattern = extra or peft.trainable_pattern(method)
  mask = peft.mask(state.params, pattern)
  trainable = [k for k, m in mask.items() if m]
  assert trainer.partial and trainable and len(trainable) < len(mask)
  # Optimizer state only for the trained parameters: Adam's mu and nu mirror them exactly.
  adam = state.opt_state[1][0]
  for moment in (adam.mu, adam.nu):
    assert sorted(peft.flat(moment)) == sorted(trainable)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert 2 * trainer.num_trainable_params <= n_opt <= 2 * trainer.num_trainable_params + 4
  before = _bits(state.params)
  losses = []
  for b in batches:
    state, metrics = trainer.jit_train_step(state, trainer.shard_batch(b))
    losses.append(float(metrics['loss'].compute()))
  after = _bits(state.params)
  for k in mask:
    if mask[k]:
      assert not np.array_equal(before[k], after[k]), f'{k} did not train'
    else:
      np.testing.assert_array_equal(before[k], after[k], err_msg=f'frozen {k} changed')
  assert losses[-1] < losses[0]


def test_a_pattern_matching_nothing_fails():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder())
  batches = [tu.random_batch(model, 8, {'targets': 32})]
  with pytest.raises(utils.InputError, match=r"trainable_params='lorra' matches no parameter"):
    _trainer(model, batches, trainable_params='lorra')


def _run(model, batches, mesh):
  trainer = _trainer(model, batches, mesh)
  state = trainer.init_state()
  # Start from non-zero B, so that A has gradients too.
  keys = iter(jax.random.split(jax.random.PRNGKey(7), 64))
  params = peft.unflat({k: (v + 0.1 * jax.random.normal(next(keys), v.shape) if k.endswith(
      'lora_b') else v) for k, v in peft.flat(jax.device_get(state.params)).items()})
  state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))

  def mean_loss(t, frozen, b):
    loss_sum, metrics = model.loss_fn(peft.combine(t, frozen), b)
    return loss_sum / metrics['loss'].weight
  grad_fn = jax.jit(jax.grad(mean_loss))
  gb = trainer.shard_batch(batches[0])
  with trainer.partitioner.context():
    grads = jax.device_get(grad_fn(trainer.trainable(state.params),
                                   trainer.frozen(state.params), gb))
  losses = []
  for b in batches:
    state, metrics = trainer.jit_train_step(state, trainer.shard_batch(b))
    losses.append(float(metrics['loss'].compute()))
  return losses, grads, jax.device_get(trainer.trainable(state.params))


@pytest.fixture(scope='module')
def lora_reference():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(num_kv_heads=1, peft=LORA))
  batches = [tu.random_batch(model, 8, {'targets': 32}, seed=s, packed=True) for s in range(3)]
  return model, batches, _run(model, batches, (1, 1, 1))


@pytest.mark.parametrize('mesh', [(2, 2, 2), (1, 2, 4)])
def test_lora_sharded_equals_single_device(lora_reference, mesh):
  model, batches, (losses, grads, trained) = lora_reference
  s_losses, s_grads, s_trained = _run(model, batches, mesh)
  np.testing.assert_allclose(s_losses, losses, rtol=1e-5)
  assert set(peft.flat(s_grads)) == set(peft.flat(grads))
  for k, g in peft.flat(grads).items():
    assert np.abs(g).max() > 0, f'no gradient for {k}'
    np.testing.assert_allclose(peft.flat(s_grads)[k], g, rtol=1e-4, atol=1e-7, err_msg=k)
  for k, v in peft.flat(trained).items():
    np.testing.assert_allclose(peft.flat(s_trained)[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


FILES = ['models/llama/tiny.gin', 'runs/pretrain.gin']


def _bindings(model_dir, steps, *extra):
  return ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
          f'TRAIN_STEPS = {steps}', f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8',
          'WARMUP_STEPS = 1', 'train_lib.train.eval_split = None',
          'train_lib.train.peak_flops = 1e11', 'train_lib.train.checkpoint_every = 100', *extra]


def test_lora_run_starts_from_a_base_and_keeps_it(tmp_path, capsys):
  base_dir, lora_dir = str(tmp_path / 'base'), str(tmp_path / 'lora')
  train_lib.run(FILES, _bindings(base_dir, 2))
  lora = FILES + ['peft/lora.gin']
  extra = (f"train_lib.train.initial_checkpoint = '{base_dir}'", 'LEARNING_RATE = 1e-2',
           'train_lib.train.checkpoint_every = 2')
  train_lib.run(lora, _bindings(lora_dir, 2, *extra))
  result = train_lib.run(lora, _bindings(lora_dir, 4, *extra))  # resumes over the base
  out = capsys.readouterr().out
  assert 'training 1,792 of them' in out and '4 added parameters initialised fresh' in out
  assert 'resumed from step 2' in out and result['step'] == 4
  # The run's checkpoints hold only the LoRA factors; frozen.json names the base and its digest.
  saved = peft.flat(checkpoints.restore_params(*checkpoints.resolve(lora_dir)))
  assert saved and all('/lora_' in k for k in saved)
  rec = adapters.read_record(lora_dir)
  base = checkpoints.restore_params(*checkpoints.resolve(base_dir))
  assert rec['digest'] == adapters.digest(base) and rec['initial_checkpoint']['step'] == 2
  assert any(np.abs(np.asarray(v)).max() > 0 for k, v in saved.items() if k.endswith('lora_b'))
  # Exported to Hugging Face as the plain model it equals: LoRA folded into the kernels.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  exported = {}
  for name, d in (('base', base_dir), ('lora', lora_dir)):
    hf.export_checkpoint(d, str(tmp_path / f'hf_{name}'))
    exported[name] = load_file(str(tmp_path / f'hf_{name}' / 'model.safetensors'))
  changed = {k for k in exported['base']
             if not np.array_equal(exported['base'][k], exported['lora'][k])}
  assert changed == {f'model.layers.{i}.self_attn.{p}_proj.weight' for i in range(2)
                     for p in ('q', 'v')}
  # Merged into a plain checkpoint: it scores exactly as the adapter over its base does.
  merged_dir = str(tmp_path / 'merged')
  adapters.merge(lora_dir, merged_dir)
  data = tmp_path / 'score.jsonl'
  data.write_text('{"input": "def main(", "target": "):\\n    pass"}\n')
  score = lambda files, path, *b: infer_lib.run(files + ['runs/infer.gin'], [
      f"CHECKPOINT_PATH = '{path}'", f"OUTPUT_FILE = '{tmp_path / 'out.jsonl'}'",
      "MODE = 'score'", f"INPUT_FILE = '{data}'", *b])['records'][0]['log_likelihood']
  via_adapter = score(['models/llama/tiny.gin', 'peft/lora.gin'], lora_dir)
  assert score([merged_dir + '/config.gin'], merged_dir) == pytest.approx(via_adapter, rel=1e-5)
  assert score(['models/llama/tiny.gin'], base_dir) != pytest.approx(via_adapter, rel=1e-5)
  # Another base: refused in one line, before anything is written.
  other = str(tmp_path / 'other')
  train_lib.run(FILES, _bindings(other, 2, 'train_lib.train.seed = 1'))
  with pytest.raises(adapters.AdapterError, match=r'frozen base rebuilt for .* has digest .* '
                     r'but the run was trained on .*: point BASE_CHECKPOINT at the base'):
    score(['models/llama/tiny.gin', 'peft/lora.gin'], lora_dir, f"BASE_CHECKPOINT = '{other}'")
  with pytest.raises(adapters.AdapterError, match='already holds a checkpoint'):
    adapters.merge(lora_dir, merged_dir)


def test_qlora_run_quantizes_its_base(tmp_path, capsys):
  base_dir, qlora_dir = str(tmp_path / 'base'), str(tmp_path / 'qlora')
  train_lib.run(FILES, _bindings(base_dir, 2))
  result = train_lib.run(FILES + ['peft/qlora.gin'], _bindings(
      qlora_dir, 6, f"train_lib.train.initial_checkpoint = '{base_dir}'", 'LEARNING_RATE = 1e-2'))
  assert 'weight matrices quantized to nf4' in capsys.readouterr().out
  assert result['step'] == 6 and np.isfinite(result['train_loss'])
  base = checkpoints.restore_params(*checkpoints.resolve(base_dir))
  model = gin_utils.model_from_gin(['models/llama/tiny.gin', 'peft/qlora.gin'])
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 1, 1), devices=jax.devices()[:1]))
  abstract = infer_lib.abstract_params(model, part)
  tuned = peft.flat(infer_lib.checked_checkpoint(qlora_dir, abstract, 'x', model, part).restore(
      abstract))
  want = peft.flat(peft.quantize_like(base, abstract, cfg.PeftConfig(quantization='nf4')))
  for k, v in want.items():  # the frozen base: the quantized base run, bit for bit
    np.testing.assert_array_equal(np.asarray(tuned[k]), np.asarray(v), err_msg=k)
  saved = peft.flat(checkpoints.restore_params(*checkpoints.resolve(qlora_dir)))
  assert all('/lora_' in k for k in saved)  # the checkpoint: only the LoRA factors


def test_prompt_tuning_refuses_packed_rows():
  from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(
      vocab_size=384, peft=cfg.PeftConfig(method='prompt', num_virtual_tokens=4)))
  config = pipeline.DatasetConfig('stdlib_lm', {'targets': 32}, batch_size=8, pack=True)
  with pytest.raises(pipeline.DataError, match='pack = False'):
    pipeline.validate(config, model)
