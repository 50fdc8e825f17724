"""The input process: the seqio/tf.data pipeline in a process of its own.

`python -m train` starts it first thing (`prestart`, from train.py), before
the trainer imports JAX. While the trainer imports JAX, builds the model, and
initialises and compiles, the input process imports TensorFlow and seqio,
validates the datasets, builds the pipeline and makes the first batch (4-6 s
of every launch on a 2-core machine; its garbage collector is paused until that
batch is handed over, xla_env.pause_gc), on the second core instead of on the
trainer's critical path (a thread cannot do this: both sides are Python and
would take turns at the interpreter lock). The trainer's process then imports
no TensorFlow at all.

It runs exactly the in-process code (`pipeline.validate`, `batch_shapes`,
`InputIterator`, ...) on the same pickled `DatasetConfig` and model, so its
batches, hashes, positions and errors are the ones the trainer would make
itself (tests/t5x_like/service_test.py compares the two). An error raised
there is raised again here as the same exception (an input error is still one
line, exit code 2, before anything is written); one of a class this process has
not imported becomes `InputProcessError` carrying the input process's
traceback.

`train(input_process=None)` uses it when the run was started from the command
line and nothing in this process has imported TensorFlow (a gin file that
imports a task module has: then the pipeline runs in-process, as it does from
Python and notebooks). `T5X_LIKE_INPUT_PROCESS=0` turns it off.

Protocol: pickled (operation, arguments) requests on the child's stdin,
pickled ('ok', result) or ('error', description) replies on a private copy of
its stdout (its file descriptor 1 is pointed at stderr, so nothing TensorFlow
prints can corrupt the channel). The child ignores SIGINT and SIGTERM (the
trainer decides when to stop) and ends when its stdin closes or the trainer's
process dies (PR_SET_PDEATHSIG).
"""

import atexit
import os
import pickle
import subprocess
import sys
import traceback
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from t5x_like import xla_env

ENV = 'T5X_LIKE_INPUT_PROCESS'


class InputProcessError(RuntimeError):
  """The input process failed (with a class of error this process cannot rebuild), or died."""


_PRESTARTED: Optional['InputProcess'] = None


class Prepared(NamedTuple):
  """What train() reads from the data side before it builds the trainer."""
  shapes: Dict[str, tuple]  # feature -> global batch shape
  loss_groups: Optional[Sequence[str]]  # UL2 denoiser families logged apart, if any
  check_eval: Callable[[], None]  # validates the evaluation dataset (raises its error)


def prepare_stages(train_config, eval_config, model) -> List[Tuple[str, Callable[[], Any]]]:
  """What train() checks and reads before it builds the trainer, as (name, thunk), in
  train()'s order: run in this process (`LocalInputs`) or the input process (`_Server`)."""
  from t5x_like.data import denoisers  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
  stages = [('validate', lambda: pipeline.validate(train_config, model)),
            ('shapes', lambda: pipeline.batch_shapes(train_config, model)),
            ('loss_groups', lambda: denoisers.loss_groups(train_config.mixture_or_task_name))]
  if eval_config is not None:
    stages.append(('validate_eval', lambda: pipeline.validate(eval_config, model)))
  return stages


class LocalInputs:
  """The pipeline in this process (from Python and notebooks, or when TensorFlow is here)."""

  def prepare(self, train_config, eval_config, model) -> Prepared:
    stages = dict(prepare_stages(train_config, eval_config, model))
    stages['validate']()
    return Prepared(stages['shapes'](), stages['loss_groups'](),
                    stages.get('validate_eval', lambda: None))

  def start_prepare(self, train_config, eval_config, model) -> Callable[[], Prepared]:
    prepared = self.prepare(train_config, eval_config, model)  # (now: same thread)
    return lambda: prepared

  def predicted(self, train_config, model) -> Optional[Prepared]:
    return None  # (nothing to overlap: the pipeline runs in this thread)

  def iterator(self, config, model, row_slice: slice = slice(None),
               num_epochs: Optional[int] = None, pad_last: bool = False):
    from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.InputIterator(config, model, row_slice, num_epochs, pad_last)

  def close(self) -> None:
    pass


