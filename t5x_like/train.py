"""The training entry: `python -m train --gin_file=... --gin.KEY=value`.

Gin stays here: `train()` is the one gin-configured function (bound from the
gin files under gin/runs/), and everything below it takes explicit arguments.
`train()` is also callable from Python (Colab) after `gin_utils.parse(...)`.

Order of work: every check that can fail (gin, mesh, batch, data, model,
checkpoint compatibility) runs before anything is written to MODEL_DIR.
"""

if __name__ == '__main__':  # run as `python -m t5x_like.train`: what `python -m train` does first
  from t5x_like import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.start('train', __name__)
  from t5x_like.data import service as _service  # pylint: disable=g-import-not-at-top
  _service.prestart()  # (the input process: see train.py at the repository root)

import dataclasses
import logging
import os
import re
import time
from typing import Any, Dict, Optional, Sequence, Union

import jax
from jax.experimental import multihost_utils
import numpy as np

from models import model as model_lib
from models import param_count
from models import preference
from partitioning import partitioner as partitioner_lib
from t5x_like import adapters
from t5x_like import checkpoints
from t5x_like import cli
from t5x_like import decoding
from t5x_like import gin_utils
from t5x_like import loop
from t5x_like import optimizers
from t5x_like import signals
from t5x_like import trainer as trainer_lib
from t5x_like import utils
from t5x_like import xla_env
from t5x_like.data import pipeline
from t5x_like.data import service

logger = logging.getLogger('t5x_like')


TrainingError = loop.TrainingError  # training cannot continue (exit code 1)

