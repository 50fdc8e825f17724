"""Small shared helpers: timing, machine peak FLOP/s, formatting."""

import datetime
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like import xla_env


cache_root = xla_env.cache_root


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """The best FLOP/s of an n x n x n matmul on the default device (the MFU denominator).

  Measured once per machine, device kind and dtype, then read back from
  `<cache>/peak_flops.json` (T5X_LIKE_CACHE, default ~/.cache/t5x_like), so every
  run and benchmark on a machine divides by the same number (a console MFU and a
  benchmark's agree) and start-up skips the measurement. Delete the file to measure
  again; `train_lib.train.peak_flops` overrides it for a run.
  """
  path = os.path.join(cache_root(), 'peak_flops.json')
  dev = jax.devices()[0]
  # (XLA_FLAGS too: the tests' compile options make slower matmuls than a run's)
  key = (f'{dev.platform}/{dev.device_kind}/{os.cpu_count()} cpus/{dtype}/n={n}/'
         f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
  try:
    with open(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    cached = {}
  if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
    return float(cached[key])
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  peak = 2 * n ** 3 / best
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}'
    with open(tmp, 'w') as fh:
      json.dump({**cached, key: peak}, fh, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass  # a read-only cache: measure every time
  return peak


def release_free_memory() -> None:
  """Returns the C heap's free pages to the system (glibc's malloc_trim; elsewhere a
  no-op). XLA's compiler frees hundreds of MB that glibc would otherwise keep mapped."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class TrainingError(RuntimeError):
  """Training cannot continue (a non-finite loss or state, repeated loss spikes): exit code 1."""


class InputError(ValueError):
  """A setting out of its valid range or of the wrong type: exit code 2, one line."""


def check_int(name: str, value, low: Optional[int] = 1, fix: str = '') -> None:
  """Raises InputError unless `value` is an int (not a bool) >= low (any int
  when low is None).

  Args:
    name: the setting, as the user writes it (a macro or a gin binding).
    fix: what to do instead (default: set it to a whole number >= low).
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      low is not None and value < low):
    what = {None: 'an integer', 0: 'a non-negative integer', 1: 'a positive integer'}.get(
        low, f'an integer >= {low}')
    raise InputError(f'{name}={value!r} must be {what}: ' + (fix or (
        f'set {name} to a whole number' + ('' if low is None else f' >= {low}'))))


def check_bool(name: str, value) -> None:
  """Raises InputError unless `value` is True or False."""
  if not isinstance(value, bool):
    raise InputError(f'{name}={value!r} must be True or False: set {name} to one of them')


def check_float(name: str, value, low: float = 0.0, high: float = math.inf,
                include_low: bool = True, include_high: bool = False, fix: str = '') -> None:
  """Raises InputError unless `value` is a finite real number in the given range."""
  ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer))
        and math.isfinite(value))
  if ok:
    ok = (value >= low if include_low else value > low) and (
        value <= high if include_high else value < high)
  if not ok:
    lo, hi = '[' if include_low else '(', ']' if include_high else ')'
    upper = 'inf' if high == math.inf else f'{high:g}'
    raise InputError(f'{name}={value!r} must be a finite number in {lo}{low:g}, {upper}{hi}: ' +
                     (fix or f'set {name} to a value in that range'))


def check_types(args: Mapping[str, Any], expected, setting: Callable[[str, Any], str],
                fix: str) -> None:
  """Each `args[name]` of (name, class) pairs is an instance of its class;
  otherwise one line naming the setting (`setting(name, value)`) and `fix`."""
  for name, cls in expected:
    if not isinstance(args[name], cls):
      names = ' or '.join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
      raise InputError(f'{setting(name, args[name])} is {type(args[name]).__name__}, not a '
                       f'{names}: {fix.format(cls=names)}')


def nearest_existing(path: str) -> str:
  """`path` itself or its nearest ancestor that exists (where a write would create it)."""
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path