class InputProcess:
  """The trainer's side of one input process."""

  def __init__(self):
    env = dict(os.environ)
    env['JAX_PLATFORMS'] = 'cpu'  # (seqio imports JAX: it must never claim an accelerator)
    env.update(_malloc_env(env))
    self._proc = subprocess.Popen([sys.executable, '-m', 't5x_like.data.service'],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    self._ids = 0
    self._model = None  # (the model of `prepare`, which the input process keeps)
    self._pending: Optional[Dict[str, Any]] = None  # (a request whose reply is not read yet)
    self.closed = False
    atexit.register(self.close)

  def _failed(self, e: BaseException) -> InputProcessError:
    code = self._proc.poll()
    self.close()
    return InputProcessError(
        f'the input process ended unexpectedly (exit status {code}; its messages are '
        f'above): {type(e).__name__}: {e}')

  def _send(self, op: str, *args) -> None:
    self._settle()
    if self.closed:
      raise InputProcessError('the input process was closed (or ended: see above)')
    try:
      pickle.dump((op, args), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
      self._proc.stdin.flush()
    except OSError as e:
      raise self._failed(e) from None

  def _receive(self) -> Any:
    try:
      status, value = pickle.load(self._proc.stdout)
    except (OSError, EOFError, pickle.UnpicklingError) as e:
      raise self._failed(e) from None
    if status == 'ok':
      return value
    raise rebuild(value)

  def _settle(self) -> None:
    """Reads the reply to a request sent without waiting (`start_prepare`), if any."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      try:
        pending['reply'] = ('ok', self._receive())
      except BaseException as e:  # pylint: disable=broad-except  (raised to whoever waits)
        pending['reply'] = ('error', e)

  def call(self, op: str, *args) -> Any:
    self._send(op, *args)
    return self._receive()

  def prepare(self, train_config, eval_config, model) -> Prepared:
    """train()'s checks and facts, from the input process (see `LocalInputs.prepare`)."""
    return self.start_prepare(train_config, eval_config, model)()

  def start_prepare(self, train_config, eval_config, model) -> Callable[[], Prepared]:
    """Sends `prepare` and returns at once; calling the result waits for the answer
    (raising the checks' errors, in train()'s order). The trainer builds and compiles
    in between."""
    self._send('prepare', train_config, eval_config, model)
    self._model = model
    pending = self._pending = {}

    def wait() -> Prepared:
      if self._pending is pending:
        self._settle()
      status, value = pending['reply']
      if status == 'error':
        raise value
      return self._prepared(value, eval_config)
    return wait

  def _prepared(self, reply, eval_config) -> Prepared:
    stages = {name: (status, value) for name, status, value in reply}

    def result(name):
      status, value = stages[name]
      if status == 'error':
        raise rebuild(value)
      return value

    result('validate')
    shapes, loss_groups = result('shapes'), result('loss_groups')
    return Prepared(shapes, loss_groups,
                    lambda: result('validate_eval') if eval_config is not None else None)

  def predicted(self, train_config, model) -> Optional[Prepared]:
    """What `prepare` will answer, where this process can tell without TensorFlow
    (`pipeline.predicted_shapes`; no per-denoiser loss groups), else None."""
    from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow-free)
    shapes = pipeline.predicted_shapes(train_config, model)
    return None if shapes is None else Prepared(shapes, {}, lambda: None)

  def iterator(self, config, model, row_slice: slice = slice(None),
               num_epochs: Optional[int] = None, pad_last: bool = False) -> 'RemoteIterator':
    self._ids += 1
    return RemoteIterator(self, self._ids, config, model, row_slice, num_epochs, pad_last)

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    try:
      self._proc.stdin.close()
    except OSError:
      pass
    try:  # (it exits when its stdin closes, unless busy making a batch nobody will take)
      self._proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    self._proc.stdout.close()


class RemoteIterator:
  """`pipeline.InputIterator`'s interface, served by the input process.

  The position (`batches_consumed`, `skipped`) and `last_batch_hash` are the
  input process's, mirrored after every call.
  """

  def __init__(self, process: InputProcess, key: int, config, model, row_slice: slice,
               num_epochs: Optional[int], pad_last: bool):
    self._process, self._key = process, key
    self.config, self.model, self.row_slice = config, model, row_slice
    self.num_epochs, self.pad_last = num_epochs, pad_last
    sent = None if model is process._model else model  # pylint: disable=protected-access
    self._mirror(process.call('open', key, config, sent, row_slice, num_epochs, pad_last))

  def _mirror(self, position: Mapping[str, Any]) -> None:
    self.batches_consumed = position['batches_consumed']
    self.skipped = [list(r) for r in position['skipped']]
    self.last_batch_hash = position['last_batch_hash']

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, Any]:
    batch, position = self._process.call('next', self._key)
    self._mirror(position)
    return batch

  def state(self) -> Dict[str, Any]:
    return self._process.call('state', self._key)

  def skip(self, n: int) -> None:
    self._mirror(self._process.call('skip', self._key, n))

  def restore(self, state: Mapping[str, Any], allow_changes: bool = False) -> None:
    self._mirror(self._process.call('restore', self._key, dict(state), allow_changes))


