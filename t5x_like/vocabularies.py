"""The vocabularies inference and evaluation read and write text with.

Bound in gin (`VOCABULARY = @vocabularies.byte_vocabulary()`): the byte
vocabulary the embedded corpus tasks use, a SentencePiece `.model` file (T5,
LLaMA-2) through seqio, or a task's own vocabulary. Every one is a
`seqio.Vocabulary`: `encode`, `decode` (which stops at EOS), `eos_id`, `vocab_size`.
"""

import json
import os
from typing import Optional, Sequence

import numpy as np

# tf_setup first: it imports TensorFlow (under seqio) with its CUDA probing quiet.
from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order
from t5x_like.data import registry  # pylint: disable=g-bad-import-order
import seqio  # pylint: disable=g-bad-import-order
import tensorflow as tf  # pylint: disable=g-bad-import-order

from t5x_like import utils

Vocabulary = seqio.Vocabulary


def byte_vocabulary() -> seqio.Vocabulary:
  """UTF-8 bytes plus the 100 extra ids of the embedded corpus tasks."""
  return registry.DEFAULT_VOCABULARY


def sentencepiece(path: str, extra_ids: int = 0) -> seqio.Vocabulary:
  """A SentencePiece `.model` file (T5: extra_ids=100 sentinels; LLaMA-2: 0)."""
  if not os.path.isfile(path):
    raise utils.InputError(f'SentencePiece model {path!r} does not exist: point '
                           'vocabularies.sentencepiece.path at a .model file')
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def model_vocabulary(kind: str = 'bytes', path: Optional[str] = None,
                     extra_ids: int = 0) -> seqio.Vocabulary:
  """The vocabulary a model reads, as its gin file names it (runs/infer.gin's
  VOCABULARY): 'bytes' (the corpus tasks'), 'sentencepiece' (a .model file) or
  'hf_tokenizer' (a Hugging Face tokenizer.json; `hf import` binds it)."""
  if kind == 'bytes':
    return byte_vocabulary()
  if kind not in ('sentencepiece', 'hf_tokenizer'):
    raise utils.InputError(f"vocabularies.model_vocabulary.kind={kind!r} must be 'bytes', "
                           "'sentencepiece' or 'hf_tokenizer'")
  if not path:
    raise utils.InputError(f'vocabularies.model_vocabulary.kind={kind!r} needs path')
  if kind == 'sentencepiece':
    return sentencepiece(path, extra_ids)
  return hf_tokenizer(path)


class HfTokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face `tokenizer.json` through the `tokenizers` library.

  `encode` adds no special tokens; `prompt_prefix` holds what the tokenizer's
  template puts before a text (LLaMA's <s>), which `infer` puts before prompts
  of decoders without a start token. Decoding stops at EOS and skips special
  tokens. In tf.data (seqio tasks) it runs through `tf.py_function`.
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    with open(path, encoding='utf-8') as f:
      spec = json.load(f)
    specials = {t['content']: t['id'] for t in spec.get('added_tokens', []) if t.get('special')}
    def first(*names):
      return next((specials[n] for n in names if n in specials), None)
    self._eos = first('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>')
    self._bos = first('<s>', '<|begin_of_text|>', '<bos>')
    self._pad = first('<pad>', '<|pad|>')
    self._unk = first('<unk>')
    # What the tokenizer's own template puts before a text (LLaMA: <s>; GPT-2: nothing).
    plain = self._tok.encode('a', add_special_tokens=False).ids
    full = self._tok.encode('a', add_special_tokens=True).ids
    self.prompt_prefix = full[:len(full) - len(plain)] if full[-len(plain):] == plain else []
    super().__init__(extra_ids=0)

  @property
  def eos_id(self) -> Optional[int]:
    return self._eos

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos

  @property
  def pad_id(self) -> int:
    return 0 if self._pad is None else self._pad

  @property
  def unk_id(self) -> Optional[int]:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self._tok.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)

  def _encode_tf(self, s):
    """tf.data: a string (or a vector of them, ragged out) -> int32 ids, through
    the Python tokenizer (`tf.py_function`; the pipeline's position is restored
    by counting batches, so nothing needs to serialize it)."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank:
      return tf.map_fn(self._encode_tf, s,
                       fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
    ids = tf.py_function(lambda x: np.asarray(self._encode(x.numpy().decode('utf-8')),
                                              np.int32), [s], tf.int32)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids):
    """tf.data: ids [n] (or [batch, n]) -> a string (or a vector of them)."""
    ids = tf.convert_to_tensor(ids)
    if ids.shape.rank and ids.shape.rank > 1:
      return tf.map_fn(self._decode_tf, ids, fn_output_signature=tf.string)
    text = tf.py_function(lambda x: self._decode(x.numpy().tolist()), [ids], tf.string)
    text.set_shape([])
    return text

  def __eq__(self, other):
    return isinstance(other, HfTokenizerVocabulary) and other._path == self._path

  def __hash__(self):
    return hash(self._path)


def hf_tokenizer(path: str) -> seqio.Vocabulary:
  """A Hugging Face tokenizer.json file (or a folder holding one)."""
  if os.path.isdir(path):
    path = os.path.join(path, 'tokenizer.json')
  if not os.path.isfile(path):
    raise utils.InputError(f'tokenizer {path!r} does not exist: point '
                           'vocabularies.model_vocabulary.path at a tokenizer.json')
  return HfTokenizerVocabulary(path)


def task_vocabulary(name: str, feature: str = 'targets') -> seqio.Vocabulary:
  """The vocabulary of a registered task's (or mixture's) feature."""
  from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.get_mixture_or_task(name).output_features[feature].vocabulary


def check_fits(vocabulary: seqio.Vocabulary, vocab_size: int) -> None:
  """Fails when the vocabulary has ids the model's embedding does not."""
  if vocabulary.vocab_size > vocab_size:
    raise utils.InputError(
        f'the vocabulary has {vocabulary.vocab_size} ids but the model only {vocab_size}: '
        'bind VOCABULARY to the vocabulary the model was trained with')
