"""Checkpoints with orbax: the train state, the data-iterator position, the run.

Layout under MODEL_DIR/checkpoints/<step>/: `state` (params, optimizer state,
step; sharded arrays restored onto any mesh), `data` (the iterator state as
JSON) and `meta` (JSON: a digest of every array of `state` and of `data`, the
loop's own state, and a checksum of itself). Saves are asynchronous and atomic
(orbax writes to a temporary folder and renames it on commit), so a killed
process never leaves a checkpoint that looks complete but is not; leftovers of
interrupted saves are removed at start.

Every checkpoint is verified when it is restored: a checkpoint that cannot be
read, whose arrays do not match their digests or that holds a non-finite value
fails with `CorruptCheckpoint`, and `find_resumable` falls back to the newest
one that verifies. A non-finite state is never saved (`NonFiniteStateError`).
`python -m t5x_like.checkpoints verify MODEL_DIR [--step N]` checks a run's
checkpoints offline.
"""

import abc
import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import re
import sys
import threading
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from t5x_like import utils

FORMAT = 2  # the `meta` item's layout (2: one 32-bit weighted sum per array)


class CheckpointError(ValueError):
  """A checkpoint that does not fit the run."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint that cannot be read or fails verification.

  Attributes:
    step: the checkpoint's step.
    what: which array or file, and what is wrong with it (one line).
  """

  def __init__(self, step: int, what: str):
    self.step, self.what = step, what
    super().__init__(f'checkpoint step {step} failed verification: {what}')


class NonFiniteStateError(utils.TrainingError):
  """A state with a NaN or infinite value was about to be saved."""


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(os.path.abspath(model_dir), 'checkpoints')


