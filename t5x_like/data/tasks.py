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
