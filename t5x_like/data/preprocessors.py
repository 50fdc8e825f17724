"""seqio preprocessors for the pretraining objectives.

Each is a function over a `tf.data.Dataset` of token features, usable in any
Task's preprocessor list and configurable with gin (functools.partial):
  split_tokens:      chunk long documents into pieces of at most N tokens;
  causal LM:         tokenize -> append EOS -> split_tokens_to_targets_length;
  prefix_lm:         split each chunk at a random point into inputs/targets;
  span_corruption:   T5's objective (Raffel et al., 2020): noise spans replaced
                     by unique sentinels in the inputs; the targets list each
                     sentinel followed by the span it replaced. Also UL2's R-
                     and X-denoisers, with a mode token;
  sequential_denoising: UL2's S-denoiser (prefix LM with a mode token).
Sentinels are the vocabulary's last ids (`vocab_size - 1` is the first), as in T5;
the three extra ids below them are the UL2 mode tokens (see MODE_TOKENS).
"""

import math
from typing import Callable, Mapping, Optional, Tuple

from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio
import tensorflow as tf
from t5x_like.data import errors


ObjectiveError = errors.ObjectiveError  # (defined apart, importable without TensorFlow)


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


# --- denoising (T5 span corruption and the UL2 denoisers) -----------------------------
#
# Reserved ids. Every seqio vocabulary with E extra ids keeps its last E ids for
# this module: the lowest three are the UL2 mode tokens and the rest are
# sentinels, counted down from the last id as in T5:
#   vocab_size - E + 0: [NLU]   (R-denoisers: regular span corruption)
#   vocab_size - E + 1: [NLG]   (X-denoisers: extreme span corruption)
#   vocab_size - E + 2: [S2S]   (S-denoiser: sequential, prefix-LM)
#   vocab_size - 1, vocab_size - 2, ...: sentinels 0, 1, ... (E - 3 of them)
MODE_TOKENS = ('[NLU]', '[NLG]', '[S2S]')


def _extra_ids(vocabulary: seqio.Vocabulary) -> int:
  return int(getattr(vocabulary, 'extra_ids', 0) or 0)


def has_mode_tokens(vocabulary: seqio.Vocabulary) -> bool:
  """Whether `vocabulary` has extra ids for the UL2 mode tokens and a sentinel."""
  return _extra_ids(vocabulary) >= len(MODE_TOKENS) + 1


def mode_token_id(vocabulary: seqio.Vocabulary, mode: str) -> int:
  """The id reserved for a UL2 mode token ('[NLU]', '[NLG]' or '[S2S]')."""
  if mode not in MODE_TOKENS:
    raise ObjectiveError(f'unknown mode token {mode!r}: use one of {", ".join(MODE_TOKENS)}')
  extra = _extra_ids(vocabulary)
  if not has_mode_tokens(vocabulary):
    raise ObjectiveError(
        f'the vocabulary has {extra} extra ids, no room for the {len(MODE_TOKENS)} mode tokens '
        'and sentinels: build it with more extra_ids (e.g. seqio.ByteVocabulary(extra_ids=100))')
  return vocabulary.vocab_size - extra + MODE_TOKENS.index(mode)


def num_sentinels(vocabulary: seqio.Vocabulary) -> int:
  """Sentinel ids available: the extra ids less the reserved mode tokens."""
  return max(0, _extra_ids(vocabulary) - len(MODE_TOKENS))


def concat_and_split(dataset: tf.data.Dataset, length: int, eos_id: int,
                     documents_per_group: int = 32) -> tf.data.Dataset:
  """Joins documents (each followed by EOS) in groups and cuts `length`-token chunks.

  Nearly every chunk is full length, so the noise statistics of a denoiser do
  not depend on document lengths; only the last chunk of each group is short.
  """
  ds = dataset.filter(lambda ex: tf.size(ex['targets']) > 0)
  ds = ds.map(lambda ex: tf.concat([ex['targets'], tf.constant([eos_id], ex['targets'].dtype)], 0))
  ds = ds.ragged_batch(documents_per_group)
  ds = ds.map(lambda r: {'targets': r.flat_values})
  return split_tokens(ds, length)


