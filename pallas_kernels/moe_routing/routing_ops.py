"""Differentiable token permutation, and the dropless MoE path the models run.

`permute` and `unpermute` have exactly `xla.permute` / `unpermute`'s
semantics (a stable sort of the token copies by expert; its inverse, weighted
by the gates and summed in f32) and stay XLA gathers rather than Pallas
kernels: a row gather moves each row once at memory bandwidth already, so a
kernel could only fuse it into its neighbours, and the grouped matmul reads
its rows by tiles, not by index. An argsort plus `take` is also what
MaxText's and megablox's users do. What is added over `xla.py` is the
backward: each op has a `jax.custom_vjp` whose cotangent is a gather by the
inverse permutation too (MaxText's `_sort_activations` trick), not the
scatter-add that autodiff of `take` (or of `xla.unpermute`'s `.at[].set`)
would emit, which is serialised and slow on TPUs and needs atomics on GPUs.

`moe_dropless` composes the four steps: `gating_ops.top_k_gating` (Pallas)
-> `permute` -> `gmm_ops.gmm` per expert weight (Pallas) -> `unpermute`, or
with `pallas=False` the same with XLA's gating (`xla.top_k_gating`) and
grouped matmul (`jax.lax.ragged_dot`); `xla.moe_mlp_loop` is its
specification. `models/moe.py` runs it for both dropless implementations,
per device under a mesh, with each device's slice of the experts
(`first_expert`). Shapes: tokens [num_tokens, embed] (batch and length
flattened), router logits [num_tokens, num_experts].
"""

import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib
from pallas_kernels.moe_routing import gating_ops
from pallas_kernels.moe_routing import gmm_ops
from pallas_kernels.moe_routing import xla


def _inverse(order: jax.Array) -> jax.Array:
  """[n] int32 inverse permutation: inverse[order[r]] = r.

  A scatter of n integers: cheaper than a second argsort, and it moves no rows.
  """
  n = order.shape[0]
  return jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype),
                                             unique_indices=True)


def _take_rows(x: jax.Array, idx: jax.Array, unique: bool) -> jax.Array:
  # Indices are in range by construction: 'clip' skips the out-of-bounds fill.
  return jnp.take(x, idx, axis=0, mode='clip', unique_indices=unique)


