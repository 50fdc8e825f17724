"""Grouped matmuls for TPUs: Pallas kernels lowered through Mosaic.

Both kernels walk a list of "visits", (group, row tile) pairs in row order,
scalar-prefetched into SMEM with the group offsets, so the index maps can
fetch each visit's lhs rows and its group's weights (megablox's group
metadata). The visit axis is a dynamic grid dimension: its length is the
number of visits this call's group sizes need, at most row tiles + groups.

`gmm`: grid (output-column tile, visit, k tile). A row tile split between
groups gets one visit per group, consecutively, so its output block stays in
VMEM across them; each visit stores its finished product only into its own
group's rows (a select against the block), so no visit clobbers another's.
To write every row exactly once, the rows in no group (past sum(group_sizes),
and padding) form one more "tail" group whose visits multiply nothing and
store zeros. Empty groups get no visit.

`tgmm`: grid (lhs-column tile, dout-column tile, visit). A group's visits are
consecutive, so its [tk, tn] output block stays in VMEM while an f32 scratch
accumulates lhs.T @ dout over its row tiles, with other groups' rows zeroed;
it is stored at the group's last visit. An empty group gets one visit that
only stores zeros.

Arrays arrive from `gmm_ops.py` padded to whole tiles, with the int32 group
offsets [num_groups + 1] of `gmm_reference.group_offsets` (cut at the real m).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend as backend_lib
from pallas_kernels.moe_routing import tiles


@dataclasses.dataclass(frozen=True)
class BlockSizes(tiles.GmmBlockSizes):
  """tm, tk, tn (see `tiles.GmmBlockSizes`): multiples of 8; on a real TPU tk and
  tn must also be multiples of 128 (they sit in lanes) unless `clipped` makes
  them the whole padded dimension."""
  BACKEND = 'tpu'
  tm: int = 128
  tk: int = 512
  tn: int = 512

  @classmethod
  def default(cls, dtype) -> 'BlockSizes':
    # tm stays small: a row tile split between groups is multiplied once per
    # group, so tm bounds the waste (num_groups * tm rows at most). Wide tk/tn
    # amortise the ~0.35us per grid step; f32 halves tk to keep the VMEM
    # footprint of a bf16 step.
    if jnp.dtype(dtype) == jnp.float32:
      return cls(tm=128, tk=256, tn=512)
    return cls()

  @staticmethod
  def dim_cap(d: int) -> int:
    # Rounded up to 8: a tile spanning the whole padded dimension is legal for
    # Mosaic whatever its size.
    return backend_lib.round_up(d, 8)


def _visits(offsets: jax.Array, tm: int, tiles_m: int, *, visit_empty: bool):
  """The (group, row tile) visits of a grouped kernel, in row order.

  Args:
    offsets: int32 [groups + 1], non-decreasing, within [0, tiles_m * tm].
    tm: row tile.
    tiles_m: row tiles.
    visit_empty: give an empty group one visit (tgmm must write its zeros).

  Returns:
    group_ids, tile_ids: int32 [tiles_m + groups], the visits; entries past
      the last visit repeat it (never run: the grid stops at num_visits).
    num_visits: int32 scalar.
  """
  starts, ends = offsets[:-1], offsets[1:]  # [groups]
  groups = starts.shape[0]
  first = lax.div(starts, tm)
  spans = jnp.where(ends > starts, lax.div(ends + tm - 1, tm) - first, 0)  # tiles met
  if visit_empty:
    spans = jnp.where(ends > starts, spans, 1)
  # A group of r rows meets at most ceil(r / tm) + 1 tiles, and only where it
  # starts inside a tile another group also meets: sum(spans) <= tiles_m +
  # groups (empty visits included), a static bound for the metadata.
  ends_of_visits = jnp.cumsum(spans)  # [groups]
  num_visits = ends_of_visits[-1]
  v = jnp.minimum(jnp.arange(tiles_m + groups, dtype=jnp.int32), num_visits - 1)
  group_ids = jnp.searchsorted(ends_of_visits, v, side='right').astype(jnp.int32)
  tile_ids = first[group_ids] + v - (ends_of_visits[group_ids] - spans[group_ids])
  # An empty group at the very end starts at tiles_m * tm: clamp to the last tile.
  tile_ids = jnp.minimum(tile_ids, tiles_m - 1).astype(jnp.int32)
  return group_ids, tile_ids, num_visits.astype(jnp.int32)


def _call(kernel, grid, in_specs, out_spec, out_shape, scratch, semantics, interpret, name):
  return pl.pallas_call(
      kernel, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_spec,
          scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=pltpu.InterpretParams() if interpret else False, name=name)


def _row_mask(offsets_ref, g, tile, tm: int, width: int):
  """[tm, width] bool: the rows of this row tile that group g owns."""
  rows = tile * tm + lax.broadcasted_iota(jnp.int32, (tm, width), 0)
  return (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])


# -------------------------------------------------------------------- gmm


def _gmm_kernel(group_ids, tile_ids, offsets_ref, lhs_ref, rhs_ref, out_ref, acc_scr, *,
                num_groups: int, tm: int, nk: int, transpose_rhs: bool):
  v, kk = pl.program_id(1), pl.program_id(2)
  g = group_ids[v]

  @pl.when(kk == 0)
  def _():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(g < num_groups)  # the tail group's rows stay zero: nothing to multiply
  def _():
    dims = tiles.NT if transpose_rhs else tiles.NN
    acc_scr[...] += tiles.dot(lhs_ref[...], rhs_ref[...], dims)

  @pl.when(kk == nk - 1)
  def _():
    # Only this group's rows: the block's other rows belong to the visits of
    # other groups, just before or just after this one.
    mask = _row_mask(offsets_ref, g, tile_ids[v], tm, acc_scr.shape[1])
    out_ref[...] = jnp.where(mask, acc_scr[...],
                             out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, offsets: jax.Array, bs: BlockSizes, *,
        transpose_rhs: bool = False, out_dtype=None, interpret: bool = False) -> jax.Array:
  """out[rows of g] = lhs[rows of g] @ rhs[g], on whole tiles (see `gmm_ops`)."""
  m, k, n, num_groups = tiles.gmm_dims(lhs, rhs, transpose_rhs)
  tm, tk, tn = bs.tm, bs.tk, bs.tn
  tiles_m, nk = m // tm, k // tk
  # The tail group [offsets[-1], m) makes the groups cover every row.
  covered = jnp.concatenate([offsets, jnp.full((1,), m, jnp.int32)])  # [num_groups + 2]
  group_ids, tile_ids, num_visits = _visits(covered, tm, tiles_m, visit_empty=False)

  def rhs_map(j, v, kk, group_ids, tile_ids, offsets):
    g = jnp.minimum(group_ids[v], num_groups - 1)  # the tail group reads no weights
    return (g, j, kk) if transpose_rhs else (g, kk, j)

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  return _call(
      functools.partial(_gmm_kernel, num_groups=num_groups, tm=tm, nk=nk,
                        transpose_rhs=transpose_rhs),
      (n // tn, num_visits, nk),
      [pl.BlockSpec((tm, tk), lambda j, v, kk, gids, tids, offs: (tids[v], kk)),
       pl.BlockSpec(rhs_block, rhs_map)],
      pl.BlockSpec((tm, tn), lambda j, v, kk, gids, tids, offs: (tids[v], j)),
      jax.ShapeDtypeStruct((m, n), out_dtype or lhs.dtype),
      [pltpu.VMEM((tm, tn), jnp.float32)],
      # Visits of one row tile revisit its output block: sequential.
      ('parallel', 'arbitrary', 'arbitrary'), interpret, 'moe_gmm',
  )(group_ids, tile_ids, covered, lhs, rhs)


# ------------------------------------------------------------------- tgmm


def _tgmm_kernel(group_ids, tile_ids, offsets_ref, lhs_ref, dout_ref, out_ref, acc_scr, *,
                 tm: int):
  v, num_visits = pl.program_id(2), pl.num_programs(2)
  g = group_ids[v]
  new_group = (v == 0) | (group_ids[jnp.maximum(v - 1, 0)] != g)
  last_visit = (v == num_visits - 1) | (group_ids[jnp.minimum(v + 1, num_visits - 1)] != g)

  @pl.when(new_group)
  def _():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(offsets_ref[g + 1] > offsets_ref[g])  # an empty group's visit only stores zeros
  def _():
    tile = tile_ids[v]
    # Both sides zeroed outside the group (a select in f32: older TPUs have no
    # bf16 VPU): other groups' rows may hold inf or nan, and 0 * inf = nan.
    a = lhs_ref[...]  # [tm, tk]
    b = dout_ref[...]  # [tm, tn]
    a = jnp.where(_row_mask(offsets_ref, g, tile, tm, a.shape[1]), a.astype(jnp.float32),
                  0.0).astype(a.dtype)
    b = jnp.where(_row_mask(offsets_ref, g, tile, tm, b.shape[1]), b.astype(jnp.float32),
                  0.0).astype(b.dtype)
    acc_scr[...] += tiles.dot(a, b, tiles.TN)

  @pl.when(last_visit)
  def _():
    out_ref[...] = acc_scr[...].astype(out_ref.dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, offsets: jax.Array, bs: BlockSizes, *,
         out_dtype=None, interpret: bool = False) -> jax.Array:
  """out[g] = lhs[rows of g].T @ dout[rows of g], on whole tiles (see `gmm_ops`)."""
  (m, k), n, num_groups = lhs.shape, dout.shape[1], offsets.shape[0] - 1
  tm, tk, tn = bs.tm, bs.tk, bs.tn
  group_ids, tile_ids, num_visits = _visits(offsets, tm, m // tm, visit_empty=True)
  return _call(
      functools.partial(_tgmm_kernel, tm=tm),
      (k // tk, n // tn, num_visits),
      [pl.BlockSpec((tm, tk), lambda a, b, v, gids, tids, offs: (tids[v], a)),
       pl.BlockSpec((tm, tn), lambda a, b, v, gids, tids, offs: (tids[v], b))],
      pl.BlockSpec((None, tk, tn), lambda a, b, v, gids, tids, offs: (gids[v], a, b)),
      jax.ShapeDtypeStruct((num_groups, k, n), out_dtype or lhs.dtype),
      [pltpu.VMEM((tk, tn), jnp.float32)],
      # A group's visits accumulate into one output block: sequential.
      ('parallel', 'parallel', 'arbitrary'), interpret, 'moe_tgmm',
  )(group_ids, tile_ids, offsets, lhs, dout)
