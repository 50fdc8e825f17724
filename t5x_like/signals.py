"""SIGTERM as a request to stop, honoured from process start.

`python -m train` calls `install()` before it imports jax, so a SIGTERM that
arrives while the run is still starting is recorded instead of killing the
process: `train()` then exits 0 before writing anything, and the train loop
saves the current step and exits 0. The handler only sets a flag; the loop
reads it once per step (`agreed()`: the flags of all processes, all-gathered,
so every process takes the same branch).

`jax.distributed.initialize` would start XLA's preemption notifier, which
installs its own C-level SIGTERM handler and so silently takes over from
Python's (`signal.getsignal` still returns ours; XLA only logs "SIGTERM caught
at ..." and the run goes on): `train.main` turns that service off
(`jax_enable_preemption_service`) before joining the job, and calls `install()`
again after it (as the loop does when it starts) in case anything else took the
signal.

A SIGTERM in the first moments of the interpreter, before `install()` runs,
still kills the process (status -15): nothing has been written by then.

This module imports nothing heavy at the top: it runs before jax is imported.
"""

import signal

_state = {'requested': False, 'installed': False, 'previous': None}


def _handle(signum, frame):  # pylint: disable=unused-argument
  _state['requested'] = True


def install() -> bool:
  """Routes SIGTERM to the stop flag (again, if it was already: see above).

  Returns:
    True if this call installed the handler (the caller may `uninstall()` it),
    False if it was installed before or this is not the main thread.
  """
  try:
    previous = signal.signal(signal.SIGTERM, _handle)
  except ValueError:  # not the main thread (e.g. inside a notebook worker)
    return False
  if _state['installed']:
    return False
  _state['installed'], _state['previous'] = True, previous
  return True


def uninstall() -> None:
  """Puts back the handler that was there before `install()`."""
  if _state['installed']:
    try:
      signal.signal(signal.SIGTERM, _state['previous'] or signal.SIG_DFL)
    except ValueError:
      return
    _state['installed'], _state['previous'] = False, None


def requested() -> bool:
  """Whether this process got SIGTERM."""
  return _state['requested']


def agreed() -> bool:
  """Whether any process got SIGTERM (collective: every process must call it)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return _state['requested']
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # The result is not written back to the flag: a SIGTERM handled while the
  # all-gather runs (where a process mostly waits) sets the flag after it was
  # read, and writing back the gathered False would lose that request. Left
  # alone, the flag goes into the next all-gather and every process stops a step
  # later, together.
  flags = multihost_utils.process_allgather(np.int32(_state['requested']))
  return bool(np.max(flags))
