"""seqio Tasks and Mixtures over the embedded corpus.

Registered on import (vocabulary: bytes with 100 extra ids: 3 UL2 mode tokens
and 97 sentinels, see preprocessors.MODE_TOKENS):
  stdlib_{code,prose}_lm,             mixture stdlib_lm             (causal LM)
  stdlib_{code,prose}_prefix_lm,      mixture stdlib_prefix_lm      (prefix LM)
  stdlib_{code,prose}_span_corruption, mixture stdlib_span_corruption (T5)
  the same three objectives mixed by characters ({mixture}_by_characters) and
  temperature-scaled with mT5's alpha = 0.3 ({mixture}_temperature);
  stdlib_ul2:  UL2's seven denoisers, 1/7 each, over both domains (denoisers.UL2);
  stdlib_ul2r: U-PaLM's UL2R mixture for continuing a causal decoder.
The domain mixtures use equal rates.
`register_corpus_tasks(vocabulary, prefix)` registers the same set for another
vocabulary (e.g. the SentencePiece model `scripts/train_sentencepiece.py` makes),
and `register_text_task` one task of one objective over any text source.
"""

import logging
import os
from typing import Sequence

from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio
import tensorflow as tf

from t5x_like.data import corpus
from t5x_like.data import denoisers
from t5x_like.data import instructions  # pylint: disable=unused-import  (stdlib_instructions)
from t5x_like.data import mixtures
from t5x_like.data import preferences  # pylint: disable=unused-import  (stdlib_preferences)
from t5x_like.data import preprocessors as prep
from t5x_like.data import registry
from t5x_like.data import sources

EXTRA_IDS = registry.EXTRA_IDS
DEFAULT_VOCABULARY = registry.DEFAULT_VOCABULARY


class _QuietUncachedWarning(logging.Filter):
  """seqio warns that uncached function sources shuffle poorly on restarts; ours
  shuffle whole documents with the run's seed, and resume by exact position."""

  def filter(self, record):
    return 'uncached FunctionDataset' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietUncachedWarning())


def corpus_source(domain: str) -> seqio.DataSource:
  """One domain of the embedded corpus: whole documents, shuffled with the seed."""
  return sources.embedded_corpus(domain)


OBJECTIVES = ('lm', 'prefix_lm', 'span_corruption')


def objective_spec(objective: str, vocabulary: seqio.Vocabulary):
  """(preprocessors, output features) of a single-objective text task."""
  rekey = registry.TEXT_TO_TARGETS
  tokenize = seqio.preprocessors.tokenize
  if objective == 'lm':
    return ([rekey, tokenize, seqio.preprocessors.append_eos,
             prep.split_tokens_to_targets_length],
            {'targets': seqio.Feature(vocabulary, add_eos=True)})
  if objective == 'prefix_lm':
    return ([rekey, tokenize, prep.prefix_lm, seqio.preprocessors.append_eos],
            {'inputs': seqio.Feature(vocabulary, add_eos=False),
             'targets': seqio.Feature(vocabulary, add_eos=True)})
  if objective == 'span_corruption':
    return ([rekey, tokenize, prep.span_corruption, seqio.preprocessors.append_eos_after_trim],
            {'inputs': seqio.Feature(vocabulary, add_eos=True),
             'targets': seqio.Feature(vocabulary, add_eos=True)})
  raise prep.ObjectiveError(f'unknown objective {objective!r}: use one of {", ".join(OBJECTIVES)}'
                            ' (or register_denoising_mixture for UL2)')


def register_text_task(name: str, source: seqio.DataSource, objective: str = 'lm',
                       vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY,
                       preprocessors: Sequence = ()) -> str:
  """Registers a task of one objective over any text source; returns its name (for gin).

  Args:
    name: the task name.
    source: a seqio DataSource yielding {'text': string} (see `sources`).
    objective: 'lm', 'prefix_lm' or 'span_corruption'.
    vocabulary: the tokenizer.
    preprocessors: extra preprocessors run on the raw text first (e.g. the
      quality or importance filters of `selection`).
  """
  steps, features = objective_spec(objective, vocabulary)
  registry.register_seqio_task(name, source, list(preprocessors) + steps, features)
  return name


def register_corpus_tasks(vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY,
                          prefix: str = 'stdlib') -> None:
  """Registers the corpus tasks and mixtures listed above for `vocabulary` (the
  UL2 mixtures only when it has extra ids for the mode tokens and sentinels)."""
  for objective in OBJECTIVES:
    names = [register_text_task(f'{prefix}_{domain}_{objective}', corpus_source(domain),
                                objective, vocabulary) for domain in corpus.DOMAINS]
    mixtures.register_mixture(f'{prefix}_{objective}', names)
    mixtures.register_lazy_mixture(f'{prefix}_{objective}_by_characters', names, 'characters')
    mixtures.register_lazy_mixture(f'{prefix}_{objective}_temperature', names, 'characters',
                                   temperature=1 / 0.3)
  if prep.has_mode_tokens(vocabulary):  # (an HF tokenizer has no extra ids for them)
    domains = {d: corpus_source(d) for d in corpus.DOMAINS}
    denoisers.register_denoising_mixture(f'{prefix}_ul2', domains, denoisers.UL2, vocabulary)
    denoisers.register_denoising_mixture(f'{prefix}_ul2r', domains, denoisers.UL2R, vocabulary)


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
  return seqio.SentencePieceVocabulary(output, extra_ids=EXTRA_IDS)


def sentencepiece_mixture(model_path: str, objective: str = 'lm',
                          prefix: str = 'stdlib_sp') -> str:
  """Registers the corpus tasks for a SentencePiece model; returns the mixture name.

  For gin: `MIXTURE_OR_TASK_NAME = @tasks.sentencepiece_mixture()`.
  """
  if not os.path.exists(model_path):
    raise FileNotFoundError(f'SentencePiece model {model_path} not found: make it with '
                            f'python scripts/train_sentencepiece.py --output={model_path}')
  register_corpus_tasks(seqio.SentencePieceVocabulary(model_path, extra_ids=EXTRA_IDS), prefix)
  return f'{prefix}_{objective}'
