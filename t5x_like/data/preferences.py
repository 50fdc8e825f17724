"""Preference data for DPO and reward models: {"prompt", "chosen", "rejected"} pairs.

  register_preference_task(name, split_files, vocabulary)
      a seqio Task over JSONL files of pairs; its features are `inputs` (the prompt),
      `chosen` and `rejected` (the two responses, each ending in EOS).
  PairedFeatureConverter
      makes the model features of both halves of each pair, one pair per row:
      `chosen_<feature>` holds prompt + chosen and `rejected_<feature>` prompt +
      rejected, as seqio's PrefixLM (decoder-only: the prompt has loss weight 0) or
      EncDec converter would, so chosen and rejected of a pair always share a batch.
  stdlib_preferences()
      registers the embedded preference set: a few lines of standard-library code as
      the prompt, its real next line as `chosen`, and that line with its words
      shuffled as `rejected` (a prompt seen twice is kept once; a hash of it picks the
      split).

Every record is read and checked when the task is registered: a record missing
`prompt`, `chosen` or `rejected` is one line naming the file and line.
"""

import hashlib
import random
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio
import tensorflow as tf

from t5x_like.data import corpus
from t5x_like.data import instructions
from t5x_like.data import registry
from t5x_like.data import errors

FIELDS = ('prompt', 'chosen', 'rejected')


PreferenceDataError = errors.PreferenceDataError  # (defined apart, importable without TensorFlow)


REFERENCE_FEATURES = ('reference_chosen_log_likelihood', 'reference_rejected_log_likelihood')


def _pair(record, vocabulary, where: str) -> Tuple[List[int], List[int], List[int]]:
  if not isinstance(record, Mapping):
    raise PreferenceDataError(f'{where}: a record must be a JSON object with "prompt", "chosen" '
                              'and "rejected"')
  missing = [k for k in FIELDS if not isinstance(record.get(k), str)]
  if missing:
    raise PreferenceDataError(
        f'{where}: the record has no text {missing[0]!r} (keys: {", ".join(sorted(record)) or "none"}): '
        'preference data needs "prompt", "chosen" and "rejected" in every record')
  return tuple([int(i) for i in vocabulary.encode(record[k])] for k in FIELDS)


def _source(pairs, references):
  """pairs: split -> [(prompt, chosen, rejected) ids]; references: split -> [(chosen,
  rejected) reference log-likelihoods] (or None)."""

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed
    rows, refs = pairs[split], references.get(split)
    signature = {k: tf.TensorSpec([None], tf.int32) for k in ('inputs', 'chosen', 'rejected')}
    if refs is not None:
      signature.update({k: tf.TensorSpec([], tf.float32) for k in REFERENCE_FEATURES})

    def gen():
      for i, (p, c, r) in enumerate(rows):
        ex = {'inputs': np.asarray(p, np.int32), 'chosen': np.asarray(c, np.int32),
              'rejected': np.asarray(r, np.int32)}
        if refs is not None:
          ex.update({k: np.float32(v) for k, v in zip(REFERENCE_FEATURES, refs[i])})
        yield ex
    return tf.data.Dataset.from_generator(gen, output_signature=signature)

  return seqio.FunctionDataSource(dataset_fn, splits=list(pairs),
                                  num_input_examples={s: len(v) for s, v in pairs.items()})


def register_preference_task(name: str, split_files: instructions.SplitFiles,
                             vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY) -> str:
  """Registers a preference task over JSONL files; returns its name (for gin).

  Args:
    name: the task name.
    split_files: split -> a file pattern or patterns of JSONL pair records.
    vocabulary: the tokenizer.
  """
  files = instructions._files(split_files)  # pylint: disable=protected-access
  pairs, references = {}, {}
  for split, paths in files.items():
    records = [(where, r) for path in paths for where, r in instructions.read_jsonl(path)]
    pairs[split] = [_pair(r, vocabulary, where) for where, r in records]
    if not pairs[split]:
      raise PreferenceDataError(f'split {split!r} of {name} has no pairs ({paths[0]} ...)')
    with_refs = [all(isinstance(r.get(k), (int, float)) for k in REFERENCE_FEATURES)
                 for _, r in records]
    if any(with_refs):
      if not all(with_refs):
        where = records[with_refs.index(False)][0]
        raise PreferenceDataError(
            f'{where}: this record has no numeric {REFERENCE_FEATURES[0]!r} / '
            f'{REFERENCE_FEATURES[1]!r} but others do: precompute them for every record '
            '(scripts/precompute_reference.py)')
      references[split] = [tuple(float(r[k]) for k in REFERENCE_FEATURES) for _, r in records]
  if references and len(references) != len(pairs):
    raise PreferenceDataError(f'{name}: some splits carry reference log-likelihoods and some do '
                              'not: precompute them for every split')
  registry.register_seqio_task(
      name, _source(pairs, references), [instructions.keep_prompt_end,
                             seqio.preprocessors.append_eos_after_trim],
      {'inputs': seqio.Feature(vocabulary, add_eos=False),
       'chosen': seqio.Feature(vocabulary, add_eos=True),
       'rejected': seqio.Feature(vocabulary, add_eos=True)})
  return name


def preference_task(name: str, split_files: instructions.SplitFiles,
                    vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY) -> str:
  """For gin: `MIXTURE_OR_TASK_NAME = @preferences.preference_task()`."""
  return register_preference_task(name, split_files, vocabulary)


