"""The train loop and the hooks it calls.

`run(...)` steps the trainer over the data and calls hooks; everything else a
run does (writing metrics, evaluating, checkpointing, stopping on a
non-finite loss) is a `Hook`: an object with `every` (steps between calls)
and `__call__(info: StepInfo)`, plus optional `start` and `end`. Hooks run
in list order, so a hook that can stop the run (the non-finite check) comes
before the ones that would keep its state. A hook may also raise `Rollback`
with an earlier state: the loop continues from it (spike recovery). This is where later features plug
in (spike rollback, sample generation, sweep reporting), as Levanter's
`TrainerHooks` and T5X's actions do.

    class PrintNorm(loop.Hook):
      every = 100
      def __call__(self, info):
        print(info.step, float(info.metrics['grad_norm'].compute()))

    train.hooks = [@PrintNorm()]   # in gin, after the standard hooks
"""

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from models import metrics as metrics_lib
from t5x_like import checkpoints
from t5x_like import signals
from t5x_like import trainer as trainer_lib
from t5x_like import utils


TrainingError = utils.TrainingError  # training cannot continue (exit code 1)


def chief_print(msg: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


@dataclasses.dataclass
class StepInfo:
  """What a hook sees after a step (or at the start and end of the loop).

  Attributes:
    step: steps done so far (the state's step).
    state: the train state after that step.
    train_steps: the run's last step.
    metrics: the step's metrics (on device; `metrics_lib.compute` fetches
      them); None at the start.
    loss: the step's loss (fetched), None at the start.
    batch_hash: the digest of the step's global batch, None at the start.
    stopped: at the end, whether SIGTERM stopped the run.
  """
  step: int
  state: trainer_lib.TrainState
  train_steps: int
  metrics: Optional[metrics_lib.Metrics] = None
  loss: Optional[float] = None
  batch_hash: Optional[str] = None
  stopped: bool = False

  @property
  def finished(self) -> bool:
    """The last step of the run is done."""
    return self.step >= self.train_steps


class Hook:
  """Called every `every` steps (0: never during the loop) with a StepInfo."""

  every: int = 1

  def due(self, info: StepInfo) -> bool:
    return self.every > 0 and info.step % self.every == 0

  def start(self, info: StepInfo) -> None:
    """Before the first step (info.step is where the run starts or resumes)."""

  def __call__(self, info: StepInfo) -> None:
    """After a step for which `due` is true."""

  def end(self, info: StepInfo) -> None:
    """After the loop: the last step, or a SIGTERM (info.stopped)."""

  def rewind(self, info: StepInfo) -> None:
    """After a `Rollback`: the loop continues from info.step."""

  def close(self) -> None:
    """Releases what the hook holds; called even when the loop raised."""


class Rollback(Exception):
  """Raised by a hook to continue the run from an earlier `state` (its step)."""

  def __init__(self, state: trainer_lib.TrainState):
    super().__init__('rollback')
    self.state = state


class StopRequest:
  """Turns SIGTERM into "save at the current step and exit 0".

  The request may come before the loop starts: `signals.install()` at process
  start records it (see t5x_like/signals.py).
  """

  def __enter__(self):
    self._installed = signals.install()
    return self

  @property
  def requested(self) -> bool:
    return signals.requested()

  def agreed(self) -> bool:
    """True when any process got SIGTERM. Every process must take the same branch:
    saving is collective, and so is the next train step."""
    return signals.agreed()

  def __exit__(self, *exc):
    if self._installed:
      signals.uninstall()


def run(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState, data, train_steps: int,
        hooks: Sequence[Hook]) -> StepInfo:
  """Steps until `train_steps` (or SIGTERM), calling `hooks`; returns the last StepInfo.

  Args:
    trainer: compiles the train step.
    state: the state to start from (its step is where the loop starts).
    data: an iterator of host-local batches with `last_batch_hash`.
    train_steps: the step to stop at.
    hooks: called in order; every hook is closed at the end, also on error.
  """
  info = StepInfo(step=int(jax.device_get(state.step)), state=state, train_steps=train_steps)
  try:
    with StopRequest() as stop:
      for hook in hooks:
        hook.start(info)
      compiled = False
      while info.step < train_steps and not stop.agreed():
        local = next(data)
        batch = trainer.shard_batch(local)
        if not compiled:  # (ahead of the first step, then the compiler's garbage is freed)
          trainer.precompile_train_step(state, batch, once=True)  # (train() may have, ahead)
          compiled = True
        state, metrics = trainer.jit_train_step(state, batch)
        info = StepInfo(step=info.step + 1, state=state, train_steps=train_steps,
                        metrics=metrics, loss=float(jax.device_get(metrics['loss'].compute())),
                        batch_hash=data.last_batch_hash)
        try:
          for hook in hooks:
            if hook.due(info):
              hook(info)
        except Rollback as r:
          state = r.state
          info = StepInfo(step=int(jax.device_get(state.step)), state=state,
                          train_steps=train_steps)
          for hook in hooks:
            hook.rewind(info)
      info = dataclasses.replace(info, stopped=stop.agreed())
      for hook in hooks:
        hook.end(info)
  finally:
    for hook in hooks:
      hook.close()
  return info


# --- the standard hooks --------------------------------------------------------------

class MetricsWriter:
  """Console lines, TensorBoard events and MODEL_DIR/metrics.jsonl (process 0 only).

  `write(kind, step, values)` appends one JSONL record {'kind', 'step',
  'time' (wall-clock seconds since the epoch), ...} and, for kinds 'train' and
  'eval', TensorBoard scalars.
  """

  def __init__(self, model_dir: str, enabled: bool, tensorboard: bool = True,
               kinds: Sequence[str] = ('train', 'eval')):
    self.enabled = enabled
    self._tb = {}
    self._jsonl = None
    if enabled:
      self._jsonl = open(os.path.join(model_dir, 'metrics.jsonl'), 'a')
      if tensorboard:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = {k: tensorboardX.SummaryWriter(os.path.join(model_dir, k))
                    for k in kinds}

  def write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'kind': kind, 'step': step, 'time': round(time.time(), 3), **values}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if kind in self._tb:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb[kind].add_scalar(k, v, global_step=step)
      self._tb[kind].flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    for w in self._tb.values():
      w.close()
    self._tb = {}


