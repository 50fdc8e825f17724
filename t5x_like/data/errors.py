"""The input side's error classes, importable without TensorFlow.

Each is raised by the module named in its docstring (which re-exports it), and
each means "the inputs are wrong": the entry points report it as one line with
exit code 2 (`cli.INPUT_ERRORS`). They live here, apart from the modules that
raise them, so that the trainer (which imports no TensorFlow when its data come
from the input process, `t5x_like/data/service.py`) can name them and re-raise
them as the input process raised them.
"""


class DataError(ValueError):
  """A dataset configuration that cannot be served (`pipeline`)."""


class MixtureError(ValueError):
  """A mixture that cannot be built as configured (`mixtures`)."""


class SourceError(ValueError):
  """A data source that cannot be read as configured (`sources`)."""


class ObjectiveError(ValueError):
  """An objective that cannot be applied to the given lengths or vocabulary (`preprocessors`)."""


class PreferenceDataError(ValueError):
  """Preference data that cannot be used (`preferences`)."""


class SftDataError(ValueError):
  """Fine-tuning data that cannot be used (`instructions`)."""


class SelectionError(ValueError):
  """Data selection given inputs it cannot use; the message names the fix (`selection`)."""
