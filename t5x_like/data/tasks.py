"""seqio Tasks and Mixtures over the embedded corpus.

Registered on import (vocabulary: bytes, with 100 sentinel extra ids):
  stdlib_{code,prose}_lm,             mixture stdlib_lm             (causal LM)
  stdlib_{code,prose}_prefix_lm,      mixture stdlib_prefix_lm      (prefix LM)
  stdlib_{code,prose}_span_corruption, mixture stdlib_span_corruption (T5)
`register_corpus_tasks(vocabulary, prefix)` registers the same set for another
vocabulary (e.g. the SentencePiece model `scripts/train_sentencepiece.py` makes).
"""

import functools
import logging
import os
from typing import Optional

import seqio
import tensorflow as tf

from t5x_like.data import corpus
from t5x_like.data import preprocessors as prep

NUM_SENTINELS = 100
DEFAULT_VOCABULARY = seqio.ByteVocabulary(extra_ids=NUM_SENTINELS)


class _QuietUncachedWarning(logging.Filter):
  """seqio warns that uncached function sources shuffle poorly on restarts; ours
  shuffle whole documents with the run's seed, and resume by exact position."""

  def filter(self, record):
    return 'uncached FunctionDataset' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietUncachedWarning())


def _read_domain(split: str, shuffle_files: bool, seed: Optional[int] = None, *,
                 domain: str) -> tf.data.Dataset:
  manifest = corpus.build()
  ds = tf.data.TFRecordDataset(corpus.record_path(domain, split))
  if shuffle_files:
    # Shuffle whole documents, deterministically for a given seed.
    ds = ds.shuffle(manifest[domain][split]['documents'], seed=seed,
                    reshuffle_each_iteration=True)
  return ds.map(lambda text: {'text': text}, num_parallel_calls=tf.data.AUTOTUNE)


def corpus_source(domain: str) -> seqio.DataSource:
  return seqio.FunctionDataSource(functools.partial(_read_domain, domain=domain),
                                  splits=corpus.SPLITS)


def _register_task(name, source, preprocessors, output_features):
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=output_features, metric_fns=[])


def _register_mixture(name, tasks, rate=1.0):
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, rate) for t in tasks])


def register_corpus_tasks(vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY,
                          prefix: str = 'stdlib') -> None:
  """Registers the LM, prefix-LM and span-corruption tasks for `vocabulary`."""
  lm_features = {'targets': seqio.Feature(vocabulary, add_eos=True)}
  seq2seq_features = {'inputs': seqio.Feature(vocabulary, add_eos=True),
                      'targets': seqio.Feature(vocabulary, add_eos=True)}
  prefix_features = {'inputs': seqio.Feature(vocabulary, add_eos=False),
                     'targets': seqio.Feature(vocabulary, add_eos=True)}
  rekey = functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'})
  objectives = {
      'lm': ([rekey, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
              prep.split_tokens_to_targets_length], lm_features),
      'prefix_lm': ([rekey, seqio.preprocessors.tokenize, prep.prefix_lm,
                     seqio.preprocessors.append_eos], prefix_features),
      'span_corruption': ([rekey, seqio.preprocessors.tokenize, prep.span_corruption,
                           seqio.preprocessors.append_eos_after_trim], seq2seq_features),
  }
  for objective, (preprocessors, features) in objectives.items():
    names = []
    for domain in corpus.DOMAINS:
      name = f'{prefix}_{domain}_{objective}'
      _register_task(name, corpus_source(domain), preprocessors, features)
      names.append(name)
    _register_mixture(f'{prefix}_{objective}', names)


register_corpus_tasks()


def train_sentencepiece(output: str, vocab_size: int = 8000,
                        max_sentences: int = 300_000) -> seqio.SentencePieceVocabulary:
  """Trains a unigram SentencePiece model on the corpus' train split.

  ids: 0 pad, 1 eos, 2 unk (seqio's convention); byte fallback keeps every
  character encodable. Returns the vocabulary with sentinel extra ids.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  corpus.build()

  def lines():
    for domain in corpus.DOMAINS:
      for text in tf.data.TFRecordDataset(corpus.record_path(domain, 'train')).as_numpy_iterator():
        for line in text.decode('utf-8').splitlines():
          if line.strip():
            yield line

  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'wb') as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=f, vocab_size=vocab_size, model_type='unigram',
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=200_000,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name='identity', num_threads=2)
  return seqio.SentencePieceVocabulary(output, extra_ids=NUM_SENTINELS)


def sentencepiece_mixture(model_path: str, objective: str = 'lm',
                          prefix: str = 'stdlib_sp') -> str:
  """Registers the corpus tasks for a SentencePiece model; returns the mixture name.

  For gin: `MIXTURE_OR_TASK_NAME = @tasks.sentencepiece_mixture()`.
  """
  if not os.path.exists(model_path):
    raise FileNotFoundError(f'SentencePiece model {model_path} not found: make it with '
                            f'python scripts/train_sentencepiece.py --output={model_path}')
  register_corpus_tasks(seqio.SentencePieceVocabulary(model_path, extra_ids=NUM_SENTINELS), prefix)
  return f'{prefix}_{objective}'
