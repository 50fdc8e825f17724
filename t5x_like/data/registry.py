"""What every task-registering module shares: the default vocabulary and Task registration.

`tasks` (single-objective text tasks) and `denoisers` (UL2's mixtures of
denoisers) both import this module and not each other.
"""

import functools
from typing import Callable, Dict, Mapping, Sequence

from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio

# 3 UL2 mode tokens and 97 sentinels (see preprocessors.MODE_TOKENS).
EXTRA_IDS = 100
DEFAULT_VOCABULARY = seqio.ByteVocabulary(extra_ids=EXTRA_IDS)

# The first preprocessor of a text task: sources yield {'text': ...}, objectives read 'targets'.
TEXT_TO_TARGETS = functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'})


def register_seqio_task(name: str, source: seqio.DataSource, preprocessors: Sequence,
                        output_features: Mapping[str, seqio.Feature],
                        shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE,
                        metric_fns: Sequence = ()) -> seqio.Task:
  """Registers a seqio Task, replacing one of the same name; returns the new Task."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                                output_features=output_features, metric_fns=list(metric_fns),
                                shuffle_buffer_size=shuffle_buffer_size)


# Tasks built on first use (their data takes seconds to make): name -> registering function.
_LAZY: Dict[str, Callable[[], str]] = {}


def register_lazy(name: str, register: Callable[[], str]) -> None:
  """`register()` registers task `name` when it is first looked up (`ensure`)."""
  _LAZY[name] = register


def ensure(name: str) -> None:
  """Registers `name` now if it is a lazily registered task not yet in seqio's registry."""
  if name in _LAZY and name not in seqio.TaskRegistry.names():
    _LAZY[name]()


def lazy_names() -> Sequence[str]:
  return sorted(_LAZY)