def non_finite(info: StepInfo) -> Optional[str]:
  """What is non-finite after the step (loss, gradient, parameters or optimizer
  state), or None. The loss sum, not its mean: a batch without target tokens
  has an undefined mean loss but nothing wrong with it."""
  loss_sum, grad_norm, bad = (float(x) for x in jax.device_get(
      (info.metrics['loss'].total, info.metrics['grad_norm'].compute(),
       info.metrics['nonfinite_state'].compute())))
  if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
    return f'loss is {info.loss} (gradient norm {grad_norm})'
  if bad:
    return f'the parameters or optimizer state hold non-finite values (loss {info.loss})'
  return None


class NonFiniteLoss(Hook):
  """Stops the run (TrainingError) on a non-finite loss, gradient norm,
  parameter or optimizer-state value, before any later hook can save that
  state.

  Args:
    last_saved: returns the step of the newest checkpoint (for the message).
  """
  every = 1

  def __init__(self, last_saved: Callable[[], Optional[int]] = lambda: None):
    self.last_saved = last_saved

  def __call__(self, info: StepInfo) -> None:
    problem = non_finite(info)
    if problem:
      raise TrainingError(
          f'{problem} at step {info.step}; stopping without saving this state (last '
          f'checkpoint: step {self.last_saved()}): lower the learning rate or check the data')


class StepRecords(Hook):
  """One metrics.jsonl record per step: its loss and global batch hash (what
  bit-exact resume is checked against)."""
  every = 1

  def __init__(self, writer: MetricsWriter):
    self.writer = writer

  def __call__(self, info: StepInfo) -> None:
    self.writer.write('step', info.step, {'loss': info.loss, 'batch_hash': info.batch_hash})


class ProgressLog(Hook):
  """Every `every` steps and at the last: the step's metrics on the console,
  in metrics.jsonl and TensorBoard, with tokens/s, MFU and ETA over the
  steps since the previous line, and the tokens and model FLOPs trained on so far.

  Args:
    writer: where records go.
    every: steps between lines.
    tokens_per_step: global tokens a step consumes.
    flops_per_step: model FLOPs a step does.
    peak_flops: the machine's peak FLOP/s (the MFU denominator).
  """

  def __init__(self, writer: MetricsWriter, every: int, tokens_per_step: int,
               flops_per_step: float, peak_flops: float):
    self.writer = writer
    self.every = every
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self._window_start = self._window_step = None

  def due(self, info: StepInfo) -> bool:
    return super().due(info) or info.finished

  def start(self, info: StepInfo) -> None:
    self._window_start, self._window_step = time.perf_counter(), info.step

  rewind = start

  def __call__(self, info: StepInfo) -> None:
    values = metrics_lib.compute(info.metrics)
    elapsed = time.perf_counter() - self._window_start
    steps_per_s = (info.step - self._window_step) / max(elapsed, 1e-9)
    values.update(tokens_per_second=self.tokens_per_step * steps_per_s,
                  mfu=self.flops_per_step * steps_per_s / self.peak_flops,
                  tokens=self.tokens_per_step * info.step, flops=self.flops_per_step * info.step)
    self.writer.write('train', info.step, values)
    eta = (info.train_steps - info.step) / max(steps_per_s, 1e-9)
    chief_print(f'train step {info.step:>6}/{info.train_steps}'
                f'{metrics_lib.console_fields(info.metrics, values)} | '
                f'{values["tokens_per_second"]:,.0f} tok/s | MFU {100 * values["mfu"]:.1f}% | '
                f'ETA {utils.format_duration(eta)}')
    self._window_start, self._window_step = time.perf_counter(), info.step


