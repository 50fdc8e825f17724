"""Data selection: a quality classifier and DSIR importance resampling.

Both work on hashed n-gram features of raw text and are usable in two ways:
offline over a list of texts (what `scripts/select_data.py` does), and as
seqio preprocessors over a `tf.data.Dataset` of dicts with a string `text`
feature (put them before tokenization in a Task's preprocessors, or wrap an
existing Task or Mixture with `register_filtered`).

  features.py:   hashed 1..n-gram ids of text (TF string ops, the same
                 offline and inside tf.data), and SelectionError.
  classifier.py: `train_quality_classifier`, logistic regression (jax, optax
                 L-BFGS, full batch) on L2-normalised log(1 + count) features
                 of examples the user labels positive/negative.
  dsir.py:       DSIR (Xie et al., 2023, "Data Selection for Language Models via
                 Importance Resampling"): Laplace-smoothed bucket distributions
                 of a target and a raw corpus, per-example log importance
                 weights sum_ngrams log p_target - log p_raw, and k examples
                 drawn without replacement in proportion to the weights by the
                 Gumbel top-k trick (`resample`, exact DSIR).
  report.py:     `kl_reduction`: KL(target || features of a selection) against
                 the raw pool and against a random selection of the same size.
  filters.py:    the seqio preprocessors: `quality_filter` keeps examples whose
                 probability is >= a threshold; `importance_filter` is DSIR's
                 streaming approximation, keeping each example with probability
                 min(1, w / c); `register_filtered` copies a Task or Mixture
                 with filters run first.
  storage.py:    the .npz files the fitted models are saved in.

The names below are the public API (`from t5x_like.data import selection`,
`selection.quality_filter` in gin).
"""

from t5x_like.data.selection.classifier import DEFAULT_CLASSIFIER_BUCKETS
from t5x_like.data.selection.classifier import QualityClassifier
from t5x_like.data.selection.classifier import train_quality_classifier
from t5x_like.data.selection.dsir import DEFAULT_DSIR_BUCKETS
from t5x_like.data.selection.dsir import DsirSelection
from t5x_like.data.selection.dsir import dsir_select
from t5x_like.data.selection.dsir import fit_importance_weights
from t5x_like.data.selection.dsir import fit_ngram_distribution
from t5x_like.data.selection.dsir import ImportanceWeights
from t5x_like.data.selection.dsir import importance_log_weights
from t5x_like.data.selection.dsir import resample
from t5x_like.data.selection.features import DEFAULT_NGRAM_ORDER
from t5x_like.data.selection.features import hash_ngrams
from t5x_like.data.selection.features import HashedNgrams
from t5x_like.data.selection.features import ngram_ids
from t5x_like.data.selection.features import SelectionError
from t5x_like.data.selection.filters import importance_filter
from t5x_like.data.selection.filters import quality_filter
from t5x_like.data.selection.filters import register_filtered
from t5x_like.data.selection.report import kl_divergence
from t5x_like.data.selection.report import kl_reduction
from t5x_like.data.selection.report import KLReport

__all__ = [
    'DEFAULT_CLASSIFIER_BUCKETS', 'DEFAULT_DSIR_BUCKETS', 'DEFAULT_NGRAM_ORDER', 'DsirSelection',
    'HashedNgrams', 'ImportanceWeights', 'KLReport', 'QualityClassifier', 'SelectionError',
    'dsir_select', 'fit_importance_weights', 'fit_ngram_distribution', 'hash_ngrams',
    'importance_filter', 'importance_log_weights', 'kl_divergence', 'kl_reduction', 'ngram_ids',
    'quality_filter', 'register_filtered', 'resample', 'train_quality_classifier',
]
