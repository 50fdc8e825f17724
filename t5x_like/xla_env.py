"""The process settings the entry points make before the backend starts (standard
library only): XLA options, glibc's malloc, JAX's persistent compilation cache, and
Python's garbage collector during start-up.

On CPU, XLA's YNNPACK fusions of elementwise ops and reductions
(`--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce`) run the softmax,
normalisation and optimizer arithmetic vectorised and across the thread pool;
measured on the 2-core CPU (docs/benchmarks.md, bench_vs_maxtext), a train step
of the 20.5M comparison model takes 12% less time, and values are unchanged
(the same IEEE operations: tests/t5x_like/xla_env_test.py compares a train step
with and without). The options only touch the CPU backend, so GPU and TPU runs
are unaffected.

XLA CPU's concurrency-optimised scheduler (its default) is kept: it runs independent
parts of the step side by side (the query blocks of blockwise attention) and keeps
their buffers alive together, about 90 MB more temporaries on the comparison model
for 5-10% less step time (docs/efficiency.md);
`--xla_cpu_enable_concurrency_optimized_scheduler=false` in XLA_FLAGS schedules for
memory instead.

The train step's executables are kept in JAX's persistent compilation cache
(`<cache root>/jax_compilation`, at most 1 GiB, least recently used first out;
the cache root is T5X_LIKE_CACHE, default ~/.cache/t5x_like), as MaxText's
base config does: a relaunch with the same model, shapes and options (a resume,
the next trial of a sweep at the same size) loads the compiled step instead of
compiling it, about 6 s sooner to its first step on the 20.5M comparison model.
JAX_COMPILATION_CACHE_DIR, when set, wins.

glibc's malloc is asked for transparent huge pages (the `glibc.malloc.hugetlb=1`
tunable, read only at process start, so `reexec_with_malloc_tunables` restarts
the interpreter with it once, before anything is imported): each CPU step
allocates its ~800 MB of temporaries afresh, and with 4 KiB pages the kernel
faults and clears them page by page (300,000 faults a step on the comparison
model); with 2 MiB pages, under 30,000, for about 3% of the step time.

Python's cyclic garbage collector is off while `python -m train` starts (`pause_gc`,
until `resume_gc`), and so is the input process's (t5x_like/data/service.py): imports
(JAX, TensorFlow, seqio), tracing and the pipeline's AutoGraph build make about a
million objects that live on, and the collector walks them again and again as they
pile up. Measured on the 2-core CPU: the input process reaches its first batch about
1.1 s sooner (its imports take 2.6-2.9 s instead of 3.4-4.0 s), the trainer is ready
about 0.3 s sooner, with the same peak memory. `resume_gc` then makes one full
collection (which also moves the survivors to the oldest generation, which later
collections seldom walk) and turns the collector back on.

`python -m train`, `infer` and `eval` call `apply()` before anything imports
jax. An option the user already put in XLA_FLAGS wins;
T5X_LIKE_XLA_DEFAULTS=0 turns all of these defaults off.
"""

import gc
import os
import sys

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce',)


def flags_with_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each default whose option it does not set already."""
  flags = xla_flags.split()
  for flag in CPU_FLAGS:
    name = flag.split('=')[0]
    if not any(f.split('=')[0] == name for f in flags):
      flags.append(flag)
  return ' '.join(flags)


HUGETLB = 'glibc.malloc.hugetlb=1'
MALLOC_ARENAS = 2  # (glibc malloc arenas, unless MALLOC_ARENA_MAX is set: `apply`)
COMPILATION_CACHE_BYTES = 2**30


def enabled() -> bool:
  return os.environ.get('T5X_LIKE_XLA_DEFAULTS', '1') != '0'


def cache_root() -> str:
  """Where caches live: T5X_LIKE_CACHE, default ~/.cache/t5x_like (the corpus, the
  matmul peak, compiled programs)."""
  return os.environ.get('T5X_LIKE_CACHE', os.path.join(os.path.expanduser('~'), '.cache',
                                                       't5x_like'))


def _huge_pages_on_request() -> bool:
  """Transparent huge pages are in 'madvise' mode (with 'always' every process gets
  them; with 'never', none)."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[madvise]' in f.read()
  except OSError:
    return False


