"""How close a selection is to the target: KL divergences of hashed n-gram distributions.

`kl_reduction` reports KL(target || features of a selection) against the raw
pool and against a random selection of the same size.
"""

import dataclasses

import numpy as np

from t5x_like.data.selection import features


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


def kl_reduction(target_dist: np.ndarray, raw: features.TextsOrNgrams, selected: np.ndarray, *,
                 ngram_order: int = features.DEFAULT_NGRAM_ORDER, seed: int = 0) -> KLReport:
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
  hashed = features.as_hashed(raw, len(target_dist), ngram_order)
  selected = np.asarray(selected, np.int64)
  k, n = len(selected), len(hashed)
  if k < 1 or np.any(selected < 0) or np.any(selected >= n):
    raise features.SelectionError(f'selected must be 1 or more indices into the {n} raw examples')
  random_rows = np.random.default_rng(seed).choice(n, size=k, replace=False)
  kl = lambda rows: kl_divergence(target_dist, features.laplace_smoothed(hashed.counts(rows)))
  return KLReport(kl_raw=kl(None), kl_random=kl(random_rows), kl_selected=kl(selected),
                  num_raw=n, num_selected=k)