def prestart() -> None:
  """Starts the input process now (`python -m train`, before JAX is imported), unless
  T5X_LIKE_INPUT_PROCESS=0."""
  global _PRESTARTED
  if os.environ.get(ENV, '1') != '0' and _PRESTARTED is None:
    _PRESTARTED = InputProcess()


def take(wanted: Optional[bool]) -> Union[InputProcess, LocalInputs]:
  """The inputs `train(input_process=wanted)` uses: an input process or `LocalInputs`.

  None (auto): the one `prestart` started, if this process has not imported
  TensorFlow (then it is already here, and a second copy would cost memory for
  nothing). True: that one, or a new one. False: in-process.
  """
  global _PRESTARTED
  process, _PRESTARTED = _PRESTARTED, None
  if wanted is None:
    wanted = process is not None and 'tensorflow' not in sys.modules
  if not wanted:
    if process is not None:
      process.close()
    return LocalInputs()
  return process if process is not None else InputProcess()


def describe(error: BaseException) -> Dict[str, Any]:
  """An exception as the input process sends it (`rebuild` makes it again here)."""
  try:
    pickled = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
  except Exception:  # pylint: disable=broad-except
    pickled = None
  cls = type(error)
  return {'module': cls.__module__, 'name': cls.__qualname__, 'pickled': pickled,
          'message': str(error), 'traceback': ''.join(traceback.format_exception(error))}


def rebuild(desc: Mapping[str, Any]) -> BaseException:
  """The exception the input process raised, when its class is already imported here
  (so rebuilding it imports nothing: no TensorFlow); otherwise an InputProcessError."""
  if desc['pickled'] is not None and (desc['module'] in sys.modules or
                                      desc['module'] == 'builtins'):
    try:
      return pickle.loads(desc['pickled'])
    except Exception:  # pylint: disable=broad-except
      pass
  return InputProcessError(f'the input process failed: {desc["module"]}.{desc["name"]}: '
                           f'{desc["message"]}\n--- its traceback ---\n{desc["traceback"]}')


# ---------------------------------------------------------------------------------------
# The input process itself: `python -m t5x_like.data.service`.


class _Server:
  """Runs the in-process pipeline code for the trainer's requests."""

  def __init__(self):
    from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
    self.pipeline = pipeline
    self.iterators: Dict[int, Any] = {}
    self.model = None
    self._warm_key, self._warm = None, None  # (the train iterator `prepare` made ready)
    self.released = 0

  def prepare(self, train_config, eval_config, model) -> List[tuple]:
    """What train() checks and reads before it builds the trainer, stage by stage, in
    train()'s order; the first failed stage ends the list."""
    self.model = model  # (`open` is sent None for it: the same object keeps batch_shapes' pipeline)
    out = []
    for name, stage in prepare_stages(train_config, eval_config, model):
      try:
        out.append((name, 'ok', stage()))
      except Exception as e:  # pylint: disable=broad-except
        out.append((name, 'error', describe(e)))
        break
    else:  # the train iterator, opened after this reply (`after_reply`)
      self._warm_key, self._warm = (train_config, None, False), None
    return out

  def after_reply(self) -> None:
    """Work done between a reply and the next request: after `prepare`, the train
    iterator's first batch (the trainer builds its state and compiles meanwhile)."""
    if self._warm_key is not None and self._warm is None:
      config, num_epochs, pad_last = self._warm_key
      self._warm = self.pipeline.InputIterator(config, self.model, slice(None), num_epochs,
                                               pad_last)
      self._warm.warm()
      self.released += release_startup_pages()  # (start-up is over: what it alone touched can go)

  def released_bytes(self) -> int:
    """The bytes of mappings `release_startup_pages` advised so far (for tests)."""
    return self.released

  def gc_enabled(self) -> bool:
    """Whether the garbage collector is on (for tests: start-up pauses it, `serve` turns
    it back on after the first batch it hands over)."""
    import gc  # pylint: disable=g-import-not-at-top
    return gc.isenabled()

  def _position(self, it) -> Dict[str, Any]:
    return {'batches_consumed': it.batches_consumed, 'skipped': it.skipped,
            'last_batch_hash': it.last_batch_hash}

  def open(self, key, config, model, row_slice, num_epochs, pad_last):
    warm, self._warm, self._warm_key = self._warm, None, None
    if model is None and warm is not None and (config, num_epochs, pad_last) == (
        warm.config, warm.num_epochs, warm.pad_last):
      warm.row_slice = row_slice
      it = self.iterators[key] = warm
    else:
      model = self.model if model is None else model
      it = self.iterators[key] = self.pipeline.InputIterator(config, model, row_slice,
                                                             num_epochs, pad_last)
    return self._position(it)

  def next(self, key):
    it = self.iterators[key]
    batch = next(it)
    return batch, self._position(it)

  def state(self, key):
    return self.iterators[key].state()

  def skip(self, key, n):
    self.iterators[key].skip(n)
    return self._position(self.iterators[key])

  def restore(self, key, state, allow_changes):
    self.iterators[key].restore(state, allow_changes=allow_changes)
    return self._position(self.iterators[key])


