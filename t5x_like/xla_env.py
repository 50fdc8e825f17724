"""XLA options the entry points set before the backend starts (standard library only).

On CPU, XLA's YNNPACK fusions of elementwise ops and reductions
(`--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce`) run the softmax,
normalisation and optimizer arithmetic vectorised and across the thread pool;
measured on the 2-core CPU (docs/benchmarks.md, bench_vs_maxtext), a train step
of the 20.5M comparison model takes 12% less time, and values are unchanged
(the same IEEE operations: tests/t5x_like/xla_env_test.py compares a train step
with and without). The options only touch the CPU backend, so GPU and TPU runs
are unaffected.

`python -m train`, `infer` and `eval` call `apply()` before anything imports
jax. An option the user already put in XLA_FLAGS wins;
T5X_LIKE_XLA_DEFAULTS=0 turns the defaults off.
"""

import os

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce',)


def flags_with_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each default whose option it does not set already."""
  flags = xla_flags.split()
  for flag in CPU_FLAGS:
    name = flag.split('=')[0]
    if not any(f.split('=')[0] == name for f in flags):
      flags.append(flag)
  return ' '.join(flags)


def apply() -> None:
  """Adds the defaults to XLA_FLAGS (before the backend starts; no effect after) and
  caps glibc's malloc arenas at 2 (unless MALLOC_ARENA_MAX is set): XLA's and
  TensorFlow's worker threads would each get an arena that keeps its freed memory,
  about 50 MB of peak RSS on the comparison model for no measured speed."""
  if os.environ.get('T5X_LIKE_XLA_DEFAULTS', '1') == '0':
    return
  os.environ['XLA_FLAGS'] = flags_with_defaults(os.environ.get('XLA_FLAGS', ''))
  if 'MALLOC_ARENA_MAX' not in os.environ:
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      ctypes.CDLL('libc.so.6').mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
      pass  # not glibc
