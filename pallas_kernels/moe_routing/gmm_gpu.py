"""Grouped matmuls for GPUs: Pallas kernels lowered through Triton.

`gmm`: a grid over (row tile, output-column tile). Group boundaries need not
fall on row tiles, so one row tile may hold rows of several groups: its
program loops over exactly the groups that meet the tile (a range precomputed
per tile from the group offsets), multiplies the whole tile by each group's
weights, and keeps each product only in that group's rows. Every output tile
is written once, by one program, so a tile split between groups needs neither
atomics nor masked stores; rows in no group (past sum(group_sizes), or
padding) keep the zeros they start with. Empty groups meet no tile, or run an
empty k loop.

`tgmm`: a grid over (group, lhs-column tile, dout-column tile). Each program
walks the row tiles its group spans, zeroing the rows of other groups in both
operands before the contraction over rows; an empty group walks none and
writes zeros.

Arrays arrive from `gmm_ops.py` padded to whole tiles, with the int32 group
offsets [num_groups + 1] of `gmm_reference.group_offsets` (cut at the real m).
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import backend as backend_lib
from pallas_kernels.moe_routing import tiles


@dataclasses.dataclass(frozen=True)
class BlockSizes(tiles.GmmBlockSizes):
  """tm, tk, tn (see `tiles.GmmBlockSizes`): powers of 2 of at least 16 (Triton's
  dot); and Triton's launch knobs."""
  BACKEND = 'gpu'
  tm: int = 64
  tk: int = 64
  tn: int = 128
  num_warps: Optional[int] = None  # None: 4, or 8 for tiles of 128 x 128 and more
  num_stages: int = 3

  @classmethod
  def default(cls, dtype) -> 'BlockSizes':
    # Small row tiles: a tile split between groups is multiplied once per
    # group, so tm bounds the waste (num_groups * tm rows at most). f32 tiles
    # take twice the shared memory per element: half the contraction tile.
    if jnp.dtype(dtype) == jnp.float32:
      return cls(tm=64, tk=32, tn=128)
    return cls(tm=64, tk=64, tn=128)

  @staticmethod
  def dim_cap(d: int) -> int:
    return max(16, backend_lib.next_power_of_2(d))  # a power of 2

  def params(self) -> plgpu.CompilerParams:
    warps = self.num_warps or (8 if self.tm * self.tn >= 128 * 128 else 4)
    return plgpu.CompilerParams(num_warps=warps, num_stages=self.num_stages)


def _tile_groups(offsets: jax.Array, m: int, tm: int):
  """First and one-past-last group meeting each row tile: int32 [m // tm] each.

  Groups lo..hi-1 are those with start < tile end and end > tile start; empty
  groups between them are in the range too (they cost an empty loop).
  """
  tile_starts = jnp.arange(0, m, tm, dtype=jnp.int32)  # [tiles_m]
  lo = jnp.searchsorted(offsets[1:], tile_starts, side='right')  # first group ending after
  hi = jnp.searchsorted(offsets[:-1], tile_starts + tm, side='left')  # groups starting before
  return lo.astype(jnp.int32), jnp.maximum(lo, hi).astype(jnp.int32)


# -------------------------------------------------------------------- gmm