def _malloc_env(env: Mapping[str, str]) -> Dict[str, str]:
  """glibc malloc settings for the input process, where the entry points' defaults are
  on (xla_env): at most 2 arenas (MALLOC_ARENA_MAX, unless set: TensorFlow's threads
  would each get one that keeps its freed memory) and no huge pages for its heap (the
  trainer's `glibc.malloc.hugetlb=1` is inherited through GLIBC_TUNABLES; a pipeline's
  small buffers gain nothing from 2 MiB pages and round its heap up to them)."""
  if not xla_env.enabled():
    return {}
  out = {} if 'MALLOC_ARENA_MAX' in env else {'MALLOC_ARENA_MAX': str(xla_env.MALLOC_ARENAS)}
  tunables = env.get('GLIBC_TUNABLES', '').split(':')
  if xla_env.HUGETLB in tunables:
    out['GLIBC_TUNABLES'] = ':'.join(t for t in tunables if t != xla_env.HUGETLB)
  return out


def release_startup_pages() -> int:
  """Hands back the file-backed pages (shared libraries' code and data, mostly
  TensorFlow's) that the imports and the pipeline's first build touched: about half a
  GiB here, of which the batches after that fault back about 10 MB. Linux 5.4+
  (madvise MADV_PAGEOUT on every file mapping; clean pages, so nothing is written); a
  no-op elsewhere. Returns the bytes of the mappings advised."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open('/proc/self/maps') as f:
      maps = f.read().splitlines()
  except (OSError, AttributeError):
    return 0
  advised = 0
  for line in maps:
    fields = line.split()
    if len(fields) < 6 or not fields[5].startswith('/'):
      continue
    lo, hi = (int(x, 16) for x in fields[0].split('-'))
    if libc.madvise(lo, hi - lo, 21) == 0:  # MADV_PAGEOUT
      advised += hi - lo
  return advised


def _die_with_parent() -> None:
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    import signal  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def serve() -> None:
  """The input process's main loop (see the module docstring)."""
  import signal  # pylint: disable=g-import-not-at-top
  _die_with_parent()
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  requests = os.fdopen(os.dup(0), 'rb')
  replies = os.fdopen(os.dup(1), 'wb')
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  os.dup2(2, 1)  # prints go to stderr, never into the replies
  server = None
  while True:
    try:
      op, args = pickle.load(requests)
    except (EOFError, OSError):
      # The trainer is done. Not through the interpreter's exit: TensorFlow's generator
      # datasets (the corpus) can hang it there.
      sys.stderr.flush()
      os._exit(0)  # pylint: disable=protected-access
    try:
      if server is None:
        server = _Server()
      reply = ('ok', getattr(server, op)(*args))
    except Exception as e:  # pylint: disable=broad-except
      reply = ('error', describe(e))
    try:
      pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
      replies.flush()
    except (BrokenPipeError, OSError):
      sys.stderr.flush()
      os._exit(0)  # pylint: disable=protected-access
    if server is not None:
      try:
        server.after_reply()
      except Exception:  # pylint: disable=broad-except  (the same work fails again, reported, on request)
        server._warm = None  # pylint: disable=protected-access
    if op == 'next':  # (the first batch is out: start-up is over, the collector runs again
      xla_env.resume_gc()  # while the trainer takes its step; before, it would delay the batch)


if __name__ == '__main__':
  # Before the first request arrives: the slow imports (TensorFlow, seqio, the shipped
  # tasks), done while the trainer imports JAX, without the garbage collector until the
  # first batch is handed over (xla_env.pause_gc: about 1 s sooner).
  xla_env.pause_gc()
  from t5x_like.data import pipeline as _pipeline  # pylint: disable=g-import-not-at-top
  _pipeline._seqio()  # pylint: disable=protected-access
  serve()
