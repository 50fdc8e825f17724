"""Public grouped matmuls: validation, padding, backend choice and the VJPs.

`gmm` and `tgmm` take the arguments of `gmm_reference.gmm` / `tgmm` plus
`backend`, `block_sizes` and `interpret`, and return the same values within
floating-point tolerance. On GPU they run the Triton kernels of `gmm_gpu.py`,
on TPU the Mosaic kernels of `gmm_tpu.py`; on CPU the GPU kernels run in the
Pallas interpreter (slow: for tests and debugging).

Both are differentiable in their float arguments (never in group_sizes), and
each one's VJP is made of the two functions themselves (so it is
differentiable again): for out = gmm(lhs, rhs), d lhs = gmm(d out, rhs,
transpose_rhs=True) and d rhs = tgmm(lhs, d out); for out = tgmm(lhs, dout),
d lhs = gmm(dout, d out, transpose_rhs=True) and d dout = gmm(lhs, d out).

group_sizes is read at run time (under jit it may be traced; shapes never
depend on it). As in the reference (`gmm_reference.group_offsets`), a negative
size counts as 0 and groups that run past m are cut at m.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backend_lib
from pallas_kernels.moe_routing import gmm_reference
from pallas_kernels.moe_routing import tiles


def _pad(x: jax.Array, shape) -> jax.Array:
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _check_group_sizes(group_sizes, num_groups: int, groups_from: str) -> jax.Array:
  group_sizes = jnp.asarray(group_sizes)
  if group_sizes.shape != (num_groups,):
    raise ValueError(f'group_sizes has shape {group_sizes.shape}; expected [num_groups] = '
                     f'({num_groups},) ({groups_from})')
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f'group_sizes has dtype {group_sizes.dtype}; expected an integer dtype')
  return group_sizes.astype(jnp.int32)


def _out_dtype(preferred_element_type, *inputs):
  if preferred_element_type is None:
    return inputs[0].dtype
  try:
    dtype = jnp.dtype(preferred_element_type)
  except TypeError as e:
    raise ValueError(f'preferred_element_type={preferred_element_type!r} is not a '
                     'dtype') from e
  if dtype not in backend_lib.FLOATS:
    raise ValueError(f'preferred_element_type={dtype} must be float32, bfloat16 or float16')
  return dtype


def _select(backend, block_sizes, interpret, dtype, m: int, k: int, n: int
            ) -> backend_lib.Kernels:
  """The kernels for a problem [m, k] x [k, n] (tiles clipped to it)."""
  return backend_lib.select('pallas_kernels.moe_routing.gmm_{}', backend, interpret,
                            block_sizes, default=(dtype,), clip=(m, k, n))


def _again(kernels: backend_lib.Kernels, block_sizes) -> dict:
  """The public functions' arguments that rerun `kernels` with other tiles."""
  return dict(backend=kernels.backend, block_sizes=block_sizes, interpret=kernels.interpret)


