"""The evaluation entry: `python -m eval --gin_file=... --gin.CHECKPOINT_PATH=...`.

For one checkpoint, or every checkpoint of a MODEL_DIR (`EVERY_CHECKPOINT`),
computes on a task or mixture's split:
  * loss (cross-entropy per target token), perplexity and token accuracy, over
    the same batches for every checkpoint;
  * the seqio `metric_fns` of every task that defines them, on decoded
    predictions (and scores), through `seqio.Evaluator`.
Results go to OUTPUT_DIR (default MODEL_DIR/evaluations/<task>.<split>):
`metrics.jsonl` (one record per checkpoint, kind 'eval') and TensorBoard
events under `eval/`; the console prints a table over steps. Checkpoints are
only read.
"""

if __name__ == '__main__':  # run as `python -m t5x_like.evaluate`: what `python -m eval` does first
  from t5x_like import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.start('eval', __name__)

import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from models import metrics as metrics_lib
from models import model as model_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import checkpoints
from t5x_like import cli
from t5x_like import decoding
from t5x_like import gin_utils
from t5x_like import infer as infer_lib
from t5x_like import loop
from t5x_like import trainer as trainer_lib
from t5x_like import utils
from t5x_like.data import pipeline
from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio  # pylint: disable=g-bad-import-order  (after t5x_like.data: TF imported quietly)

# Shown in the console table, in this order, when present.
TABLE = ('loss', 'perplexity', 'accuracy', 'target_tokens')


def _setting(param: str, value: Any = None) -> str:
  return gin_utils.bound_macro('.evaluate', param, value) or f'eval_lib.evaluate.{param}'


