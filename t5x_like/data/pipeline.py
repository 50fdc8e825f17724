"""The input pipeline: seqio task -> feature converter -> global batches -> host rows.

Determinism and resumption: every process builds the same global batch stream
from `seed` (so the stream does not depend on the number of hosts) and keeps
the rows it feeds. The iterator's state is the number of batches consumed; a
restored iterator skips exactly that many batches, so a resumed run sees the
exact next batch. Skipping replays the preprocessing of the skipped batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Any, Dict, Iterator, List, Mapping, Optional, TYPE_CHECKING

import numpy as np

from models import model as model_lib
from models import preference
from t5x_like import gin_utils
from t5x_like import utils
from t5x_like.data import errors

if TYPE_CHECKING:
  import seqio
  import tensorflow as tf


def _seqio():
  """seqio with the shipped tasks registered, imported on first use.

  Importing this module imports no TensorFlow: `DatasetConfig`, `DataError`
  and `batch_hash` serve a trainer whose batches come from the input process
  (service.py), and everything that reads data imports the seqio side here.
  """
  from t5x_like.data import tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the corpus tasks)
  import seqio  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return seqio


DataError = errors.DataError  # (defined apart, importable without TensorFlow)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read and how to batch it.

  Attributes:
    mixture_or_task_name: a registered seqio Task or Mixture.
    task_feature_lengths: e.g. {'targets': 512} or {'inputs': 512, 'targets': 114}.
    split: 'train' or 'validation'.
    batch_size: the global batch size (all hosts together).
    shuffle: shuffle documents and examples.
    seed: the data seed; the same seed gives the same batches.
    pack: pack several examples into each row (segment ids and positions).
    use_cached: read a seqio cache made offline.
  """
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = 'train'
  batch_size: int = 32
  shuffle: bool = True
  seed: int = 0
  pack: bool = True
  use_cached: bool = False

  def __post_init__(self):
    def name(field):
      return gin_utils.setting('pipeline.DatasetConfig', field, getattr(self, field))

    if not isinstance(self.mixture_or_task_name, str) or not self.mixture_or_task_name:
      raise DataError(f'{name("mixture_or_task_name")}={self.mixture_or_task_name!r} must be '
                      "the name of a seqio task or mixture, e.g. 'stdlib_lm'")
    lengths = self.task_feature_lengths
    if not isinstance(lengths, Mapping) or not lengths:
      raise DataError(f'{name("task_feature_lengths")}={lengths!r} must map feature names to '
                      "lengths, e.g. {'targets': 512}")
    for key, length in lengths.items():
      utils.check_int(f'{name("task_feature_lengths")}[{key!r}]', length, 1,
                      fix=f'set {name("task_feature_lengths")} to positive whole lengths')
    object.__setattr__(self, 'task_feature_lengths', dict(lengths))
    utils.check_int(name('batch_size'), self.batch_size, 1)
    utils.check_int(name('seed'), self.seed, low=None)
    if not isinstance(self.split, str) or not self.split:
      raise DataError(f'{name("split")}={self.split!r} must be a split name such as \'train\'')
    for flag in ('shuffle', 'pack', 'use_cached'):
      utils.check_bool(name(flag), getattr(self, flag))


def get_mixture_or_task(name: str):
  seqio = _seqio()  # pylint: disable=redefined-outer-name
  from t5x_like.data import mixtures  # pylint: disable=g-import-not-at-top
  from t5x_like.data import registry  # pylint: disable=g-import-not-at-top
  registry.ensure(name)
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    close = mixtures.similar_names(name)
    hint = (f'did you mean {", ".join(close)}?' if close else
            f'registered: {", ".join(mixtures.registered_names()[:10])}')
    raise DataError(f'unknown mixture or task {name!r}: {hint} (set MIXTURE_OR_TASK_NAME)') from None


def feature_converter(model: model_lib.BaseModel, task_feature_lengths: Mapping[str, int],
                      pack: bool) -> seqio.FeatureConverter:
  """The seqio converter that produces `model`'s features."""
  seqio = _seqio()  # pylint: disable=redefined-outer-name
  from t5x_like.data import preferences  # pylint: disable=g-import-not-at-top
  if isinstance(model, preference.PairedModel):
    return preferences.PairedFeatureConverter(model.encoder_decoder, pack)
  if isinstance(model, model_lib.EncoderDecoderModel):
    if 'inputs' not in task_feature_lengths:
      raise DataError("an encoder-decoder needs an 'inputs' feature length: set "
                      "TASK_FEATURE_LENGTHS = {'inputs': ..., 'targets': ...}")
    return seqio.EncDecFeatureConverter(pack=pack)
  if 'inputs' in task_feature_lengths:
    return seqio.PrefixLMFeatureConverter(pack=pack)
  return seqio.DecoderFeatureConverter(pack=pack)


