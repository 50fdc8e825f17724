"""Checkpoints with orbax: the train state, the data-iterator position, the run.

Layout under MODEL_DIR/checkpoints/<step>/: `state` (params, optimizer state,
step; sharded arrays restored onto any mesh) and `data` (the iterator state as
JSON). Saves are asynchronous and atomic (orbax writes to a temporary folder
and renames it on commit), so a killed process never leaves a checkpoint that
looks complete but is not; leftovers of interrupted saves are removed at start.
"""

import os
from typing import Any, Dict, Optional, Tuple

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


def latest_step(model_dir: str) -> Optional[int]:
  """The newest complete checkpoint's step, without creating anything."""
  directory = checkpoint_dir(model_dir)
  if not os.path.isdir(directory):
    return None
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_handlers=_handlers()) as manager:
    return manager.latest_step()


def check_compatible(model_dir: str, abstract_state: Any) -> Optional[int]:
  """Compares the latest checkpoint's shapes with `abstract_state`, read-only.

  Returns the step to resume from (None when there is no checkpoint) and
  raises `CheckpointError` naming the first mismatch otherwise.
  """
  directory = checkpoint_dir(model_dir)
  if not os.path.isdir(directory):
    return None
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_handlers=_handlers()) as manager:
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


def _resolve_initial(path: str) -> Tuple[str, int]:
  """(checkpoints directory, step) for a MODEL_DIR, its checkpoints/ or one step's folder."""
  path = os.path.abspath(path)
  candidates = [(checkpoint_dir(path), None), (path, None)]
  base = os.path.basename(path.rstrip('/'))
  if base.isdigit():
    candidates.append((os.path.dirname(path), int(base)))
  for directory, step in candidates:
    if not os.path.isdir(directory):
      continue
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False), item_handlers=_handlers()) as manager:
      steps = manager.all_steps()
    if step is None and steps:
      return directory, max(steps)
    if step is not None and step in steps:
      return directory, step
  raise CheckpointError(f'no checkpoint found at {path}: set train.initial_checkpoint to a '
                        'MODEL_DIR with checkpoints (or one of its checkpoints/<step> folders)')


def check_initial_params(path: str, abstract_params: Any) -> Tuple[str, int]:
  """Checks, read-only, that the parameters at `path` fit the model; returns (dir, step)."""
  directory, step = _resolve_initial(path)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_handlers=_handlers()) as manager:
    saved = manager.item_metadata(step)['state']
  try:
    saved_params = saved['params']
  except (KeyError, TypeError):
    saved_params = None
  if saved_params is None:
    raise CheckpointError(f'checkpoint step {step} in {directory} has no params: point '
                          'train.initial_checkpoint at a t5x_like MODEL_DIR')
  fix = 'use the same model config as the run that wrote it (initial_checkpoint loads params only)'
  _compare(_flat_shapes(saved_params), _flat_shapes(abstract_params), step, directory, fix)
  return directory, step


def restore_params(directory: str, step: int, abstract_params: Any) -> Any:
  """Only the parameters of a checkpoint, onto `abstract_params`' shardings."""
  item = {'params': abstract_params}
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_handlers={'state': ocp.PyTreeCheckpointHandler()}
      ) as manager:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
  return out['state']['params']


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