def _describe(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _handlers(streamed: bool = False):
  state = (ocp.PyTreeCheckpointHandler(type_handler_registry=_streaming_registry()) if streamed
           else ocp.StandardCheckpointHandler())
  return {'state': state, 'data': ocp.JsonCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler()}


# --- arrays written piece by piece ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """A host array that is never whole in memory: `pieces()` makes it as
  consecutive slices along axis 0, each `rows` long (the last may be shorter),
  every time it is called. A Checkpointer(streamed=True) digests it piece by
  piece and writes it piece by piece, one array at a time, each piece its own
  chunk on disk; it restores as an ordinary array. The HF import builds its
  parameters this way, so host memory stays near one tensor, not the model.

  Raises (from `pieces`): whatever the producer raises; a piece of the wrong
  shape or dtype is a ValueError naming the array.
  """
  name: str
  shape: Tuple[int, ...]
  dtype: Any
  rows: int
  make: Callable[[], Iterator[np.ndarray]]

  def __post_init__(self):
    object.__setattr__(self, 'shape', tuple(int(n) for n in self.shape))
    object.__setattr__(self, 'dtype', np.dtype(self.dtype))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def pieces(self) -> Iterator[Tuple[int, np.ndarray]]:
    """(first row, piece) in order, each checked against the declared layout."""
    if not self.shape:  # a scalar: one piece, itself
      (piece,) = list(self.make())
      piece = np.asarray(piece)
      if piece.shape or piece.dtype != self.dtype:
        raise ValueError(f'{self.name}: a piece of shape {piece.shape} {piece.dtype}, expected '
                         f'a {self.dtype} scalar')
      yield 0, piece
      return
    start = 0
    for piece in self.make():
      piece = np.asarray(piece)
      want = (min(self.rows, self.shape[0] - start),) + tuple(self.shape[1:])
      if tuple(piece.shape) != want or piece.dtype != self.dtype:
        raise ValueError(f'{self.name}: a piece of shape {tuple(piece.shape)} {piece.dtype} '
                         f'at row {start}, expected {want} {self.dtype} (the array '
                         f'is {tuple(self.shape)})')
      yield start, piece
      start += piece.shape[0]
    if start != self.shape[0]:
      raise ValueError(f'{self.name}: its pieces give {start} rows, expected {self.shape[0]}')


def _streamed_digest(x: StreamedArray) -> Tuple[int, int]:
  """(`_host_digest`, number of non-finite values) of the whole array, from its
  pieces: a piece at word offset o adds its own digest + 2 o (its word sum), mod 2**32."""
  total, nonfinite, per_row = 0, 0, int(np.prod(x.shape[1:]))
  for start, piece in x.pieces():
    with np.errstate(over='ignore'):
      word_sum = int(_host_words(piece).sum(dtype=np.uint32))
    offset = start * per_row * _words_per_value(piece.dtype)
    digest, count = _array_digest(piece)
    total = (total + digest + 2 * offset * word_sum) % (1 << 32)
    nonfinite += count
  return total, nonfinite


def _array_digest(x) -> Tuple[int, int]:
  """(`_host_digest`, number of non-finite values) of a host array."""
  a = np.asarray(x)
  return _host_digest(a), 0 if _host_finite(a) else int((~np.isfinite(a.astype(np.float32))).sum())


def _words_per_value(dtype) -> int:
  """How many digest words one value of `dtype` is (`_host_words`)."""
  return 2 if np.dtype(dtype).itemsize == 8 else 1


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes StreamedArrays as numpy arrays (they restore as any array does), one
  array at a time and piece by piece, each piece a chunk of its own."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)
    self._one_at_a_time: Optional[asyncio.Lock] = None

  async def _background_serialize(self, values, infos, args=None):
    self._one_at_a_time = asyncio.Lock()  # of this save's event loop
    return await super()._background_serialize(values, infos, args)

  async def _open_and_write(self, value: StreamedArray, tspec, ts_context):
    metadata = tspec['metadata']
    if value.shape:
      chunks = [value.rows] + list(value.shape[1:])
      if 'chunks' in metadata:  # zarr v2
        metadata['chunks'] = chunks
      else:  # zarr3
        metadata['chunk_grid'] = {'name': 'regular', 'configuration': {'chunk_shape': chunks}}
    async with self._one_at_a_time:
      store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
      for start, piece in value.pieces():
        target = store[start:start + piece.shape[0]] if value.shape else store
        await target.write(piece, can_reference_source_data_indefinitely=True)  # never changed
        del piece


@functools.lru_cache(maxsize=1)
def _streaming_registry():
  return ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (StreamedArray, _StreamedArrayHandler()))


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Hides orbax's absl warnings about expected situations (a read-only manager,
  a missing item) while orbax runs; real failures still raise."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


@contextlib.contextmanager
def open_read_only(directory: str, item_handlers=None) -> Iterator[ocp.CheckpointManager]:
  """A checkpoint manager over `directory` that can neither create nor change anything."""
  with quiet_orbax(), ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_handlers=item_handlers or _handlers()) as manager:
    yield manager


def all_steps(model_dir: str) -> List[int]:
  """Every committed checkpoint's step, oldest first, without creating anything."""
  directory = checkpoint_dir(model_dir)
  if not os.path.isdir(directory):
    return []
  with open_read_only(directory) as manager:
    return sorted(manager.all_steps())


def latest_step(model_dir: str) -> Optional[int]:
  """The newest complete checkpoint's step, without creating anything."""
  directory = checkpoint_dir(model_dir)
  if not os.path.isdir(directory):
    return None
  with open_read_only(directory) as manager:
    return manager.latest_step()


def _compare(saved_flat, want_flat, step, directory, fix):
  for name, shape in want_flat.items():
    if name not in saved_flat:
      raise CheckpointError(f'checkpoint step {step} in {directory} has no {name!r} that the '
                            f'model needs: {fix}')
    (saved_shape, saved_dtype), (want_shape, want_dtype) = saved_flat[name], shape
    if saved_shape != want_shape:
      raise CheckpointError(f'checkpoint step {step} in {directory} has {name} of shape '
                            f'{saved_shape} but the model expects {want_shape}: {fix}')
    if saved_dtype and want_dtype and saved_dtype != want_dtype:
      raise CheckpointError(f'checkpoint step {step} in {directory} has {name} of dtype '
                            f'{saved_dtype} but the model expects {want_dtype}: {fix}')
  extra = sorted(set(saved_flat) - set(want_flat))
  if extra:
    raise CheckpointError(f'checkpoint step {step} in {directory} has {extra[0]!r} that the '
                          f'model does not: {fix}')


def compare_params(saved: Any, want: Any, step: int, directory: str, fix: str) -> None:
  """Raises CheckpointError (one line, ending in `fix`) unless the saved parameter tree has
  exactly `want`'s names, shapes and dtypes."""
  _compare(_flat_shapes(saved), _flat_shapes(want), step, directory, fix)


def _flat_shapes(tree) -> Dict[str, Tuple[tuple, Optional[str]]]:
  def dtype(x):
    d = getattr(x, 'dtype', None)
    return None if d is None else str(d)
  return {_describe(p): (tuple(getattr(x, 'shape', ())), dtype(x)) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def resolve(path: str, setting: str = 'train.initial_checkpoint') -> Tuple[str, int]:
  """(checkpoints directory, step) for a MODEL_DIR (its newest checkpoint), its
  checkpoints/ folder, or one checkpoints/<step> folder; read-only.

  Raises:
    CheckpointError: no complete checkpoint there.
  """
  path = os.path.abspath(path)
  candidates = [(checkpoint_dir(path), None), (path, None)]
  base = os.path.basename(path.rstrip('/'))
  if base.isdigit():
    candidates.append((os.path.dirname(path), int(base)))
  for directory, step in candidates:
    if not os.path.isdir(directory):
      continue
    with open_read_only(directory) as manager:
      steps = manager.all_steps()
    if step is None and steps:
      return directory, max(steps)
    if step is not None and step in steps:
      return directory, step
  raise CheckpointError(f'no checkpoint found at {path}: set {setting} to a '
                        'MODEL_DIR with checkpoints (or one of its checkpoints/<step> folders)')


def saved_params(directory: str, step: int, setting: str = 'train.initial_checkpoint') -> Any:
  """The parameter shapes and dtypes (a tree of ShapeDtypeStruct) saved at `step`, read-only.

  Raises:
    CheckpointError: the checkpoint holds no parameters.
  """
  with open_read_only(directory) as manager:
    saved = manager.item_metadata(step)['state']
  try:
    params = saved['params']
  except (KeyError, TypeError):
    params = None
  if params is None:
    raise CheckpointError(f'checkpoint step {step} in {directory} has no params: point '
                          f'{setting} at a t5x_like MODEL_DIR')
  return _abstract(params)


def _abstract(saved: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """ShapeDtypeStructs (on `sharding`) for a tree of orbax array metadata."""
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                      saved)


def restore_params(directory: str, step: int, abstract_params: Any = None) -> Any:
  """Only the parameters of a checkpoint: onto `abstract_params`' shardings, or
  (None) as saved, on the default device."""
  if abstract_params is None:
    abstract_params = saved_params(directory, step)
  item = {'params': abstract_params}
  state_args = ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)
  handlers = {'state': ocp.PyTreeCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
  with open_read_only(directory, handlers) as manager:
    out, _ = _restore_verified(manager, directory, step, state_args, with_data=False)
  return out['state']['params']


class InitialCheckpoint(abc.ABC):
  """Parameters from elsewhere that a new run starts from, with a fresh optimizer
  and data pipeline (continued pretraining, sparse upcycling; later HF import,
  a LoRA base). Ignored when MODEL_DIR has its own checkpoint: that resumes.

  `check` runs before anything is written, read-only; `restore` after.

  Args:
    path: a MODEL_DIR (its newest checkpoint), its checkpoints/ folder or one
      checkpoints/<step> folder.
  """

  def __init__(self, path: str, setting: str = 'train.initial_checkpoint'):
    self.path = path
    self.setting = setting  # what the user sets `path` by, for error messages
    self.directory: Optional[str] = None
    self.step: Optional[int] = None

  def check(self, abstract_params: Any) -> None:
    """Raises CheckpointError (one line) unless `restore` can fill `abstract_params`."""
    self.directory, self.step = resolve(self.path, self.setting)
    self._check(saved_params(self.directory, self.step, self.setting), abstract_params)

  @abc.abstractmethod
  def _check(self, saved: Any, abstract_params: Any) -> None:
    """Compares the saved parameter shapes with the model's."""

  @abc.abstractmethod
  def restore(self, params: Any) -> Any:
    """The run's starting parameters, in the layout and shardings of `params`
    (the model's fresh initialisation, for whatever the checkpoint lacks)."""

  @abc.abstractmethod
  def describe(self) -> str:
    """One line for the console: what was restored from where."""


# Saved parameters a model reading a checkpoint may leave: a DPO run's frozen reference.
SAVED_ONLY = r'^reference/'


class ParamsCheckpoint(InitialCheckpoint):
  """The parameters of a run of the same model, copied as they are.

  Args:
    path, setting: as `InitialCheckpoint`.
    added: a regular expression of parameter paths ('/'-joined) the model adds
      to the checkpoint's (a PEFT method's LoRA factors, adapters, ...): those
      the checkpoint lacks keep their fresh initialisation; every other
      parameter must be there with the same shape.
  """

  def __init__(self, path: str, setting: str = 'train.initial_checkpoint',
               added: Optional[str] = None, derived: Optional[str] = None,
               ignored: Optional[str] = SAVED_ONLY):
    """derived: parameters made from the restored ones afterwards (DPO's reference copy):
    neither read nor initialised here. ignored: saved parameters the model does not use
    (by default a DPO run's frozen `reference/` copy: the policy is the model)."""
    super().__init__(path, setting)
    self.added = added
    self.derived = derived
    self.ignored = ignored
    self._fresh: List[str] = []
    self._skipped: List[str] = []

  def _check(self, saved, abstract_params):
    fix = (f'use the same model config as the run that wrote it ({self.setting} loads '
           'params only)')
    saved_flat, want_flat = _flat_shapes(saved), _flat_shapes(abstract_params)
    if self.derived is not None:
      regex = re.compile(self.derived)
      derived = [k for k in want_flat if regex.search(k)]
      want_flat = {k: v for k, v in want_flat.items() if k not in derived}
    if self.added is not None:
      regex = re.compile(self.added)
      self._fresh = [k for k in want_flat if k not in saved_flat and regex.search(k)]
      want_flat = {k: v for k, v in want_flat.items() if k not in self._fresh}
    self._skipped = [k for k in _flat_shapes(abstract_params) if k not in want_flat]
    if self.ignored is not None:
      regex = re.compile(self.ignored)
      saved_flat = {k: v for k, v in saved_flat.items()
                    if k in want_flat or not regex.search(k)}
    _compare(saved_flat, want_flat, self.step, self.directory, fix)

  def restore(self, params):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            params)
    if not self._skipped:
      return restore_params(self.directory, self.step, abstract)
    flat_abstract = traverse_util.flatten_dict(abstract, sep='/')
    fresh = set(self._skipped)
    wanted = traverse_util.unflatten_dict(
        {k: v for k, v in flat_abstract.items() if k not in fresh}, sep='/')
    restored = traverse_util.flatten_dict(restore_params(self.directory, self.step, wanted),
                                          sep='/')
    flat_params = traverse_util.flatten_dict(params, sep='/')
    return traverse_util.unflatten_dict({k: restored.get(k, flat_params[k]) for k in flat_params},
                                        sep='/')

  def describe(self):
    added = f'; {len(self._fresh)} added parameters initialised fresh' if self._fresh else ''
    return (f'initialised parameters from {self.directory} step {self.step} (fresh optimizer '
            f'and data{added})')


class ConvertedCheckpoint(InitialCheckpoint):
  """Parameters saved in another layout than the model's, converted when restored (a
  QLoRA run starts from a checkpoint of f32 kernels and keeps them quantized).

  Args:
    path, setting: as `InitialCheckpoint`.
    saved_abstract: the parameter tree (ShapeDtypeStructs) the checkpoint must hold.
    convert: (restored parameters, the model's fresh parameters) -> the run's
      starting parameters, in the model's layout and shardings.
    what: a few words for `describe`, e.g. 'quantized to nf4'.
  """

  def __init__(self, path: str, saved_abstract: Any, convert: Callable[[Any, Any], Any],
               what: str, setting: str = 'train.initial_checkpoint'):
    super().__init__(path, setting)
    self.saved_abstract = saved_abstract
    self.convert = convert
    self.what = what

  def _check(self, saved, abstract_params):
    del abstract_params
    fix = f'point {self.setting} at a run of the base model (without its PEFT parameters)'
    _compare(_flat_shapes(saved), _flat_shapes(self.saved_abstract), self.step, self.directory,
             fix)

  def restore(self, params):
    return self.convert(restore_params(self.directory, self.step, self.saved_abstract), params)

  def describe(self):
    return (f'initialised parameters from {self.directory} step {self.step}, {self.what} '
            '(fresh optimizer and data)')


# --- digests -----------------------------------------------------------------------

def _words(x: jax.Array) -> jax.Array:
  """The array's bits as a flat uint32 vector (one word per element; two for 64-bit)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * size}')).astype(jnp.uint32)
  return jnp.ravel(lax.bitcast_convert_type(x, jnp.uint32))


def _leaf_digest(x: jax.Array) -> jax.Array:
  """A position-weighted sum of the array's words, mod 2**32: a uint32 scalar.

  Integer sums do not depend on the order of reduction, so the digest is the
  same for any sharding, on any device; the odd weights make every single-bit
  change, and any two different words swapped, change it. (One pass over the
  array: on GPU/TPU at memory bandwidth; XLA's CPU backend reduces integers at
  about 2 GB/s, see docs/benchmarks.md.)
  """
  w = _words(x)
  i = lax.iota(jnp.uint32, w.shape[0])
  return jnp.sum(w * (2 * i + 1), dtype=jnp.uint32)


def all_finite(tree: Any) -> jax.Array:
  """Whether every value of the tree's floating-point arrays is finite: one
  float reduction per array (x * 0 is NaN exactly where x is NaN or infinite)."""
  flags = [jnp.isfinite(jnp.sum(x * 0, dtype=jnp.float32)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _nonfinite_count(tree: Any) -> jax.Array:
  """How many values of the tree's floating-point arrays are NaN or infinite."""
  counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return sum(counts, jnp.int32(0))


def _digest_and_check(tree):
  return jax.tree.map(_leaf_digest, tree), all_finite(tree)


_DIGEST_FNS: Dict[Any, Callable] = {}


def _replicated(tree) -> Optional[jax.sharding.Sharding]:
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


_BLOCK = 4096  # the host digest's row length (any value gives the same digest)
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                              thread_name_prefix='t5x_like_digest')


