"""Data selection: a quality classifier and DSIR importance resampling.

Both work on hashed n-gram features of raw text and are usable in two ways:
offline over a list of texts (what `scripts/select_data.py` does), and as
seqio preprocessors over a `tf.data.Dataset` of dicts with a string `text`
feature (put them before tokenization in a Task's preprocessors, or wrap an
existing Task or Mixture with `register_filtered`).

  Features:   lowercase, split into words (runs of letters, digits and `_`)
              and single punctuation marks, take 1..n-grams and hash each into
              `num_buckets` with FarmHash (`tf.strings.to_hash_bucket_fast`),
              which is the same in every process and on every machine. The
              featurizer is TF string ops, called eagerly offline and in the
              graph inside tf.data, so both paths give the same buckets.
  Quality:    `train_quality_classifier` fits logistic regression (jax,
              optax L-BFGS, full batch) on L2-normalised log(1 + count)
              features of examples the user labels positive/negative;
              `quality_filter` keeps examples whose probability is >= a
              threshold.
  Importance: DSIR (Xie et al., 2023, "Data Selection for Language Models via
              Importance Resampling"): Laplace-smoothed bucket distributions of
              a target and a raw corpus, per-example log importance weights
              sum_ngrams log p_target - log p_raw, and k examples drawn without
              replacement in proportion to the weights by the Gumbel top-k trick
              (`resample`, exact DSIR). `importance_filter` is the streaming
              approximation: keep each example with probability min(1, w / c).
              `kl_reduction` reports KL(target || features of a selection)
              against the raw pool and against a random selection of the same size.
"""

import dataclasses
import json
import math
import os
import tempfile
from typing import Callable, Dict, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
import tensorflow as tf

from t5x_like.data import mixtures

DEFAULT_CLASSIFIER_BUCKETS = 2**16
# The DSIR paper's choice: enough buckets to separate domains, few enough that
# a small target corpus estimates every bucket's probability.
DEFAULT_DSIR_BUCKETS = 10_000
DEFAULT_NGRAM_ORDER = 2

_FORMAT_VERSION = 1
_CLASSIFIER_KIND = 'quality_classifier'
_IMPORTANCE_KIND = 'dsir_importance_weights'
# Letters, digits and `_` form words (code identifiers stay whole); any other
# non-space character is a token of its own, so code's punctuation is a feature.
_PUNCTUATION = r'([^\pL\pN_\s])'
_CLASSIFIER_CLI = ('python scripts/select_data.py train-classifier --positive GOOD.txt '
                   '--negative BAD.txt --output {path}')
_DSIR_CLI = ('python scripts/select_data.py dsir --target TARGET.txt --raw RAW.txt --k N '
             '--output SELECTED.txt --save_weights {path}')

Texts = Sequence[Union[str, bytes]]


class SelectionError(ValueError):
  """Data selection given inputs it cannot use; the message names the fix."""


# ----------------------------------------------------------------------------------------------
# Hashed n-gram features.


def _check_feature_args(num_buckets: int, ngram_order: int) -> None:
  if num_buckets < 1:
    raise SelectionError(f'num_buckets={num_buckets} must be >= 1')
  if ngram_order < 1:
    raise SelectionError(f'ngram_order={ngram_order} must be >= 1 (1: unigrams, 2: +bigrams)')


def _ragged_ngram_ids(texts: tf.Tensor, num_buckets: int, ngram_order: int) -> tf.RaggedTensor:
  """Hashed n-gram ids of a batch of texts: [batch] string -> [batch, (ngrams)] int64."""
  # Invalid UTF-8 (possible in TFRecords) would make the Unicode ops below fail.
  t = tf.strings.unicode_transcode(texts, 'UTF-8', 'UTF-8', errors='replace')
  t = tf.strings.lower(t, encoding='utf-8')
  t = tf.strings.regex_replace(t, _PUNCTUATION, r' \1 ')
  tokens = tf.strings.split(t)
  # Unigrams hold no space, so an n-gram never hashes the same string as a unigram.
  ngrams = tf.strings.ngrams(tokens, ngram_width=tuple(range(1, ngram_order + 1)), separator=' ')
  return tf.ragged.map_flat_values(tf.strings.to_hash_bucket_fast, ngrams, num_buckets)


