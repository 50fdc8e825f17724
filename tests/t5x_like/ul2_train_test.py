"""End to end: the shipped UL2, UL2R and continued-pretraining gin runs."""

import json
import os

import jax
import numpy as np
import pytest

from t5x_like import checkpoints
from t5x_like import train as train_lib
from t5x_like.data import corpus
from t5x_like.data import denoisers
from t5x_like.data import tasks

import testing_utils as tu

LENGTHS = "TASK_FEATURE_LENGTHS = {'inputs': 384, 'targets': 128}"


def bindings(model_dir, steps, *extra):
  return [f'TRAIN_STEPS = {steps}', f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8',
          'WARMUP_STEPS = 1', 'train_lib.train.log_every = 1', 'train_lib.train.eval_steps = 1',
          'train_lib.train.peak_flops = 1e11', 'optimizers.warmup_cosine.decay_steps = 10', *extra]


def records(model_dir, kind):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


@pytest.mark.rotate(2)
@pytest.mark.parametrize('model_file', ['models/t5_1_1/tiny.gin', 'models/llama/tiny.gin'])
def test_ul2_trains_and_logs_each_denoiser_family(tmp_path, model_file):
  model_dir = str(tmp_path / 'run')
  # Unshuffled to keep the test short: 14 tasks would each fill a 1000-example buffer.
  result = train_lib.run([model_file, 'runs/ul2.gin'], bindings(
      model_dir, 4, LENGTHS, 'pipeline.DatasetConfig.shuffle = False'))
  assert result['step'] == 4
  train = records(model_dir, 'train')
  seen = {k for r in train for k in r if k.startswith('loss/')}
  assert seen == {'loss/R', 'loss/X', 'loss/S'}
  for r in train:
    assert all(np.isfinite(v) for k, v in r.items() if k.startswith('loss'))
  last_eval = records(model_dir, 'eval')[-1]
  assert {'loss/R', 'loss/X', 'loss/S'} <= set(last_eval)
  assert last_eval['loss'] < records(model_dir, 'eval')[0]['loss']


@pytest.fixture(scope='module')
def small_buffer_ul2():
  """stdlib_ul2 with 32-example shuffle buffers: shuffled, and quick to start."""
  sources = {d: tasks.corpus_source(d) for d in corpus.DOMAINS}
  return denoisers.register_denoising_mixture('test_ul2', sources, 'ul2', shuffle_buffer_size=32)


def test_ul2_resume_gives_the_same_batches(tmp_path, small_buffer_ul2):
  files = ['models/t5_1_1/tiny.gin', 'runs/ul2.gin']
  extra = (LENGTHS, f"MIXTURE_OR_TASK_NAME = '{small_buffer_ul2}'",
           'train_lib.train.checkpoint_every = 3', 'train_lib.train.eval_split = None')
  full = str(tmp_path / 'full')
  train_lib.run(files, bindings(full, 6, *extra))
  cut = str(tmp_path / 'cut')
  train_lib.run(files, bindings(cut, 3, *extra))
  result = train_lib.run(files, bindings(cut, 6, *extra))
  assert result['step'] == 6
  a, b = tu.step_records(full), tu.step_records(cut)
  assert sorted(b) == list(range(1, 7))
  for step in range(1, 7):
    assert a[step][1] == b[step][1], step  # the global batch hash
    assert a[step][0] == pytest.approx(b[step][0], rel=1e-5)


@pytest.fixture(scope='module')
def causal_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('causal'))
  train_lib.run(['models/llama/tiny.gin', 'runs/pretrain.gin'], bindings(
      model_dir, 2, "MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 64}",
      'train_lib.train.eval_split = None'))
  return model_dir


def _params(model_dir):
  return checkpoints.restore_params(*checkpoints.resolve(model_dir))


def test_ul2r_continues_a_causal_decoder(tmp_path, causal_run):
  model_dir = str(tmp_path / 'ul2r')
  # Learning rate 0: the saved parameters must be exactly the causal run's.
  train_lib.run(['models/llama/tiny.gin', 'runs/ul2r.gin'], bindings(
      model_dir, 1, LENGTHS, f"INITIAL_CHECKPOINT = '{causal_run}'", 'LEARNING_RATE = 0.0',
      'pipeline.DatasetConfig.shuffle = False', 'train_lib.train.eval_split = None'))
  jax.tree.map(np.testing.assert_array_equal, _params(causal_run), _params(model_dir))
  assert any('loss/S' in r for r in records(model_dir, 'train'))


def test_continued_pretraining_recipe_and_bad_initial_checkpoints(tmp_path, causal_run):
  files = ['models/llama/tiny.gin', 'runs/continued_pretraining.gin']
  common = ("DOMAIN_TASK = 'stdlib_prose_lm'", "REPLAY_TASK = 'stdlib_code_lm'",
            'REPLAY_FRACTION = 0.2', "TASK_FEATURE_LENGTHS = {'targets': 64}",
            'train_lib.train.eval_split = None')
  model_dir = str(tmp_path / 'dapt')
  result = train_lib.run(files, bindings(model_dir, 2, f"INITIAL_CHECKPOINT = '{causal_run}'",
                                         *common))
  assert result['step'] == 2
  data_state = json.load(open(os.path.join(checkpoints.checkpoint_dir(model_dir), '2', 'data',
                                           'metadata')))
  assert data_state['mixture'] == pytest.approx({'stdlib_code_lm': 0.2, 'stdlib_prose_lm': 0.8})
  bad = str(tmp_path / 'bad')
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint found at'):
    train_lib.run(files, bindings(bad, 2, f"INITIAL_CHECKPOINT = '{tmp_path / 'nothing'}'",
                                  *common))
  with pytest.raises(checkpoints.CheckpointError, match='of shape .* but the model expects'):
    train_lib.run(files, bindings(bad, 2, f"INITIAL_CHECKPOINT = '{causal_run}'",
                                  'model_config.DecoderConfig.emb_dim = 48', *common))
  assert not os.path.exists(bad)