def _host_words(x: np.ndarray) -> np.ndarray:
  """The array's bits as a flat uint32 vector, as `_words` makes them on device."""
  x = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    return x.astype(np.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return x.view(np.uint32)
  if size in (1, 2):
    return x.view(np.dtype(f'uint{8 * size}')).astype(np.uint32)
  return x.view(np.uint32)


def _host_digest(x: np.ndarray) -> int:
  """`_leaf_digest` with numpy: sum_i w_i (2i + 1) mod 2**32, computed as
  2 (K sum_r r rowsum_r + sum_c c colsum_c) + sum_i w_i over rows of K words,
  two vectorised passes (XLA's CPU backend reduces integers several times slower)."""
  w = _host_words(x)
  n = w.shape[0]
  full = n - n % _BLOCK
  with np.errstate(over='ignore'):
    total = np.uint32(0)
    if full:
      rows = w[:full].reshape(-1, _BLOCK)
      row_sums = rows.sum(axis=1, dtype=np.uint32)
      col_sums = rows.sum(axis=0, dtype=np.uint32)
      r = np.arange(row_sums.shape[0], dtype=np.uint32)
      c = np.arange(_BLOCK, dtype=np.uint32)
      weighted = (np.uint32(_BLOCK) * (r * row_sums).sum(dtype=np.uint32) +
                  (c * col_sums).sum(dtype=np.uint32))
      total = np.uint32(2) * weighted + row_sums.sum(dtype=np.uint32)
    if full < n:
      i = np.arange(full, n, dtype=np.uint32)
      total = total + (w[full:] * (np.uint32(2) * i + np.uint32(1))).sum(dtype=np.uint32)
  return int(total)


def _host_finite(x: np.ndarray) -> bool:
  if x.dtype in (np.float32, np.float16):
    # A float32 sum is finite only if every value is (fast); one that overflowed
    # from large finite values is settled exactly.
    return bool(np.isfinite(np.sum(x, dtype=np.float32))) or bool(np.isfinite(x).all())
  if x.dtype == np.float64:
    return bool(np.isfinite(x).all())
  if jnp.issubdtype(x.dtype, jnp.inexact):  # bfloat16 and the other ml_dtypes
    return bool(np.isfinite(x.astype(np.float32)).all())
  return True


def _on_host(tree) -> bool:
  """Whether the arrays are in this process's CPU memory (the numpy path)."""
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(
      not isinstance(x, jax.Array) or (x.is_fully_addressable and all(
          d.platform == 'cpu' for d in x.sharding.device_set)) for x in leaves)


def state_digests(tree: Any, on_device: Optional[bool] = None) -> Tuple[Dict[str, str], int]:
  """({array path: digest}, number of non-finite values) of a tree of arrays.

  Where the arrays are on an accelerator or spread over hosts: one jitted
  pass where they are (collective across hosts). In this process's CPU
  memory: the same digests with numpy, several times faster than XLA's CPU
  integer reductions. `on_device` forces one path (None: chosen as above).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not on_device and (on_device is False or _on_host(tree)):
    # Whole arrays on the pool, largest first (numpy releases the GIL in its
    # reductions: one thread per core); StreamedArrays one at a time, piece by
    # piece, so they are never whole.
    whole = sorted((i for i, (_, x) in enumerate(flat) if not isinstance(x, StreamedArray)),
                   key=lambda i: -np.size(flat[i][1]))
    results = dict(zip(whole, _POOL.map(_array_digest, [np.asarray(flat[i][1]) for i in whole])))
    results.update({i: _streamed_digest(x) for i, (_, x) in enumerate(flat)
                    if isinstance(x, StreamedArray)})
    digests = {_describe(p): f'{results[i][0]:08x}' for i, (p, _) in enumerate(flat)}
    return digests, sum(count for _, count in results.values())
  out = _replicated(tree)
  if out not in _DIGEST_FNS:
    _DIGEST_FNS[out] = (jax.jit(_digest_and_check, out_shardings=out),
                        jax.jit(_nonfinite_count, out_shardings=out))
  digest_fn, count_fn = _DIGEST_FNS[out]
  digests, finite = jax.device_get(digest_fn(tree))
  count = 0 if finite else max(int(jax.device_get(count_fn(tree))), 1)
  flat = jax.tree_util.tree_flatten_with_path(digests)[0]
  return {_describe(p): f'{int(d):08x}' for p, d in flat}, count


def _json_digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def _sealed(record: Dict[str, Any]) -> Dict[str, Any]:
  """`record` with a checksum of itself (for `meta` and the file manifest)."""
  return {**record, 'checksum': _json_digest(record)}


def _seal_intact(record: Any) -> bool:
  """Whether a record made by `_sealed` still matches its checksum."""
  if not isinstance(record, dict) or 'checksum' not in record:
    return False
  return _json_digest({k: v for k, v in record.items() if k != 'checksum'}) == record['checksum']


def _meta(step: int, digests: Dict[str, str], data_state: Any, loop_state: Any) -> Dict[str, Any]:
  return _sealed({'format': FORMAT, 'step': step, 'state': digests,
                  'data': _json_digest(data_state), 'loop': loop_state})


def _check_meta(step: int, meta: Any) -> None:
  if not isinstance(meta, dict) or 'checksum' not in meta:
    raise CorruptCheckpoint(step, 'meta: not a t5x_like checkpoint record')
  if not _seal_intact(meta):
    raise CorruptCheckpoint(step, 'meta: checksum mismatch')
  if meta.get('format') != FORMAT or meta.get('step') != step:
    raise CorruptCheckpoint(step, f'meta: format {meta.get("format")} step {meta.get("step")}, '
                            f'expected format {FORMAT} step {step}')


def _compare_digests(step: int, want: Dict[str, str], got: Dict[str, str],
                     partial: bool = False) -> None:
  for name, digest in got.items():
    if name not in want:
      raise CorruptCheckpoint(step, f'state/{name}: no digest recorded for this array')
    if want[name] != digest:
      raise CorruptCheckpoint(step, f'state/{name}: digest mismatch (the array\'s bytes changed '
                              'after it was saved)')
  missing = sorted(set(want) - set(got))
  if missing and not partial:
    raise CorruptCheckpoint(step, f'state/{missing[0]}: recorded but not restored')


def _first_line(error: BaseException) -> str:
  """One line for an error from orbax or tensorstore; for a failed array read,
  the innermost cause (it names the array and the file), without tensorstore's
  long spec."""
  if 'TensorStore' in str(error):
    while (error.__cause__ or error.__context__) is not None:
      error = error.__cause__ or error.__context__
  text = str(error).strip().splitlines()
  line = f'{type(error).__name__}: {text[0]}' if text else type(error).__name__
  line = line.split(' See full TensorStore details')[0]
  return line if len(line) <= 300 else line[:297] + '...'


def _drop_failed_read_reports(unraisable, _default=sys.unraisablehook) -> None:
  """After one array read fails, orbax's other read coroutines fail as they are
  collected; the failure is reported once, by the caller, not once per array."""
  if getattr(unraisable.object, '__name__', '') == '_read_array_index_and_device_put':
    return
  _default(unraisable)


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
  try:
    yield
  except Exception:
    sys.unraisablehook = _drop_failed_read_reports
    gc.collect()
    raise


# --- file manifests -----------------------------------------------------------------

MANIFEST = 'files.json'


def _crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while True:
      chunk = f.read(1 << 22)
      if not chunk:
        return crc
      crc = zlib.crc32(chunk, crc)


def write_manifest(directory: str, step: int) -> None:
  """Records the size and CRC32 of every file of committed checkpoint `step`
  (atomically, in <step>/files.json), so a change to any byte, also one no
  array reads, is caught."""
  step_dir = os.path.join(directory, str(step))
  paths = sorted(os.path.join(d, name) for d, _, names in os.walk(step_dir) for name in names
                 if not name.startswith(MANIFEST))
  crcs = list(_POOL.map(_crc32, paths))  # zlib releases the GIL on large buffers
  files = {os.path.relpath(p, step_dir): [os.path.getsize(p), c] for p, c in zip(paths, crcs)}
  manifest = _sealed({'step': step, 'files': files})
  tmp = os.path.join(step_dir, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def _check_manifest(directory: str, step: int) -> None:
  """Raises CorruptCheckpoint naming the first file that changed since it was
  written (checkpoints saved without a manifest pass)."""
  step_dir = os.path.join(directory, str(step))
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      manifest = json.load(f)
    ok = _seal_intact(manifest) and manifest['step'] == step
  except (ValueError, KeyError, TypeError, OSError):
    ok = False
  if not ok:
    raise CorruptCheckpoint(step, f'{MANIFEST}: unreadable or checksum mismatch')
  listed = sorted(manifest['files'].items())
  for rel, (size, _) in listed:
    file = os.path.join(step_dir, rel)
    if not os.path.exists(file):
      raise CorruptCheckpoint(step, f'{rel}: missing')
    actual = os.path.getsize(file)
    if actual != size:
      raise CorruptCheckpoint(step, f'{rel}: {actual} bytes, {size} when written (truncated '
                              'or overwritten)')
  crcs = _POOL.map(_crc32, [os.path.join(step_dir, rel) for rel, _ in listed])
  for (rel, (_, crc)), actual in zip(listed, crcs):
    if actual != crc:
      raise CorruptCheckpoint(step, f'{rel}: contents changed since it was written (CRC32 '
                              'mismatch)')


# --- restoring ----------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
  """What a checkpoint holds.

  Attributes:
    step: its step.
    state: the train state (on the target's shardings).
    data: the data iterator's state.
    loop: the loop hooks' state saved with it (None if none).
    verified: whether it carried digests (checkpoints written before digests
      existed restore unverified).
  """
  step: int
  state: Any
  data: Dict[str, Any]
  loop: Any = None
  verified: bool = True
  rejected: List[int] = dataclasses.field(default_factory=list)


def _has_item(directory: str, step: int, item: str) -> bool:
  return os.path.isdir(os.path.join(directory, str(step), item))


def _restore_verified(manager: ocp.CheckpointManager, directory: str, step: int, state_args,
                      with_data: bool = True, files_checked: bool = False
                      ) -> Tuple[Dict[str, Any], bool]:
  """Restores `state` (all of it, or part with a partial `state_args`), `data`
  and `meta`, and verifies what it read: the file manifest, `meta`'s checksum,
  the data digest, the digests of the arrays restored, finiteness.

  Returns:
    (orbax's output by item, whether the checkpoint carried digests).

  Raises:
    CorruptCheckpoint: any failure.
  """
  verified = _has_item(directory, step, 'meta')
  if not files_checked:
    _check_manifest(directory, step)
  try:
    items = dict(state=state_args)
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    if verified:
      items['meta'] = ocp.args.JsonRestore()
    with quiet_orbax(), _quiet_failed_reads():
      out = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except  (tensorstore, json, orbax: all unreadable)
    raise CorruptCheckpoint(step, _first_line(e)) from None
  if verified:
    _check_meta(step, out['meta'])
    if with_data and _json_digest(out['data']) != out['meta']['data']:
      raise CorruptCheckpoint(step, 'data: digest mismatch')
  digests, nonfinite = state_digests(out['state'])
  if verified:
    _compare_digests(step, out['meta']['state'], digests, partial=not with_data)
  if nonfinite:
    what = 'state holds' if with_data else 'params hold'
    raise CorruptCheckpoint(step, f'{what} {nonfinite} non-finite values')
  return out, verified


def _read(manager: ocp.CheckpointManager, directory: str, step: int, abstract_state: Any,
          files_checked: bool = False) -> Restored:
  """Restores and verifies one whole checkpoint; any failure is a CorruptCheckpoint."""
  out, verified = _restore_verified(manager, directory, step,
                                    ocp.args.StandardRestore(abstract_state),
                                    files_checked=files_checked)
  return Restored(step, out['state'], out['data'], out['meta']['loop'] if verified else None,
                  verified)


def _check_shapes(manager, directory: str, step: int, abstract_state: Any) -> None:
  """Raises CheckpointError if the checkpoint's arrays do not fit `abstract_state`
  (a CorruptCheckpoint if its metadata cannot be read)."""
  try:
    with quiet_orbax():
      saved = manager.item_metadata(step)['state']
    if saved is None:
      raise ValueError('no state item')
    saved_flat = _flat_shapes(saved)
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpoint(step, f'state metadata: {_first_line(e)}') from None
  fix = f'point MODEL_DIR at a new directory, or use the model config that wrote {directory}'
  _compare(saved_flat, _flat_shapes(abstract_state), step, directory, fix)


def find_resumable(model_dir: str, abstract_state: Any,
                   notice: Callable[[str], None] = print) -> Optional[Restored]:
  """The newest checkpoint of MODEL_DIR that fits and verifies, restored onto
  `abstract_state`'s shardings; read-only.

  A checkpoint that fails verification is reported through `notice` (one
  line) and the next older one is tried; the steps passed over are in the
  result's `rejected`.

  Returns:
    None when MODEL_DIR has no checkpoint.

  Raises:
    CheckpointError: the newest readable checkpoint is of another model, or
      no checkpoint verifies.
  """
  directory = checkpoint_dir(model_dir)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f'{directory} is a file, not a directory: move it away or point '
                          'MODEL_DIR at a new directory')
  steps = sorted(all_steps(model_dir), reverse=True)
  if not steps:
    return None
  rejected: List[CorruptCheckpoint] = []
  with open_read_only(directory) as manager:
    for step in steps:
      try:
        _check_manifest(directory, step)
        _check_shapes(manager, directory, step, abstract_state)
        restored = _agree(functools.partial(_read, files_checked=True), manager, directory,
                          step, abstract_state)
      except CorruptCheckpoint as e:
        rejected.append(e)
        older = [s for s in steps if s < step]
        notice(f'{e}; ' + (f'falling back to step {older[0]}' if older else 'no older checkpoint'))
        continue
      restored.rejected = [e.step for e in rejected]
      return restored
  first = rejected[0]
  raise CheckpointError(
      f'no checkpoint in {directory} verifies (step {first.step}: {first.what}): move the '
      'damaged checkpoints/<step> folders away, or point MODEL_DIR at a new directory')


def _agree(fn, manager, directory, step, abstract_state):
  """`fn`'s result, or the same CorruptCheckpoint on every process when any
  process failed (each reads its own shards)."""
  error = None
  try:
    result = fn(manager, directory, step, abstract_state)
  except CorruptCheckpoint as e:
    error, result = e, None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.max(failed):
      error = CorruptCheckpoint(step, f'failed on process {int(np.argmax(failed))}')
  if error is not None:
    raise error
  return result


def set_aside(model_dir: str, steps) -> List[str]:
  """Moves checkpoints that failed verification to MODEL_DIR/checkpoints.rejected/
  (kept for inspection, out of the way of the steps the run writes again)."""
  moved = []
  if jax.process_index() != 0:
    return moved
  target = os.path.join(os.path.abspath(model_dir), 'checkpoints.rejected')
  for step in steps:
    os.makedirs(target, exist_ok=True)
    dest, n = os.path.join(target, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(target, f'{step}.{n}'), n + 1
    os.rename(os.path.join(checkpoint_dir(model_dir), str(step)), dest)
    moved.append(dest)
  return moved


# --- verify (offline) ---------------------------------------------------------------

def verify(model_dir: str, step: Optional[int] = None) -> List[Tuple[int, str, str]]:
  """Checks checkpoints offline, restoring each as saved on the default device.

  Returns:
    (step, status, detail) per checkpoint, oldest first; status is 'ok',
    'unverified' (written before digests) or 'FAILED'.
  """
  directory = checkpoint_dir(model_dir)
  steps = all_steps(model_dir)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'no checkpoint step {step} in {directory} (steps: {steps}): '
                            'pass one of those to --step')
    steps = [step]
  if not steps:
    raise CheckpointError(f'no checkpoints in {directory}: pass a MODEL_DIR that has some')
  report = []
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with open_read_only(directory) as manager:
    for s in steps:
      try:
        try:
          with quiet_orbax():
            saved = manager.item_metadata(s)['state']
          abstract = _abstract(saved, device)
        except Exception as e:  # pylint: disable=broad-except
          raise CorruptCheckpoint(s, f'state metadata: {_first_line(e)}') from None
        restored = _read(manager, directory, s, abstract)
        arrays = jax.tree.leaves(restored.state)
        size = sum(x.size * x.dtype.itemsize for x in arrays)
        if restored.verified:
          report.append((s, 'ok', f'{len(arrays)} arrays, {size / 2**20:.1f} MiB, digests match'))
        else:
          report.append((s, 'unverified', f'{len(arrays)} arrays readable; written without '
                         'digests'))
      except CorruptCheckpoint as e:
        report.append((s, 'FAILED', e.what))
  return report


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m t5x_like.checkpoints',
      description='verify: check the checkpoints of a run (digests, readability, finiteness).')
  sub = parser.add_subparsers(dest='command', required=True)
  v = sub.add_parser('verify', help='check every checkpoint of MODEL_DIR (or one step)')
  v.add_argument('model_dir')
  v.add_argument('--step', type=int, default=None)
  args = parser.parse_args(argv)
  try:
    report = verify(args.model_dir, args.step)
  except CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for step, status, detail in report:
    print(f'step {step}: {status}: {detail}')
  failed = [s for s, status, _ in report if status == 'FAILED']
  print(f'{len(report) - len(failed)} of {len(report)} checkpoints in '
        f'{checkpoint_dir(args.model_dir)} pass' + (f'; failed: {failed}' if failed else ''))
  return 1 if failed else 0


@dataclasses.dataclass(frozen=True)
class StateView:
  """What a checkpoint holds of a train state whose frozen parameters live elsewhere.

  saved: state -> the part written (e.g. only the trained parameters); works on
    abstract states too.
  full: (restored part, a current state) -> the whole state (the frozen parameters
    taken from the current one).
  """
  saved: Callable[[Any], Any]
  full: Callable[[Any, Any], Any]


class Checkpointer:
  """Saves and restores (state, data-iterator state, loop state) at steps.

  Every save records digests and refuses a non-finite state; every restore
  verifies.

  Args:
    model_dir: the run directory.
    keep: how many of the newest checkpoints to keep.
    keep_period: also keep every checkpoint whose step is a multiple of this.
    async_save: write in a background thread after copying arrays to host.
    streamed: `state` may hold StreamedArrays (written piece by piece; saves
      wait until written).
    view: write only part of each state (`StateView`); None: all of it.
  """

  def __init__(self, model_dir: str, keep: int = 3, keep_period: Optional[int] = None,
               async_save: bool = True, streamed: bool = False,
               view: Optional[StateView] = None):
    self.view = view
    if keep < 1:
      raise CheckpointError(f'keep={keep} must be at least 1: set train.keep_checkpoints')
    self.directory = checkpoint_dir(model_dir)
    self._unlisted: List[int] = []  # committed (or being saved) without a file manifest yet
    self._lock = threading.Lock()
    self._streamed = streamed
    async_save = async_save and not streamed
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
        async_options=(ocp.AsyncOptions(post_finalization_callback=self._write_manifests)
                       if async_save else None))
    with quiet_orbax():
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=_handlers(streamed))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Dict[str, Any], loop_state: Any = None,
           digests: Optional[Tuple[Dict[str, str], int]] = None) -> None:
    """Commits a checkpoint of `state` at `step`, with the digests of its arrays.

    `digests`: `state_digests(state)` when the caller already has it (a
    streamed state is made once more for them otherwise).

    Raises:
      NonFiniteStateError: `state` holds a NaN or infinity (nothing is written).
    """
    if self.view is not None:
      state = self.view.saved(state)
    digests, nonfinite = digests or state_digests(state)
    if nonfinite:
      raise NonFiniteStateError(
          f'the state at step {step} holds {nonfinite} non-finite values; not saving it '
          f'(last checkpoint: step {self.latest_step()}): lower the learning rate or check '
          'the data')
    meta = _meta(step, digests, data_state, loop_state)
    with self._lock:
      self._unlisted.append(step)
    with quiet_orbax():
      self.manager.save(step, args=ocp.args.Composite(
          state=(ocp.args.PyTreeSave(state) if self._streamed else ocp.args.StandardSave(state)),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)
    if not self.manager.is_saving_in_progress():
      self._write_manifests()

  def _write_manifests(self) -> None:
    """After a commit (orbax calls it from its background thread): the file
    manifest of every checkpoint this Checkpointer committed (process 0)."""
    with self._lock:
      for step in list(self._unlisted):
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.isdir(step_dir):
          if not self.manager.is_saving_in_progress():
            self._unlisted.remove(step)  # deleted by retention, or never committed
          continue
        try:
          if jax.process_index() == 0:
            write_manifest(self.directory, step)
        except FileNotFoundError:  # retention removed it meanwhile
          pass
        self._unlisted.remove(step)

  def restore(self, step: int, abstract_state: Any, current: Any = None) -> Restored:
    """Restores and verifies onto the shardings carried by `abstract_state` (any mesh);
    with a `view`, the rest of the state comes from `current`.

    Raises:
      CorruptCheckpoint: it cannot be read or fails verification.
    """
    self.wait()
    if self.view is None:
      return _agree(_read, self.manager, self.directory, step, abstract_state)
    restored = _agree(_read, self.manager, self.directory, step, self.view.saved(abstract_state))
    restored.state = self.view.full(restored.state, current)
    return restored

  def saving(self) -> bool:
    """Whether a save is still being written in the background."""
    return self.manager.is_saving_in_progress()

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_manifests()

  def close(self) -> None:
    self.wait()
    self.manager.close()


if __name__ == '__main__':
  # Through the imported module, so its classes are the ones the rest of the code uses.
  from t5x_like import checkpoints as _checkpoints  # pylint: disable=g-import-self
  sys.exit(_checkpoints.main())