def _stochastic_round(x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
  """floor(x + u) with u ~ U[0, 1): an integer whose expectation is exactly x."""
  return tf.cast(tf.floor(x + u), tf.int32)


def random_spans_noise_mask(length: tf.Tensor, noise_density: float, seeds,
                            mean_noise_span_length: float) -> tf.Tensor:
  """Boolean [length] mask of noise tokens, in spans; the first token is never noise.

  The number of noise tokens and of spans are stochastically rounded, so that
  over many chunks the noise density is `noise_density` and the mean span
  length is `mean_noise_span_length` exactly in expectation (T5's rounding to
  the nearest integer biases both, e.g. a mean span of 64 in 90 noise tokens
  would always be one span of 90). Span lengths are uniformly random
  segmentations of the noise and non-noise counts, as in T5.

  Args:
    length: the chunk length (>= 2 for any noise).
    noise_density: the expected fraction of noise tokens.
    seeds: three stateless seeds ([2] int tensors).
    mean_noise_span_length: the expected noise tokens per span.
  """
  orig_length = length
  length = tf.maximum(length, 2)
  u = tf.random.stateless_uniform([2], seeds[2])
  num_noise = _stochastic_round(tf.cast(length, tf.float32) * noise_density, u[0])
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = _stochastic_round(tf.cast(num_noise, tf.float32) / mean_noise_span_length, u[1])
  num_spans = tf.clip_by_value(num_spans, 1, tf.minimum(num_noise, length - num_noise))
  num_nonnoise = length - num_noise

  def segmentation(num_items, num_segments, seed):
    # num_segments - 1 boundaries among the num_items - 1 gaps, uniformly.
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


def _ceil(x: float) -> int:
  return int(math.ceil(x - 1e-9))


def _denoising_lengths(sequence_length: Mapping[str, int], noise_density: float,
                       objective: str) -> Tuple[int, int]:
  """(inputs, targets) lengths, after checking them and the noise density."""
  if not 0.0 < noise_density < 1.0:
    raise ObjectiveError(f'noise_density={noise_density} must be in (0, 1)')
  li, lt = sequence_length.get('inputs'), sequence_length.get('targets')
  if li is None or lt is None:
    raise ObjectiveError(f'{objective} needs inputs and targets lengths, got '
                         f'{dict(sequence_length)}: set TASK_FEATURE_LENGTHS')
  return li, lt


def _longest(fits: Callable[[int], bool]) -> int:
  """The largest n >= 1 with fits(2..n) (fits is monotone: longer chunks need more room)."""
  n = 1
  while fits(n + 1):
    n += 1
  return n


def span_corruption_chunk_length(sequence_length: Mapping[str, int], noise_density: float,
                                 mean_noise_span_length: float, max_sentinels: int,
                                 prefix_tokens: int = 0) -> int:
  """The longest raw chunk whose corrupted inputs and targets always fit.

  Worst case over the stochastic rounding: inputs hold the non-noise tokens,
  one sentinel per span, `prefix_tokens` (a mode token) and EOS; targets hold
  the noise tokens, one sentinel per span and EOS; spans never exceed the
  sentinels available. Raises `ObjectiveError` when the lengths are too short
  for even one span of the mean length.
  """
  li, lt = _denoising_lengths(sequence_length, noise_density, 'span corruption')
  if mean_noise_span_length < 1.0:
    raise ObjectiveError(f'mean_noise_span_length={mean_noise_span_length} must be >= 1')
  r, mu = noise_density, mean_noise_span_length

  def fits(n):
    noise_hi = min(n - 1, _ceil(n * r))
    noise_lo = max(1, int(math.floor(n * r)))
    spans_hi = max(1, _ceil(noise_hi / mu))
    return (n - noise_lo + spans_hi + prefix_tokens + 1 <= li and noise_hi + spans_hi + 1 <= lt
            and spans_hi <= max_sentinels)

  n = _longest(fits)
  description = f'noise density {r} and mean span {mu}'
  if max_sentinels < 1:
    raise ObjectiveError(f'span corruption with {description} needs sentinel ids but the '
                         'vocabulary has none left: use a vocabulary with more extra_ids')
  if n * r < mu:
    # Fewer noise tokens per chunk than one mean span: the span length could not be honoured.
    need = _ceil(mu / r)
    need_in = need - int(math.floor(need * r)) + 2 + prefix_tokens + 1
    need_t = _ceil(need * r) + 2 + 1
    raise ObjectiveError(
        f'inputs {li} / targets {lt} are too short for span corruption with {description}: '
        f'a chunk of {n} tokens (with {max_sentinels} sentinels) holds about {n * r:.0f} noise '
        f'tokens, less than one span; raise the feature lengths to at least inputs {need_in} '
        f'and targets {need_t}')
  return n


def _targets_vocabulary(output_features: Mapping[str, seqio.Feature]) -> seqio.Vocabulary:
  return output_features['targets'].vocabulary


def _prepend(mode_id: Optional[int], tokens: tf.Tensor) -> tf.Tensor:
  if mode_id is None:
    return tokens
  return tf.concat([tf.constant([mode_id], tokens.dtype), tokens], 0)


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0,
                    mode: Optional[str] = None,
                    max_sentinels: Optional[int] = None) -> tf.data.Dataset:
  """Span corruption (T5; UL2's R- and X-denoisers) of a tokenized document stream.

  Documents are joined and cut into chunks sized so that the corrupted inputs
  and targets fit `sequence_length` (`span_corruption_chunk_length`). In each
  chunk, noise spans are replaced in the inputs by unique sentinels; the
  targets list each sentinel followed by the span it replaced. Substituting
  the targets back for the sentinels gives the chunk exactly.

  Args:
    dataset: examples with tokenized `targets` (whole documents).
    sequence_length: task feature lengths (`inputs` and `targets`).
    output_features: the task's features; the `targets` vocabulary supplies
      the sentinels and mode tokens from its extra ids.
    noise_density: the fraction of tokens corrupted (UL2's r).
    mean_noise_span_length: the mean corrupted span length (UL2's mu).
    mode: a UL2 mode token to prepend to the inputs ('[NLU]', '[NLG]'), or None (T5).
    max_sentinels: at most this many spans per chunk (default: all sentinels).
  """
  vocab = _targets_vocabulary(output_features)
  mode_id = mode_token_id(vocab, mode) if mode is not None else None
  available = num_sentinels(vocab)
  if max_sentinels is not None:
    available = min(available, max_sentinels)
  n = span_corruption_chunk_length(sequence_length, noise_density, mean_noise_span_length,
                                   available, prefix_tokens=int(mode_id is not None))
  vocab_size = vocab.vocab_size
  dataset = concat_and_split(dataset, n, vocab.eos_id)

  @seqio.map_over_dataset(num_seeds=3)
  def corrupt(ex, seeds):
    tokens = ex['targets']
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds, mean_noise_span_length)
    return {'inputs': _prepend(mode_id, _spans_to_sentinels(tokens, mask, vocab_size)),
            'targets': _spans_to_sentinels(tokens, tf.logical_not(mask), vocab_size)}

  return corrupt(dataset)