INPUT_ERRORS = cli.INPUT_ERRORS  # one line on stderr, exit code 2


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
          initial_checkpoint: Union[str, checkpoints.InitialCheckpoint, None] = None,
          initial_checkpoint_upcycle: bool = False,
          trainable_params: Optional[str] = None,
          spike_recovery: Optional[loop.SpikePolicy] = None,
          samples: int = 0,
          sample_prompt_length: int = 32,
          sample_decoding: Optional[decoding.DecodingConfig] = None,
          evaluate_if_done: bool = False,
          peak_flops: Optional[float] = None,
          tensorboard: bool = True,
          hooks: Sequence[loop.Hook] = (),
          input_process: Optional[bool] = None,
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
      or one checkpoint folder; or a `checkpoints.InitialCheckpoint`) with a
      fresh optimizer and data pipeline, for continued pretraining; ignored
      when MODEL_DIR has its own checkpoint.
    initial_checkpoint_upcycle: `initial_checkpoint` is a run of the dense
      version of this MoE model: copy each dense MLP into every expert of the
      corresponding MoE layer (sparse upcycling, `t5x_like/upcycle.py`).
    trainable_params: a regular expression of the parameter paths to train
      (e.g. 'lora_|decoder_norm'); the others are frozen: no gradient, no
      optimizer state, bit-identical after training. None: the parameters the
      model's PEFT method adds (`DecoderConfig.peft`), or all without one.
    spike_recovery: roll back past loss spikes (`loop.SpikePolicy`); None: a
      non-finite loss or state stops the run.
    samples: at the end, print this many sampled continuations of the
      validation split's prompts (its sequences cut after `sample_prompt_length`
      tokens; `t5x_like/infer.py` does the same from the command line).
    sample_prompt_length: prompt tokens of each sample.
    sample_decoding: how samples are decoded (default: temperature 0.7, top-p
      0.95, 64 new tokens).
    evaluate_if_done: when MODEL_DIR already holds step `train_steps`,
      evaluate it (otherwise the run says so and returns).
    peak_flops: the MFU denominator; measured (f32/bf16 matmul) when None.
    tensorboard: write TensorBoard event files.
    hooks: more `loop.Hook`s, called after the standard ones (non-finite
      check, step records, progress log, evaluation, checkpoints).
    input_process: run the input pipeline in a process of its own
      (`t5x_like/data/service.py`): the same batches, made on another core while
      this one builds and compiles the model. None: when started from the
      command line and this process has not imported TensorFlow.
    config_str: the operative gin config to write as MODEL_DIR/config.gin
      (and config.<start step>.gin, one per launch).

  Returns:
    {'step', 'train_loss', 'eval': {...}, 'first_eval': {...}, 'stopped_by_signal',
    'seconds'} of the run.
  """
  # --- checks: nothing is written before these pass ------------------------------
  settings = dict(locals())
  _check_settings(settings)
  _check_model_dir(model_dir)
  inputs = service.take(settings.pop('input_process'))
  try:
    return _train(inputs, **settings)
  finally:
    inputs.close()


def _train(inputs, *, model, train_dataset, optimizer, partitioner, model_dir, train_steps,
           num_microbatches, seed, log_every, eval_every, eval_steps, eval_split,
           checkpoint_every, keep_checkpoints, keep_period, async_checkpointing,
           allow_data_changes, initial_checkpoint, initial_checkpoint_upcycle,
           trainable_params, spike_recovery, samples, sample_prompt_length, sample_decoding,
           evaluate_if_done, peak_flops, tensorboard, hooks, config_str) -> Dict[str, Any]:
  """train() once its own settings are checked, with `inputs` (service.take) serving the data."""
  eval_dataset = None
  if eval_split:
    eval_dataset = dataclasses.replace(train_dataset, split=eval_split, shuffle=False)
  wait_prepared = inputs.start_prepare(train_dataset, eval_dataset, model)

  def make_trainer(facts):
    return trainer_lib.Trainer(model, optimizer, partitioner, facts.shapes,
                               num_microbatches=num_microbatches, seed=seed,
                               loss_groups=facts.loss_groups, trainable_params=trainable_params)

  # With an input process, the trainer is built, a fresh run's state initialised and the
  # train step compiled from the predicted batch shapes while that process imports
  # TensorFlow and builds the pipeline; its answer is checked below (a different one
  # builds the trainer again from it, and the early work is dropped).
  guess = inputs.predicted(train_dataset, model)
  trainer, early_state = None, None
  if guess is not None:
    trainer = make_trainer(guess)
    if not _has_checkpoints(model_dir):
      early_state = trainer.init_state()  # (dispatched: it runs while the step compiles)
    trainer.precompile_train_step(trainer.abstract_state, trainer.abstract_batch())
  # The collector, paused by `python -m train` (xla_env.pause_gc), runs again: the imports
  # and, where the batch shapes were predicted, the trainer's build and compile are done,
  # and the input process, if any, is usually still at work.
  xla_env.resume_gc()
  prepared = wait_prepared()
  if trainer is None or (prepared.shapes, prepared.loss_groups) != (guess.shapes,
                                                                    guess.loss_groups):
    trainer, early_state = make_trainer(prepared), None
  shapes = prepared.shapes
  prepared.check_eval()
  initial = adapters.initial_checkpoint(initial_checkpoint, initial_checkpoint_upcycle, model,
                                        train_dataset.task_feature_lengths)
  data = inputs.iterator(train_dataset, model, partitioner.host_slice(train_dataset.batch_size))
  # A run that trains part of the model checkpoints only that part (and its optimizer
  # state); the frozen rest is rebuilt from where the run started (adapters.py).
  view = _partial_view(trainer) if trainer.partial else None
  # Restored and verified before anything is written: a checkpoint that fails
  # verification is passed over for the newest one that passes.
  resumed = checkpoints.find_resumable(
      model_dir, view.saved(trainer.abstract_state) if view else trainer.abstract_state,
      loop.chief_print)
  if resumed is not None:
    data.restore(resumed.data, allow_changes=allow_data_changes)
  if initial is not None and (resumed is None or view is not None):
    initial.check(trainer.abstract_state.params)
  start_step = resumed.step if resumed else 0
  start_state, frozen_record = None, None
  if view is not None:  # the frozen parameters, checked against the record when resuming
    start_state = _starting_state(trainer, model, initial, early_state)
    frozen_record = adapters.record(trainer.trainable_pattern, trainer.frozen(start_state.params),
                                    initial, seed)
    earlier = adapters.read_record(model_dir)
    if resumed is not None:
      if earlier is None:
        raise checkpoints.CheckpointError(
            f'{model_dir} holds checkpoints of only the trained parameters but no '
            f'{adapters.RECORD} saying what they were trained on: point MODEL_DIR at a new '
            'directory')
      adapters.check_digest(earlier, trainer.frozen(start_state.params), 'resuming',
                            _setting('initial_checkpoint', initial_checkpoint))
      start_state = resumed.state.replace(params=trainer.combine(
          resumed.state.params, trainer.frozen(start_state.params)))

  lengths = train_dataset.task_feature_lengths
  flops_per_step = train_dataset.batch_size * model.flops_per_example(lengths)
  tokens_per_step = int(sum(np.prod(v) for k, v in shapes.items()
                            if k.endswith(('decoder_target_tokens', 'encoder_input_tokens'))))
  loop.chief_print(
      f'model: {type(model).__name__} with {trainer.num_params:,} parameters (analytic '
      f'{param_count.analytic_param_count(model.config):,}); mesh {dict(partitioner.mesh.shape)} '
      f'on {jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} '
      'process(es)')
  if trainer.partial:
    loop.chief_print(
        f'training {trainer.num_trainable_params:,} of them '
        f'({100 * trainer.num_trainable_params / trainer.num_params:.2f}%, parameters matching '
        f'{trainer.trainable_pattern!r}); the rest are frozen')
  loop.chief_print(
      f'data: {train_dataset.mixture_or_task_name} {dict(lengths)}, global batch '
      f'{train_dataset.batch_size}, {tokens_per_step:,} tokens/step' +
      (f'; loss logged per denoiser family {", ".join(prepared.loss_groups)}'
       if prepared.loss_groups else ''))
  if resumed is not None:
    _describe_resume(resumed, data, train_steps)
    if start_step >= train_steps and not evaluate_if_done:
      loop.chief_print(
          f'{model_dir} already holds step {start_step} (TRAIN_STEPS={train_steps}): nothing to '
          'do (raise TRAIN_STEPS to train further, or set train_lib.train.evaluate_if_done = '
          'True to evaluate it)')
      return {'step': start_step, 'stopped_by_signal': False, 'seconds': 0.0}
  if signals.agreed():
    loop.chief_print('SIGTERM before training started: exiting without writing anything')
    return {'step': start_step, 'stopped_by_signal': True, 'seconds': 0.0}
  if peak_flops is None:
    peak_flops = utils.measured_matmul_peak(model.config.dtype) * jax.device_count()

  # --- from here on MODEL_DIR is written --------------------------------------------
  if jax.process_count() > 1:
    # Every process has finished its read-only checks before process 0 writes, so
    # all of them take the same resume decision.
    multihost_utils.sync_global_devices('t5x_like:checks_done')
  is_chief = jax.process_index() == 0
  if is_chief:
    try:
      os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
      raise utils.InputError(f'{_setting("model_dir", model_dir)}={model_dir!r} cannot be created '
                             f'({e.strerror}): point it at a writable directory') from None
    for moved in checkpoints.set_aside(model_dir, resumed.rejected if resumed else ()):
      loop.chief_print(f'set the damaged checkpoint aside: {moved}')
    if config_str is not None:
      _write_config(model_dir, config_str, start_step)
    if frozen_record is not None:
      adapters.write_record(model_dir, frozen_record)
  if jax.process_count() > 1:
    # Every process opens the checkpoint directory after the damaged steps moved away.
    multihost_utils.sync_global_devices('t5x_like:model_dir_ready')
  ckpt = checkpoints.Checkpointer(model_dir, keep=keep_checkpoints, keep_period=keep_period,
                                  async_save=async_checkpointing, view=view)
  writer = loop.MetricsWriter(model_dir, is_chief, tensorboard)
  # What the sweep report and scaling fits read: parameters (total, non-embedding, active)
  # and the exact training FLOPs per token (models/param_count.py), for any model's
  # features (a reward model's or DPO's pairs too: the step's FLOPs over its tokens).
  writer.write('model', start_step, {**param_count.param_counts(model.config),
                                     'flops_per_token': flops_per_step / max(tokens_per_step, 1)})
  try:
    if start_state is not None:
      state = start_state
      if resumed is None and initial is not None:
        loop.chief_print(initial.describe())
    elif resumed is not None:
      state = resumed.state
    else:
      state = _starting_state(trainer, model, initial, early_state)
      if initial is not None:
        loop.chief_print(initial.describe())

    spike = None
    if spike_recovery is not None:
      spike = loop.SpikeRecovery(spike_recovery, ckpt, data, trainer.abstract_state, writer)
      spike.load_state_dict(((resumed.loop if resumed else None) or {}).get(spike.key))

    def loop_state():
      out = {'train_steps': train_steps}
      if spike is not None:
        out[spike.key] = spike.state_dict()
      return out

    checkpoint_policy = loop.CheckpointPolicy(ckpt, data, checkpoint_every, resumed and start_step,
                                              loop_state=loop_state,
                                              save_at_start=spike is not None)
    evaluation = None
    if eval_dataset is not None:
      eval_it = inputs.iterator(eval_dataset, model,
                                partitioner.host_slice(eval_dataset.batch_size))
      evaluation = loop.Evaluation(trainer, [next(eval_it) for _ in range(eval_steps)], writer,
                                   eval_every)
    standard = [
        *([spike] if spike else []),
        loop.NonFiniteLoss(lambda: checkpoint_policy.last_saved),
        loop.StepRecords(writer),
        loop.ProgressLog(writer, log_every, tokens_per_step, flops_per_step, peak_flops),
        *([evaluation] if evaluation else []),
        checkpoint_policy,
    ]
    t_start = time.perf_counter()
    last = loop.run(trainer, state, data, train_steps, standard + list(hooks))
  finally:
    ckpt.close()
    writer.close()
  result: Dict[str, Any] = {'step': last.step, 'stopped_by_signal': last.stopped,
                            'seconds': time.perf_counter() - t_start}
  if last.loss is not None:
    result['train_loss'] = last.loss
  if evaluation is not None and evaluation.first is not None:
    result['first_eval'] = evaluation.first
  if evaluation is not None and last.finished and not last.stopped:
    result['eval'] = evaluation.last
  if samples and eval_split and last.finished and not last.stopped:
    result['samples'] = _print_samples(model, last.state.params, partitioner, train_dataset,
                                       eval_split, samples, sample_prompt_length,
                                       sample_decoding)
  return result


def _print_samples(model, params, partitioner, dataset, split, n, prompt_length, config):
  """Sampled continuations of `n` validation prompts, printed and returned."""
  from t5x_like import infer as infer_lib  # pylint: disable=g-import-not-at-top  (TensorFlow: seqio)
  from t5x_like import vocabularies  # pylint: disable=g-import-not-at-top
  config = config or decoding.DecodingConfig(temperature=0.7, top_p=0.95, max_decode_length=64)
  name = dataset.mixture_or_task_name
  vocabulary = vocabularies.task_vocabulary(name)
  examples = infer_lib.task_examples(name, split, vocabulary, dataset.task_feature_lengths,
                                     prompt_length, n)
  out = infer_lib.generate_tokens(model, params, partitioner, examples,
                                  infer_lib.call_batch_size(partitioner, len(examples)), config)
  samples = []
  loop.chief_print(f'samples ({split} prompts of {prompt_length} tokens, temperature '
                   f'{config.temperature}, top-p {config.top_p}):')
  for e, (ids, _) in zip(examples, out):
    prompt, continuation = vocabulary.decode(e.input_ids), vocabulary.decode(ids)
    samples.append({'prompt': prompt, 'continuation': continuation})
    loop.chief_print(f'  {prompt!r} -> {continuation!r}')
  return samples


def _setting(param: str, value) -> str:
  """The name a user sets train()'s `param` to `value` by (its macro if gin binds one)."""
  return gin_utils.bound_macro('.train', param, value) or f'train_lib.train.{param}'