def validate(config: DatasetConfig, model: model_lib.BaseModel) -> None:
  """Checks names, lengths and vocabulary before anything runs."""
  task = get_mixture_or_task(config.mixture_or_task_name)
  for key in config.task_feature_lengths:
    if key not in task.output_features:
      raise DataError(f'task feature length {key!r} is not a feature of '
                      f'{config.mixture_or_task_name!r} (it has {sorted(task.output_features)})')
  for key, feature in task.output_features.items():
    if key not in config.task_feature_lengths:
      raise DataError(f'{config.mixture_or_task_name!r} needs a length for feature {key!r}: '
                      f'add it to TASK_FEATURE_LENGTHS')
    if feature.vocabulary.vocab_size > model.config.vocab_size:
      raise DataError(f'the {key!r} vocabulary has {feature.vocabulary.vocab_size} ids but the '
                      f'model vocab_size is {model.config.vocab_size}: raise '
                      f'{type(model.config).__name__}.vocab_size')
  if config.split not in task.splits:
    raise DataError(f'split {config.split!r} is not one of {sorted(task.splits)}: set '
                    f'{"train_lib.train.eval_split" if config.split != "train" else "pipeline.DatasetConfig.split"} '
                    'to one of those')
  model.check_lengths(config.task_feature_lengths)
  peft_config = model.config.peft
  if peft_config is not None and peft_config.method.value == 'prompt' and config.pack:
    raise DataError('prompt tuning puts its soft prompt before each row, so a row must hold '
                    'one sequence: set pipeline.DatasetConfig.pack = False')
  if isinstance(model, preference.DpoModel) and model.reference == preference.Reference.PRECOMPUTED:
    spec = build_dataset(config, model).element_spec
    missing = [k for k in preference.REFERENCE_FEATURES if k not in spec]
    if missing:
      raise DataError(f'DpoModel.reference=precomputed needs {missing[0]!r} in the data, but '
                      f'{config.mixture_or_task_name!r} does not carry it: add it with '
                      "scripts/precompute_reference.py, or set REFERENCE = 'on_the_fly'")


# A dataset built only to read its element spec (`batch_shapes`), kept for the next
# `build_dataset` with the same arguments (the run's InputIterator), which takes it:
# tracing the pipeline's functions takes seconds. Only a dataset that was never
# iterated may be handed on (a seeded shuffle reshuffles on every new iteration of
# the same Dataset object), so a taken one leaves the cache. The registered task
# object is part of the key: re-registering a name rebuilds.
_SPEC_ONLY: Dict[str, Any] = {}


def build_dataset(config: DatasetConfig, model: model_lib.BaseModel,
                  num_epochs: Optional[int] = None, drop_remainder: bool = True
                  ) -> tf.data.Dataset:
  """Global batches of model features (numpy-convertible), repeated forever by default.

  With `drop_remainder=False` (evaluation of a finite split) the last batch may
  be short; `InputIterator` pads it.
  """
  key = (config, num_epochs, drop_remainder)
  task = get_mixture_or_task(config.mixture_or_task_name)
  if (_SPEC_ONLY.get('key') == key and _SPEC_ONLY.get('model') is model
      and _SPEC_ONLY.get('task') is task):
    ds = _SPEC_ONLY['ds']
    _SPEC_ONLY.clear()
    return ds
  return _build_dataset(config, model, num_epochs, drop_remainder)


def _spec_of(config: DatasetConfig, model: model_lib.BaseModel):
  """The element spec of `build_dataset(config, model)`; the dataset is kept for it."""
  ds = _build_dataset(config, model, None, True)
  _SPEC_ONLY.clear()
  _SPEC_ONLY.update(key=(config, None, True), model=model,
                    task=get_mixture_or_task(config.mixture_or_task_name), ds=ds)
  return ds.element_spec


def _build_dataset(config, model, num_epochs, drop_remainder):
  converter = feature_converter(model, config.task_feature_lengths, config.pack)
  # Not seqio.get_dataset: it caches small sources in memory after their
  # document shuffle, which would freeze the document order across epochs.
  ds = get_mixture_or_task(config.mixture_or_task_name).get_dataset(
      sequence_length=config.task_feature_lengths, split=config.split,
      use_cached=config.use_cached, shuffle=config.shuffle, num_epochs=num_epochs,
      seed=config.seed, trim_output_features=True, try_in_mem_cache=False)
  ds = converter(ds, config.task_feature_lengths)
  return ds.batch(config.batch_size, drop_remainder=drop_remainder)


def predicted_shapes(config: DatasetConfig, model) -> Optional[Dict[str, tuple]]:
  """The global batch shapes `batch_shapes` will give, known without TensorFlow for a
  decoder (causal or, with an 'inputs' length, prefix LM) or an encoder-decoder under
  seqio's converters, packed or not; None for any other model. The trainer compiles
  with them while the input process starts, and checks them against its answer."""
  lengths, b = dict(config.task_feature_lengths), config.batch_size
  if not set(lengths) <= {'inputs', 'targets'} or 'targets' not in lengths:
    return None
  packed = ('segment_ids', 'positions') if config.pack else ()
  tokens = ('target_tokens', 'input_tokens', 'loss_weights')
  if type(model) is model_lib.DecoderOnlyModel:  # pylint: disable=unidiomatic-typecheck
    length = lengths['targets'] + lengths.get('inputs', 0)
    names = [f'decoder_{k}' for k in tokens + packed]
    if 'inputs' in lengths:
      names.append('decoder_causal_attention')
    return {k: (b, length) for k in names}
  if type(model) is model_lib.EncoderDecoderModel and 'inputs' in lengths:  # pylint: disable=unidiomatic-typecheck
    shapes = {'encoder_input_tokens': (b, lengths['inputs'])}
    shapes.update({f'decoder_{k}': (b, lengths['targets']) for k in tokens + packed})
    shapes.update({f'encoder_{k}': (b, lengths['inputs']) for k in packed})
    return shapes
  return None