class PairedFeatureConverter:
  """Task features (inputs, chosen, rejected) -> `chosen_*` and `rejected_*` model features.

  Each half is what seqio's unpacked PrefixLM (decoder-only) or EncDec converter makes of
  (inputs, response) (tested equal); the reference log-likelihoods a task may carry
  (`REFERENCE_FEATURES`) pass through. Unpacked: one pair per row (packing two sequences
  per pair row-aligned would need a joint packer; pairs are short next to the rows DPO is
  usually run with).
  """

  def __init__(self, encoder_decoder: bool, pack: bool = False):
    if pack:
      raise PreferenceDataError('preference pairs are not packed: set pipeline.DatasetConfig.pack '
                                '= False (each row holds one pair)')
    self.encoder_decoder = encoder_decoder

  def _half(self, inputs, response, n_in: int, n_out: int) -> Dict[str, tf.Tensor]:
    pad = lambda x, n: tf.reshape(tf.pad(x[:n], [[0, n - tf.shape(x[:n])[0]]]), [n])
    shift = lambda x: tf.concat([[0], x[:-1]], axis=0)
    inputs, response = inputs[:n_in], response[:n_out]  # (the task trims them already)
    if self.encoder_decoder:
      targets = pad(response, n_out)
      return {'encoder_input_tokens': pad(inputs, n_in), 'decoder_target_tokens': targets,
              'decoder_input_tokens': shift(targets),
              'decoder_loss_weights': tf.cast(targets > 0, tf.int32)}
    a, b = tf.shape(inputs)[0], tf.shape(response)[0]
    length = n_in + n_out
    seq = pad(tf.concat([inputs, response], axis=0), length)
    position = tf.range(length)
    return {'decoder_target_tokens': seq, 'decoder_input_tokens': shift(seq),
            'decoder_loss_weights': tf.cast((position >= a) & (position < a + b), tf.int32),
            'decoder_causal_attention': tf.cast(position < a + 1, tf.int32)}

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    missing = [k for k in FIELDS[1:] if k not in task_feature_lengths]
    if missing:
      raise PreferenceDataError(
          f"preference data needs a length for {missing[0]!r}: set TASK_FEATURE_LENGTHS = "
          "{'inputs': ..., 'chosen': ..., 'rejected': ...}")
    n_in = task_feature_lengths['inputs']
    n_out = max(task_feature_lengths['chosen'], task_feature_lengths['rejected'])

    def convert(ex):
      out = {}
      for side in ('chosen', 'rejected'):
        half = self._half(ex['inputs'], ex[side], n_in, n_out)
        out.update({f'{side}_{k}': v for k, v in half.items()})
      out.update({k: ex[k] for k in REFERENCE_FEATURES if k in ex})
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


# --- the embedded preference set ----------------------------------------------------
_VERSION = 2
VALIDATION_PERCENT = 5
PROMPT_LINES = 4
STRIDE = 37  # one window every STRIDE lines of each file
MAX_PAIRS = {'train': 4000, 'validation': 250}


def _corrupt(line: str, rng: random.Random) -> Optional[str]:
  """The line with its words shuffled (its indentation kept); None if that changes nothing."""
  indent = line[:len(line) - len(line.lstrip())]
  words = line.split()
  if len(words) < 3:
    return None
  for _ in range(5):
    shuffled = words[:]
    rng.shuffle(shuffled)
    if shuffled != words:
      return indent + ' '.join(shuffled)
  return None


def preference_records():
  """The embedded set's records in a fixed order: {'prompt', 'chosen', 'rejected', 'split'}."""
  rng = random.Random(0)
  counts = {s: 0 for s in MAX_PAIRS}
  seen = set()
  for path in corpus._stdlib_files():  # pylint: disable=protected-access
    try:
      with open(path, encoding='utf-8') as f:
        lines = [l.rstrip() for l in f if l.strip()]
    except (UnicodeDecodeError, OSError):
      continue
    for start in range(0, len(lines) - PROMPT_LINES - 1, STRIDE):
      prompt_lines, chosen = lines[start:start + PROMPT_LINES], lines[start + PROMPT_LINES]
      prompt = '\n'.join(prompt_lines) + '\n'
      if not chosen.isascii() or not prompt.isascii() or not 16 <= len(chosen) <= 60 or len(
          prompt) > 200:
        continue
      if prompt in seen:  # (code repeated across files: kept once, in one split)
        continue
      seen.add(prompt)
      rejected = _corrupt(chosen, rng)
      if rejected is None:
        continue
      h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100
      split = 'validation' if h < VALIDATION_PERCENT else 'train'
      if counts[split] >= MAX_PAIRS[split]:
        continue
      counts[split] += 1
      yield {'prompt': prompt, 'chosen': chosen, 'rejected': rejected, 'split': split}


def build_preferences(root: Optional[str] = None) -> Dict[str, str]:
  """Writes the embedded set (once) as {split}.jsonl; returns split -> path."""
  return instructions.build_split_files(root or instructions.cache_dir('preferences', _VERSION),
                                        preference_records)


STDLIB_PREFERENCES = 'stdlib_preferences'


def register_stdlib_preferences(vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY,
                                name: str = STDLIB_PREFERENCES) -> str:
  """Registers the embedded preference set (built on first use); returns its name."""
  return register_preference_task(name, build_preferences(), vocabulary)


registry.register_lazy(STDLIB_PREFERENCES, register_stdlib_preferences)


def stdlib_preferences(vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY,
                       name: str = STDLIB_PREFERENCES) -> str:
  """For gin: `MIXTURE_OR_TASK_NAME = @preferences.stdlib_preferences()`."""
  return register_stdlib_preferences(vocabulary, name)
