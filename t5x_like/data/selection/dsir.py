"""DSIR importance resampling (Xie et al., 2023, "Data Selection for Language Models via
Importance Resampling").

Laplace-smoothed bucket distributions of a target and a raw corpus, per-example
log importance weights sum_ngrams log p_target - log p_raw, and k examples
drawn without replacement in proportion to the weights by the Gumbel top-k
trick (`resample`, exact DSIR). `filters.importance_filter` is the streaming
approximation over the `ImportanceWeights` saved here.
"""

import dataclasses
import math

import numpy as np

from t5x_like.data.selection import features
from t5x_like.data.selection import report as report_lib
from t5x_like.data.selection import storage

# The DSIR paper's choice: enough buckets to separate domains, few enough that
# a small target corpus estimates every bucket's probability.
DEFAULT_DSIR_BUCKETS = 10_000

_IMPORTANCE_KIND = 'dsir_importance_weights'
_DSIR_CLI = ('python scripts/select_data.py dsir --target TARGET.txt --raw RAW.txt --k N '
             '--output SELECTED.txt --save_weights {path}')


def fit_ngram_distribution(texts: features.TextsOrNgrams,
                           num_buckets: int = DEFAULT_DSIR_BUCKETS,
                           ngram_order: int = features.DEFAULT_NGRAM_ORDER) -> np.ndarray:
  """Add-one (Laplace) smoothed bucket probabilities of a corpus.

  Args:
    texts: the corpus, or its `hash_ngrams` (with the same buckets and order).
    num_buckets: hash buckets.
    ngram_order: longest n-gram.

  Returns:
    [num_buckets] float64, positive, summing to 1.
  """
  counts = features.as_hashed(texts, num_buckets, ngram_order).counts()
  return features.laplace_smoothed(counts)


def _check_distributions(target_dist: np.ndarray, raw_dist: np.ndarray) -> None:
  if target_dist.shape != raw_dist.shape or target_dist.ndim != 1:
    raise features.SelectionError(
        f'target and raw distributions have shapes {target_dist.shape} and '
        f'{raw_dist.shape}: fit both with the same num_buckets')
  if np.any(target_dist <= 0) or np.any(raw_dist <= 0):
    raise features.SelectionError('distributions must be positive everywhere: fit them with '
                                  'fit_ngram_distribution (which smooths)')


def importance_log_weights(texts: features.TextsOrNgrams, target_dist: np.ndarray,
                           raw_dist: np.ndarray,
                           ngram_order: int = features.DEFAULT_NGRAM_ORDER) -> np.ndarray:
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
  hashed = features.as_hashed(texts, len(target_dist), ngram_order)
  return hashed.row_sums(np.log(target_dist) - np.log(raw_dist))


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
    raise features.SelectionError(f'cannot select k={k} of {n} examples: choose 1 <= k <= {n}')
  if np.any(np.isnan(log_weights)):
    raise features.SelectionError(
        'log weights contain NaN: recompute them from finite distributions')
  keys = log_weights + np.random.default_rng(seed).gumbel(size=n)
  return np.sort(np.argpartition(-keys, k - 1)[:k]).astype(np.int64)


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
  ngram_order: int = features.DEFAULT_NGRAM_ORDER
  raw_log_weights: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros([0]))

  def __post_init__(self):
    self.target_dist = np.asarray(self.target_dist, np.float64)
    self.raw_dist = np.asarray(self.raw_dist, np.float64)
    self.raw_log_weights = np.asarray(self.raw_log_weights, np.float64)
    _check_distributions(self.target_dist, self.raw_dist)
    features.check_feature_args(self.num_buckets, self.ngram_order)

  @property
  def num_buckets(self) -> int:
    return len(self.target_dist)

  @property
  def log_ratio(self) -> np.ndarray:
    """[num_buckets] log p_target - log p_raw."""
    return np.log(self.target_dist) - np.log(self.raw_dist)

  def log_weights(self, texts: features.TextsOrNgrams) -> np.ndarray:
    return importance_log_weights(texts, self.target_dist, self.raw_dist, self.ngram_order)

  def log_cap(self, keep_fraction: float) -> float:
    """log c such that min(1, w / c) keeps `keep_fraction` of the raw pool in expectation."""
    if not 0.0 < keep_fraction <= 1.0:
      raise features.SelectionError(f'keep_fraction={keep_fraction} must be in (0, 1]')
    lw = self.raw_log_weights
    if not len(lw):
      raise features.SelectionError(
          'these importance weights hold no raw-pool log weights: fit them with '
          'fit_importance_weights, or pass log_cap explicitly')
    kept = lambda c: np.mean(np.exp(np.minimum(0.0, lw - c)))
    lo, hi = float(lw.min()), float(lw.max() - math.log(keep_fraction))
    for _ in range(200):  # bisection: kept(c) falls from 1 at lo to <= keep_fraction at hi
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if kept(mid) > keep_fraction else (lo, mid)
    return hi

  def save(self, path: str) -> None:
    """Writes the distributions to `path` (.npz; the name is kept as given)."""
    storage.write_npz(path, _IMPORTANCE_KIND, target_dist=self.target_dist,
                      raw_dist=self.raw_dist, ngram_order=np.array(self.ngram_order),
                      raw_log_weights=self.raw_log_weights)

  @classmethod
  def load(cls, path: str) -> 'ImportanceWeights':
    z = storage.read_npz(path, _IMPORTANCE_KIND, _DSIR_CLI)
    return cls(z['target_dist'], z['raw_dist'], int(z['ngram_order']), z['raw_log_weights'])


def fit_importance_weights(target: features.TextsOrNgrams, raw: features.TextsOrNgrams,
                           num_buckets: int = DEFAULT_DSIR_BUCKETS,
                           ngram_order: int = features.DEFAULT_NGRAM_ORDER,
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
  target = features.as_hashed(target, num_buckets, ngram_order)
  raw = features.as_hashed(raw, num_buckets, ngram_order)
  for name, f in (('target', target), ('raw', raw)):
    if not len(f) or not len(f.ids):
      raise features.SelectionError(
          f'the {name} corpus has no n-grams: pass a non-empty --{name} file')
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
  report: report_lib.KLReport


def dsir_select(target_texts: features.Texts, raw_texts: features.Texts, k: int, *,
                num_buckets: int = DEFAULT_DSIR_BUCKETS,
                ngram_order: int = features.DEFAULT_NGRAM_ORDER, seed: int = 0) -> DsirSelection:
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
  raw = features.hash_ngrams(raw_texts, num_buckets, ngram_order)
  if not 1 <= k <= len(raw):
    raise features.SelectionError(f'cannot select k={k} of {len(raw)} raw examples: choose '
                                  f'1 <= k <= {len(raw)}')
  target = features.hash_ngrams(target_texts, num_buckets, ngram_order)
  weights = fit_importance_weights(target, raw, num_buckets, ngram_order, seed=seed)
  log_weights = weights.log_weights(raw)
  indices = resample(log_weights, k, seed)
  report = report_lib.kl_reduction(weights.target_dist, raw, indices, ngram_order=ngram_order,
                                   seed=seed)
  return DsirSelection(indices, log_weights, weights, report)
