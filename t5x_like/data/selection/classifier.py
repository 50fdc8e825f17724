"""The quality classifier: logistic regression on hashed n-gram features.

`train_quality_classifier` fits it (jax, optax L-BFGS, full batch) on
L2-normalised log(1 + count) features of examples the user labels
positive/negative; `filters.quality_filter` keeps examples whose probability
is >= a threshold.
"""

import dataclasses
import json
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import tensorflow as tf

from t5x_like.data.selection import features
from t5x_like.data.selection import storage

DEFAULT_CLASSIFIER_BUCKETS = 2**16

_CLASSIFIER_KIND = 'quality_classifier'
_CLASSIFIER_CLI = ('python scripts/select_data.py train-classifier --positive GOOD.txt '
                   '--negative BAD.txt --output {path}')


def _normalized_features(ids: tf.Tensor):
  """Distinct buckets of one text and their L2-normalised log(1 + count) values."""
  buckets, _, counts = tf.unique_with_counts(ids)
  values = tf.math.log1p(tf.cast(counts, tf.float32))
  # Normalising makes the score independent of length: a long page is not
  # "more" code or prose than one line of it.
  norm = tf.sqrt(tf.reduce_sum(values * values))
  return buckets, values / tf.maximum(norm, 1e-12)


def _sparse_training_features(hashed: features.HashedNgrams):
  """The numpy twin of `_normalized_features` for all rows: (rows, buckets, values)."""
  row_of_id = np.repeat(np.arange(len(hashed), dtype=np.int64), np.diff(hashed.row_splits))
  keys, counts = np.unique(row_of_id * hashed.num_buckets + hashed.ids, return_counts=True)
  rows, buckets = keys // hashed.num_buckets, keys % hashed.num_buckets
  values = np.log1p(counts.astype(np.float64))
  norms = np.sqrt(np.bincount(rows, weights=values * values, minlength=len(hashed)))
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
  ngram_order: int = features.DEFAULT_NGRAM_ORDER
  metrics: Dict[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    features.check_feature_args(self.num_buckets, self.ngram_order)
    self.weights = np.asarray(self.weights, np.float32)
    self.bias = float(self.bias)
    if self.weights.shape != (self.num_buckets,):
      raise features.SelectionError(f'weights have shape {self.weights.shape}, expected '
                                    f'({self.num_buckets},) for num_buckets={self.num_buckets}')

  def probability_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
    """A graph-safe function: scalar string text -> scalar float32 probability."""
    weights = tf.constant(self.weights)
    bias = tf.constant(self.bias, tf.float32)
    num_buckets, ngram_order = self.num_buckets, self.ngram_order

    def probability(text):
      buckets, values = _normalized_features(features.ngram_ids(text, num_buckets, ngram_order))
      return tf.math.sigmoid(tf.reduce_sum(tf.gather(weights, buckets) * values) + bias)

    return probability

  def score(self, texts: features.Texts, batch_size: int = 1024) -> np.ndarray:
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
    storage.write_npz(path, _CLASSIFIER_KIND, weights=self.weights,
                      bias=np.array(self.bias, np.float64), num_buckets=np.array(self.num_buckets),
                      ngram_order=np.array(self.ngram_order),
                      metrics=np.array(json.dumps(self.metrics, sort_keys=True)))

  @classmethod
  def load(cls, path: str) -> 'QualityClassifier':
    z = storage.read_npz(path, _CLASSIFIER_KIND, _CLASSIFIER_CLI)
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


def train_quality_classifier(positive_texts: features.Texts, negative_texts: features.Texts, *,
                             num_buckets: int = DEFAULT_CLASSIFIER_BUCKETS,
                             ngram_order: int = features.DEFAULT_NGRAM_ORDER, l2: float = 1e-4,
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
      raise features.SelectionError(
          f'no {name} examples: train_quality_classifier needs at least one positive and one '
          f'negative text (pass a non-empty --{name} file)')
  if not 0.0 <= holdout_fraction < 1.0:
    raise features.SelectionError(f'holdout_fraction={holdout_fraction} must be in [0, 1)')
  if l2 < 0 or steps < 1:
    raise features.SelectionError(f'l2={l2} must be >= 0 and steps={steps} >= 1')

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
  rows, buckets, values = _sparse_training_features(
      features.hash_ngrams(texts, num_buckets, ngram_order))
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