def _gmm_kernel(offsets_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, tm: int, tk: int,
                tn: int, transpose_rhs: bool):
  i = pl.program_id(0)
  nk = lhs_ref.shape[1] // tk
  rows = i * tm + jnp.arange(tm, dtype=jnp.int32)[:, None]  # [tm, 1]

  def group(g, acc):
    start, end = offsets_ref[g], offsets_ref[g + 1]

    def k_step(kk, part):
      ks = pl.ds(pl.multiple_of(kk * tk, tk), tk)
      a = lhs_ref[:, ks]  # [tm, tk]
      if transpose_rhs:
        return part + tiles.dot(a, rhs_ref[g, :, ks], tiles.NT)  # rhs tile [tn, tk]
      return part + tiles.dot(a, rhs_ref[g, ks, :], tiles.NN)  # rhs tile [tk, tn]

    # Both bounds int32 and not weakly typed: Triton's scf.for takes one type for
    # its bounds and step (a Python 0 beside a traced bound fails to lower there).
    steps = jnp.where(end > start, jnp.int32(nk), jnp.int32(0))
    part = lax.fori_loop(jnp.int32(0), steps, k_step, jnp.zeros((tm, tn), jnp.float32))
    # Rows are independent in a @ b: keeping this group's rows of the whole
    # tile's product is exact, and cheaper than masking every lhs tile.
    return jnp.where((rows >= start) & (rows < end), part, acc)

  acc = lax.fori_loop(lo_ref[i], hi_ref[i], group, jnp.zeros((tm, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, offsets: jax.Array, bs: BlockSizes, *,
        transpose_rhs: bool = False, out_dtype=None, interpret: bool = False) -> jax.Array:
  """out[rows of g] = lhs[rows of g] @ rhs[g], on whole tiles (see `gmm_ops`)."""
  m, k, n, num_groups = tiles.gmm_dims(lhs, rhs, transpose_rhs)
  tm, tk, tn = bs.tm, bs.tk, bs.tn
  lo, hi = _tile_groups(offsets, m, tm)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((num_groups, tn, k), lambda i, j: (0, j, 0))
  else:
    rhs_spec = pl.BlockSpec((num_groups, k, tn), lambda i, j: (0, 0, j))
  whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,))
  return pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs),
      grid=(m // tm, n // tn),
      in_specs=[whole(offsets), whole(lo), whole(hi),
                pl.BlockSpec((tm, k), lambda i, j: (i, 0)), rhs_spec],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype or lhs.dtype),
      compiler_params=bs.params(), interpret=interpret, name='moe_gmm',
  )(offsets, lo, hi, lhs, rhs)


# ------------------------------------------------------------------- tgmm


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, tm: int, tk: int, tn: int):
  g = pl.program_id(0)
  start, end = offsets_ref[g], offsets_ref[g + 1]
  first = lax.div(start, tm)  # offsets are >= 0: no floor-division sign fix-up
  last = jnp.where(end > start, lax.div(end + tm - 1, tm), first)

  def m_step(t, acc):
    rs = pl.ds(pl.multiple_of(t * tm, tm), tm)
    rows = t * tm + jnp.arange(tm, dtype=jnp.int32)[:, None]  # [tm, 1]
    in_group = (rows >= start) & (rows < end)
    # Both sides zeroed (by select, not a 0/1 product): rows of other groups
    # may hold inf or nan, and 0 * inf would leak into this group's sums.
    a = jnp.where(in_group, lhs_ref[rs, :], 0)  # [tm, tk]
    b = jnp.where(in_group, dout_ref[rs, :], 0)  # [tm, tn]
    return acc + tiles.dot(a, b, tiles.TN)

  acc = lax.fori_loop(first, last, m_step, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, offsets: jax.Array, bs: BlockSizes, *,
         out_dtype=None, interpret: bool = False) -> jax.Array:
  """out[g] = lhs[rows of g].T @ dout[rows of g], on whole tiles (see `gmm_ops`)."""
  (m, k), n, num_groups = lhs.shape, dout.shape[1], offsets.shape[0] - 1
  tm, tk, tn = bs.tm, bs.tk, bs.tn
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
      grid=(num_groups, k // tk, n // tn),
      in_specs=[pl.BlockSpec(offsets.shape, lambda g, a, b: (0,)),
                pl.BlockSpec((m, tk), lambda g, a, b: (0, a)),
                pl.BlockSpec((m, tn), lambda g, a, b: (0, b))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype or lhs.dtype),
      compiler_params=bs.params(), interpret=interpret, name='moe_tgmm',
  )(offsets, lhs, dout)