def _glibc_at_least(major: int, minor: int) -> bool:
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    return name == 'glibc' and tuple(map(int, version.split('.')[:2])) >= (major, minor)
  except (AttributeError, ValueError, OSError):
    return False


def reexec_with_malloc_tunables() -> None:
  """Restarts this interpreter with the same arguments and glibc.malloc.hugetlb=1
  added to GLIBC_TUNABLES, once, where it helps: glibc 2.35 or newer, transparent
  huge pages on request, the defaults on, and the tunable not set already (then
  this returns). Call it first thing in a program's main module."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if (not enabled() or 'glibc.malloc.hugetlb' in tunables or not _glibc_at_least(2, 35)
      or not _huge_pages_on_request() or not getattr(sys, 'orig_argv', None)):
    return
  os.environ['GLIBC_TUNABLES'] = f'{tunables}:{HUGETLB}' if tunables else HUGETLB
  try:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
  except OSError:
    pass  # (runs on without huge pages)


def apply() -> None:
  """Adds the defaults to XLA_FLAGS (before the backend starts; no effect after),
  points JAX's persistent compilation cache at the cache root, and caps glibc's
  malloc arenas at 2 (unless MALLOC_ARENA_MAX is set): XLA's and TensorFlow's
  worker threads would each get an arena that keeps its freed memory, about 50 MB
  of peak RSS on the comparison model for no measured speed."""
  if not enabled():
    return
  os.environ['XLA_FLAGS'] = flags_with_defaults(os.environ.get('XLA_FLAGS', ''))
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(cache_root(), 'jax_compilation')
    os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(COMPILATION_CACHE_BYTES))
  if 'MALLOC_ARENA_MAX' not in os.environ:
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      ctypes.CDLL('libc.so.6').mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX
    except (OSError, AttributeError):
      pass  # not glibc


_gc_paused = False


def pause_gc() -> None:
  """Turns Python's cyclic garbage collector off for start-up (see the module
  docstring), unless T5X_LIKE_XLA_DEFAULTS=0 or it is off already; `resume_gc` turns
  it back on. Nothing else changes: objects without cycles are still freed at once."""
  global _gc_paused
  if enabled() and gc.isenabled():
    gc.disable()
    _gc_paused = True


def resume_gc() -> None:
  """Ends `pause_gc`'s pause (a no-op when it made none): one full collection, of the
  unreachable cycles start-up left (the trainer: about 13,000 objects, 3 MB, in 0.15 s;
  the input process: about 31,000, 5 MB, in 0.3-0.4 s), then the collector is on.
  Nothing is frozen: what start-up built and a run drops later (a trainer rebuilt from
  the input process's answer, a start-up iterator a resume replaces) is collected as
  usual."""
  global _gc_paused
  if not _gc_paused:
    return
  _gc_paused = False
  gc.collect()
  gc.enable()


def elementwise_compiler_options(platform: str) -> dict:
  """XLA options for the programs that are elementwise work over parameter-sized
  arrays: the optimizer update of a split train step (`trainer.Trainer.split_update`)
  and a fresh state's initialisation (`Trainer.init_state`). On CPU: YNN reductions
  without the YNN elementwise fusions. A YNN fusion takes no broadcast, so each
  scalar of the update (learning rate, betas, bias corrections, clip factor)
  becomes a parameter-sized buffer; XLA's own loop fusions read the scalar in place.
  Measured on the 20.5M comparison model (2-core CPU): the update takes 142 MB of
  temporaries instead of 327 MB and 0.08 s instead of 0.14 s; the initialisation
  compiles in 1.4-1.9 s instead of 2.4-3.7 s (it is compiled on every fresh run's
  launch) and runs in 0.22-0.31 s instead of 0.38-0.45 s (its random draws differ
  from those made under the YNN elementwise fusions in the last bits). None
  elsewhere, or with T5X_LIKE_XLA_DEFAULTS=0."""
  if platform != 'cpu' or not enabled():
    return {}
  return {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
