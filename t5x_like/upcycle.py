"""Sparse upcycling (Komatsuzaki et al., 2022): an MoE model from a dense run.

Every MoE layer's experts start as copies of the corresponding dense layer's
MLP; every other parameter (attention, norms, embeddings, the MLPs of the
layers that stay dense) is copied as is; the router and the shared experts
keep the MoE model's fresh initialisation. All experts of a layer agree, so
whenever a token's gates sum to 1 and none of its choices is dropped
(renormalised top-k with dropless execution or enough capacity) the upcycled
model computes exactly the dense function at step 0, whatever the router
says. Raw top-1 gates (Switch) scale each MoE layer's MLP output by p < 1.

Layouts (`models/transformer.py`), per stack (`decoder/stack`, `encoder/stack`):
  dense scanned     layers/<rest> [L, ...]
  dense unrolled    layers_<i>/<rest>
  MoE scanned       layers/<rest> [L, ...] (experts every layer), or
                    layers/sublayer_<j>/<rest> [L/N, ...] (every N-th layer:
                    dense layers j, j+N, ...; sublayer N-1 is the MoE one)
  MoE unrolled      layers_<i>/<rest>
and in an MoE layer `mlp/wi_0/kernel` [..., d, m] (or wi_1, wi, wo) becomes
`moe/wi_0` [..., experts, d, m]. Either dense layout maps to either MoE layout.
"""

import re
from typing import Any, Dict, Tuple, Union

import jax
import jax.numpy as jnp

from models import config as model_config
from t5x_like import checkpoints

Key = Tuple[str, ...]

_EXPERT_WEIGHTS = ('wi_0', 'wi_1', 'wi', 'wo')  # moe/<name> <- mlp/<name>/kernel
_FRESH = ('router', 'shared_mlp')  # moe/<name>: nothing dense to copy from
_FIX = ('start from a run of the dense version of this model (the same config with '
        'num_experts = 0)')


def _key(path) -> Key:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _name(key: Key) -> str:
  return '/'.join(key)


def _flat(tree) -> Dict[Key, Any]:
  return {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layer_slot(key: Key) -> Tuple[Key, Union[str, int, None], Key]:
  """(stack prefix, 'scan' | unrolled layer index | None, the rest of the path)."""
  for pos, part in enumerate(key):
    if part == 'layers':
      return key[:pos], 'scan', key[pos + 1:]
    m = re.fullmatch(r'layers_(\d+)', part)
    if m:
      return key[:pos], int(m.group(1)), key[pos + 1:]
  return key, None, ()


def _stack_depths(moe_flat: Dict[Key, Any]) -> Dict[Key, Tuple[int, int]]:
  """Stack prefix -> (layers, scan-unit size) of the MoE model."""
  scanned, unrolled = {}, {}
  for key, x in moe_flat.items():
    prefix, slot, rest = _layer_slot(key)
    if slot == 'scan':
      m = re.fullmatch(r'sublayer_(\d+)', rest[0]) if rest else None
      groups, size = scanned.get(prefix, (x.shape[0], 1))
      scanned[prefix] = (groups, max(size, int(m.group(1)) + 1 if m else 1))
    elif slot is not None:
      unrolled[prefix] = max(unrolled.get(prefix, 0), slot + 1)
  out = {p: (groups * size, size) for p, (groups, size) in scanned.items()}
  out.update({p: (n, 1) for p, n in unrolled.items()})
  return out


class _Dense:
  """The dense parameters, looked up per layer in either layout; records what is used."""

  def __init__(self, params, source: str):
    self.flat = _flat(params)
    self.source = source
    self.used = set()

  def same(self, key: Key, want: tuple, target: Key):
    """The parameter at `key`, which must have shape `want`."""
    if key not in self.flat:
      raise checkpoints.CheckpointError(
          f'{self.source} has no {_name(key)!r} that the MoE model needs: {_FIX}')
    return self._take(key, want, target)

  def _take(self, key: Key, want: tuple, target: Key, what: str = ''):
    value = self.flat[key]
    if tuple(value.shape) != tuple(want):
      into = '' if key == target else f' (copied into {_name(target)}{what})'
      raise checkpoints.CheckpointError(
          f'{self.source} has {_name(key)} of shape {tuple(value.shape)} but the MoE model '
          f'expects {tuple(want)}{into}: {_FIX}')
    self.used.add(key)
    return value

  def layers(self, prefix: Key, rest: Key, layers: Union[int, slice], num_layers: int,
             want: tuple, target: Key, what: str = ''):
    """`prefix/<layer>/rest` of dense `layers` (an index, or a slice stacked on
    axis 0), each of shape `want`."""
    scanned = prefix + ('layers',) + rest
    if scanned in self.flat:
      return self._take(scanned, (num_layers,) + tuple(want), target, what)[layers]
    indices = range(num_layers)[layers]
    unrolled = [prefix + (f'layers_{i}',) + rest
                for i in ([indices] if isinstance(indices, int) else indices)]
    missing = [k for k in unrolled if k not in self.flat]
    if missing:
      # Name the path in the dense layout: unrolled when some of its layers
      # exist, else the MoE model's (scanned for a slice of layers).
      some = len(missing) < len(unrolled)
      name = _name(scanned if isinstance(layers, slice) and not some else missing[0])
      raise checkpoints.CheckpointError(
          f'{self.source} has no {name!r} that the MoE model needs for {_name(target)}: '
          f'{_FIX}')
    values = [self._take(k, want, target, what) for k in unrolled]
    return values[0] if isinstance(layers, int) else jnp.stack(values)


def upcycle_params(dense_params: Any, moe_params_init: Any, config: model_config.DecoderConfig,
                   source: str = 'the dense model') -> Any:
  """The MoE model's parameters from a dense model's (sparse upcycling).

  Pure and traceable (`jax.eval_shape` of it checks shapes without data).

  Args:
    dense_params: the dense model's parameters (arrays or ShapeDtypeStructs),
      scanned or unrolled.
    moe_params_init: the MoE model's freshly initialised parameters; gives the
      layout and shapes, and the router and shared-expert values kept.
    config: the MoE model's config (num_experts > 0).
    source: what the dense parameters are, for error messages.

  Returns:
    A tree shaped like `moe_params_init`, in its dtypes.

  Raises:
    checkpoints.CheckpointError: naming the first parameter of `dense_params`
      that is missing, of the wrong shape, or has no place in the MoE model.
    model_config.ConfigError: `config` has no experts.
  """
  if not config.num_experts:
    raise model_config.ConfigError(
        f'upcycling needs an MoE model, but {type(config).__name__}.num_experts = 0: include '
        'an MoE model file (e.g. models/mixtral/tiny.gin) or drop the upcycle flag')
  dense = _Dense(dense_params, source)
  moe_flat = _flat(moe_params_init)
  depths = _stack_depths(moe_flat)
  out = {}
  for key, target in moe_flat.items():
    prefix, slot, rest = _layer_slot(key)
    if slot is None:
      out[key] = dense.same(key, target.shape, key)
      continue
    num_layers, size = depths[prefix]
    if slot == 'scan':
      m = re.fullmatch(r'sublayer_(\d+)', rest[0]) if rest else None
      j, rest = (int(m.group(1)), rest[1:]) if m else (0, rest)
      layers, lead = slice(j, None, size), 1  # dense layers j, j + N, ... on axis 0
    else:
      layers, lead = slot, 0
    if rest[:1] == ('moe',):
      if rest[1:2] and rest[1] in _FRESH:
        out[key] = target
        continue
      if len(rest) != 2 or rest[1] not in _EXPERT_WEIGHTS:
        raise checkpoints.CheckpointError(f'do not know how to upcycle {_name(key)}: '
                                          f'expected moe/{{{",".join(_EXPERT_WEIGHTS)}}}')
      if target.shape[lead] != config.num_experts:
        raise checkpoints.CheckpointError(
            f'{_name(key)} has {target.shape[lead]} experts on axis {lead} but config says '
            f'num_experts = {config.num_experts}')
      value = dense.layers(prefix, ('mlp', rest[1], 'kernel'), layers, num_layers,
                           target.shape[lead + 1:], key, ' as every expert')
      # Every expert is the dense MLP: insert the expert axis after the layers axis.
      out[key] = jnp.broadcast_to(jnp.expand_dims(value, lead), target.shape)
    else:
      out[key] = dense.layers(prefix, rest, layers, num_layers, target.shape[lead:], key)
  unused = [k for k in dense.flat if k not in dense.used]
  if unused:
    mlp_bias = unused[0][-1] == 'bias' and 'mlp' in unused[0]
    raise checkpoints.CheckpointError(
        f'{source} has {_name(unused[0])} that the MoE model has no place for'
        f'{" (MoE experts have no biases)" if mlp_bias else ""}: {_FIX}')
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(out[_key(p)], x.dtype), moe_params_init)


