"""The selection models as seqio preprocessors over raw text, and Task copies that run them.

Put `quality_filter` or `importance_filter` before tokenization in a Task's
preprocessors, or wrap an existing Task or Mixture with `register_filtered`.
"""

from typing import Callable, Optional, Sequence

from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio
import tensorflow as tf

from t5x_like.data import mixtures
from t5x_like.data.selection import classifier
from t5x_like.data.selection import dsir
from t5x_like.data.selection import features


def _check_text_key(dataset: tf.data.Dataset, text_key: str, who: str) -> None:
  """Raises SelectionError unless `text_key` is a scalar string feature of `dataset`."""
  spec = dataset.element_spec
  if not isinstance(spec, dict) or text_key not in spec:
    keys = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
    raise features.SelectionError(
        f'{who} reads the string feature {text_key!r} but the dataset has {keys}: put the '
        'filter before tokenization (first in the Task\'s preprocessors) or set text_key')
  if spec[text_key].dtype != tf.string or spec[text_key].shape.rank != 0:
    raise features.SelectionError(f'{who}: feature {text_key!r} is {spec[text_key]}, not a '
                                  'scalar string: put the filter before tokenization')


def quality_filter(dataset: tf.data.Dataset, model_path: str, threshold: float = 0.5,
                   text_key: str = 'text') -> tf.data.Dataset:
  """seqio preprocessor: keeps the examples whose quality score is >= `threshold`.

  Deterministic (no randomness); the score is `QualityClassifier.score`'s,
  compared with `threshold` in float32. Other features pass through unchanged.

  Args:
    dataset: examples with a scalar string feature `text_key`.
    model_path: a .npz from `train_quality_classifier(...).save` or
      `scripts/select_data.py train-classifier`.
    threshold: in [0, 1].
    text_key: the feature to score.

  Returns:
    The filtered dataset.
  """
  if not 0.0 <= threshold <= 1.0:
    raise features.SelectionError(
        f'quality threshold={threshold} must be a probability in [0, 1]')
  probability = classifier.QualityClassifier.load(model_path).probability_fn()
  _check_text_key(dataset, text_key, 'quality_filter')
  threshold = tf.constant(threshold, tf.float32)
  return dataset.filter(lambda ex: probability(ex[text_key]) >= threshold)


def importance_filter(dataset: tf.data.Dataset, weights_path: str, keep_fraction: float = 0.1,
                      log_cap: Optional[float] = None, seed: int = 0,
                      text_key: str = 'text') -> tf.data.Dataset:
  """seqio preprocessor: streaming DSIR by rejection sampling.

  Keeps each example with probability min(1, w / c), w its importance weight.
  This approximates DSIR: `resample` (offline, Gumbel top-k) draws exactly k
  without replacement in proportion to w; a stream cannot see all weights
  first, so the count kept is random and examples with w >= c are all kept.

  The coin of an example is keyed on (seed, a hash of its text), so the choice
  does not depend on order, sharding or restarts; identical texts share it.

  Args:
    dataset: examples with a scalar string feature `text_key`.
    weights_path: a .npz from `ImportanceWeights.save` or
      `scripts/select_data.py dsir ... --save_weights`.
    keep_fraction: expected fraction of the raw pool kept; sets c from the raw
      log weights saved at fit time. Ignored when `log_cap` is given.
    log_cap: log c, to set the cap directly.
    seed: the random choices are a function of (seed, text).
    text_key: the feature to weigh.

  Returns:
    The filtered dataset.
  """
  weights = dsir.ImportanceWeights.load(weights_path)
  if log_cap is None:
    log_cap = weights.log_cap(keep_fraction)
  _check_text_key(dataset, text_key, 'importance_filter')
  log_ratio = tf.constant(weights.log_ratio, tf.float64)
  log_cap = tf.constant(log_cap, tf.float64)
  seed = tf.constant(seed, tf.int64)
  num_buckets, ngram_order = weights.num_buckets, weights.ngram_order

  def keep(ex):
    text = ex[text_key]
    ids = features.ngram_ids(text, num_buckets, ngram_order)
    log_w = tf.reduce_sum(tf.gather(log_ratio, ids))
    text_hash = tf.strings.to_hash_bucket_fast(text, 2**62)
    u = tf.random.stateless_uniform([], tf.stack([seed, text_hash]), dtype=tf.float64)
    return u < tf.exp(tf.minimum(log_w - log_cap, tf.constant(0.0, tf.float64)))

  return dataset.filter(keep)


def register_filtered(mixture_or_task_name: str, filters: Sequence[Callable[..., tf.data.Dataset]],
                      suffix: str = 'selected') -> str:
  """Registers a copy of a Task, or of every Task of a Mixture, with `filters` run first.

  The filters see the source's raw examples (before any rekey or tokenization)
  and run in every split. Mixture rates are kept. For gin:
      MIXTURE_OR_TASK_NAME = @selection.register_filtered()
      selection.register_filtered.mixture_or_task_name = 'stdlib_lm'
      selection.register_filtered.filters = [@selection.quality_filter]
      selection.quality_filter.model_path = '/tmp/quality.npz'

  Args:
    mixture_or_task_name: a registered Task or Mixture.
    filters: preprocessors over raw examples (e.g. `quality_filter` with bound arguments).
    suffix: the new names are `<name>_<suffix>`.

  Returns:
    The name of the new Task or Mixture.
  """
  filters = list(filters)

  def filtered_task(task: seqio.Task) -> str:
    name = f'{task.name}_{suffix}'
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(
        name, task.replace(name=name, preprocessors=filters + list(task.preprocessors)))
    return name

  if mixture_or_task_name in seqio.MixtureRegistry.names():
    mixture = seqio.get_mixture_or_task(mixture_or_task_name)
    return mixtures.register_mixture(f'{mixture_or_task_name}_{suffix}',
                                     [filtered_task(t) for t in mixture.tasks],
                                     rates=[mixture.get_rate(t) for t in mixture.tasks])
  if mixture_or_task_name in seqio.TaskRegistry.names():
    return filtered_task(seqio.get_mixture_or_task(mixture_or_task_name))
  raise features.SelectionError(
      f'no Task or Mixture named {mixture_or_task_name!r} is registered: import the module '
      'that registers it (e.g. t5x_like.data.tasks) first')

