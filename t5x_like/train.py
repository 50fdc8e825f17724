"""The training entry: `python -m train --gin_file=... --gin.KEY=value`.

Gin stays here: `train()` is the one gin-configured function (bound from the
gin files under gin/runs/), and everything below it takes explicit arguments.
`train()` is also callable from Python (Colab) after `gin_utils.parse(...)`.

Order of work: every check that can fail (gin, mesh, batch, data, model,
checkpoint compatibility) runs before anything is written to MODEL_DIR.
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import gin
import jax
import numpy as np

from models import config as model_config
from models import model as model_lib
from models import param_count
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import checkpoints
from t5x_like import gin_utils
from t5x_like import optimizers
from t5x_like import trainer as trainer_lib
from t5x_like import upcycle
from t5x_like import utils
from t5x_like.data import denoisers
from t5x_like.data import mixtures
from t5x_like.data import pipeline
from t5x_like.data import preprocessors
from t5x_like.data import selection
from t5x_like.data import sources

logger = logging.getLogger('t5x_like')


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. a non-finite loss)."""


# Errors that mean "the inputs are wrong": reported as one line, exit code 2.
INPUT_ERRORS = (gin_utils.GinError, model_config.ConfigError, mesh_lib.MeshError,
                partitioner_lib.BatchError, pipeline.DataError, checkpoints.CheckpointError,
                preprocessors.ObjectiveError, mixtures.MixtureError, sources.SourceError,
                selection.SelectionError)


