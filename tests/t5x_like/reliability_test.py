"""Nothing lost, nothing silent: checkpoint digests and `verify`, fallback past
damaged checkpoints, finite-only commits, loss-spike recovery."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import model as model_lib
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import checkpoints
from t5x_like import loop
from t5x_like import optimizers
from t5x_like import train as train_lib
from t5x_like.data import pipeline

import testing_utils as tu

FILES = ['models/llama/tiny.gin', 'runs/pretrain.gin']


def bindings(model_dir, steps, *extra):
  return ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
          f'TRAIN_STEPS = {steps}', f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8',
          'WARMUP_STEPS = 1', 'train_lib.train.checkpoint_every = 3',
          'train_lib.train.eval_split = None', 'train_lib.train.peak_flops = 1e11', *extra]


# --- digests --------------------------------------------------------------------------

def test_digest_changes_with_every_bit_and_not_with_sharding():
  x = jnp.asarray(np.random.RandomState(0).randn(8, 16).astype(np.float32))
  tree = {'x': x, 'h': x.astype(jnp.bfloat16), 'i': jnp.arange(8, dtype=jnp.int32),
          'b': x > 0}
  base, nonfinite = checkpoints.state_digests(tree)
  assert nonfinite == 0
  words = np.asarray(x).view(np.uint32).ravel()
  for index in (0, 37, 127):
    for bit in range(32):
      flipped = words.copy()
      flipped[index] ^= np.uint32(1 << bit)
      changed, _ = checkpoints.state_digests({**tree, 'x': jnp.asarray(flipped.view(np.float32)
                                                                          .reshape(8, 16))})
      assert changed['x'] != base['x'], (index, bit)
  swapped = np.asarray(x).copy()
  swapped[0, 0], swapped[0, 1] = swapped[0, 1], swapped[0, 0]
  assert checkpoints.state_digests({**tree, 'x': jnp.asarray(swapped)})[0]['x'] != base['x']
  mesh = mesh_lib.create_mesh((2, 2, 2))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp'),
                                                                         'tensor'))
  sharded = {k: jax.device_put(v, sharding) if v.ndim == 2 else v for k, v in tree.items()}
  assert checkpoints.state_digests(sharded) == (base, 0)
  assert checkpoints.state_digests({'x': x.at[3, 3].set(jnp.nan)})[1] == 1


def test_host_digests_equal_device_digests():
  """state_digests uses numpy for arrays in CPU memory and XLA elsewhere: the
  same numbers, so a checkpoint saved on one verifies on the other."""
  rng = np.random.RandomState(1)
  tree = {}
  for n in (0, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5):
    for dtype in (np.float32, np.float16, np.int32, np.uint8, np.bool_):
      tree[f'{np.dtype(dtype).name}_{n}'] = jnp.asarray(
          (rng.randn(n) * 100).astype(dtype) if dtype != np.bool_ else rng.rand(n) > 0.5)
    tree[f'bf16_{n}'] = jnp.asarray(rng.randn(n), jnp.bfloat16)
  host, _ = checkpoints.state_digests(tree)
  assert checkpoints._on_host(tree)  # pylint: disable=protected-access
  assert host == checkpoints.state_digests(tree, on_device=True)[0]
  nan = {'x': jnp.ones(5000).at[4097].set(jnp.nan), 'h': jnp.ones(3, jnp.bfloat16).at[0].set(jnp.inf)}
  assert checkpoints.state_digests(nan)[1] == 2


def _streamed(name, x, rows):
  return checkpoints.StreamedArray(name, x.shape, x.dtype, rows,
                                   lambda: (x[i:i + rows] for i in range(0, x.shape[0], rows)))


def test_streamed_digests_equal_whole_array_digests():
  """An array digested piece by piece (HF import) gets the digest of the whole,
  whatever the pieces, so it verifies like any other array when restored."""
  rng = np.random.RandomState(2)
  for shape in ((5, 4096), (3, 7, 4097), (9,), (4, 1)):
    for dtype in (np.float32, np.float16, np.int32, np.uint8, np.float64, jnp.bfloat16):
      x = (rng.randn(*shape) * 100).astype(dtype)
      whole = checkpoints.state_digests({'x': x}, on_device=False)
      for rows in (1, 2, shape[0]):
        assert checkpoints.state_digests({'x': _streamed('x', x, rows)}) == whole, (shape, dtype)
  x = np.ones((4, 3), np.float32)
  x[2, 1], x[3, 0] = np.nan, -np.inf
  assert checkpoints.state_digests({'x': _streamed('x', x, 1)})[1] == 2
  with pytest.raises(ValueError, match=r'x: a piece of shape \(2, 3\) float32 at row 1, '
                     r'expected \(1, 3\)'):
    checkpoints.state_digests({'x': checkpoints.StreamedArray(
        'x', (3, 3), np.float32, 1,
        lambda: iter([np.ones((1, 3), np.float32), np.ones((2, 3), np.float32)]))})


def test_save_refuses_a_non_finite_state_and_writes_nothing(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, {'w': jnp.ones(4)}, {'batches_consumed': 1})
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    with pytest.raises(checkpoints.NonFiniteStateError, match=r'state at step 2 holds 1 '
                       r'non-finite values; not saving it \(last checkpoint: step 1\)'):
      ckpt.save(2, {'w': jnp.ones(4).at[2].set(bad)}, {'batches_consumed': 2})
  ckpt.close()
  assert checkpoints.all_steps(str(tmp_path)) == [1]


# --- damaged checkpoints ----------------------------------------------------------------

@pytest.fixture(scope='module')
def six_steps(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('six') / 'run')
  train_lib.run(FILES, bindings(model_dir, 6))
  return model_dir


def test_verify_passes_a_clean_run(six_steps, capsys):
  assert checkpoints.main(['verify', six_steps]) == 0
  out = capsys.readouterr().out
  assert 'step 3: ok' in out and 'step 6: ok' in out and '2 of 2 checkpoints' in out
  assert checkpoints.main(['verify', six_steps, '--step', '7']) == 2


@pytest.mark.parametrize('kind', tu.CORRUPTIONS)
def test_damaged_newest_checkpoint_is_named_and_skipped(six_steps, tmp_path, kind, capsys):
  model_dir = str(tmp_path / 'run')
  shutil.copytree(six_steps, model_dir)
  damaged = tu.corrupt(model_dir, 6, kind)
  capsys.readouterr()
  assert checkpoints.main(['verify', model_dir]) == 1
  out = capsys.readouterr().out
  failed = [l for l in out.splitlines() if l.startswith('step 6: FAILED')]
  assert len(failed) == 1 and 'step 3: ok' in out, out
  # Which array (or file) is wrong is named.
  assert ('state/' in failed[0] or 'metadata' in failed[0] or
          os.path.basename(os.path.dirname(damaged)) in failed[0]), failed[0]

  result = train_lib.run(FILES, bindings(model_dir, 6))
  out = capsys.readouterr().out
  notice = [l for l in out.splitlines() if 'failed verification' in l]
  assert len(notice) == 1 and notice[0].startswith('checkpoint step 6 failed verification')
  assert notice[0].endswith('falling back to step 3')
  assert 'resumed from step 3 (verified)' in out
  assert result['step'] == 6
  # Steps 4-6 again, exactly as the undamaged run did them from step 3.
  assert tu.step_records(model_dir) == tu.step_records(six_steps)
  assert os.listdir(os.path.join(model_dir, 'checkpoints.rejected')) == ['6']
  assert checkpoints.main(['verify', model_dir]) == 0


# --- non-finite states ------------------------------------------------------------------

def _python_run(model_dir, steps, model=None, optimizer=None, **kw):
  model = model or model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384))
  data = pipeline.DatasetConfig('stdlib_lm', {'targets': 32}, batch_size=8)
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  return train_lib.train(model=model, train_dataset=data,
                         optimizer=optimizer or optimizers.adamw(1e-3), partitioner=part,
                         model_dir=model_dir, train_steps=steps, eval_split=None,
                         peak_flops=1e11, tensorboard=False, **kw)


def _all_finite(model_dir):
  for step in checkpoints.all_steps(model_dir):
    directory = checkpoints.checkpoint_dir(model_dir)
    with checkpoints.open_read_only(directory) as manager:
      state = manager.restore(step)['state']
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf))), step


@pytest.mark.rotate(2)
@pytest.mark.parametrize('spike', [False, True], ids=['stop', 'rollbacks'])
def test_overflowing_learning_rate_is_never_committed(tmp_path, spike):
  """1e39 is finite in Python and infinite in float32: the loss of step 1 is
  finite (computed before the update) but the state after it is not."""
  model_dir = str(tmp_path / 'run')
  kw = dict(spike_recovery=loop.SpikePolicy(window=2, max_rollbacks=2)) if spike else {}
  pattern = (r'the parameters or optimizer state hold non-finite values .*at step 1' +
             (r'.*spiked 3 times after restoring step 0' if spike else
              r'; stopping without saving this state \(last checkpoint: step None\)'))
  with pytest.raises(train_lib.TrainingError, match=pattern):
    _python_run(model_dir, 4, optimizer=optimizers.adamw(1e39), checkpoint_every=1, **kw)
  assert checkpoints.all_steps(model_dir) == ([0] if spike else [])
  _all_finite(model_dir)


def test_growing_learning_rate_commits_only_finite_checkpoints(tmp_path):
  model_dir = str(tmp_path / 'run')
  with pytest.raises(train_lib.TrainingError, match=r'at step \d+; stopping without saving this '
                     r'state \(last checkpoint: step \d+\)'):
    _python_run(model_dir, 12, checkpoint_every=1,
                optimizer=optimizers.adamw(optimizers.warmup_linear(3e38, 10, 12)))
  assert checkpoints.all_steps(model_dir)
  _all_finite(model_dir)


# --- loss spikes ------------------------------------------------------------------------

class PoisonedModel(model_lib.DecoderOnlyModel):
  """Its loss is 100x on one particular batch (a poisoned batch in the data)."""

  def __init__(self, config, poison):
    super().__init__(config)
    self.poison = jnp.asarray(poison)

  def loss_fn(self, params, batch, dropout_rng=None, token_groups=None):
    loss, metrics = super().loss_fn(params, batch, dropout_rng, token_groups)
    scale = jnp.where(jnp.all(batch['decoder_target_tokens'] == self.poison), 100.0, 1.0)
    metrics['loss'] = metrics['loss'].replace(total=metrics['loss'].total * scale)
    return loss * scale, metrics


def test_spike_rolls_back_skips_and_resumes_bit_exactly(tmp_path):
  config = tu.tiny_decoder(vocab_size=384)
  plain = model_lib.DecoderOnlyModel(config)
  it = pipeline.InputIterator(pipeline.DatasetConfig('stdlib_lm', {'targets': 32}, batch_size=8),
                              plain)
  batches = [next(it) for _ in range(7)]
  model = PoisonedModel(config, batches[6]['decoder_target_tokens'])  # step 7's batch
  policy = loop.SpikePolicy(factor=3.0, window=3, skip_batches=1)

  whole = str(tmp_path / 'whole')
  result = _python_run(whole, 10, model=model, spike_recovery=policy, checkpoint_every=3)
  assert result['step'] == 10
  with open(os.path.join(whole, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  spikes = [r for r in records if r['kind'] == 'spike']
  assert len(spikes) == 1
  assert spikes[0]['step'] == 7 and spikes[0]['restored_step'] == 6
  assert spikes[0]['skipped_batches'] == [6, 8]  # the spike batch and one more
  steps = tu.step_records(whole)
  assert sorted(steps) == list(range(1, 11))
  assert steps[7][0] < 10  # step 7 was redone on other data
  with checkpoints.open_read_only(checkpoints.checkpoint_dir(whole)) as manager:
    data_state = manager.restore(9)['data']
  assert data_state['skipped'] == [[6, 8]] and data_state['batches_consumed'] == 11

  # Stop after the recovery, resume: the same steps, bit for bit.
  parts = str(tmp_path / 'parts')
  _python_run(parts, 8, model=model, spike_recovery=policy, checkpoint_every=3)
  _python_run(parts, 10, model=model, spike_recovery=policy, checkpoint_every=3)
  assert tu.step_records(parts) == steps
