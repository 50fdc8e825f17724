"""seqio preprocessors for the pretraining objectives.

Each is a function over a `tf.data.Dataset` of token features, usable in any
Task's preprocessor list and configurable with gin (functools.partial):
  split_tokens:      chunk long documents into pieces of at most N tokens;
  causal LM:         tokenize -> append EOS -> split_tokens_to_targets_length;
  prefix_lm:         split each chunk at a random point into inputs/targets;
  span_corruption:   T5's objective (Raffel et al., 2020): noise spans replaced
                     by unique sentinels in the inputs; the targets list each
                     sentinel followed by the span it replaced.
Sentinels are the vocabulary's last ids (`vocab_size - 1` is the first), as in T5.
"""

from typing import Mapping, Optional, Tuple

import seqio
import tensorflow as tf


class ObjectiveError(ValueError):
  """An objective that cannot be applied to the given lengths or vocabulary."""


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                 feature_key: str = 'targets') -> tf.data.Dataset:
  """Splits `feature_key` into consecutive pieces of at most `max_tokens_per_segment`.

  Other features are dropped (they would be ambiguous across pieces).
  """
  if max_tokens_per_segment < 1:
    raise ObjectiveError(f'max_tokens_per_segment={max_tokens_per_segment} must be >= 1')

  def to_pieces(ex):
    tokens = ex[feature_key]
    n = tf.size(tokens, out_type=tf.int64)
    num = (n + max_tokens_per_segment - 1) // max_tokens_per_segment
    lengths = tf.concat([tf.fill([num - 1], tf.cast(max_tokens_per_segment, tf.int64)),
                         [n - (num - 1) * max_tokens_per_segment]], axis=0)
    pieces = tf.RaggedTensor.from_row_lengths(tokens, lengths)
    return tf.data.Dataset.from_tensor_slices({feature_key: pieces})

  dataset = dataset.filter(lambda ex: tf.size(ex[feature_key]) > 0)
  return dataset.flat_map(to_pieces)


def split_tokens_to_targets_length(dataset: tf.data.Dataset,
                                   sequence_length: Mapping[str, int]) -> tf.data.Dataset:
  """Causal-LM chunking: pieces as long as the `targets` feature."""
  return split_tokens(dataset, sequence_length['targets'])


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              seed: Optional[int] = None) -> tf.data.Dataset:
  """Prefix-LM: chunk `targets` to inputs+targets length, split at a random point.

  The inputs get between 1 and `inputs` tokens and the targets the rest (at most
  `targets`); a chunk of one token yields no example.
  """
  li, lt = sequence_length['inputs'], sequence_length['targets']
  if li < 1 or lt < 2:
    raise ObjectiveError(f'prefix_lm needs inputs >= 1 and targets >= 2 tokens, got '
                         f'{dict(sequence_length)}: raise the task feature lengths')
  # Leave room for the EOS appended to the targets.
  dataset = split_tokens(dataset, li + lt - 1)
  dataset = dataset.filter(lambda ex: tf.size(ex['targets']) > 1)

  @seqio.map_over_dataset(num_seeds=1)
  def split(ex, seed):
    tokens = ex['targets']
    n = tf.size(tokens)
    low = tf.maximum(1, n - (lt - 1))
    high = tf.minimum(li, n - 1)
    cut = tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)
    return {'inputs': tokens[:cut], 'targets': tokens[cut:]}

  return split(dataset)


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float) -> Tuple[int, int]:
  """(tokens_length, targets_length): the raw chunk length whose span-corrupted
  inputs (with sentinels and EOS) fill `inputs_length`, and the targets length
  that results (T5's calculation)."""
  if not 0.0 < noise_density < 1.0:
    raise ObjectiveError(f'noise_density={noise_density} must be in (0, 1)')
  if mean_noise_span_length < 1.0:
    raise ObjectiveError(f'mean_noise_span_length={mean_noise_span_length} must be >= 1')

  def lengths(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_nonnoise = tokens_length - num_noise
    num_spans = max(1, int(round(num_noise / mean_noise_span_length)))
    return num_nonnoise + num_spans + 1, num_noise + num_spans + 1

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  inputs, targets = lengths(tokens_length)
  if tokens_length < 2 or inputs > inputs_length:
    raise ObjectiveError(
        f'inputs length {inputs_length} is too short for span corruption with noise '
        f'density {noise_density} and mean span {mean_noise_span_length}: raise the '
        'inputs feature length')
  return tokens_length, targets


def random_spans_noise_mask(length: tf.Tensor, noise_density: float, seeds,
                            mean_noise_span_length: float) -> tf.Tensor:
  """Boolean [length] mask with about `noise_density * length` noise tokens in
  about `noise_tokens / mean_noise_span_length` spans; the first token is never
  noise. Span lengths are random segmentations of the noise and non-noise counts.
  """
  orig_length = length
  length = tf.maximum(length, 2)
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  num_nonnoise = length - num_noise

  def segmentation(num_items, num_segments, seed):
    # Choose num_segments-1 boundaries among num_items-1 gaps, uniformly.
    first = tf.concat([tf.ones([num_segments - 1], tf.int32),
                       tf.zeros([num_items - num_segments], tf.int32)], 0)
    first = tf.random.experimental.stateless_shuffle(first, seed)
    first = tf.pad(first, [[1, 0]])
    segment_id = tf.cumsum(first)
    return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id, num_segments)

  noise_lengths = segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lengths = segmentation(num_nonnoise, num_spans, seeds[1])
  interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
  starts = tf.cumsum(interleaved)[:-1]
  start_indicator = tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, length)
  span_num = tf.cumsum(start_indicator)
  is_noise = tf.equal(span_num % 2, 1)
  return is_noise[:orig_length]


def _spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """Replaces each run of True in `mask` by one sentinel (vocab_size-1, -2, ...)."""
  prev = tf.pad(mask[:-1], [[1, 0]])
  first = tf.logical_and(mask, tf.logical_not(prev))
  subsequent = tf.logical_and(mask, prev)
  sentinel = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
  tokens = tf.where(first, sentinel, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(subsequent))


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0,
                    max_sentinels: Optional[int] = None) -> tf.data.Dataset:
  """T5 span corruption of the `targets` token stream into inputs/targets.

  Args:
    dataset: examples with tokenized `targets` (whole documents).
    sequence_length: task feature lengths; `inputs` sets the chunk size.
    output_features: the task's features; the `targets` vocabulary supplies
      sentinels from its extra ids.
    noise_density: fraction of tokens corrupted.
    mean_noise_span_length: average corrupted span length.
    max_sentinels: sentinel ids available (default: the vocabulary's extra ids).
  """
  vocab = output_features['targets'].vocabulary
  tokens_length, _ = random_spans_helper(sequence_length['inputs'], noise_density,
                                         mean_noise_span_length)
  available = max_sentinels if max_sentinels is not None else getattr(vocab, 'extra_ids', 0)
  spans = max(1, int(round(round(tokens_length * noise_density) / mean_noise_span_length)))
  if spans > available:
    raise ObjectiveError(
        f'span corruption of {tokens_length}-token chunks needs {spans} sentinel ids but '
        f'the vocabulary has {available} extra ids: use a vocabulary with more extra_ids')
  vocab_size = vocab.vocab_size
  dataset = split_tokens(dataset, tokens_length)

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(ex, seeds):
    tokens = ex['targets']
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds,
                                   mean_noise_span_length)
    return {'inputs': _spans_to_sentinels(tokens, mask, vocab_size),
            'targets': _spans_to_sentinels(tokens, tf.logical_not(mask), vocab_size)}

  return corrupt(dataset)