def sequential_chunk_length(sequence_length: Mapping[str, int], noise_density: float,
                            prefix_tokens: int = 0) -> int:
  """The longest chunk whose S-denoising inputs and targets always fit."""
  li, lt = _denoising_lengths(sequence_length, noise_density, 'S-denoising')

  def fits(n):
    m = n * noise_density
    w = min(m, n - m)
    t_lo = max(1, int(math.floor(m - w)))
    t_hi = min(n - 1, _ceil(m + w))
    return n - t_lo + prefix_tokens + 1 <= li and t_hi + 1 <= lt

  n = _longest(fits)
  if n < 2:
    raise ObjectiveError(f'inputs {li} / targets {lt} are too short for S-denoising: raise '
                         'the feature lengths')
  return n


def sequential_denoising(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                         output_features: Mapping[str, seqio.Feature],
                         noise_density: float = 0.25,
                         mode: Optional[str] = '[S2S]') -> tf.data.Dataset:
  """UL2's S-denoiser: each chunk split into a prefix (inputs) and its continuation.

  The continuation's length is uniform around `noise_density` x the chunk
  length (from 0 to twice that, or symmetric about it when above one half),
  stochastically rounded, so that the expected fraction of target tokens is
  `noise_density`. A decoder-only model attends to the inputs bidirectionally
  (seqio's prefix-LM feature converter) and is trained on the targets.

  Args:
    dataset: examples with tokenized `targets` (whole documents).
    sequence_length: task feature lengths (`inputs` and `targets`).
    output_features: the task's features (their vocabulary has the mode token).
    noise_density: the expected fraction of each chunk in the targets.
    mode: the mode token to prepend to the inputs, or None.
  """
  vocab = _targets_vocabulary(output_features)
  mode_id = mode_token_id(vocab, mode) if mode is not None else None
  n = sequential_chunk_length(sequence_length, noise_density, int(mode_id is not None))
  dataset = concat_and_split(dataset, n, vocab.eos_id)

  @seqio.map_over_dataset(num_seeds=1)
  def split(ex, seed):
    tokens = ex['targets']
    length = tf.size(tokens)
    lf = tf.cast(length, tf.float32)
    m = lf * noise_density
    w = tf.minimum(m, lf - m)
    u = tf.random.stateless_uniform([2], seed)
    t = _stochastic_round(m + (2.0 * u[0] - 1.0) * w, u[1])
    t = tf.clip_by_value(t, 1, tf.maximum(length - 1, 1))
    cut = length - t
    return {'inputs': _prepend(mode_id, tokens[:cut]), 'targets': tokens[cut:]}

  return split(dataset)