def _common(a: jax.Array, b: jax.Array):
  """Both in their common dtype: the public functions take one dtype, and the
  kernels promote the operands of every tile product to it anyway (exact)."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  return a.astype(dtype), b.astype(dtype)


# ----------------------------------------------------------- custom VJPs
# Each backend module's kernels take arrays padded to whole tiles (m, k and n
# multiples of the clipped BlockSizes' tm, tk and tn) and the int32 group
# offsets [num_groups + 1] of `gmm_reference.group_offsets` (cut at the real
# m):
#   gmm(lhs [m, k], rhs [groups, k, n] (or [groups, n, k] with transpose_rhs),
#       offsets, bs, *, transpose_rhs, out_dtype, interpret) -> [m, n], zero in
#       the rows of no group;
#   tgmm(lhs [m, k], dout [m, n], offsets, bs, *, out_dtype, interpret)
#       -> [groups, k, n], zero for an empty group.
# The VJPs below are the public `gmm` and `tgmm` again (so gradients of
# gradients work too), padding and slicing for themselves.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, kernels):
  (m, k, n, groups), bs = tiles.gmm_dims(lhs, rhs, transpose_rhs), kernels.block_sizes
  mp, kp, np_ = (backend_lib.round_up(d, t) for d, t in ((m, bs.tm), (k, bs.tk), (n, bs.tn)))
  rhs_shape = (groups, np_, kp) if transpose_rhs else (groups, kp, np_)
  out = kernels.module.gmm(_pad(lhs, (mp, kp)), _pad(rhs, rhs_shape),
                           gmm_reference.group_offsets(group_sizes, m), bs,
                           transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                           interpret=kernels.interpret)
  return out[:m, :n]


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype, kernels):
  out = _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, kernels)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, out_dtype, kernels, res, dout):
  del out_dtype
  lhs, rhs, group_sizes = res  # lhs [m, k], dout [m, n]
  bs = kernels.block_sizes
  # d lhs contracts over n and has k columns: the tiles of tk and tn swap.
  dlhs = gmm(*_common(dout, rhs), group_sizes, transpose_rhs=not transpose_rhs,
             preferred_element_type=lhs.dtype, **_again(kernels, bs.swapped()))
  if transpose_rhs:  # rhs [groups, n, k]: tgmm with swapped operands, no transpose
    drhs = tgmm(*_common(dout, lhs), group_sizes, preferred_element_type=rhs.dtype,
                **_again(kernels, bs.swapped()))
  else:
    drhs = tgmm(*_common(lhs, dout), group_sizes, preferred_element_type=rhs.dtype,
                **_again(kernels, bs))
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tgmm(lhs, dout, group_sizes, out_dtype, kernels):
  (m, k), n, bs = lhs.shape, dout.shape[1], kernels.block_sizes
  mp, kp, np_ = (backend_lib.round_up(d, t) for d, t in ((m, bs.tm), (k, bs.tk), (n, bs.tn)))
  out = kernels.module.tgmm(_pad(lhs, (mp, kp)), _pad(dout, (mp, np_)),
                            gmm_reference.group_offsets(group_sizes, m), bs,
                            out_dtype=out_dtype, interpret=kernels.interpret)
  return out[:, :k, :n]


def _tgmm_fwd(lhs, dout, group_sizes, out_dtype, kernels):
  out = _tgmm(lhs, dout, group_sizes, out_dtype, kernels)
  return out, (lhs, dout, group_sizes)


def _tgmm_bwd(out_dtype, kernels, res, g):
  del out_dtype
  lhs, dout, group_sizes = res  # lhs [m, k], dout [m, n], g [groups, k, n]
  bs = kernels.block_sizes
  dlhs = gmm(*_common(dout, g), group_sizes, transpose_rhs=True,
             preferred_element_type=lhs.dtype, **_again(kernels, bs.swapped()))
  ddout = gmm(*_common(lhs, g), group_sizes, preferred_element_type=dout.dtype,
              **_again(kernels, bs))
  return dlhs, ddout, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


# ------------------------------------------------------------- public API


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        transpose_rhs: bool = False,
        preferred_element_type: Optional[jnp.dtype] = None,
        backend: Optional[str] = None,
        block_sizes=None,
        interpret: Optional[bool] = None) -> jax.Array:
  """Grouped matmul: out[rows of g] = lhs[rows of g] @ rhs[g], as Pallas kernels.

  Args:
    lhs: [m, k]; its rows grouped contiguously, group 0 first.
    rhs: [num_groups, k, n], or [num_groups, n, k] with transpose_rhs; same
      dtype as lhs.
    group_sizes: int [num_groups], rows per group; rows past their sum belong
      to no group.
    transpose_rhs: multiply by rhs[g].T.
    preferred_element_type: output dtype (None: lhs's); products accumulate
      in f32 regardless.
    backend: 'gpu' (Triton) or 'tpu' (Mosaic); None picks the default device's.
    block_sizes: the backend's BlockSizes (tm, tk, tn); None uses its default.
    interpret: run in the Pallas interpreter; None: only when the default
      device cannot run the backend (CPU).

  Returns:
    [m, n]; rows past sum(group_sizes) are zero.

  m, k and n need not divide the tiles: inputs are zero-padded to whole tiles.
  """
  backend_lib.check_float_array('lhs', lhs, '[m, k]')
  backend_lib.check_float_array(
      'rhs', rhs, '[num_groups, n, k]' if transpose_rhs else '[num_groups, k, n]')
  if lhs.dtype != rhs.dtype:
    raise ValueError(f'lhs and rhs must share a dtype; got {lhs.dtype} and {rhs.dtype}')
  m, k = lhs.shape
  if transpose_rhs:
    num_groups, n, rhs_k = rhs.shape
    layout = '[num_groups, n, k] (transpose_rhs=True)'
  else:
    num_groups, rhs_k, n = rhs.shape
    layout = '[num_groups, k, n]'
  if rhs_k != k:
    raise ValueError(f'rhs has shape {rhs.shape}, read as {layout}, so k={rhs_k}; but lhs '
                     f'[m, k] has k={k}')
  if min(m, k, n, num_groups) == 0:
    raise ValueError(f'm={m}, k={k}, n={n} and num_groups={num_groups} must be positive')
  group_sizes = _check_group_sizes(group_sizes, num_groups, 'rhs.shape[0]')
  kernels = _select(backend, block_sizes, interpret, lhs.dtype, m, k, n)
  return _gmm(lhs, rhs, group_sizes, bool(transpose_rhs),
              _out_dtype(preferred_element_type, lhs, rhs), kernels)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *,
         preferred_element_type: Optional[jnp.dtype] = None,
         backend: Optional[str] = None,
         block_sizes=None,
         interpret: Optional[bool] = None) -> jax.Array:
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ dout[rows of g].

  gmm's gradient with respect to rhs, as Pallas kernels.

  Args:
    lhs: [m, k]; its rows grouped contiguously, group 0 first.
    dout: [m, n]; same dtype as lhs.
    group_sizes: int [num_groups], rows per group; rows past their sum belong
      to no group.
    preferred_element_type: output dtype (None: lhs's); products accumulate
      in f32 regardless.
    backend, block_sizes, interpret: as for `gmm` (tm tiles the rows, which
      tgmm contracts; tk the columns of lhs, tn those of dout).

  Returns:
    [num_groups, k, n]; zeros for an empty group.
  """
  backend_lib.check_float_array('lhs', lhs, '[m, k]')
  backend_lib.check_float_array('dout', dout, '[m, n]')
  if lhs.dtype != dout.dtype:
    raise ValueError(f'lhs and dout must share a dtype; got {lhs.dtype} and {dout.dtype}')
  (m, k), n = lhs.shape, dout.shape[1]
  if dout.shape[0] != m:
    raise ValueError(f'dout has {dout.shape[0]} rows but lhs has m={m}; they must match')
  group_sizes = jnp.asarray(group_sizes)
  if group_sizes.ndim != 1:
    raise ValueError(f'group_sizes must have rank 1 ([num_groups]); got shape '
                     f'{group_sizes.shape}')
  num_groups = group_sizes.shape[0]
  if min(m, k, n, num_groups) == 0:
    raise ValueError(f'm={m}, k={k}, n={n} and num_groups={num_groups} must be positive')
  group_sizes = _check_group_sizes(group_sizes, num_groups, 'its length')
  kernels = _select(backend, block_sizes, interpret, lhs.dtype, m, k, n)
  return _tgmm(lhs, dout, group_sizes, _out_dtype(preferred_element_type, lhs, dout),
               kernels)
