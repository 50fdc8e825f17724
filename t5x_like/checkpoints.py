"""Checkpoints with orbax: the train state, the data-iterator position, the run.

Layout under MODEL_DIR/checkpoints/<step>/: `state` (params, optimizer state,
step; sharded arrays restored onto any mesh) and `data` (the iterator state as
JSON). Saves are asynchronous and atomic (orbax writes to a temporary folder
and renames it on commit), so a killed process never leaves a checkpoint that
looks complete but is not; leftovers of interrupted saves are removed at start.
"""

import abc
import contextlib
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint that does not fit the run."""


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(os.path.abspath(model_dir), 'checkpoints')


def _describe(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _handlers():
  return {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}


@contextlib.contextmanager
def open_read_only(directory: str, item_handlers=None) -> Iterator[ocp.CheckpointManager]:
  """A checkpoint manager over `directory` that can neither create nor change anything."""
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_handlers=item_handlers or _handlers()) as manager:
    yield manager


def latest_step(model_dir: str) -> Optional[int]:
  """The newest complete checkpoint's step, without creating anything."""
  directory = checkpoint_dir(model_dir)
  if not os.path.isdir(directory):
    return None
  with open_read_only(directory) as manager:
    return manager.latest_step()


def check_compatible(model_dir: str, abstract_state: Any) -> Optional[int]:
  """Compares the latest checkpoint's shapes with `abstract_state`, read-only.

  Returns the step to resume from (None when there is no checkpoint) and
  raises `CheckpointError` naming the first mismatch otherwise.
  """
  directory = checkpoint_dir(model_dir)
  if not os.path.isdir(directory):
    return None
  with open_read_only(directory) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    saved = manager.item_metadata(step)['state']
  saved_flat, want_flat = _flat_shapes(saved), _flat_shapes(abstract_state)
  fix = (f'point MODEL_DIR at a new directory, or use the model config that wrote '
         f'{directory}')
  _compare(saved_flat, want_flat, step, directory, fix)
  return step


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


def _flat_shapes(tree) -> Dict[str, Tuple[tuple, Optional[str]]]:
  def dtype(x):
    d = getattr(x, 'dtype', None)
    return None if d is None else str(d)
  return {_describe(p): (tuple(getattr(x, 'shape', ())), dtype(x)) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def resolve(path: str) -> Tuple[str, int]:
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
  raise CheckpointError(f'no checkpoint found at {path}: set train.initial_checkpoint to a '
                        'MODEL_DIR with checkpoints (or one of its checkpoints/<step> folders)')


def saved_params(directory: str, step: int) -> Any:
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
                          'train.initial_checkpoint at a t5x_like MODEL_DIR')
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), params)


def restore_params(directory: str, step: int, abstract_params: Any = None) -> Any:
  """Only the parameters of a checkpoint: onto `abstract_params`' shardings, or
  (None) as saved, on the default device."""
  if abstract_params is None:
    abstract_params = saved_params(directory, step)
  item = {'params': abstract_params}
  with open_read_only(directory, {'state': ocp.PyTreeCheckpointHandler()}) as manager:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
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

  def __init__(self, path: str):
    self.path = path
    self.directory: Optional[str] = None
    self.step: Optional[int] = None

  def check(self, abstract_params: Any) -> None:
    """Raises CheckpointError (one line) unless `restore` can fill `abstract_params`."""
    self.directory, self.step = resolve(self.path)
    self._check(saved_params(self.directory, self.step), abstract_params)

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


class ParamsCheckpoint(InitialCheckpoint):
  """The parameters of a run of the same model, copied as they are."""

  def _check(self, saved, abstract_params):
    fix = ('use the same model config as the run that wrote it (initial_checkpoint loads '
           'params only)')
    _compare(_flat_shapes(saved), _flat_shapes(abstract_params), self.step, self.directory, fix)

  def restore(self, params):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            params)
    return restore_params(self.directory, self.step, abstract)

  def describe(self):
    return (f'initialised parameters from {self.directory} step {self.step} (fresh optimizer '
            'and data)')


class Checkpointer:
  """Saves and restores (state, data-iterator state) at steps.

  Args:
    model_dir: the run directory.
    keep: how many of the newest checkpoints to keep.
    keep_period: also keep every checkpoint whose step is a multiple of this.
    async_save: write in a background thread after copying arrays to host.
  """

  def __init__(self, model_dir: str, keep: int = 3, keep_period: Optional[int] = None,
               async_save: bool = True):
    if keep < 1:
      raise CheckpointError(f'keep={keep} must be at least 1: set train.keep_checkpoints')
    self.directory = checkpoint_dir(model_dir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=_handlers())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Dict[str, Any]) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores onto the shardings carried by `abstract_state` (any mesh)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out['state'], out['data']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
