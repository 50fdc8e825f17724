"""The train loop calls hooks in order, every N steps, with a StepInfo; the
standard hooks (non-finite check, progress log, checkpoint policy) keep their
promises."""

import json
import os

import jax
import numpy as np
import pytest

from models import model as model_lib
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import loop
from t5x_like import optimizers
from t5x_like import trainer as trainer_lib

import testing_utils as tu

LENGTHS = {'targets': 16}


class _Data:
  """Host batches with the iterator interface the loop and checkpoints use."""

  def __init__(self, model, seed=0):
    self.model, self.consumed, self.seed = model, 0, seed
    self.last_batch_hash = None

  def __next__(self):
    self.consumed += 1
    self.last_batch_hash = f'h{self.consumed}'
    return tu.random_batch(self.model, 8, LENGTHS, seed=self.seed + self.consumed)

  def state(self):
    return {'batches_consumed': self.consumed}


class _Recorder(loop.Hook):

  def __init__(self, every, log, name='r'):
    self.every, self.log, self.name = every, log, name

  def start(self, info):
    self.log.append((self.name, 'start', info.step, info.metrics))

  def __call__(self, info):
    self.log.append((self.name, 'call', info.step, info.batch_hash,
                     sorted(info.metrics)[:2], np.isfinite(info.loss)))

  def end(self, info):
    self.log.append((self.name, 'end', info.step, info.finished, info.stopped))

  def close(self):
    self.log.append((self.name, 'close'))


@pytest.fixture(scope='module')
def trainer():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder())
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  shapes = {k: v.shape for k, v in tu.random_batch(model, 8, LENGTHS).items()}
  return trainer_lib.Trainer(model, optimizers.sgd(0.1), part, shapes)


def test_hooks_run_every_n_steps_in_order_and_are_closed(trainer):
  log = []
  hooks = [_Recorder(2, log, 'a'), _Recorder(3, log, 'b')]
  last = loop.run(trainer, trainer.init_state(), _Data(trainer.model), 6, hooks)
  assert last.step == 6 and last.finished and not last.stopped
  calls = [(e[0], e[2]) for e in log if e[1] == 'call']
  assert calls == [('a', 2), ('b', 3), ('a', 4), ('a', 6), ('b', 6)]
  assert log[0] == ('a', 'start', 0, None) and log[1] == ('b', 'start', 0, None)
  assert ('a', 'call', 2, 'h2', ['accuracy', 'cross_entropy'], True) in log
  assert log[-4:] == [('a', 'end', 6, True, False), ('b', 'end', 6, True, False),
                      ('a', 'close'), ('b', 'close')]


def test_a_failing_hook_stops_the_loop_and_every_hook_is_closed(trainer):
  log = []

  class Boom(loop.Hook):
    def __call__(self, info):
      if info.step == 2:
        raise RuntimeError('boom')
  with pytest.raises(RuntimeError, match='boom'):
    loop.run(trainer, trainer.init_state(), _Data(trainer.model), 5,
             [Boom(), _Recorder(1, log)])
  assert [e[2] for e in log if e[1] == 'call'] == [1]
  assert log[-1] == ('r', 'close')


class _FakeCheckpointer:

  def __init__(self):
    self.saved = []

  def save(self, step, state, data_state, loop_state=None):
    self.saved.append((step, data_state['batches_consumed']))

  def saving(self):
    return False


def test_non_finite_loss_stops_before_the_checkpoint_policy_saves(trainer):
  state = trainer.init_state()
  state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
  ckpt = _FakeCheckpointer()
  policy = loop.CheckpointPolicy(ckpt, _Data(trainer.model), every=1)
  with pytest.raises(loop.TrainingError, match=r'loss is nan .* at step 1; stopping without '
                     r'saving this state \(last checkpoint: step None\)'):
    loop.run(trainer, state, policy.data, 3,
             [loop.NonFiniteLoss(lambda: policy.last_saved), policy])
  assert ckpt.saved == []


def test_checkpoint_policy_saves_every_n_and_at_the_end(trainer):
  ckpt, data = _FakeCheckpointer(), _Data(trainer.model)
  loop.run(trainer, trainer.init_state(), data, 5, [loop.CheckpointPolicy(ckpt, data, every=2)])
  assert ckpt.saved == [(2, 2), (4, 4), (5, 5)]


def test_progress_log_writes_console_and_jsonl(trainer, tmp_path, capsys):
  writer = loop.MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
  hooks = [loop.StepRecords(writer),
           loop.ProgressLog(writer, every=2, tokens_per_step=128, flops_per_step=1e6,
                            peak_flops=1e9)]
  loop.run(trainer, trainer.init_state(), _Data(trainer.model), 3, hooks)
  writer.close()
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('train step')]
  assert [l.split('|')[0].split()[-1] for l in lines] == ['2/3', '3/3']  # every 2, and the last
  for name in ('loss', 'accuracy', 'perplexity', 'learning_rate', 'nonpadding_fraction', 'tok/s',
               'MFU', 'ETA'):
    assert name in lines[0], (name, lines[0])
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  assert [r['step'] for r in records if r['kind'] == 'step'] == [1, 2, 3]
  train = [r for r in records if r['kind'] == 'train']
  assert [r['step'] for r in train] == [2, 3]
  assert {'loss', 'cross_entropy', 'grad_norm', 'learning_rate', 'target_tokens',
          'tokens_per_second', 'mfu'} <= set(train[0])
