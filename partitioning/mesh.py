"""Builds the device mesh from a gin-set shape."""

from typing import Optional, Sequence

import jax
import numpy as np

from partitioning import axes as ax


class MeshError(ValueError):
  """A mesh that does not fit the devices."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = ax.MESH_AXES) -> tuple:
  """Replaces a single -1 in `shape` by the number of devices left over."""
  shape = tuple(int(s) for s in shape)
  where = 'MESH_SHAPE (partitioning.mesh.create_mesh.shape)'
  if len(shape) == len(axis_names) - 1 and tuple(axis_names[-1:]) == (ax.EXPERT_AXIS,):
    shape = shape + (1,)  # (data, fsdp, tensor): no expert parallelism
  if len(shape) != len(axis_names):
    raise MeshError(f'mesh shape {shape} has {len(shape)} entries but the mesh '
                    f'axes are {tuple(axis_names)}: set {where} to one size per axis')
  if shape.count(-1) > 1:
    raise MeshError(f'mesh shape {shape} has more than one -1: set {where} with '
                    'at most one -1 ("the rest")')
  if any(s == 0 or s < -1 for s in shape):
    raise MeshError(f'mesh shape {shape} has a size below 1: set {where} to '
                    'positive sizes (or -1 for "the rest")')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise MeshError(f'mesh shape {shape} cannot fill {num_devices} devices '
                      f'({num_devices} is not divisible by {known}): change {where}')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise MeshError(f'mesh shape {shape} needs {int(np.prod(shape))} devices but '
                    f'{num_devices} are available: change {where} (use -1 for '
                    '"the rest")')
  return shape


def create_mesh(shape: Sequence[int] = (-1, 1, 1),
                devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """Creates a mesh with axes (data, fsdp, tensor, expert).

  Args:
    shape: one size per mesh axis in `axes.MESH_AXES` order, or three sizes
      (data, fsdp, tensor) for an expert axis of 1; one entry may be -1,
      meaning "all devices left over".
    devices: the devices to use; all global devices by default.

  Returns:
    A `jax.sharding.Mesh` with `Auto` axis types, so that logical sharding
    constraints inside jit are honoured.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, ax.MESH_AXES, axis_types=auto, devices=devices)
