"""Maps logical axis names to shardings on a mesh; shards host batches."""

import contextlib
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from partitioning import axes as ax
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib


class BatchError(ValueError):
  """A batch that does not divide over the mesh or the hosts."""


def mesh_axes_in_context(names: Sequence[Optional[str]], shape: Sequence[int]) -> list:
  """Mesh axes of logical `names` under the rules and mesh in scope (tracing
  model code under `Partitioner.context()`); None for a dimension that does not
  divide over its mesh axes. For shard_map specs inside models."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = list(nn.logical_to_mesh_axes(names))
  for i, (a, d) in enumerate(zip(axes, shape)):
    if a is not None and d % _axis_size(mesh, a):
      axes[i] = None
  return axes


def _axis_size(mesh: jax.sharding.Mesh, mesh_axes) -> int:
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return int(np.prod([mesh.shape[a] for a in mesh_axes]))


class Partitioner:
  """Holds the mesh and rule table and turns logical names into shardings."""

  def __init__(self, mesh: jax.sharding.Mesh,
               rules: Optional[rules_lib.Rules] = None):
    self.mesh = mesh
    self.rules = tuple(rules if rules is not None else rules_lib.standard_rules())

  @contextlib.contextmanager
  def context(self):
    """Mesh and rules in scope: needed while tracing model code."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  # --- logical names -> specs ------------------------------------------------
  def spec(self, names: Optional[Sequence[Optional[str]]],
           shape: Optional[Sequence[int]] = None) -> P:
    """PartitionSpec for logical `names`; a dimension that does not divide
    over its mesh axes is replicated instead (e.g. 2 heads on tensor=8)."""
    if names is None:
      return P()
    mesh_axes = list(nn.logical_to_mesh_axes(names, self.rules))
    if shape is not None:
      for i, (dim, m) in enumerate(zip(shape, mesh_axes)):
        if m is not None and dim % _axis_size(self.mesh, m):
          mesh_axes[i] = None
    return P(*mesh_axes)

  def sharding(self, names, shape=None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def boxed_shardings(self, abstract_boxed: Any) -> Any:
    """Shardings for a tree whose leaves may be `nn.LogicallyPartitioned`.

    Returns a tree with the structure of the *unboxed* tree.
    """
    def one(leaf):
      if isinstance(leaf, nn.LogicallyPartitioned):
        value = leaf.value
        return self.sharding(leaf.names, value.shape)
      return self.replicated()
    return jax.tree.map(one, abstract_boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

  def derived_shardings(self, abstract_tree: Any, params_abstract: Any,
                        params_shardings: Any) -> Any:
    """Shardings for a tree (e.g. optimizer state) that mirrors `params`.

    A leaf whose key path ends with a parameter's key path takes that
    parameter's spec when the shapes agree, or the spec with one dimension
    deleted when the leaf is the parameter's shape minus that dimension (the
    factored row/column statistics of Adafactor). Anything else is replicated.
    """
    flat_params = {tuple(path): (x.shape, s.spec) for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(params_abstract)[0],
        jax.tree.leaves(params_shardings))}
    max_len = max((len(k) for k in flat_params), default=0)

    def one(path, leaf):
      path = tuple(path)
      shape = tuple(getattr(leaf, 'shape', ()))
      for n in range(min(len(path), max_len), 0, -1):
        hit = flat_params.get(path[-n:])
        if hit is None:
          continue
        pshape, pspec = hit
        pspec = tuple(pspec) + (None,) * (len(pshape) - len(pspec))
        if shape == tuple(pshape):
          return NamedSharding(self.mesh, P(*pspec))
        if len(shape) == len(pshape) - 1:
          for d in range(len(pshape)):
            if tuple(pshape[:d]) + tuple(pshape[d + 1:]) == shape:
              return NamedSharding(self.mesh, P(*(pspec[:d] + pspec[d + 1:])))
        break
      return self.replicated()
    return jax.tree_util.tree_map_with_path(one, abstract_tree)

  # --- batches -----------------------------------------------------------------
  @property
  def data_parallel_size(self) -> int:
    return _axis_size(self.mesh, nn.logical_to_mesh_axes((ax.BATCH,), self.rules)[0])

  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    return self.sharding((ax.BATCH,) + (None,) * (ndim - 1))

  def check_experts(self, num_experts: int) -> None:
    """Fails early when the experts do not split evenly over the expert axis."""
    ep = dict(self.mesh.shape).get(ax.EXPERT_AXIS, 1)
    if num_experts and num_experts % ep:
      raise mesh_lib.MeshError(
          f'num_experts={num_experts} is not divisible by the expert mesh axis of size '
          f'{ep}: set the last entry of MESH_SHAPE (data, fsdp, tensor, expert) to a '
          'divisor of num_experts')

  def check_batch_size(self, global_batch_size: int, setting: str = 'train.batch_size') -> None:
    """Fails early when the batch does not divide over the mesh and hosts
    (`setting`: what the user sets the batch size by)."""
    dp = self.data_parallel_size
    if global_batch_size % dp:
      raise BatchError(
          f'batch size {global_batch_size} is not divisible by the data-parallel '
          f'size {dp} (mesh {dict(self.mesh.shape)}): change '
          f'{setting} to a multiple of data*fsdp*expert, or change the mesh shape')
    if global_batch_size % jax.process_count():
      raise BatchError(
          f'batch size {global_batch_size} is not divisible by the '
          f'{jax.process_count()} processes: change {setting}')

  def host_slice(self, global_batch_size: int) -> slice:
    """The rows of the global batch that this process feeds."""
    per_host = global_batch_size // jax.process_count()
    start = jax.process_index() * per_host
    return slice(start, start + per_host)

  def shard_batch(self, local_batch: Mapping[str, np.ndarray],
                  global_batch_size: int) -> dict:
    """Host-local numpy rows -> global `jax.Array`s sharded over the batch axis."""
    out = {}
    for k, v in local_batch.items():
      v = np.asarray(v)
      global_shape = (global_batch_size,) + v.shape[1:]
      out[k] = jax.make_array_from_process_local_data(
          self.batch_sharding(v.ndim), v, global_shape)
    return out