def evaluate(*,
             model: model_lib.BaseModel,
             checkpoint_path: str,
             partitioner: partitioner_lib.Partitioner,
             dataset: pipeline.DatasetConfig,
             num_batches: Optional[int] = None,
             every_checkpoint: bool = False,
             output_dir: Optional[str] = None,
             decoding_config: Optional[decoding.DecodingConfig] = None,
             num_predict_examples: Optional[int] = None,
             tensorboard: bool = True,
             config_str: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates one checkpoint or every checkpoint of a MODEL_DIR.

  Args:
    model: the model the checkpoints were trained as.
    checkpoint_path: a MODEL_DIR (its newest checkpoint, or all of them with
      `every_checkpoint`) or one checkpoints/<step> folder.
    partitioner: mesh and rules.
    dataset: the task or mixture, split, lengths and batch size (not shuffled).
    num_batches: batches for the loss metrics (None: the whole split once).
    every_checkpoint: evaluate every checkpoint in the MODEL_DIR, oldest first.
    output_dir: where metrics.jsonl and TensorBoard events go (None:
      MODEL_DIR/evaluations/<task>.<split>).
    decoding_config: how predictions for seqio metric_fns are decoded.
    num_predict_examples: examples per task for the metric_fns (None: all).
    tensorboard: also write TensorBoard events.
    config_str: the operative gin config, written to output_dir/config.gin.

  Returns:
    {'results': [{'step', 'checkpoint', metric: value, ...} per checkpoint],
     'output_dir'}.
  """
  decoding_config = decoding_config or decoding.DecodingConfig()
  _check_settings(locals())
  pipeline.validate(dataset, model)
  abstract = infer_lib.abstract_params(model, partitioner)
  to_evaluate = _checkpoints(checkpoint_path, every_checkpoint, abstract, model, partitioner)
  model_dir = os.path.dirname(to_evaluate[0].directory.rstrip('/'))
  if output_dir is None:
    output_dir = os.path.join(model_dir, 'evaluations',
                              f'{dataset.mixture_or_task_name}.{dataset.split}')
  output_dir = _check_output_dir(output_dir)
  partitioner.check_batch_size(dataset.batch_size, gin_utils.bound_macro(
      'DatasetConfig', 'batch_size', dataset.batch_size) or 'pipeline.DatasetConfig.batch_size')
  partitioner.check_experts(model.config.num_experts)
  metric_tasks = _metric_tasks(dataset)
  if metric_tasks:
    model.check_decodable()
  data = pipeline.InputIterator(dataset, model, partitioner.host_slice(dataset.batch_size),
                                num_epochs=1, pad_last=True)
  batches = []
  for b in data:
    batches.append(b)
    if num_batches is not None and len(batches) >= num_batches:
      break
  if not batches:
    raise utils.InputError(f'{dataset.mixture_or_task_name} split {dataset.split!r} has no '
                           'examples')
  evaluator = None
  if metric_tasks:
    evaluator = seqio.Evaluator(
        dataset.mixture_or_task_name,
        pipeline.feature_converter(model, dataset.task_feature_lengths, pack=False),
        eval_split=dataset.split, sequence_length=dict(dataset.task_feature_lengths),
        num_examples=num_predict_examples, async_compute_metrics=False)

  # --- from here on output_dir is written (checkpoints are only read) ---------------
  is_chief = jax.process_index() == 0
  if is_chief:
    os.makedirs(output_dir, exist_ok=True)
    if config_str is not None:
      with open(os.path.join(output_dir, 'config.gin'), 'w') as f:
        f.write(config_str)
  writer = loop.MetricsWriter(output_dir, is_chief, tensorboard, kinds=('eval',))
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  step_fn = jax.jit(lambda p, b: trainer_lib.eval_metrics(model, p, b),
                    in_shardings=(shardings, partitioner.batch_sharding()),
                    out_shardings=partitioner.replicated())
  results = []
  try:
    for ckpt in to_evaluate:
      params = infer_lib.restore(ckpt, abstract)
      total = None
      with partitioner.context():
        for b in batches:
          m = step_fn(params, partitioner.shard_batch(b, dataset.batch_size))
          total = m if total is None else metrics_lib.merge(total, m)
      values = metrics_lib.compute(total)
      if evaluator is not None:
        values.update(_seqio_metrics(evaluator, model, params, partitioner, decoding_config,
                                     ckpt.step))
      values['checkpoint'] = os.path.join(ckpt.directory, str(ckpt.step))
      writer.write('eval', ckpt.step, values)
      results.append({'step': ckpt.step, **values})
      loop.chief_print(f'eval  step {ckpt.step:>6}{metrics_lib.console_fields(total, values)}')
  finally:
    writer.close()
  return {'results': results, 'output_dir': output_dir}


def _check_settings(args) -> None:
  if args['num_batches'] is not None:
    utils.check_int(_setting('num_batches', args['num_batches']), args['num_batches'], 1,
                    fix='set it >= 1, or None for the whole split')
  if args['num_predict_examples'] is not None:
    utils.check_int(_setting('num_predict_examples', args['num_predict_examples']),
                    args['num_predict_examples'], 1, fix='set it >= 1, or None for all')
  for flag in ('every_checkpoint', 'tensorboard'):
    utils.check_bool(_setting(flag, args[flag]), args[flag])
  utils.check_types(args, (('model', model_lib.BaseModel),
                           ('partitioner', partitioner_lib.Partitioner),
                           ('dataset', pipeline.DatasetConfig),
                           ('decoding_config', decoding.DecodingConfig)),
                    _setting, 'bind it as gin/runs/eval.gin does')


def _checkpoints(path, every: bool, abstract, model, partitioner
                 ) -> List[checkpoints.InitialCheckpoint]:
  """The checkpoints to evaluate, each checked against the model (read-only); a run that
  saved only its trained parameters is read over its recorded frozen base."""
  setting = _setting('checkpoint_path', path)
  first = infer_lib.checked_checkpoint(path, abstract, setting, model, partitioner)
  if not every:
    return [first]
  return [infer_lib.checked_checkpoint(os.path.join(first.directory, str(step)), abstract,
                                       setting, model, partitioner)
          for step in checkpoints.all_steps(os.path.dirname(first.directory.rstrip('/')))]


def _check_output_dir(path) -> str:
  name = _setting('output_dir', path)
  if not isinstance(path, str) or not path.strip():
    raise utils.InputError(f'{name}={path!r} must name a directory (or None for '
                           'MODEL_DIR/evaluations/...)')
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise utils.InputError(f'{name}={path!r} is a file: point it at a directory')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    raise utils.InputError(f'{name}={path!r} holds checkpoints: evaluation writes beside a '
                           'run, not into it; point it elsewhere')
  existing = utils.nearest_existing(path)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise utils.InputError(f'{name}={path!r} cannot be written ({existing} is not writable)')
  return path


def _metric_tasks(dataset: pipeline.DatasetConfig) -> List[seqio.Task]:
  """The tasks of the mixture that define metric_fns and have the split."""
  task = pipeline.get_mixture_or_task(dataset.mixture_or_task_name)
  subtasks = seqio.get_subtasks(task) if isinstance(task, seqio.Mixture) else [task]
  return [t for t in subtasks if t.metric_objs and dataset.split in t.splits]


def _seqio_metrics(evaluator, model, params, partitioner, config, step) -> Dict[str, float]:
  """The tasks' metric_fns on this checkpoint's predictions and scores."""
  batch_size = infer_lib.call_batch_size(partitioner, 8)

  def examples_of(ds):
    """(seqio's example indices, Examples) of the Evaluator's model features."""
    indices, out = [], []
    for n, item in enumerate(ds.as_numpy_iterator()):
      index, ex = item if isinstance(item, tuple) else (n, item)  # (index, features)
      indices.append(int(index))
      if 'encoder_input_tokens' in ex:
        out.append(infer_lib.Example(_unpad(ex['encoder_input_tokens']),
                                     _unpad(ex['decoder_target_tokens'])))
      else:
        tokens = ex['decoder_input_tokens']
        n = int(ex['decoder_causal_attention'].sum()) if 'decoder_causal_attention' in ex else 1
        prompt = [int(t) for t in tokens[1:n]]  # without the start token (infer adds it)
        out.append(infer_lib.Example(prompt, _unpad(ex['decoder_target_tokens'])[len(prompt):]))
    return indices, out

  def predict_fn(ds):
    indices, examples = examples_of(ds)
    records = infer_lib.generate_tokens(model, params, partitioner, examples, batch_size,
                                        config)
    # seqio stacks the predictions into one array: each row ends in EOS, then padding.
    width = max((len(ids) for ids, _ in records), default=0) + 1
    rows = [ids + [config.eos_id] + [0] * (width - len(ids) - 1) for ids, _ in records]
    return list(zip(indices, rows))

  def score_fn(ds):
    indices, examples = examples_of(ds)
    return list(zip(indices, (float(np.sum(t)) for t in infer_lib.score_tokens(
        model, params, partitioner, examples, batch_size))))

  future, _ = evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn,
                                 score_fn=score_fn)
  out = {}
  for task, metrics in future.result().items():
    for name, value in metrics.items():
      value = getattr(value, 'value', value)
      if isinstance(value, (int, float, np.floating, np.integer)):
        out[f'{task}/{name}'] = float(value)
  return out


def _unpad(row) -> List[int]:
  ids = [int(t) for t in row]
  while ids and ids[-1] == 0:
    ids.pop()
  return ids


def print_table(results: Sequence[Dict[str, Any]]) -> None:
  """A table over steps: the standard metrics, then any task metrics."""
  if not results:
    return
  extra = sorted({k for r in results for k in r if '/' in k})
  cols = [c for c in TABLE if c in results[0]] + extra
  loop.chief_print('step    ' + '  '.join(f'{c:>14}' for c in cols))
  for r in results:
    cells = []
    for c in cols:
      v = r.get(c)
      cells.append(f'{v:>14.4f}' if isinstance(v, float) else f'{str(v):>14}')
    loop.chief_print(f'{r["step"]:<8}' + '  '.join(cells))


# --- command line ------------------------------------------------------------------------
def run(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> Dict[str, Any]:
  """Parses gin files and bindings afresh and calls evaluate(): the Python/Colab entry."""
  return cli.run_gin(evaluate, gin_files, bindings, 'runs/eval.gin')


def main(argv: Sequence[str]) -> Dict[str, Any]:
  args, bindings = cli.parse_args('eval', argv)
  cli.join_job(args)
  return run(args.gin_file, bindings)


def _report(result: Dict[str, Any]) -> None:
  print_table(result['results'])
  loop.chief_print(f'wrote {os.path.join(result["output_dir"], "metrics.jsonl")}')


def console_main(argv: Optional[Sequence[str]] = None) -> None:
  cli.console(main, argv, _report)


if __name__ == '__main__':
  from t5x_like import evaluate as _evaluate_module  # pylint: disable=g-import-self
  _evaluate_module.console_main()