# ---------------------------------------------------------------- permute


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_copies(tokens, order, k):
  return _take_rows(tokens, order // k, unique=False)  # [num_tokens * k, embed]


def _gather_copies_fwd(tokens, order, k):
  return _gather_copies(tokens, order, k), order


def _gather_copies_bwd(k, order, drows):
  # Token t's k copies sit at rows inverse[t * k : t * k + k]: gather them
  # back into [num_tokens, k, embed] and sum, instead of scatter-adding.
  num_tokens = order.shape[0] // k
  copies = _take_rows(drows, _inverse(order), unique=True)
  copies = copies.reshape(num_tokens, k, drows.shape[-1]).astype(jnp.float32)
  return copies.sum(axis=1).astype(drows.dtype), None


_gather_copies.defvjp(_gather_copies_fwd, _gather_copies_bwd)


def _check_experts(experts, num_tokens: int) -> None:
  if getattr(experts, 'ndim', None) != 2:
    raise ValueError(f'experts must have rank 2 ([num_tokens, k]); got shape '
                     f'{getattr(experts, "shape", None)}')
  if experts.shape[0] != num_tokens or experts.shape[1] == 0:
    raise ValueError(f'experts has shape {experts.shape}; expected [num_tokens={num_tokens}, '
                     'k] with k >= 1')
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    raise ValueError(f'experts has dtype {experts.dtype}; expected an integer dtype')


def permute(tokens: jax.Array, experts: jax.Array, num_experts: int
            ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Copies of tokens sorted by expert (`xla.permute`, differentiable in tokens).

  Args:
    tokens: [num_tokens, embed] float.
    experts: [num_tokens, k] int expert ids in [0, num_experts).
    num_experts: number of experts (group_sizes' length).

  Returns:
    rows [num_tokens * k, embed]: token copies, expert 0's first, token order
      within an expert (a stable sort).
    order [num_tokens * k] int32: row r is copy `order[r]` of the flattened
      [num_tokens, k] choices (token order[r] // k).
    group_sizes [num_experts] int32: rows per expert (0 for an unused expert).
  """
  backend_lib.check_float_array('tokens', tokens, '[num_tokens, embed]')
  _check_experts(experts, tokens.shape[0])
  if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) \
      or num_experts < 1:
    raise ValueError(f'num_experts={num_experts!r} must be a positive integer')
  k = experts.shape[1]
  flat = experts.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=int(num_experts)).astype(jnp.int32)
  return _gather_copies(tokens, order, k), order, group_sizes


# -------------------------------------------------------------- unpermute


def _combine(copies: jax.Array, weights: jax.Array) -> jax.Array:
  """[num_tokens, k, embed] x [num_tokens, k] -> [num_tokens, embed] f32.

  Elementwise products summed over k (k is small): exact f32 on every
  device, where an f32 einsum would run at the TPU's default bf16 precision.
  """
  return jnp.sum(copies.astype(jnp.float32) * weights.astype(jnp.float32)[..., None], axis=1)


@jax.custom_vjp
def _unpermute(rows, order, weights):
  num_tokens, k = weights.shape
  copies = _take_rows(rows, _inverse(order), unique=True)  # [num_tokens * k, embed]
  return _combine(copies.reshape(num_tokens, k, -1), weights).astype(rows.dtype)


def _unpermute_fwd(rows, order, weights):
  return _unpermute(rows, order, weights), (rows, order, weights)


def _unpermute_bwd(res, dout):
  rows, order, weights = res
  num_tokens, k = weights.shape
  dout32 = dout.astype(jnp.float32)  # [num_tokens, embed]
  # d copy (t, j) = w[t, j] * dout[t]; row r is copy order[r]: a gather by
  # order, no scatter.
  dcopies = weights.astype(jnp.float32)[..., None] * dout32[:, None, :]  # [t, k, embed]
  drows = _take_rows(dcopies.reshape(num_tokens * k, -1), order, unique=True)
  # d w[t, j] = <copy (t, j), dout[t]>: the copies are re-gathered (cheaper
  # than keeping them alive from the forward).
  copies = _take_rows(rows, _inverse(order), unique=True).reshape(num_tokens, k, -1)
  dweights = jnp.sum(copies.astype(jnp.float32) * dout32[:, None, :], axis=-1)
  return drows.astype(rows.dtype), None, dweights.astype(weights.dtype)


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute(rows: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
  """Inverse of `permute`, combining each token's k rows with its gate weights.

  `xla.unpermute`, differentiable in rows and weights.

  Args:
    rows: [num_tokens * k, embed] float, expert outputs in `permute`'s order.
    order: [num_tokens * k] int, from `permute`.
    weights: [num_tokens, k] float gate weights.

  Returns:
    [num_tokens, embed] in rows' dtype; the sum accumulates in f32.
  """
  backend_lib.check_float_array('rows', rows, '[num_tokens * k, embed]')
  if getattr(weights, 'ndim', None) != 2 or not jnp.issubdtype(weights.dtype, jnp.floating):
    raise ValueError(f'weights must be a float [num_tokens, k] array; got shape '
                     f'{getattr(weights, "shape", None)} and dtype '
                     f'{getattr(weights, "dtype", None)}')
  n = weights.shape[0] * weights.shape[1]
  if rows.shape[0] != n:
    raise ValueError(f'rows has {rows.shape[0]} rows; expected num_tokens * k = {n} '
                     f'(weights has shape {weights.shape})')
  order = jnp.asarray(order)
  if order.shape != (n,) or not jnp.issubdtype(order.dtype, jnp.integer):
    raise ValueError(f'order has shape {order.shape} and dtype {order.dtype}; expected int '
                     f'[num_tokens * k] = ({n},)')
  return _unpermute(rows, order.astype(jnp.int32), weights)


# ------------------------------------------------------------ composition


def moe_dropless(tokens: jax.Array, router_logits: jax.Array,
                 wi: Union[jax.Array, Sequence[jax.Array]], wo: jax.Array, k: int,
                 renormalize: bool = True,
                 activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
                 gated: bool = True, *,
                 first_expert: Optional[Union[int, jax.Array]] = None,
                 pallas: bool = True,
                 backend: Optional[str] = None,
                 gating_block_sizes=None,
                 gmm_block_sizes=None,
                 interpret: Optional[bool] = None
                 ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """A dropless mixture-of-experts MLP: gating -> permute -> grouped matmuls -> unpermute.

  out[t] = sum over t's k chosen experts e of gate(t, e) * mlp_e(tokens[t]),
  with mlp_e(x) = (activation(x @ wi_0[e]) * (x @ wi_1[e])) @ wo[e] when
  gated, else activation(x @ wi[e]) @ wo[e]: `xla.moe_mlp_loop` with
  `xla.top_k_gating`'s gates. Differentiable in tokens, router_logits, wi and
  wo.

  Args:
    tokens: [num_tokens, embed] float.
    router_logits: [num_tokens, num_experts] float (f32 recommended; the
      softmax runs in f32 regardless).
    wi: gated: a pair (wi_0, wi_1), each [experts, embed, mlp]; else one
      [experts, embed, mlp] array (or a 1-sequence of it). tokens' dtype.
      experts is num_experts, or the slice's size with first_expert.
    wo: [experts, mlp, embed], tokens' dtype.
    k: experts per token, 1 <= k <= num_experts.
    renormalize: renormalise the k gates to sum to 1 (see `top_k_gating`).
    activation: elementwise, applied in tokens' dtype (as the model does).
    gated: GLU-style experts (SwiGLU, GeGLU) with two input matrices.
    first_expert: None: wi and wo hold all num_experts experts. Else they
      hold a slice of them (expert parallelism): the wi[0].shape[0] experts
      from first_expert on (a Python int, or a traced int32 such as
      `lax.axis_index(axis) * experts_per_device`). Only the choices of those
      experts are computed, so out is the slice's share of the sum, which a
      sum over the slices completes; the gates and experts returned are
      every choice's.
    pallas: run the Pallas kernels (`gating_ops`, `gmm_ops`; interpreted on
      CPU). False: XLA throughout (`xla.top_k_gating`, `jax.lax.ragged_dot`),
      which XLA can partition and compiles for any device; the arguments
      below are then unused.
    backend, interpret: as for `gating_ops.top_k_gating` and `gmm_ops.gmm`.
    gating_block_sizes: the backend's `gating_{gpu,tpu}.BlockSizes` or None.
    gmm_block_sizes: the backend's `gmm_{gpu,tpu}.BlockSizes` or None.

  Returns:
    out [num_tokens, embed] in tokens' dtype; and the routing, weights
    [num_tokens, k] f32 and experts [num_tokens, k] int32, for router
    statistics (load balance) without a second gating pass.
  """
  backend_lib.check_float_array('tokens', tokens, '[num_tokens, embed]')
  num_tokens, embed = tokens.shape
  if getattr(router_logits, 'ndim', None) != 2 or router_logits.shape[0] != num_tokens:
    raise ValueError(f'router_logits has shape {getattr(router_logits, "shape", None)}; '
                     f'expected [num_tokens={num_tokens}, num_experts]')
  num_experts = router_logits.shape[1]
  wi = tuple(wi) if isinstance(wi, (tuple, list)) else (wi,)
  if len(wi) != (2 if gated else 1):
    raise ValueError(f'wi has {len(wi)} matrices; gated={gated} takes '
                     f'{"a pair (wi_0, wi_1)" if gated else "one"}')
  for name, w in [(f'wi[{i}]', w) for i, w in enumerate(wi)] + [('wo', wo)]:
    if getattr(w, 'ndim', None) != 3:
      raise ValueError(f'{name} must have rank 3 ([num_experts, in, out]); got shape '
                       f'{getattr(w, "shape", None)}')
    if w.dtype != tokens.dtype:
      raise ValueError(f"{name} has dtype {w.dtype}; expected tokens' dtype {tokens.dtype}")
  experts_here, mlp = wi[0].shape[0], wi[0].shape[2]
  if first_expert is None:
    experts_here, experts_from = num_experts, 'num_experts from router_logits'
  elif not 1 <= experts_here <= num_experts:
    raise ValueError(f'wi[0] holds {experts_here} experts; with first_expert, a slice of '
                     f'the num_experts={num_experts} of router_logits')
  else:
    experts_from = 'the slice of experts from wi[0]'
  for name, w, want in [(f'wi[{i}]', w, (experts_here, embed, mlp)) for i, w in enumerate(wi)
                        ] + [('wo', wo, (experts_here, mlp, embed))]:
    if w.shape != want:
      raise ValueError(f'{name} has shape {w.shape}; expected {want} = [num_experts, '
                       f'{"embed, mlp" if name != "wo" else "mlp, embed"}] ({experts_from}, '
                       'embed from tokens, mlp from wi[0])')
  if not callable(activation):
    raise ValueError(f'activation={activation!r} must be callable')

  if pallas:
    weights, experts = gating_ops.top_k_gating(router_logits, k, renormalize,
                                               backend=backend,
                                               block_sizes=gating_block_sizes,
                                               interpret=interpret)
    grouped = functools.partial(gmm_ops.gmm, backend=backend, block_sizes=gmm_block_sizes,
                                interpret=interpret)
  else:
    weights, experts = xla.top_k_gating(router_logits, k, renormalize)
    grouped = functools.partial(jax.lax.ragged_dot, preferred_element_type=None)
  here = experts
  if first_expert is not None:
    # The slice's experts first: their rows lead the sorted order, and the
    # other experts' rows trail past sum(group_sizes), where the grouped
    # matmul leaves zeros.
    here = (experts - first_expert) % num_experts
  rows, order, group_sizes = permute(tokens, here, num_experts)  # [num_tokens * k, embed]
  group_sizes = group_sizes[:experts_here]
  h = activation(grouped(rows, wi[0], group_sizes))  # [num_tokens * k, mlp]
  if gated:
    h = h * grouped(rows, wi[1], group_sizes)
  y = grouped(h.astype(tokens.dtype), wo, group_sizes)  # [num_tokens * k, embed]
  return unpermute(y, order, weights), weights, experts