def check_shapes(dense_params: Any, moe_params: Any, config: model_config.DecoderConfig,
                 source: str = 'the dense model') -> None:
  """`upcycle_params`' checks on shapes alone (arrays or ShapeDtypeStructs), no data.

  Raises:
    checkpoints.CheckpointError, model_config.ConfigError: as `upcycle_params`.
  """
  errors = []

  def trace(d, m):
    try:
      return upcycle_params(d, m, config, source)
    except (checkpoints.CheckpointError, model_config.ConfigError) as e:
      # Raised outside the trace: JAX appends lines to errors that cross it.
      errors.append(e)
      return m
  jax.eval_shape(trace, dense_params, moe_params)
  if errors:
    raise errors[0]


class UpcycleCheckpoint(checkpoints.InitialCheckpoint):
  """A dense run's checkpoint, upcycled into this MoE model at the start of a run.

  `restore` restores the dense parameters replicated over the mesh of the MoE
  parameters (every device holds the whole dense model for a moment), then
  maps them under jit into the MoE parameters' shardings.

  Args:
    path: the dense run (a MODEL_DIR, its checkpoints/ or one checkpoints/<step>).
    config: the MoE model's config.
  """

  def __init__(self, path: str, config: model_config.DecoderConfig):
    super().__init__(path)
    self.config = config
    self._dense = None

  def check(self, abstract_params: Any) -> None:
    if not self.config.num_experts:
      raise model_config.ConfigError(
          f'train.initial_checkpoint_upcycle = True needs an MoE model, but '
          f'{type(self.config).__name__}.num_experts = 0: include an MoE model file (e.g. '
          'models/mixtral/tiny.gin) or set train.initial_checkpoint_upcycle = False')
    super().check(abstract_params)

  def _check(self, saved, abstract_params):
    check_shapes(saved, abstract_params, self.config,
                 f'checkpoint step {self.step} in {self.directory}')
    self._dense = saved

  def restore(self, params: Any) -> Any:
    shardings = jax.tree.map(lambda x: x.sharding, params)
    mesh = jax.tree.leaves(shardings)[0].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    dense_abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), self._dense)
    dense = checkpoints.restore_params(self.directory, self.step, dense_abstract)
    return jax.jit(lambda d, m: upcycle_params(d, m, self.config), out_shardings=shardings)(
        dense, params)

  def describe(self) -> str:
    return (f'upcycled parameters from the dense run {self.directory} step {self.step}: every '
            'expert is its layer\'s dense MLP, routers fresh (fresh optimizer and data)')
