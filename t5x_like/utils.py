"""Small shared helpers: timing, machine peak FLOP/s, formatting."""

import datetime
import functools
import time

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """The best FLOP/s of an n x n x n matmul on the default device (the MFU denominator)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))