class Evaluation(Hook):
  """Validation metrics on fixed batches: at step 0 of a fresh run, every
  `every` steps, and at the last step.

  Args:
    trainer: compiles the eval step.
    batches: host-local validation batches, the same each time.
    writer: where records go (kind 'eval').
    every: steps between evaluations (0: only at the start and the end).
  """

  def __init__(self, trainer: trainer_lib.Trainer, batches: List[Dict[str, np.ndarray]],
               writer: MetricsWriter, every: int = 0):
    self.trainer = trainer
    self.batches = batches
    self.writer = writer
    self.every = every
    self.first: Optional[Dict[str, float]] = None
    self.last: Optional[Dict[str, float]] = None

  def due(self, info: StepInfo) -> bool:
    return super().due(info) and not info.finished  # the last one runs in `end`

  def evaluate(self, info: StepInfo) -> Dict[str, float]:
    metrics = self.trainer.evaluate(info.state.params, self.batches)
    values = metrics_lib.compute(metrics)
    self.writer.write('eval', info.step, values)
    chief_print(f'eval  step {info.step:>6}{metrics_lib.console_fields(metrics, values)}')
    self.last = values
    return values

  def start(self, info: StepInfo) -> None:
    if info.step == 0:
      self.first = self.evaluate(info)

  def __call__(self, info: StepInfo) -> None:
    self.evaluate(info)

  def end(self, info: StepInfo) -> None:
    if info.finished and not info.stopped:
      self.evaluate(info)


class CheckpointPolicy(Hook):
  """Saves the state, the data position and the loop's own state every `every`
  steps, at the last step, and when SIGTERM stops the run.

  Args:
    checkpointer: writes checkpoints (and owns their retention).
    data: the training iterator, whose `state()` is saved with each step.
    every: steps between checkpoints.
    last_saved: the step of the checkpoint the run resumed from, if any.
    loop_state: returns the JSON state of the hooks that keep one (saved in
      the checkpoint's `meta`, given back on resume).
    save_at_start: also save the starting state of a fresh run (something to
      roll back to before the first periodic checkpoint).
  """

  def __init__(self, checkpointer: checkpoints.Checkpointer, data, every: int,
               last_saved: Optional[int] = None,
               loop_state: Callable[[], Any] = lambda: None, save_at_start: bool = False):
    self.checkpointer = checkpointer
    self.data = data
    self.every = every
    self.last_saved = last_saved
    self.loop_state = loop_state
    self.save_at_start = save_at_start
    self._start_step = None

  def due(self, info: StepInfo) -> bool:
    return super().due(info) or info.finished

  def start(self, info: StepInfo) -> None:
    self._start_step = info.step
    if self.save_at_start and self.last_saved is None:
      self.save(info)

  def save(self, info: StepInfo) -> None:
    self.checkpointer.save(info.step, info.state, self.data.state(), self.loop_state())
    self.last_saved = info.step

  def __call__(self, info: StepInfo) -> None:
    self.save(info)

  def end(self, info: StepInfo) -> None:
    if info.stopped:
      if self.last_saved == info.step:
        chief_print(f'SIGTERM: the checkpoint of step {info.step} is already saved; exiting')
      elif info.step == self._start_step:
        chief_print(f'SIGTERM before step {info.step + 1}: nothing new to save; exiting')
        return
      else:
        self.save(info)
        chief_print(f'SIGTERM: saved a checkpoint at step {info.step}; exiting')
    if self.last_saved is not None and self.checkpointer.saving():
      t = time.perf_counter()
      chief_print(f'waiting for the checkpoint of step {self.last_saved} to be written ...')
      self.checkpointer.wait()
      chief_print(f'checkpoint step {self.last_saved} committed in '
                  f'{time.perf_counter() - t:.1f} s')