class _StopRequest:
  """Turns SIGTERM into "save at the current step and exit 0"."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a notebook worker)
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def agreed(self) -> bool:
    """True when any process got SIGTERM. Every process must take the same branch:
    saving is collective, and so is the next train step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    self.requested = bool(np.max(flags))
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Writer:
  """Console lines, TensorBoard events and MODEL_DIR/metrics.jsonl (process 0 only)."""

  def __init__(self, model_dir: str, enabled: bool, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = {}
    self._jsonl = None
    if enabled:
      self._jsonl = open(os.path.join(model_dir, 'metrics.jsonl'), 'a')
      if tensorboard:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = {k: tensorboardX.SummaryWriter(os.path.join(model_dir, k))
                    for k in ('train', 'eval')}

  def scalars(self, kind: str, step: int, values: Dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'kind': kind, 'step': step, **values}) + '\n')
    self._jsonl.flush()
    if kind in self._tb:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb[kind].add_scalar(k, v, global_step=step)
      self._tb[kind].flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    for w in self._tb.values():
      w.close()


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def evaluate(trainer: trainer_lib.Trainer, params, batches: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  """Token-weighted loss, accuracy and perplexity over fixed batches."""
  total = None
  for b in batches:
    m = trainer.jit_eval_step(params, trainer.shard_batch(b))
    total = m if total is None else jax.tree.map(lambda a, c: a + c, total, m)
  total = jax.device_get(total)
  w = max(float(total['weight_sum']), 1.0)
  # Cross-entropy only: the z-loss term is a regulariser, not part of the likelihood.
  loss = (float(total['loss_sum']) - float(total['z_loss_sum']) -
          float(total['moe_loss_sum'])) / w
  out = {'loss': loss, 'accuracy': float(total['correct_sum']) / w,
         'perplexity': float(math.exp(min(loss, 50.0))), 'target_tokens': float(w)}
  out.update(_finite(trainer_lib.group_metrics(total)))
  return out


def _finite(metrics) -> Dict[str, float]:
  """Metrics as floats, without the per-group losses of groups absent from a batch."""
  return {k: float(v) for k, v in metrics.items() if not k.startswith('loss/') or
          math.isfinite(float(v))}


def _group_summary(metrics: Dict[str, float]) -> str:
  parts = [f'{k[5:]} {v:.3f}' for k, v in sorted(metrics.items()) if k.startswith('loss/')]
  return f' | per family: {", ".join(parts)}' if parts else ''


def train(*,
          model: model_lib.BaseModel,
          train_dataset: pipeline.DatasetConfig,
          optimizer: optimizers.Optimizer,
          partitioner: partitioner_lib.Partitioner,
          model_dir: str,
          train_steps: int,
          num_microbatches: int = 1,
          seed: int = 0,
          log_every: int = 10,
          eval_every: int = 0,
          eval_steps: int = 4,
          eval_split: Optional[str] = 'validation',
          checkpoint_every: int = 100,
          keep_checkpoints: int = 3,
          keep_period: Optional[int] = None,
          async_checkpointing: bool = True,
          allow_data_changes: bool = False,
          initial_checkpoint: Optional[str] = None,
          initial_checkpoint_upcycle: bool = False,
          peak_flops: Optional[float] = None,
          tensorboard: bool = True,
          config_str: Optional[str] = None) -> Dict[str, Any]:
  """Trains `model` for `train_steps` steps, resuming from MODEL_DIR if it can.

  Args:
    model: the model wrapper (e.g. `DecoderOnlyModel(config=...)`).
    train_dataset: what to train on; its batch_size is the global batch.
    optimizer: an `optimizers.Optimizer` (AdamW, Adafactor, ...).
    partitioner: mesh and logical-axis rules.
    model_dir: checkpoints, config.gin, metrics.jsonl and TensorBoard events.
    train_steps: the total number of steps (a resumed run stops there too).
    num_microbatches: gradient accumulation per step.
    seed: parameter-init and dropout seed (the data seed is the dataset's).
    log_every: steps between console lines.
    eval_every: steps between evaluations (0: only at start and end).
    eval_steps: validation batches per evaluation (the same batches each time).
    eval_split: the held-out split; None disables evaluation.
    checkpoint_every: steps between checkpoints (and one at the end).
    keep_checkpoints: newest checkpoints kept.
    keep_period: also keep checkpoints at multiples of this step.
    async_checkpointing: write checkpoints in the background.
    allow_data_changes: restore into a different data pipeline (restarts it).
    initial_checkpoint: start from the parameters of another run (its MODEL_DIR
      or one checkpoint folder) with a fresh optimizer and data pipeline, for
      continued pretraining; ignored when MODEL_DIR has its own checkpoint.
    initial_checkpoint_upcycle: `initial_checkpoint` is a run of the dense
      version of this MoE model: copy each dense MLP into every expert of the
      corresponding MoE layer (sparse upcycling, `t5x_like/upcycle.py`).
    peak_flops: the MFU denominator; measured (f32/bf16 matmul) when None.
    tensorboard: write TensorBoard event files.
    config_str: the operative gin config to write as MODEL_DIR/config.gin.

  Returns:
    {'step', 'train_loss', 'eval': {...}, 'first_eval': {...}} of the run.
  """
  if train_steps < 1:
    raise model_config.ConfigError(f'train_steps={train_steps} must be at least 1: set TRAIN_STEPS')
  # --- checks: nothing is written before these pass ------------------------------
  pipeline.validate(train_dataset, model)
  shapes = pipeline.batch_shapes(train_dataset, model)
  loss_groups = denoisers.loss_groups(train_dataset.mixture_or_task_name)
  trainer = trainer_lib.Trainer(model, optimizer, partitioner, shapes,
                                num_microbatches=num_microbatches, seed=seed,
                                loss_groups=loss_groups)
  eval_dataset = None
  if eval_split:
    eval_dataset = dataclasses.replace(train_dataset, split=eval_split, shuffle=False)
    pipeline.validate(eval_dataset, model)
  resume_step = checkpoints.check_compatible(model_dir, trainer.abstract_state)
  initial = None
  if initial_checkpoint_upcycle and not initial_checkpoint:
    raise model_config.ConfigError(
        'train.initial_checkpoint_upcycle = True needs train.initial_checkpoint: set '
        'INITIAL_CHECKPOINT to the dense run to upcycle')
  if initial_checkpoint and resume_step is None:
    if initial_checkpoint_upcycle:
      # (directory, step, dense abstract params); shapes checked against the MoE model.
      initial = upcycle.check_dense_checkpoint(initial_checkpoint, trainer.abstract_state.params,
                                               model.config)
    else:
      initial = checkpoints.check_initial_params(initial_checkpoint,
                                                 trainer.abstract_state.params)

  lengths = train_dataset.task_feature_lengths
  flops_per_step = train_dataset.batch_size * param_count.train_flops_per_example(
      model.config, lengths.get('inputs', 0), lengths['targets'])
  tokens_per_step = int(sum(np.prod(v) for k, v in shapes.items()
                            if k in ('decoder_target_tokens', 'encoder_input_tokens')))
  _print(f'model: {type(model).__name__} with {trainer.num_params:,} parameters '
         f'(analytic {param_count.analytic_param_count(model.config):,}); mesh '
         f'{dict(partitioner.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} '
         f'devices, {jax.process_count()} process(es)')
  _print(f'data: {train_dataset.mixture_or_task_name} {dict(lengths)}, global batch '
         f'{train_dataset.batch_size}, {tokens_per_step:,} tokens/step' +
         (f'; loss logged per denoiser family {", ".join(loss_groups)}' if loss_groups else ''))
  if peak_flops is None:
    peak_flops = utils.measured_matmul_peak(model.config.dtype) * jax.device_count()

  # --- from here on MODEL_DIR is written --------------------------------------------
  if jax.process_count() > 1:
    # Every process has finished its read-only checks before process 0 writes, so
    # all of them take the same resume decision.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('t5x_like:checks_done')
  is_chief = jax.process_index() == 0
  if is_chief:
    os.makedirs(model_dir, exist_ok=True)
    if config_str is not None:
      with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
        f.write(config_str)
  ckpt = checkpoints.Checkpointer(model_dir, keep=keep_checkpoints, keep_period=keep_period,
                                  async_save=async_checkpointing)
  writer = _Writer(model_dir, is_chief, tensorboard)
  host_rows = partitioner.host_slice(train_dataset.batch_size)
  data = pipeline.InputIterator(train_dataset, model, host_rows)
  if resume_step is not None:
    state, data_state = ckpt.restore(resume_step, trainer.abstract_state)
    data.restore(data_state, allow_changes=allow_data_changes)
    _print(f'resumed from step {resume_step} ({ckpt.directory}); data position '
           f'{data.batches_consumed} batches')
  else:
    state = trainer.init_state()
    if initial is not None and initial_checkpoint_upcycle:
      params = upcycle.restore_upcycled(*initial, state.params, model.config, partitioner.mesh,
                                        trainer.state_shardings.params)
      state = state.replace(params=params)
      _print(f'upcycled parameters from the dense run {initial[0]} step {initial[1]}: every '
             'expert is its layer\'s dense MLP, routers fresh (fresh optimizer and data)')
    elif initial is not None:
      params = checkpoints.restore_params(*initial, trainer.abstract_state.params)
      state = state.replace(params=params)
      _print(f'initialised parameters from {initial[0]} step {initial[1]} (fresh optimizer '
             'and data)')
  start = int(jax.device_get(state.step))

  eval_batches = None
  if eval_dataset is not None:
    eval_it = pipeline.InputIterator(eval_dataset, model, partitioner.host_slice(eval_dataset.batch_size))
    eval_batches = [next(eval_it) for _ in range(eval_steps)]

  def run_eval(step):
    metrics = evaluate(trainer, state.params, eval_batches)
    writer.scalars('eval', step, metrics)
    _print(f'eval  step {step:>6} | loss {metrics["loss"]:.4f} | accuracy '
           f'{metrics["accuracy"]:.4f} | perplexity {metrics["perplexity"]:.2f}'
           f'{_group_summary(metrics)}')
    return metrics

  result: Dict[str, Any] = {'step': start}
  if eval_batches and start == 0:
    result['first_eval'] = run_eval(0)
  last_saved = resume_step
  window_t, window_steps = time.perf_counter(), 0
  t_start = time.perf_counter()
  step = start
  with _StopRequest() as stop:
    try:
      while step < train_steps and not stop.agreed():
        local = next(data)
        digest = data.last_batch_hash
        state, metrics = trainer.jit_train_step(state, trainer.shard_batch(local))
        step += 1
        window_steps += 1
        loss, grad_norm = (float(x) for x in jax.device_get((metrics['loss'], metrics['grad_norm'])))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
          raise TrainingError(
              f'loss is {loss} (gradient norm {grad_norm}) at step {step}; stopping without '
              f'saving this state (last checkpoint: step {last_saved}): lower the learning rate '
              'or check the data')
        writer.scalars('step', step, {'loss': loss, 'batch_hash': digest})
        result['train_loss'] = loss
        if step % log_every == 0 or step == train_steps:
          m = _finite(jax.device_get(metrics))
          elapsed = time.perf_counter() - window_t
          steps_per_s = window_steps / max(elapsed, 1e-9)
          m.update(tokens_per_second=tokens_per_step * steps_per_s,
                   mfu=flops_per_step * steps_per_s / peak_flops)
          writer.scalars('train', step, m)
          eta = (train_steps - step) / max(steps_per_s, 1e-9)
          _print(f'train step {step:>6}/{train_steps} | loss {m["loss"]:.4f} | lr '
                 f'{m["learning_rate"]:.2e} | {m["tokens_per_second"]:,.0f} tok/s | MFU '
                 f'{100 * m["mfu"]:.1f}% | ETA {utils.format_duration(eta)}{_group_summary(m)}')
          window_t, window_steps = time.perf_counter(), 0
        if eval_batches and eval_every and step % eval_every == 0 and step != train_steps:
          run_eval(step)
        if step % checkpoint_every == 0 or step == train_steps:
          ckpt.save(step, state, data.state())
          last_saved = step
      if stop.agreed():
        if last_saved != step:
          ckpt.save(step, state, data.state())
          last_saved = step
        _print(f'SIGTERM: saved a checkpoint at step {step}; exiting')
      if eval_batches and step == train_steps and not stop.requested:
        result['eval'] = run_eval(step)
    finally:
      ckpt.close()
      writer.close()
  result['step'] = step
  result['stopped_by_signal'] = stop.requested
  result['seconds'] = time.perf_counter() - t_start
  return result


def _parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
      prog='python -m train',
      description='Train a model from gin files; --gin.KEY=value overrides a binding.')
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file (repeatable); shipped files by path relative to gin/')
  parser.add_argument('--gin_search_path', action='append', default=[])
  parser.add_argument('--coordinator_address', default=None,
                      help='host:port of process 0 (multi-host; see jax.distributed.initialize)')
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--cpu_collectives', default='gloo',
                      help='CPU collectives for multi-process CPU runs')
  known, rest = parser.parse_known_args(argv)
  gin_flags = [a for a in rest if a.startswith('--gin.')]
  unknown = [a for a in rest if not a.startswith('--gin.')]
  if unknown:
    parser.error(f'unrecognised arguments: {" ".join(unknown)}')
  return known, gin_flags


