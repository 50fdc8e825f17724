"""End to end: train() from gin on the embedded corpus, checkpoints, resume, bad input."""

import glob
import json
import os

import pytest
import tensorflow as tf

from models import model as model_lib
from t5x_like import checkpoints
from t5x_like import train as train_lib
from t5x_like.data import pipeline
from t5x_like import optimizers
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib

import testing_utils as tu

FILES = ['models/llama/tiny.gin', 'runs/pretrain.gin']


def bindings(model_dir, steps, *extra):
  return ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
          f'TRAIN_STEPS = {steps}', f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8',
          'WARMUP_STEPS = 2', 'LEARNING_RATE = 3e-3', 'train_lib.train.log_every = 2',
          'train_lib.train.checkpoint_every = 3', 'train_lib.train.eval_steps = 1',
          'train_lib.train.peak_flops = 1e11',
          # The schedule's length is fixed, so a run cut short at step 6 follows the same
          # learning rates as the full 9-step run it is compared with.
          'optimizers.warmup_cosine.decay_steps = 9', *extra]


def snapshot(path):
  if not os.path.exists(path):
    return None
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('full'))
  result = train_lib.run(FILES, bindings(model_dir, 9))
  return model_dir, result


def test_run_writes_everything_and_learns(full_run):
  model_dir, result = full_run
  assert result['step'] == 9
  assert result['eval']['loss'] < result['first_eval']['loss']
  for name in ('config.gin', 'metrics.jsonl', 'train', 'eval'):
    assert os.path.exists(os.path.join(model_dir, name)), name
  assert sorted(os.listdir(os.path.join(model_dir, 'checkpoints'))) == ['3', '6', '9']
  with open(os.path.join(model_dir, 'config.gin')) as f:
    assert 'TRAIN_STEPS = 9' in f.read()
  assert any(f.startswith('events.out') for f in os.listdir(os.path.join(model_dir, 'train')))
  # Every model metric reaches metrics.jsonl and TensorBoard, train and eval alike.
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for kind in ('train', 'eval'):
    last = [r for r in records if r['kind'] == kind][-1]
    assert {'loss', 'cross_entropy', 'accuracy', 'perplexity', 'nonpadding_fraction'} <= set(last)
    assert 0 < last['nonpadding_fraction'] <= 1
    tags = set()
    for event_file in glob.glob(os.path.join(model_dir, kind, 'events.out*')):
      for event in tf.compat.v1.train.summary_iterator(event_file):
        tags.update(v.tag for v in event.summary.value)
    assert {'loss', 'accuracy', 'nonpadding_fraction'} <= tags, (kind, tags)


def test_resume_continues_bit_for_bit(full_run, tmp_path, capsys):
  model_dir, _ = full_run
  resumed = str(tmp_path / 'resumed')
  train_lib.run(FILES, bindings(resumed, 6))  # stops at 6 with a checkpoint
  capsys.readouterr()
  result = train_lib.run(FILES, bindings(resumed, 9))
  assert result['step'] == 9
  assert tu.step_records(resumed) == tu.step_records(model_dir)
  out = capsys.readouterr().out
  assert 'resumed from step 6 (verified)' in out
  assert ('TRAIN_STEPS changed from 6 to 9: the learning-rate schedule is rebuilt for the new '
          'total, from step 6') in out
  # Each launch keeps its config; metrics.jsonl records carry wall-clock time.
  for name, steps in (('config.0.gin', 6), ('config.6.gin', 9), ('config.gin', 9)):
    with open(os.path.join(resumed, name)) as f:
      assert f'TRAIN_STEPS = {steps}' in f.read(), name
  with open(os.path.join(resumed, 'metrics.jsonl')) as f:
    times = [json.loads(line)['time'] for line in f]
  assert times == sorted(times) and times[-1] > 1.7e9

  # A finished run says so and leaves MODEL_DIR as it is.
  before = snapshot(resumed)
  result = train_lib.run(FILES, bindings(resumed, 9))
  assert result['step'] == 9 and 'eval' not in result
  assert 'already holds step 9 (TRAIN_STEPS=9): nothing to do' in capsys.readouterr().out
  assert snapshot(resumed) == before
  result = train_lib.run(FILES, bindings(resumed, 9, 'train_lib.train.evaluate_if_done = True'))
  assert result['eval']['loss'] == pytest.approx(full_run[1]['eval']['loss'])


