"""Public grouped matmuls: validation, padding, backend choice and the VJPs.

`gmm` and `tgmm` take the arguments of `gmm_reference.gmm` / `tgmm` plus
`backend`, `block_sizes` and `interpret`, and return the same values within
floating-point tolerance. On GPU they run the Triton kernels of `gmm_gpu.py`,
on TPU the Mosaic kernels of `gmm_tpu.py`; on CPU the GPU kernels run in the
Pallas interpreter (slow: for tests and debugging).

Both are differentiable in their float arguments (never in group_sizes), and
each one's VJP is made of the two kernels: for out = gmm(lhs, rhs),
d lhs = gmm(d out, rhs, transpose_rhs=True) and d rhs = tgmm(lhs, d out); for
out = tgmm(lhs, dout), d lhs = gmm(dout, d out, transpose_rhs=True) and
d dout = gmm(lhs, d out).

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

# Tests set this to lower (not run) compiled kernels on a machine without the device.
_LOWERING_ONLY = False


def _module(backend):
  return backend_lib.load('pallas_kernels.moe_routing.gmm_{}', backend)



def _pad(x: jax.Array, shape) -> jax.Array:
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _check_float(name: str, x) -> None:
  if getattr(x, 'dtype', None) not in backend_lib.FLOATS:
    raise ValueError(f'{name} has dtype {getattr(x, "dtype", type(x).__name__)}; grouped '
                     'matmuls take float32, bfloat16 or float16')


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


def _setup(backend, block_sizes, interpret, dtype, m: int, k: int, n: int):
  """(backend, its clipped block sizes, interpret) for a problem [m, k] x [k, n]."""
  backend, interpret = backend_lib.resolve_backend(backend, interpret,
                                                   lowering_only=_LOWERING_ONLY)
  module = _module(backend)
  if block_sizes is None:
    block_sizes = module.BlockSizes.default(dtype)
  elif not isinstance(block_sizes, module.BlockSizes):
    raise ValueError(f'block_sizes is a {type(block_sizes).__module__}.'
                     f'{type(block_sizes).__name__}; the {backend} backend takes '
                     f'{module.__name__}.BlockSizes')
  return backend, block_sizes.clipped(m, k, n), interpret


# ----------------------------------------------------------- custom VJPs
# Both work on padded arrays (whole tiles) and the group offsets; the public
# functions pad before and slice after, and autodiff carries the cotangents
# through the pads and slices.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _gmm(lhs, rhs, offsets, transpose_rhs, out_dtype, backend, bs, interpret):
  return _module(backend).gmm(lhs, rhs, offsets, bs, transpose_rhs=transpose_rhs,
                              out_dtype=out_dtype, interpret=interpret)


def _gmm_fwd(lhs, rhs, offsets, transpose_rhs, out_dtype, backend, bs, interpret):
  out = _gmm(lhs, rhs, offsets, transpose_rhs, out_dtype, backend, bs, interpret)
  return out, (lhs, rhs, offsets)


def _gmm_bwd(transpose_rhs, out_dtype, backend, bs, interpret, res, dout):
  del out_dtype
  lhs, rhs, offsets = res  # lhs [m, k], dout [m, n]
  module = _module(backend)
  # d lhs contracts over n and has k columns: the tiles of tk and tn swap.
  dlhs = module.gmm(dout, rhs, offsets, bs.swapped(), transpose_rhs=not transpose_rhs,
                    out_dtype=lhs.dtype, interpret=interpret)
  if transpose_rhs:  # rhs [groups, n, k]: tgmm with swapped operands, no transpose
    drhs = module.tgmm(dout, lhs, offsets, bs.swapped(), out_dtype=rhs.dtype,
                       interpret=interpret)
  else:
    drhs = module.tgmm(lhs, dout, offsets, bs, out_dtype=rhs.dtype, interpret=interpret)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _tgmm(lhs, dout, offsets, out_dtype, backend, bs, interpret):
  return _module(backend).tgmm(lhs, dout, offsets, bs, out_dtype=out_dtype,
                               interpret=interpret)


def _tgmm_fwd(lhs, dout, offsets, out_dtype, backend, bs, interpret):
  out = _tgmm(lhs, dout, offsets, out_dtype, backend, bs, interpret)
  return out, (lhs, dout, offsets)


def _tgmm_bwd(out_dtype, backend, bs, interpret, res, g):
  del out_dtype
  lhs, dout, offsets = res  # lhs [m, k], dout [m, n], g [groups, k, n]
  module = _module(backend)
  dlhs = module.gmm(dout, g, offsets, bs.swapped(), transpose_rhs=True, out_dtype=lhs.dtype,
                    interpret=interpret)
  ddout = module.gmm(lhs, g, offsets, bs, out_dtype=dout.dtype, interpret=interpret)
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
  for name, x, rank in (('lhs', lhs, 2), ('rhs', rhs, 3)):
    if getattr(x, 'ndim', None) != rank:
      raise ValueError(f'{name} must have rank {rank}; got shape {getattr(x, "shape", None)}')
    _check_float(name, x)
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
  out_dtype = _out_dtype(preferred_element_type, lhs, rhs)
  backend, bs, interpret = _setup(backend, block_sizes, interpret, lhs.dtype, m, k, n)

  mp, kp, np_ = backend_lib.round_up(m, bs.tm), backend_lib.round_up(k, bs.tk), backend_lib.round_up(n, bs.tn)
  rhs_shape = (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_)
  offsets = gmm_reference.group_offsets(group_sizes, m)  # cut at the real m
  out = _gmm(_pad(lhs, (mp, kp)), _pad(rhs, rhs_shape), offsets, bool(transpose_rhs),
             out_dtype, backend, bs, interpret)
  return out[:m, :n]


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
  for name, x in (('lhs', lhs), ('dout', dout)):
    if getattr(x, 'ndim', None) != 2:
      raise ValueError(f'{name} must have rank 2; got shape {getattr(x, "shape", None)}')
    _check_float(name, x)
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
  out_dtype = _out_dtype(preferred_element_type, lhs, dout)
  backend, bs, interpret = _setup(backend, block_sizes, interpret, lhs.dtype, m, k, n)

  mp, kp, np_ = backend_lib.round_up(m, bs.tm), backend_lib.round_up(k, bs.tk), backend_lib.round_up(n, bs.tn)
  offsets = gmm_reference.group_offsets(group_sizes, m)
  out = _tgmm(_pad(lhs, (mp, kp)), _pad(dout, (mp, np_)), offsets, out_dtype, backend, bs,
              interpret)
  return out[:, :k, :n]