@dataclasses.dataclass(frozen=True)
class SpikePolicy:
  """Loss-spike recovery (PaLM, section 5.1): on a spike, restore the last good
  checkpoint and skip the data that led to it.

  A step's loss spikes when it is non-finite, the parameters or optimizer state
  became non-finite, or it exceeds `factor` times the mean loss of the last
  `window` accepted steps. The run then restores the newest checkpoint, skips
  every batch consumed since it up to and including the spike batch plus
  `skip_batches` more (the data position moves forward; the skip is recorded
  in metrics.jsonl and in the checkpointed data state), and continues. After
  `max_rollbacks` rollbacks to the same checkpoint it stops.

      train_lib.train.spike_recovery = @loop.SpikePolicy()
      loop.SpikePolicy.factor = 2.0
  """
  factor: float = 2.0
  window: int = 32
  skip_batches: int = 0
  max_rollbacks: int = 3

  def __post_init__(self):
    if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor)
            and self.factor > 1):
      raise utils.InputError(f'SpikePolicy.factor={self.factor!r} must be a finite number above '
                             '1: set loop.SpikePolicy.factor (e.g. 2.0)')
    for name, low in (('window', 1), ('skip_batches', 0), ('max_rollbacks', 1)):
      utils.check_int(f'loop.SpikePolicy.{name}', getattr(self, name), low)


class SpikeRecovery(Hook):
  """Rolls the run back past loss spikes (see `SpikePolicy`). Comes first in
  the hook list, so a spike step is never logged as accepted nor checkpointed.

  Args:
    policy: thresholds and limits.
    checkpointer: where the last good checkpoint is.
    data: the training iterator (restored and moved forward on rollback).
    abstract_state: the state's shapes and shardings (restore target).
    writer: records each spike (kind 'spike').
  """
  every = 1
  key = 'spike_recovery'

  def __init__(self, policy: SpikePolicy, checkpointer: checkpoints.Checkpointer, data,
               abstract_state: Any, writer: 'MetricsWriter'):
    self.policy = policy
    self.checkpointer = checkpointer
    self.data = data
    self.abstract_state = abstract_state
    self.writer = writer
    self.history = collections.deque(maxlen=policy.window)
    self.rollbacks: Dict[int, int] = collections.Counter()

  def state_dict(self) -> Dict[str, Any]:
    return {'history': list(self.history)}

  def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
    self.history = collections.deque((state or {}).get('history', []), maxlen=self.policy.window)

  def _spike(self, info: StepInfo) -> Optional[str]:
    problem = non_finite(info)
    if problem:
      return problem
    if len(self.history) == self.policy.window:
      mean = sum(self.history) / len(self.history)
      if info.loss > self.policy.factor * mean:
        return (f'loss {info.loss:.4f} is above {self.policy.factor:g} x the mean {mean:.4f} of '
                f'the last {len(self.history)} steps')
    return None

  def __call__(self, info: StepInfo) -> None:
    problem = self._spike(info)
    if problem is None:
      if math.isfinite(info.loss):
        self.history.append(info.loss)
      return
    self.checkpointer.wait()
    good = self.checkpointer.latest_step()
    if good is None:
      raise TrainingError(f'{problem} at step {info.step}, and there is no checkpoint to roll '
                          'back to: lower the learning rate or check the data')
    self.rollbacks[good] += 1
    if self.rollbacks[good] > self.policy.max_rollbacks:
      raise TrainingError(
          f'{problem} at step {info.step}: the loss spiked {self.rollbacks[good]} times after '
          f'restoring step {good} (loop.SpikePolicy.max_rollbacks={self.policy.max_rollbacks}); '
          f'stopping (last checkpoint: step {good}): lower the learning rate or check the data')
    spike_position = self.data.batches_consumed
    restored = self.checkpointer.restore(good, self.abstract_state, info.state)
    self.data.restore(restored.data)
    start = self.data.batches_consumed
    self.data.skip(spike_position + self.policy.skip_batches - start)
    self.load_state_dict((restored.loop or {}).get(self.key))
    self.writer.write('spike', info.step, {
        'loss': info.loss, 'reason': problem, 'restored_step': good,
        'skipped_batches': [start, self.data.batches_consumed],
        'rollback': self.rollbacks[good]})
    chief_print(f'spike at step {info.step}: {problem}; restored step {good} and skipped batches '
                f'{start} to {self.data.batches_consumed - 1} (rollback '
                f'{self.rollbacks[good]} of at most {self.policy.max_rollbacks})')
    raise Rollback(restored.state)