def _check_settings(args: Dict[str, Any]) -> None:
  """Types and ranges of train()'s own settings, each named as the user sets it."""
  for param, low in (('train_steps', 1), ('num_microbatches', 1), ('log_every', 1),
                     ('eval_every', 0), ('checkpoint_every', 1), ('keep_checkpoints', 1),
                     ('samples', 0), ('sample_prompt_length', 1)):
    utils.check_int(_setting(param, args[param]), args[param], low)
  if args['eval_split'] is not None:
    utils.check_int(_setting('eval_steps', args['eval_steps']), args['eval_steps'], 1,
                    fix='set train_lib.train.eval_steps >= 1, or eval_split = None to skip '
                    'evaluation')
    if not isinstance(args['eval_split'], str) or not args['eval_split']:
      name = _setting('eval_split', args['eval_split'])
      raise utils.InputError(f'{name}={args["eval_split"]!r} must be a split name such as '
                             "'validation', or None to skip evaluation")
  if args['keep_period'] is not None:
    utils.check_int(_setting('keep_period', args['keep_period']), args['keep_period'], 1,
                    fix='set train_lib.train.keep_period >= 1, or None')
  utils.check_int(_setting('seed', args['seed']), args['seed'], low=None)
  if args['peak_flops'] is not None:
    utils.check_float(_setting('peak_flops', args['peak_flops']), args['peak_flops'], 0,
                      include_low=False,
                      fix='set train_lib.train.peak_flops to the FLOP/s of the machine, or None '
                      'to measure it')
  for flag in ('async_checkpointing', 'allow_data_changes', 'initial_checkpoint_upcycle',
               'evaluate_if_done', 'tensorboard'):
    utils.check_bool(_setting(flag, args[flag]), args[flag])
  if args['input_process'] is not None:
    utils.check_bool(_setting('input_process', args['input_process']), args['input_process'])
  if args['trainable_params'] is not None:
    try:
      re.compile(args['trainable_params'])
    except (re.error, TypeError) as e:
      name = _setting('trainable_params', args['trainable_params'])
      raise utils.InputError(f'{name}={args["trainable_params"]!r} is not a regular expression '
                             f"({e}): use e.g. 'lora_|decoder_norm', or None") from None
  if args['spike_recovery'] is not None and not isinstance(args['spike_recovery'],
                                                           loop.SpikePolicy):
    name = _setting('spike_recovery', args['spike_recovery'])
    raise utils.InputError(f'{name}={args["spike_recovery"]!r} must be @loop.SpikePolicy() '
                           'or None')
  if args['sample_decoding'] is not None and not isinstance(args['sample_decoding'],
                                                            decoding.DecodingConfig):
    name = _setting('sample_decoding', args['sample_decoding'])
    raise utils.InputError(f'{name}={args["sample_decoding"]!r} must be '
                           '@decoding.DecodingConfig() or None')
  utils.check_types(args, (('model', (model_lib.BaseModel, preference.PairedModel)),
                           ('train_dataset', pipeline.DatasetConfig),
                           ('optimizer', optimizers.Optimizer),
                           ('partitioner', partitioner_lib.Partitioner)),
                    _setting, 'bind it to a {cls} (see gin/runs/)')


