"""Plain jnp grouped matmuls: the specification the gmm kernels must match.

The rows of lhs [m, k] are grouped contiguously: group g owns rows
[offset_g, offset_g + group_sizes[g]), with offset_0 = 0 and each group
starting where the one before ended. `gmm` multiplies each group's rows by
its own right-hand matrix (an expert's weights); `tgmm` is its weight
gradient, one [k, n] matrix per group. Rows past sum(group_sizes) belong to no
group: they give zeros and get zero gradients.

Written as a loop over groups with row masks (O(num_groups * m * k * n)): slow
but obviously right, and differentiable by plain autodiff. Products
accumulate in f32, with exact f32 products for f32 inputs.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax


def group_offsets(group_sizes: jax.Array, m: int) -> jax.Array:
  """int32 [num_groups + 1]: group g owns rows [offsets[g], offsets[g + 1]).

  Negative sizes count as 0, and groups are cut at row m (a sum of sizes
  beyond m drops the rows that do not exist), so 0 <= offsets <= m always.
  """
  sizes = jnp.maximum(jnp.asarray(group_sizes).astype(jnp.int32), 0)  # [num_groups]
  ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def _precision(*arrays):
  # f32 inputs get exact f32 products (not TF32/bf16 passes), so kernels match to 1e-5.
  return lax.Precision.HIGHEST if any(x.dtype == jnp.float32 for x in arrays) else None


def _row_masks(group_sizes, m):
  """bool [num_groups, m]: row r belongs to group g."""
  offsets = group_offsets(group_sizes, m)
  rows = jnp.arange(m, dtype=jnp.int32)[None, :]  # [1, m]
  return (rows >= offsets[:-1, None]) & (rows < offsets[1:, None])


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        transpose_rhs: bool = False,
        preferred_element_type: Optional[jnp.dtype] = None) -> jax.Array:
  """Grouped matmul: out[rows of g] = lhs[rows of g] @ rhs[g].

  Args:
    lhs: [m, k].
    rhs: [num_groups, k, n], or [num_groups, n, k] with transpose_rhs.
    group_sizes: int [num_groups], rows per group, in row order.
    transpose_rhs: multiply by rhs[g].T.
    preferred_element_type: output dtype; None: the inputs' result type.

  Returns:
    [m, n]; rows past sum(group_sizes) are zero.
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
  masks = _row_masks(group_sizes, lhs.shape[0])  # [num_groups, m]
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
  precision = _precision(lhs, rhs)
  out = None
  for g in range(rhs.shape[0]):
    prod = lax.dot_general(lhs, rhs[g], dims, precision=precision,
                           preferred_element_type=jnp.float32)  # [m, n]
    # where, not a 0/1 multiply: rows of other groups may hold inf or nan.
    part = jnp.where(masks[g][:, None], prod, 0.0)
    out = part if out is None else out + part
  return out.astype(out_dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *,
         preferred_element_type: Optional[jnp.dtype] = None) -> jax.Array:
  """Transposed grouped matmul (gmm's rhs gradient): out[g] = lhs[rows of g].T @ dout[rows of g].

  Args:
    lhs: [m, k].
    dout: [m, n].
    group_sizes: int [num_groups], rows per group, in row order.
    preferred_element_type: output dtype; None: the inputs' result type.

  Returns:
    [num_groups, k, n]; an empty group gives zeros.
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, dout.dtype)
  masks = _row_masks(group_sizes, lhs.shape[0])  # [num_groups, m]
  precision = _precision(lhs, dout)
  outs = []
  for g in range(masks.shape[0]):
    rows = masks[g][:, None]  # [m, 1]
    a = jnp.where(rows, lhs, jnp.zeros_like(lhs))  # [m, k]
    b = jnp.where(rows, dout, jnp.zeros_like(dout))  # [m, n]
    outs.append(lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32))  # [k, n]
  return jnp.stack(outs).astype(out_dtype)