def run(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> Dict[str, Any]:
  """Parses gin files and bindings afresh and calls train(): the Python/Colab entry.

  Args:
    gin_files: paths, or names relative to the shipped gin/ folder.
    bindings: gin binding strings, e.g. "TRAIN_STEPS = 100".
  """
  if not gin_files:
    raise gin_utils.GinError('no --gin_file given: e.g. --gin_file=gin/runs/pretrain_default.gin')
  gin.clear_config()
  gin_utils.parse(gin_files, bindings)
  try:
    return gin.get_configurable(train)(config_str=gin.config_str())
  except INPUT_ERRORS:
    raise
  except (ValueError, TypeError) as e:
    if 'gin' in str(e) or 'configurable' in str(e):
      raise gin_utils.GinError(gin_utils.explain(e, gin_files, bindings)) from None
    raise


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """Parses flags, joins the job (multi-host) and runs the gin-configured train()."""
  args, gin_flags = _parse_args(argv)
  if args.coordinator_address or args.num_processes:
    # Only affects CPU devices; lets CPU processes run cross-process collectives.
    jax.config.update('jax_cpu_collectives_implementation', args.cpu_collectives)
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  for p in args.gin_search_path:
    gin.add_config_file_search_path(p)
  return run(args.gin_file, gin_utils.split_argv(gin_flags))


def console_main(argv: Optional[Sequence[str]] = None) -> None:
  logging.basicConfig(level=logging.WARNING)
  try:
    result = main(sys.argv[1:] if argv is None else argv)
  except INPUT_ERRORS as e:
    print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr)
    sys.exit(2)
  except TrainingError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if result.get('eval'):
    first = result.get('first_eval', {}).get('loss')
    drop = f' (from {first:.4f} at step 0, {100 * (1 - result["eval"]["loss"] / first):.1f}% lower)' if first else ''
    _print(f'done: step {result["step"]}, validation loss {result["eval"]["loss"]:.4f}{drop}, '
           f'accuracy {result["eval"]["accuracy"]:.4f}, perplexity {result["eval"]["perplexity"]:.2f}')


if __name__ == '__main__':
  # Run through the imported module: gin binds `t5x_like.train.train`, not `__main__.train`.
  from t5x_like import train as _train_module  # pylint: disable=g-import-self
  _train_module.console_main()