def _check_model_dir(model_dir) -> None:
  """MODEL_DIR must be a directory this process can create or write."""
  name = _setting('model_dir', model_dir)
  if not isinstance(model_dir, str) or not model_dir.strip():
    raise utils.InputError(f'{name}={model_dir!r} must name a directory: set {name} to where '
                           'checkpoints and logs go')
  path = os.path.abspath(model_dir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise utils.InputError(f'{name}={model_dir!r} is a file, not a directory: point {name} at '
                           'a directory')
  existing = utils.nearest_existing(path)
  if not os.path.isdir(existing):
    raise utils.InputError(f'{name}={model_dir!r} cannot be created: {existing} is a file; '
                           f'point {name} elsewhere')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise utils.InputError(f'{name}={model_dir!r} is not writable ({existing} does not allow '
                           f'writing): point {name} at a writable directory')
  for sub in ('checkpoints', 'train', 'eval', 'metrics.jsonl', 'config.gin'):
    p = os.path.join(path, sub)
    if os.path.exists(p) and not os.access(p, os.W_OK):
      raise utils.InputError(f'{p} is not writable: fix its permissions or point {name} at a '
                             'new directory')


def _describe_resume(resumed: checkpoints.Restored, data,
                     train_steps: int) -> None:
  loop.chief_print(f'resumed from step {resumed.step} ({"verified" if resumed.verified else "unverified: written without digests"}); '
                   f'data position {data.batches_consumed} batches')
  before = (resumed.loop or {}).get('train_steps')
  if before is not None and before != train_steps and resumed.step < train_steps:
    loop.chief_print(f'TRAIN_STEPS changed from {before} to {train_steps}: the learning-rate '
                     f'schedule is rebuilt for the new total, from step {resumed.step}')


def _write_config(model_dir: str, config_str: str, start_step: int) -> None:
  """config.gin (the latest launch) and config.<start step>.gin (every launch)."""
  with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
    f.write(config_str)
  path, n = os.path.join(model_dir, f'config.{start_step}.gin'), 1
  while os.path.exists(path):
    with open(path) as f:
      if f.read() == config_str:
        return
    path, n = os.path.join(model_dir, f'config.{start_step}.{n}.gin'), n + 1
  with open(path, 'w') as f:
    f.write(config_str)


def _has_checkpoints(model_dir: str) -> bool:
  """MODEL_DIR holds a checkpoint folder with some step in it (a resume, probably)."""
  try:
    return any(n.isdigit() for n in os.listdir(checkpoints.checkpoint_dir(model_dir)))
  except OSError:
    return False


def _starting_state(trainer: trainer_lib.Trainer, model,
                    initial: Optional[checkpoints.InitialCheckpoint],
                    state: Optional[trainer_lib.TrainState] = None) -> trainer_lib.TrainState:
  """A fresh run's state: initialised (or `state`, the same made earlier), then the
  initial checkpoint's parameters."""
  state = trainer.init_state() if state is None else state
  if initial is None:
    return state
  params = initial.restore(state.params)
  if hasattr(model, 'with_reference'):  # DPO's frozen reference: the restored policy
    params = model.with_reference(params)
    if model.holds_reference_copy:
      loop.chief_print('the DPO reference: a frozen copy of these parameters')
  return state.replace(params=params)


def _partial_view(trainer: trainer_lib.Trainer) -> checkpoints.StateView:
  """Checkpoints hold the trained parameters; the frozen ones come from the live state."""
  return checkpoints.StateView(
      saved=lambda state: state.replace(params=trainer.trainable(state.params)),
      full=lambda saved, current: saved.replace(params=trainer.combine(
          saved.params, trainer.frozen(current.params))))


def run(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> Dict[str, Any]:
  """Parses gin files and bindings afresh and calls train(): the Python/Colab entry.

  Args:
    gin_files: paths, or names relative to the shipped gin/ folder.
    bindings: gin binding strings, e.g. "TRAIN_STEPS = 100".
  """
  return cli.run_gin(train, gin_files, bindings, 'gin/runs/pretrain_default.gin')


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """Parses flags, joins the job (multi-host) and runs the gin-configured train()."""
  args, bindings = cli.parse_args('train', argv)
  cli.join_job(args)
  return run(args.gin_file, bindings)


def _report(result: Dict[str, Any]) -> None:
  if result.get('eval'):
    first = result.get('first_eval', {}).get('loss')
    drop = f' (from {first:.4f} at step 0, {100 * (1 - result["eval"]["loss"] / first):.1f}% lower)' if first else ''
    ev = result['eval']
    extra = ''.join(f', {name} {ev[key]:{fmt}}' for name, key, fmt in (
        ('accuracy', 'accuracy', '.4f'), ('perplexity', 'perplexity', '.2f'),
        ('reward accuracy', 'rewards/accuracy', '.3f'), ('reward margin', 'rewards/margin', '.3f'),
        ('KL to the reference', 'kl', '.4f')) if key in ev)
    loop.chief_print(f'done: step {result["step"]}, validation loss {ev["loss"]:.4f}{drop}{extra}')


def console_main(argv: Optional[Sequence[str]] = None) -> None:
  cli.console(main, argv, _report)


if __name__ == '__main__':
  # Run through the imported module: gin binds `t5x_like.train.train`, not `__main__.train`.
  from t5x_like import train as _train_module  # pylint: disable=g-import-self
  _train_module.console_main()