def batch_shapes(config: DatasetConfig, model: model_lib.BaseModel) -> Dict[str, tuple]:
  """Feature name -> global batch shape, read from the pipeline's element spec."""
  spec = _spec_of(config, model)
  return {k: tuple(v.shape) for k, v in spec.items()}


def batch_hash(batch: Mapping[str, np.ndarray]) -> str:
  """A short digest of a batch, logged per step so resumes can be audited."""
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(k.encode())
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()[:16]


def fingerprint(config: DatasetConfig) -> Dict[str, Any]:
  """What makes two pipelines the same stream: checked when an iterator is restored."""
  _seqio()
  from t5x_like.data import mixtures  # pylint: disable=g-import-not-at-top
  return {'seed': config.seed, 'batch_size': config.batch_size,
          'mixture_or_task_name': config.mixture_or_task_name,
          'task_feature_lengths': dict(config.task_feature_lengths),
          'mixture': {k: round(v, 9) for k, v in mixtures.describe(
              config.mixture_or_task_name).items()}}


class InputIterator:
  """Host-local batches with a checkpointable position.

  Yields dicts of numpy arrays holding rows `row_slice` of each global batch.
  `last_batch_hash` is the digest of the whole global batch just served, the
  same on every host and for any number of hosts.
  """

  def __init__(self, config: DatasetConfig, model: model_lib.BaseModel,
               row_slice: slice = slice(None), num_epochs: Optional[int] = None,
               pad_last: bool = False):
    """pad_last: keep a finite split's last, short batch, padded with all-zero
    rows (loss weight 0: they change no metric sum), instead of dropping it."""
    self.config = config
    self.pad_last = pad_last
    self.model = model
    self.row_slice = row_slice
    self.num_epochs = num_epochs
    self.batches_consumed = 0
    self.skipped: List[List[int]] = []  # [first, end) ranges of batches never trained on
    self.last_batch_hash: Optional[str] = None
    self._it: Optional[Iterator] = None

  def _iterator(self) -> Iterator:
    if self._it is None:
      ds = build_dataset(self.config, self.model, self.num_epochs,
                         drop_remainder=not self.pad_last)
      if self.batches_consumed:
        ds = ds.skip(self.batches_consumed)
      self._it = ds.prefetch(2).as_numpy_iterator()
    return self._it

  def warm(self) -> None:
    """Builds the pipeline and makes the next batch now (the input process does this
    while the trainer compiles); the next `__next__` serves it. Changes no position."""
    it = self._iterator()
    try:
      first = next(it)
    except StopIteration:
      return
    self._it = itertools.chain([first], it)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._iterator())
    short = self.config.batch_size - next(iter(batch.values())).shape[0]
    if short:
      batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    self.batches_consumed += 1
    self.last_batch_hash = batch_hash(batch)
    return {k: v[self.row_slice] for k, v in batch.items()}

  def state(self) -> Dict[str, Any]:
    return {'batches_consumed': self.batches_consumed, 'skipped': [list(r) for r in self.skipped],
            **fingerprint(self.config)}

  def skip(self, n: int) -> None:
    """Moves the position forward over `n` batches (recorded in `skipped`)."""
    if n <= 0:
      return
    self.skipped.append([self.batches_consumed, self.batches_consumed + n])
    self.batches_consumed += n
    self._it = None

  def restore(self, state: Mapping[str, Any], allow_changes: bool = False) -> None:
    """Continues after `state['batches_consumed']` batches of the same stream.

    Raises `DataError` when the checkpoint's pipeline differs (seed, batch
    size, mixture or its rates, lengths) unless `allow_changes`, which starts
    this pipeline afresh instead.
    """
    mine = self.state()
    changed = [k for k in mine if k not in ('batches_consumed', 'skipped') and k in state
               and state[k] != mine[k]]
    if changed and not allow_changes:
      diffs = ', '.join(f'{k}: checkpoint {state[k]!r} vs now {mine[k]!r}' for k in changed)
      raise DataError(f'the checkpointed data iterator was for another pipeline ({diffs}): '
                      'restore with the same data settings, or set '
                      'train.allow_data_changes = True to start this pipeline afresh')
    self.batches_consumed = 0 if changed else int(state['batches_consumed'])
    self.skipped = [] if changed else [list(r) for r in state.get('skipped', [])]
    self._it = None
