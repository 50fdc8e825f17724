"""seqio Mixtures with rates by examples, by characters or temperature-scaled.

`register_mixture` is the one way this codebase builds a mixture; gin calls it
and uses the returned name, e.g.

    MIXTURE_OR_TASK_NAME = @mixtures.register_mixture()
    mixtures.register_mixture:
      name = 'code_heavy'
      tasks = ['stdlib_code_lm', 'stdlib_prose_lm']
      rates = [3.0, 1.0]            # or rate_by = 'characters', temperature = 3.33

Rates are relative numbers of examples drawn from each entry (seqio's
convention); an entry may itself be a mixture (nested mixtures: its tasks get
its rate, split in its own proportions). `rate_by`:
  'equal':       every entry the same rate;
  'examples':    the number of source examples (documents) of the split;
  'characters':  the number of source characters of the split;
then raised to 1/temperature (mT5's sampling, p ~ n^alpha with alpha =
1/temperature; temperature 1 is proportional, large temperatures approach equal).
`replay_mixture` is the recipe for domain-adaptive continued pretraining.
"""

import difflib
import math
from typing import Callable, Optional, Sequence, Union

from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio

from t5x_like.data import registry

from t5x_like.data import sources
from t5x_like.data import errors


MixtureError = errors.MixtureError  # (defined apart, importable without TensorFlow)


RATE_BY = ('equal', 'examples', 'characters')


def registered_names() -> list:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()) |
                set(registry.lazy_names()))


def similar_names(name: str) -> list:
  """Up to three registered task or mixture names close to `name` (for error hints)."""
  return difflib.get_close_matches(name, registered_names(), n=3)


def _lookup(name: str, mixture: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    close = similar_names(name)
    hint = f'did you mean {", ".join(close)}?' if close else 'register it first'
    raise MixtureError(f'mixture {mixture!r} names unknown task or mixture {name!r}: '
                       f'{hint}') from None


def source_count(task: seqio.Task, kind: str, split: str = 'train') -> float:
  """Examples or characters (`kind`) in a task's source split: as the source
  reports them, else counted in one pass over it."""
  try:
    if kind == 'examples':
      return float(sources.num_examples(task.source, split))
    return float(sources.num_characters(task.source, split))
  except sources.SourceError as e:
    raise MixtureError(f'cannot count the {kind} of task {task.name!r}: {e}; give the mixture '
                       'explicit rates') from None


def _entry_count(entry, kind: str, split: str) -> float:
  if isinstance(entry, seqio.Mixture):
    return sum(source_count(t, kind, split) for t in entry.tasks)
  return source_count(entry, kind, split)


def _check_rate(rate: float, what: str, mixture: str) -> float:
  if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
    raise MixtureError(f'mixture {mixture!r}: the rate of {what} is {rate!r}; rates must be '
                       'positive numbers')
  return float(rate)


def mixture_rates(name: str, tasks: Sequence[str], rates: Optional[Sequence[float]] = None,
                  rate_by: str = 'equal', temperature: float = 1.0,
                  split: str = 'train') -> list:
  """The rate of each entry of a mixture (checked: positive and finite)."""
  entries = [_lookup(t, name) for t in tasks]
  if rates is not None:
    if len(rates) != len(tasks):
      raise MixtureError(f'mixture {name!r} has {len(tasks)} tasks but {len(rates)} rates: give '
                         'one rate per task')
    return [_check_rate(r, t, name) for r, t in zip(rates, tasks)]
  if rate_by not in RATE_BY:
    raise MixtureError(f'mixture {name!r}: rate_by={rate_by!r} is not one of {", ".join(RATE_BY)}')
  if not (math.isfinite(temperature) and temperature > 0):
    raise MixtureError(f'mixture {name!r}: temperature={temperature} must be positive')
  if rate_by == 'equal':
    return [1.0] * len(tasks)
  counts = [_entry_count(e, rate_by, split) for e in entries]
  return [_check_rate(c ** (1.0 / temperature), t, name) for c, t in zip(counts, tasks)]


def register_mixture(name: str, tasks: Sequence[str],
                     rates: Optional[Sequence[float]] = None, rate_by: str = 'equal',
                     temperature: float = 1.0, split: str = 'train') -> str:
  """Registers (or replaces) a seqio Mixture; returns its name for gin.

  Args:
    name: the mixture's name.
    tasks: registered task or mixture names.
    rates: explicit positive rates, one per task; overrides `rate_by`.
    rate_by: 'equal', 'examples' or 'characters' (counted in `split`).
    temperature: rates become count ** (1 / temperature).
    split: the split whose sizes set the rates.
  """
  if not tasks:
    raise MixtureError(f'mixture {name!r} has no tasks')
  if len(set(tasks)) != len(tasks):
    raise MixtureError(f'mixture {name!r} lists a task twice: {list(tasks)}')
  values = mixture_rates(name, tasks, rates, rate_by, temperature, split)
  if name in tasks:
    raise MixtureError(f'mixture {name!r} cannot contain itself')
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  try:
    seqio.MixtureRegistry.add(name, list(zip(tasks, values)))
  except ValueError as e:  # e.g. tasks with different output features
    raise MixtureError(f'mixture {name!r}: {" ".join(str(e).split())}') from None
  return name


def register_lazy_mixture(name: str, tasks: Sequence[str], rate_by: str,
                          temperature: float = 1.0, split: str = 'train') -> str:
  """Like `register_mixture` over tasks only, with rates computed when first used
  (so registering at import time reads no data)."""
  if rate_by not in RATE_BY[1:]:
    raise MixtureError(f'lazy mixture {name!r}: rate_by must be examples or characters')
  rate: Callable[[seqio.Task], float] = (
      lambda task: source_count(task, rate_by, split) ** (1.0 / temperature))
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, rate) for t in tasks])
  return name


def replay_mixture(name: str, domain: Union[str, Sequence[str]], general: Union[str, Sequence[str]],
                   replay_fraction: float = 0.25) -> str:
  """Domain-adaptive continued pretraining: new-domain data mixed with replay.

  `replay_fraction` of the examples come from `general` (the original
  pretraining mixture, against forgetting) and the rest from `domain`.
  Either side may be one name or a list (mixed equally within the side).
  """
  if not 0.0 < replay_fraction < 1.0:
    raise MixtureError(f'replay_fraction={replay_fraction} must be in (0, 1) (0 means no '
                       'replay: train on the domain task directly)')

  def side(names, label):
    if isinstance(names, str):
      return names
    return register_mixture(f'{name}_{label}', list(names))

  return register_mixture(name, [side(domain, 'domain'), side(general, 'replay')],
                          rates=[1.0 - replay_fraction, replay_fraction])


def describe(name: str) -> dict:
  """Leaf task -> normalised sampling probability (for logs and fingerprints)."""
  entry = seqio.get_mixture_or_task(name)
  if isinstance(entry, seqio.Task):
    return {entry.name: 1.0}
  rates = {t.name: entry.get_rate(t) for t in entry.tasks}
  total = sum(rates.values())
  return {k: v / total for k, v in sorted(rates.items())}
