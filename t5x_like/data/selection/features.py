"""Hashed n-gram features of raw text, shared by the quality classifier and DSIR.

Lowercase, split into words (runs of letters, digits and `_`) and single
punctuation marks, take 1..n-grams and hash each into `num_buckets` with
FarmHash (`tf.strings.to_hash_bucket_fast`), which is the same in every process
and on every machine. The featurizer is TF string ops, called eagerly offline
(`hash_ngrams`) and in the graph inside tf.data (`ngram_ids`), so both paths give
the same buckets.
"""

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import tensorflow as tf
from t5x_like.data import errors

DEFAULT_NGRAM_ORDER = 2

# Letters, digits and `_` form words (code identifiers stay whole); any other
# non-space character is a token of its own, so code's punctuation is a feature.
_PUNCTUATION = r'([^\pL\pN_\s])'

Texts = Sequence[Union[str, bytes]]


SelectionError = errors.SelectionError  # (defined apart, importable without TensorFlow)


def check_feature_args(num_buckets: int, ngram_order: int) -> None:
  """Raises SelectionError unless both are >= 1."""
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
  check_feature_args(num_buckets, ngram_order)
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
  check_feature_args(num_buckets, ngram_order)
  texts = list(texts)
  ids, lengths = [np.zeros([0], np.int32)], [np.zeros([0], np.int64)]
  for start in range(0, len(texts), batch_size):
    batch = tf.constant(texts[start:start + batch_size], dtype=tf.string)
    ragged = _ragged_ngram_ids(batch, num_buckets, ngram_order)
    ids.append(ragged.flat_values.numpy().astype(np.int32))
    lengths.append(ragged.row_lengths().numpy().astype(np.int64))
  row_splits = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
  return HashedNgrams(np.concatenate(ids), row_splits, num_buckets, ngram_order)


TextsOrNgrams = Union[Texts, HashedNgrams]


def as_hashed(texts_or_features: TextsOrNgrams, num_buckets: int,
              ngram_order: int) -> HashedNgrams:
  """`texts_or_features` hashed, checking that given features have these buckets and order."""
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


def laplace_smoothed(counts: np.ndarray) -> np.ndarray:
  """Add-one (Laplace) smoothed probabilities of [num_buckets] counts: positive, summing to 1."""
  return (counts + 1.0) / (counts.sum() + len(counts))