def ngram_ids(text: tf.Tensor, num_buckets: int,
              ngram_order: int = DEFAULT_NGRAM_ORDER) -> tf.Tensor:
  """Hashed n-gram ids of one text, for use inside a tf.data graph.

  Args:
    text: scalar string tensor.
    num_buckets: hash buckets.
    ngram_order: longest n-gram (1: unigrams, 2: unigrams and bigrams, ...).

  Returns:
    [ngrams] int64 ids in [0, num_buckets), one per n-gram occurrence.
  """
  _check_feature_args(num_buckets, ngram_order)
  return _ragged_ngram_ids(tf.reshape(text, [1]), num_buckets, ngram_order).flat_values


@dataclasses.dataclass(frozen=True, eq=False)
class HashedNgrams:
  """Hashed n-gram ids of many texts, row-split like a ragged tensor.

  Attributes:
    ids: [total_ngrams] int32 bucket ids, the texts' n-grams one after another.
    row_splits: [num_texts + 1] int64; text i owns ids[row_splits[i]:row_splits[i + 1]].
    num_buckets: hash buckets.
    ngram_order: longest n-gram.
  """
  ids: np.ndarray
  row_splits: np.ndarray
  num_buckets: int
  ngram_order: int

  def __len__(self) -> int:
    return len(self.row_splits) - 1

  def row(self, i: int) -> np.ndarray:
    return self.ids[self.row_splits[i]:self.row_splits[i + 1]]

  def counts(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """[num_buckets] float64 n-gram counts summed over `rows` (indices; default all)."""
    ids = self.ids
    if rows is not None:
      selected = np.zeros(len(self), bool)
      selected[np.asarray(rows, np.int64)] = True
      ids = ids[np.repeat(selected, np.diff(self.row_splits))]
    return np.bincount(ids, minlength=self.num_buckets).astype(np.float64)

  def row_sums(self, values: np.ndarray) -> np.ndarray:
    """[num_texts]: for each text, the sum of `values[id]` over its n-grams."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(values, np.float64)[self.ids])])
    return cumulative[self.row_splits[1:]] - cumulative[self.row_splits[:-1]]


def hash_ngrams(texts: Texts, num_buckets: int, ngram_order: int = DEFAULT_NGRAM_ORDER,
                batch_size: int = 512) -> HashedNgrams:
  """Hashed n-gram ids of `texts`, computed eagerly with the same ops as `ngram_ids`.

  Args:
    texts: str or UTF-8 bytes.
    num_buckets: hash buckets.
    ngram_order: longest n-gram.
    batch_size: texts per TF call (bounds memory, not the result).

  Returns:
    HashedNgrams with len(texts) rows.
  """
  _check_feature_args(num_buckets, ngram_order)
  texts = list(texts)
  ids, lengths = [np.zeros([0], np.int32)], [np.zeros([0], np.int64)]
  for start in range(0, len(texts), batch_size):
    batch = tf.constant(texts[start:start + batch_size], dtype=tf.string)
    ragged = _ragged_ngram_ids(batch, num_buckets, ngram_order)
    ids.append(ragged.flat_values.numpy().astype(np.int32))
    lengths.append(ragged.row_lengths().numpy().astype(np.int64))
  row_splits = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
  return HashedNgrams(np.concatenate(ids), row_splits, num_buckets, ngram_order)


def _as_hashed(texts_or_features: Union[Texts, HashedNgrams], num_buckets: int,
               ngram_order: int) -> HashedNgrams:
  if isinstance(texts_or_features, HashedNgrams):
    f = texts_or_features
    if (f.num_buckets, f.ngram_order) != (num_buckets, ngram_order):
      raise SelectionError(
          f'features were hashed with num_buckets={f.num_buckets}, ngram_order={f.ngram_order} '
          f'but {num_buckets}, {ngram_order} are needed: hash the texts again with those')
    return f
  if isinstance(texts_or_features, (str, bytes)):
    raise SelectionError('expected a sequence of texts, got a single string: wrap it in a list')
  return hash_ngrams(texts_or_features, num_buckets, ngram_order)


def _check_text_key(dataset: tf.data.Dataset, text_key: str, who: str) -> None:
  spec = dataset.element_spec
  if not isinstance(spec, dict) or text_key not in spec:
    keys = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
    raise SelectionError(
        f'{who} reads the string feature {text_key!r} but the dataset has {keys}: put the '
        'filter before tokenization (first in the Task\'s preprocessors) or set text_key')
  if spec[text_key].dtype != tf.string or spec[text_key].shape.rank != 0:
    raise SelectionError(f'{who}: feature {text_key!r} is {spec[text_key]}, not a scalar string: '
                         'put the filter before tokenization')


def _write_npz(path: str, **arrays) -> None:
  """Writes `path` exactly (np.savez would append .npz), atomically."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_npz(path: str, kind: str, how_to_make: str) -> Dict[str, np.ndarray]:
  how_to_make = how_to_make.format(path=path)
  if not os.path.exists(path):
    raise SelectionError(f'{kind.replace("_", " ")} file {path} not found: make it with '
                         f'{how_to_make}')
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise SelectionError(f'{path} is not a readable .npz file ({e}): make it again with '
                         f'{how_to_make}') from e
  found = str(arrays.get('kind', 'unknown'))
  if found != kind:
    raise SelectionError(f'{path} holds {found!r}, not {kind!r}: make one with {how_to_make}')
  if int(arrays.get('version', 0)) > _FORMAT_VERSION:
    raise SelectionError(f'{path} has format version {int(arrays["version"])}, newer than this '
                         f'code reads ({_FORMAT_VERSION}): update the code')
  return arrays


# ----------------------------------------------------------------------------------------------
# Quality classifier.


def _normalized_features(ids: tf.Tensor):
  """Distinct buckets of one text and their L2-normalised log(1 + count) values."""
  buckets, _, counts = tf.unique_with_counts(ids)
  values = tf.math.log1p(tf.cast(counts, tf.float32))
  # Normalising makes the score independent of length: a long page is not
  # "more" code or prose than one line of it.
  norm = tf.sqrt(tf.reduce_sum(values * values))
  return buckets, values / tf.maximum(norm, 1e-12)


def _sparse_training_features(features: HashedNgrams):
  """The numpy twin of `_normalized_features` for all rows: (rows, buckets, values)."""
  row_of_id = np.repeat(np.arange(len(features), dtype=np.int64), np.diff(features.row_splits))
  keys, counts = np.unique(row_of_id * features.num_buckets + features.ids, return_counts=True)
  rows, buckets = keys // features.num_buckets, keys % features.num_buckets
  values = np.log1p(counts.astype(np.float64))
  norms = np.sqrt(np.bincount(rows, weights=values * values, minlength=len(features)))
  values = values / np.maximum(norms[rows], 1e-12)
  return rows.astype(np.int32), buckets.astype(np.int32), values.astype(np.float32)


@dataclasses.dataclass(eq=False)
class QualityClassifier:
  """Logistic regression over hashed n-gram features: P(positive | text).

  Attributes:
    weights: [num_buckets] float32.
    bias: the logit of an empty text.
    num_buckets: hash buckets of the features.
    ngram_order: longest n-gram of the features.
    metrics: what training measured (accuracies, loss, example counts); saved with the model.
  """
  weights: np.ndarray
  bias: float
  num_buckets: int = DEFAULT_CLASSIFIER_BUCKETS
  ngram_order: int = DEFAULT_NGRAM_ORDER
  metrics: Dict[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _check_feature_args(self.num_buckets, self.ngram_order)
    self.weights = np.asarray(self.weights, np.float32)
    self.bias = float(self.bias)
    if self.weights.shape != (self.num_buckets,):
      raise SelectionError(f'weights have shape {self.weights.shape}, expected '
                           f'({self.num_buckets},) for num_buckets={self.num_buckets}')

  def probability_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
    """A graph-safe function: scalar string text -> scalar float32 probability."""
    weights = tf.constant(self.weights)
    bias = tf.constant(self.bias, tf.float32)
    num_buckets, ngram_order = self.num_buckets, self.ngram_order

    def probability(text):
      buckets, values = _normalized_features(ngram_ids(text, num_buckets, ngram_order))
      return tf.math.sigmoid(tf.reduce_sum(tf.gather(weights, buckets) * values) + bias)

    return probability

  def score(self, texts: Texts, batch_size: int = 1024) -> np.ndarray:
    """[len(texts)] float32 probabilities that each text is positive.

    Computed by the same graph function `quality_filter` runs, so
    `score(texts) >= threshold` is exactly what the filter keeps.
    """
    texts = list(texts)
    if not texts:
      return np.zeros([0], np.float32)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(texts, dtype=tf.string))
    ds = ds.map(self.probability_fn(), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.concatenate(list(ds.batch(batch_size).as_numpy_iterator())).astype(np.float32)

  def save(self, path: str) -> None:
    """Writes the model to `path` (.npz; the name is kept as given)."""
    _write_npz(path, kind=np.array(_CLASSIFIER_KIND), version=np.array(_FORMAT_VERSION),
               weights=self.weights, bias=np.array(self.bias, np.float64),
               num_buckets=np.array(self.num_buckets), ngram_order=np.array(self.ngram_order),
               metrics=np.array(json.dumps(self.metrics, sort_keys=True)))

  @classmethod
  def load(cls, path: str) -> 'QualityClassifier':
    z = _read_npz(path, _CLASSIFIER_KIND, _CLASSIFIER_CLI)
    return cls(weights=z['weights'], bias=float(z['bias']), num_buckets=int(z['num_buckets']),
               ngram_order=int(z['ngram_order']), metrics=json.loads(str(z['metrics'])))


def _fit_logistic_regression(rows, buckets, values, labels, sample_weights, num_buckets, l2,
                             steps):
  """Minimises weighted cross-entropy + l2/2 |w|^2 with full-batch L-BFGS."""
  rows, buckets, values = jnp.asarray(rows), jnp.asarray(buckets), jnp.asarray(values)
  labels, sample_weights = jnp.asarray(labels), jnp.asarray(sample_weights)
  num_examples = labels.shape[0]

  def loss(params):
    logits = jax.ops.segment_sum(params['w'][buckets] * values, rows,
                                 num_segments=num_examples) + params['b']
    ce = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(ce * sample_weights) + 0.5 * l2 * jnp.sum(params['w'] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
      return (optax.apply_updates(params, updates), state), value

    (params, _), values_seen = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params, loss(params), values_seen

  params = {'w': jnp.zeros([num_buckets], jnp.float32), 'b': jnp.zeros([], jnp.float32)}
  params, final_loss, _ = run(params)
  return np.asarray(params['w']), float(params['b']), float(final_loss)


def train_quality_classifier(positive_texts: Texts, negative_texts: Texts, *,
                             num_buckets: int = DEFAULT_CLASSIFIER_BUCKETS,
                             ngram_order: int = DEFAULT_NGRAM_ORDER, l2: float = 1e-4,
                             steps: int = 100, holdout_fraction: float = 0.0,
                             seed: int = 0) -> QualityClassifier:
  """Fits P(positive | text) on examples of good and bad text.

  The two classes weigh equally in the loss whatever their sizes, so a
  threshold of 0.5 means "closer to the positives" even with unbalanced lists.

  Args:
    positive_texts: examples to keep (e.g. reference-quality text).
    negative_texts: examples to drop (e.g. a random sample of the raw pool).
    num_buckets: hash buckets of the features.
    ngram_order: longest n-gram of the features.
    l2: weight of 0.5 * |weights|^2 in the loss (the bias is not penalised).
    steps: L-BFGS iterations.
    holdout_fraction: fraction of each class held out (chosen with `seed`) and
      not trained on, to measure `metrics['holdout_accuracy']`.
    seed: seed of the holdout split (training itself is deterministic).

  Returns:
    The classifier, with `metrics` holding train (and holdout) accuracy and loss.
  """
  positive_texts, negative_texts = list(positive_texts), list(negative_texts)
  for name, texts in (('positive', positive_texts), ('negative', negative_texts)):
    if not texts:
      raise SelectionError(f'no {name} examples: train_quality_classifier needs at least one '
                           f'positive and one negative text (pass a non-empty --{name} file)')
  if not 0.0 <= holdout_fraction < 1.0:
    raise SelectionError(f'holdout_fraction={holdout_fraction} must be in [0, 1)')
  if l2 < 0 or steps < 1:
    raise SelectionError(f'l2={l2} must be >= 0 and steps={steps} >= 1')

  rng = np.random.default_rng(seed)
  train, holdout = {}, {}
  for label, texts in ((1, positive_texts), (0, negative_texts)):
    order = rng.permutation(len(texts))
    # Keep at least one training example per class.
    n_out = min(int(holdout_fraction * len(texts)), len(texts) - 1)
    holdout[label] = [texts[i] for i in np.sort(order[:n_out])]
    train[label] = [texts[i] for i in np.sort(order[n_out:])]

  texts = train[1] + train[0]
  labels = np.array([1.0] * len(train[1]) + [0.0] * len(train[0]), np.float32)
  sample_weights = np.where(labels == 1, 0.5 / len(train[1]), 0.5 / len(train[0]))
  sample_weights = sample_weights.astype(np.float32)
  rows, buckets, values = _sparse_training_features(hash_ngrams(texts, num_buckets, ngram_order))
  weights, bias, loss = _fit_logistic_regression(rows, buckets, values, labels, sample_weights,
                                                 num_buckets, float(l2), int(steps))
  clf = QualityClassifier(weights, bias, num_buckets, ngram_order)

  def accuracy(pos, neg):
    probs = clf.score(pos + neg)
    return float(np.mean((probs >= 0.5) == np.array([True] * len(pos) + [False] * len(neg))))

  clf.metrics = {'num_positive': len(train[1]), 'num_negative': len(train[0]), 'loss': loss,
                 'train_accuracy': accuracy(train[1], train[0])}
  if holdout[1] or holdout[0]:
    clf.metrics.update(holdout_positive=len(holdout[1]), holdout_negative=len(holdout[0]),
                       holdout_accuracy=accuracy(holdout[1], holdout[0]))
  return clf


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
    raise SelectionError(f'quality threshold={threshold} must be a probability in [0, 1]')
  probability = QualityClassifier.load(model_path).probability_fn()
  _check_text_key(dataset, text_key, 'quality_filter')
  threshold = tf.constant(threshold, tf.float32)
  return dataset.filter(lambda ex: probability(ex[text_key]) >= threshold)


# ----------------------------------------------------------------------------------------------
# DSIR importance resampling.


def fit_ngram_distribution(texts: Union[Texts, HashedNgrams],
                           num_buckets: int = DEFAULT_DSIR_BUCKETS,
                           ngram_order: int = DEFAULT_NGRAM_ORDER) -> np.ndarray:
  """Add-one (Laplace) smoothed bucket probabilities of a corpus.

  Args:
    texts: the corpus, or its `hash_ngrams` (with the same buckets and order).
    num_buckets: hash buckets.
    ngram_order: longest n-gram.

  Returns:
    [num_buckets] float64, positive, summing to 1.
  """
  counts = _as_hashed(texts, num_buckets, ngram_order).counts()
  return _smoothed(counts)


def _smoothed(counts: np.ndarray) -> np.ndarray:
  return (counts + 1.0) / (counts.sum() + len(counts))


def _check_distributions(target_dist: np.ndarray, raw_dist: np.ndarray) -> None:
  if target_dist.shape != raw_dist.shape or target_dist.ndim != 1:
    raise SelectionError(f'target and raw distributions have shapes {target_dist.shape} and '
                         f'{raw_dist.shape}: fit both with the same num_buckets')
  if np.any(target_dist <= 0) or np.any(raw_dist <= 0):
    raise SelectionError('distributions must be positive everywhere: fit them with '
                         'fit_ngram_distribution (which smooths)')


def importance_log_weights(texts: Union[Texts, HashedNgrams], target_dist: np.ndarray,
                           raw_dist: np.ndarray,
                           ngram_order: int = DEFAULT_NGRAM_ORDER) -> np.ndarray:
  """DSIR's per-example log importance weights.

  log w(x) = sum over buckets b of count_b(x) * (log p_target(b) - log p_raw(b)),
  the log likelihood ratio of x under two bag-of-hashed-n-grams models.

  Args:
    texts: examples, or their `hash_ngrams` (num_buckets = len(target_dist)).
    target_dist: [num_buckets] from `fit_ngram_distribution` on the target corpus.
    raw_dist: [num_buckets] from `fit_ngram_distribution` on the raw pool.
    ngram_order: longest n-gram (as the distributions were fitted).

  Returns:
    [num_texts] float64.
  """
  target_dist, raw_dist = np.asarray(target_dist, np.float64), np.asarray(raw_dist, np.float64)
  _check_distributions(target_dist, raw_dist)
  features = _as_hashed(texts, len(target_dist), ngram_order)
  return features.row_sums(np.log(target_dist) - np.log(raw_dist))


def resample(log_weights: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
  """Draws k examples without replacement in proportion to exp(log_weights).

  The Gumbel top-k trick, as DSIR does: the k largest of log w_i + Gumbel
  noise are a sample without replacement from the weights' distribution.

  Args:
    log_weights: [num_examples] float (from `importance_log_weights`).
    k: how many to draw, 1 <= k <= num_examples.
    seed: the draw is a function of (log_weights, k, seed).

  Returns:
    [k] int64 indices into log_weights, ascending (the pool's order).
  """
  log_weights = np.asarray(log_weights, np.float64)
  n = len(log_weights)
  if not 1 <= k <= n:
    raise SelectionError(f'cannot select k={k} of {n} examples: choose 1 <= k <= {n}')
  if np.any(np.isnan(log_weights)):
    raise SelectionError('log weights contain NaN: recompute them from finite distributions')
  keys = log_weights + np.random.default_rng(seed).gumbel(size=n)
  return np.sort(np.argpartition(-keys, k - 1)[:k]).astype(np.int64)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
  """KL(p || q) in nats, for distributions over the same buckets (q > 0 where p > 0)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  support = p > 0
  return float(np.sum(p[support] * (np.log(p[support]) - np.log(q[support]))))


@dataclasses.dataclass(frozen=True)
class KLReport:
  """KL(target || hashed-feature distribution) of the raw pool, a random k-subset and the selection.

  All distributions are Laplace-smoothed like `fit_ngram_distribution`, in nats.
  """
  kl_raw: float
  kl_random: float
  kl_selected: float
  num_raw: int
  num_selected: int

  @property
  def reduction_vs_raw(self) -> float:
    return self.kl_raw - self.kl_selected

  @property
  def reduction_vs_random(self) -> float:
    """DSIR's "KL reduction": how much closer to the target than random selection."""
    return self.kl_random - self.kl_selected

  def table(self) -> str:
    rows = [(f'KL(target || raw)       [{self.num_raw} examples]', self.kl_raw),
            (f'KL(target || random-k)  [{self.num_selected} examples]', self.kl_random),
            (f'KL(target || selected)  [{self.num_selected} examples]', self.kl_selected),
            ('KL reduction vs random', self.reduction_vs_random),
            ('KL reduction vs raw', self.reduction_vs_raw)]
    width = max(len(name) for name, _ in rows)
    return '\n'.join(f'{name:<{width}}  {value:9.4f}' for name, value in rows)


def kl_reduction(target_dist: np.ndarray, raw: Union[Texts, HashedNgrams], selected: np.ndarray,
                 *, ngram_order: int = DEFAULT_NGRAM_ORDER, seed: int = 0) -> KLReport:
  """How much closer to the target the selection's features are than the raw pool's.

  Args:
    target_dist: [num_buckets] from `fit_ngram_distribution` on the target corpus.
    raw: the raw pool's texts, or their `hash_ngrams`.
    selected: indices into `raw` of the selected examples.
    ngram_order: longest n-gram (as target_dist was fitted).
    seed: seed of the random k-subset the selection is compared with.

  Returns:
    KLReport with KL(target || raw), KL(target || random k), KL(target || selected).
  """
  target_dist = np.asarray(target_dist, np.float64)
  features = _as_hashed(raw, len(target_dist), ngram_order)
  selected = np.asarray(selected, np.int64)
  k, n = len(selected), len(features)
  if k < 1 or np.any(selected < 0) or np.any(selected >= n):
    raise SelectionError(f'selected must be 1 or more indices into the {n} raw examples')
  random_rows = np.random.default_rng(seed).choice(n, size=k, replace=False)
  kl = lambda rows: kl_divergence(target_dist, _smoothed(features.counts(rows)))
  return KLReport(kl_raw=kl(None), kl_random=kl(random_rows), kl_selected=kl(selected),
                  num_raw=n, num_selected=k)


@dataclasses.dataclass(eq=False)
class ImportanceWeights:
  """The pair of distributions DSIR needs, plus what the streaming filter needs.

  Attributes:
    target_dist: [num_buckets] smoothed target bucket probabilities.
    raw_dist: [num_buckets] smoothed raw-pool bucket probabilities.
    ngram_order: longest n-gram.
    raw_log_weights: log importance weights of (a sample of) the raw pool, to
      set the streaming filter's cap for a wanted keep fraction.
  """
  target_dist: np.ndarray
  raw_dist: np.ndarray
  ngram_order: int = DEFAULT_NGRAM_ORDER
  raw_log_weights: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros([0]))

  def __post_init__(self):
    self.target_dist = np.asarray(self.target_dist, np.float64)
    self.raw_dist = np.asarray(self.raw_dist, np.float64)
    self.raw_log_weights = np.asarray(self.raw_log_weights, np.float64)
    _check_distributions(self.target_dist, self.raw_dist)
    _check_feature_args(self.num_buckets, self.ngram_order)

  @property
  def num_buckets(self) -> int:
    return len(self.target_dist)

  @property
  def log_ratio(self) -> np.ndarray:
    """[num_buckets] log p_target - log p_raw."""
    return np.log(self.target_dist) - np.log(self.raw_dist)

  def log_weights(self, texts: Union[Texts, HashedNgrams]) -> np.ndarray:
    return importance_log_weights(texts, self.target_dist, self.raw_dist, self.ngram_order)

  def log_cap(self, keep_fraction: float) -> float:
    """log c such that min(1, w / c) keeps `keep_fraction` of the raw pool in expectation."""
    if not 0.0 < keep_fraction <= 1.0:
      raise SelectionError(f'keep_fraction={keep_fraction} must be in (0, 1]')
    lw = self.raw_log_weights
    if not len(lw):
      raise SelectionError('these importance weights hold no raw-pool log weights: fit them with '
                           'fit_importance_weights, or pass log_cap explicitly')
    kept = lambda c: np.mean(np.exp(np.minimum(0.0, lw - c)))
    lo, hi = float(lw.min()), float(lw.max() - math.log(keep_fraction))
    for _ in range(200):  # bisection: kept(c) falls from 1 at lo to <= keep_fraction at hi
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if kept(mid) > keep_fraction else (lo, mid)
    return hi

  def save(self, path: str) -> None:
    """Writes the distributions to `path` (.npz; the name is kept as given)."""
    _write_npz(path, kind=np.array(_IMPORTANCE_KIND), version=np.array(_FORMAT_VERSION),
               target_dist=self.target_dist, raw_dist=self.raw_dist,
               ngram_order=np.array(self.ngram_order), raw_log_weights=self.raw_log_weights)

  @classmethod
  def load(cls, path: str) -> 'ImportanceWeights':
    z = _read_npz(path, _IMPORTANCE_KIND, _DSIR_CLI)
    return cls(z['target_dist'], z['raw_dist'], int(z['ngram_order']), z['raw_log_weights'])


def fit_importance_weights(target: Union[Texts, HashedNgrams], raw: Union[Texts, HashedNgrams],
                           num_buckets: int = DEFAULT_DSIR_BUCKETS,
                           ngram_order: int = DEFAULT_NGRAM_ORDER,
                           max_saved_log_weights: int = 100_000,
                           seed: int = 0) -> ImportanceWeights:
  """Fits DSIR's target and raw distributions.

  Args:
    target: texts (or their `hash_ngrams`) that look like the data wanted.
    raw: the pool to select from (or a representative sample of it).
    num_buckets: hash buckets.
    ngram_order: longest n-gram.
    max_saved_log_weights: raw-pool log weights kept (a random sample with
      `seed` beyond this many) to calibrate the streaming filter.
    seed: seed of that sample.

  Returns:
    ImportanceWeights.
  """
  target = _as_hashed(target, num_buckets, ngram_order)
  raw = _as_hashed(raw, num_buckets, ngram_order)
  for name, f in (('target', target), ('raw', raw)):
    if not len(f) or not len(f.ids):
      raise SelectionError(f'the {name} corpus has no n-grams: pass a non-empty --{name} file')
  weights = ImportanceWeights(fit_ngram_distribution(target, num_buckets, ngram_order),
                              fit_ngram_distribution(raw, num_buckets, ngram_order), ngram_order)
  lw = weights.log_weights(raw)
  if len(lw) > max_saved_log_weights:
    lw = lw[np.random.default_rng(seed).choice(len(lw), max_saved_log_weights, replace=False)]
  weights.raw_log_weights = lw
  return weights


@dataclasses.dataclass(frozen=True, eq=False)
class DsirSelection:
  """What `dsir_select` chose and how well.

  Attributes:
    indices: [k] ascending indices into the raw pool.
    log_weights: [num_raw] every raw example's log importance weight.
    weights: the fitted distributions (save them for `importance_filter`).
    report: KL of the selection against the raw pool and random selection.
  """
  indices: np.ndarray
  log_weights: np.ndarray
  weights: ImportanceWeights
  report: KLReport


def dsir_select(target_texts: Texts, raw_texts: Texts, k: int, *,
                num_buckets: int = DEFAULT_DSIR_BUCKETS, ngram_order: int = DEFAULT_NGRAM_ORDER,
                seed: int = 0) -> DsirSelection:
  """DSIR end to end: fit, weigh, resample k of `raw_texts`, report the KL reduction.

  Args:
    target_texts: examples of the data wanted.
    raw_texts: the pool to select from.
    k: how many to select.
    num_buckets: hash buckets.
    ngram_order: longest n-gram.
    seed: seed of the resampling and of the random baseline.

  Returns:
    DsirSelection.
  """
  raw = hash_ngrams(raw_texts, num_buckets, ngram_order)
  if not 1 <= k <= len(raw):
    raise SelectionError(f'cannot select k={k} of {len(raw)} raw examples: choose 1 <= k <= '
                         f'{len(raw)}')
  weights = fit_importance_weights(hash_ngrams(target_texts, num_buckets, ngram_order), raw,
                                   num_buckets, ngram_order, seed=seed)
  log_weights = weights.log_weights(raw)
  indices = resample(log_weights, k, seed)
  report = kl_reduction(weights.target_dist, raw, indices, ngram_order=ngram_order, seed=seed)
  return DsirSelection(indices, log_weights, weights, report)


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
  weights = ImportanceWeights.load(weights_path)
  if log_cap is None:
    log_cap = weights.log_cap(keep_fraction)
  _check_text_key(dataset, text_key, 'importance_filter')
  log_ratio = tf.constant(weights.log_ratio, tf.float64)
  log_cap = tf.constant(log_cap, tf.float64)
  seed = tf.constant(seed, tf.int64)
  num_buckets, ngram_order = weights.num_buckets, weights.ngram_order

  def keep(ex):
    text = ex[text_key]
    log_w = tf.reduce_sum(tf.gather(log_ratio, ngram_ids(text, num_buckets, ngram_order)))
    text_hash = tf.strings.to_hash_bucket_fast(text, 2**62)
    u = tf.random.stateless_uniform([], tf.stack([seed, text_hash]), dtype=tf.float64)
    return u < tf.exp(tf.minimum(log_w - log_cap, tf.constant(0.0, tf.float64)))

  return dataset.filter(keep)


# ----------------------------------------------------------------------------------------------
# Wiring into seqio.


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
  raise SelectionError(f'no Task or Mixture named {mixture_or_task_name!r} is registered: import '
                       'the module that registers it (e.g. t5x_like.data.tasks) first')


__all__ = [
    'DEFAULT_CLASSIFIER_BUCKETS', 'DEFAULT_DSIR_BUCKETS', 'DEFAULT_NGRAM_ORDER', 'DsirSelection',
    'HashedNgrams', 'ImportanceWeights', 'KLReport', 'QualityClassifier', 'SelectionError',
    'dsir_select', 'fit_importance_weights', 'fit_ngram_distribution', 'hash_ngrams',
    'importance_filter', 'importance_log_weights', 'kl_divergence', 'kl_reduction', 'ngram_ids',
    'quality_filter', 'register_filtered', 'resample', 'train_quality_classifier',
]