def test_restore_onto_another_mesh(full_run, tmp_path):
  model_dir, _ = full_run
  other = str(tmp_path / 'other')
  train_lib.run(FILES, bindings(other, 6))  # mesh (8, 1, 1)
  train_lib.run(FILES, bindings(other, 9, 'MESH_SHAPE = (1, 2, 4)'))
  want, got = tu.step_records(model_dir), tu.step_records(other)
  for step in (7, 8, 9):
    assert got[step][1] == want[step][1]  # the same batches
    assert got[step][0] == pytest.approx(want[step][0], rel=1e-5)


def test_incompatible_checkpoint_refuses_and_touches_nothing(full_run):
  model_dir, _ = full_run
  before = snapshot(model_dir)
  with pytest.raises(checkpoints.CheckpointError, match='has .* of shape .* but the model expects'):
    train_lib.run(FILES, bindings(model_dir, 12, 'model_config.DecoderConfig.emb_dim = 48'))
  with pytest.raises(checkpoints.CheckpointError, match='of dtype float32 but the model expects bfloat16'):
    train_lib.run(FILES, bindings(model_dir, 12, "model_config.DecoderConfig.param_dtype = 'bfloat16'"))
  assert snapshot(model_dir) == before


@pytest.mark.parametrize('extra,error,match', [
    (['MESH_SHAPE = (2, 2, 4)'], 'MeshError', 'needs 16 devices but 8 are available'),
    (['BATCH_SIZE = 6'], 'BatchError', 'batch size 6 is not divisible by the data-parallel size 8'),
    (['model_config.DecoderConfig.num_kv_heads = 3'], 'ConfigError',
     'num_heads=2 is not divisible by num_kv_heads=3'),
    (["model_config.DecoderConfig.position_encoding = 'learned'",
      'model_config.DecoderConfig.max_length = 16'], 'ConfigError',
     'sequence length 32 is longer than DecoderConfig.max_length=16'),
    (["MIXTURE_OR_TASK_NAME = 'stdlib_lmm'"], 'DataError', 'did you mean stdlib_lm'),
    (['model_config.DecoderConfig.num_hedas = 2'], 'GinError', 'did you mean'),
])
def test_bad_input_fails_before_writing(tmp_path, extra, error, match):
  model_dir = str(tmp_path / 'run')
  with pytest.raises(train_lib.INPUT_ERRORS, match=match) as e:
    train_lib.run(FILES, bindings(model_dir, 4, *extra))
  assert type(e.value).__name__ == error
  assert '\n' not in str(e.value).split('\n  In call to configurable')[0]
  assert not os.path.exists(model_dir)


def test_missing_required_macro(tmp_path):
  b = [x for x in bindings(str(tmp_path / 'run'), 4) if not x.startswith('MODEL_DIR')]
  with pytest.raises(train_lib.INPUT_ERRORS, match='required gin macro MODEL_DIR is not set'):
    train_lib.run(FILES, b)


def test_non_finite_loss_stops_without_saving(tmp_path):
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384), z_loss=float('nan'))
  data = pipeline.DatasetConfig('stdlib_lm', {'targets': 32}, batch_size=8)
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  model_dir = str(tmp_path / 'nan')
  with pytest.raises(train_lib.TrainingError, match=r'loss is nan \(gradient norm nan\) at step 1; stopping without saving'):
    train_lib.train(model=model, train_dataset=data, optimizer=optimizers.adamw(1e-3),
                    partitioner=part, model_dir=model_dir, train_steps=3, checkpoint_every=1,
                    eval_split=None, peak_flops=1e11)
  assert checkpoints.latest_step(model_dir) is None


def test_extend_context_continues_at_four_times_the_length(full_run, tmp_path):
  """runs/extend_context.gin: the 32-token run continues at 128 tokens with RoPE
  position interpolation (same parameters, new positions)."""
  model_dir, trained = full_run
  result = train_lib.run(['models/llama/tiny.gin', 'runs/extend_context.gin'], [
      f"INITIAL_CHECKPOINT = '{model_dir}'", 'ORIGINAL_LENGTH = 32', 'CONTEXT_FACTOR = 4.0',
      "TASK_FEATURE_LENGTHS = {'targets': 128}", 'TRAIN_STEPS = 2', 'BATCH_SIZE = 8',
      'WARMUP_STEPS = 1',
      f"MODEL_DIR = '{tmp_path / 'long'}'", 'train_lib.train.eval_steps = 1',
      'train_lib.train.peak_flops = 1e11'])
  # it starts from the trained parameters, not from scratch
  assert result['step'] == 2
  assert result['first_eval']['loss'] < trained['first_eval']['loss']
  with open(tmp_path / 'long' / 'config.gin') as f:
    text = f.read()
  assert "rope_scaling = 'linear'" in text and 'CONTEXT_FACTOR = 4.0' in text
  assert 'rope_scaling_factor = %CONTEXT_FACTOR' in text
