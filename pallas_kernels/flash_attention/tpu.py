"""Flash attention for TPUs: Pallas kernels lowered through Mosaic.

Forward (FlashAttention-2 online softmax) and a two-kernel backward, as in
`gpu.py`, shaped for Mosaic's pipeline: each kernel is a grid whose innermost
("arbitrary") axes walk the blocks it reduces over, with running statistics
and accumulators in VMEM scratch, while Pallas double-buffers the blocks
between HBM and VMEM. The table of `tiles.block_classes` is scalar-prefetched
into SMEM: SKIP blocks are neither computed (`pl.when`) nor fetched (their
index_map repeats a live block's index, so Pallas issues no DMA), and FULL
blocks skip the mask.

Arrays arrive from `ops.py` padded to whole blocks: q [batch, q_len, heads,
head_dim], k/v [batch, kv_len, kv_heads, head_dim]. They are transposed here
to [batch, heads, length, head_dim], so every block ends in (block, head_dim)
as Mosaic tiles want. Per-token ints (positions, segment ids, prefix flags)
and per-row floats (lse, delta) travel lane-major, broadcast over 8 sublanes
([..., 8, length], as JAX's TPU kernels do): a block reads a [1, block] row
directly or turns row 0 into a [block, 1] column. Logits are in base 2
(scaled by log2(e)); the saved lse is in the same units.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend as backend_lib
from pallas_kernels.flash_attention import tiles
from pallas_kernels.flash_attention.tiles import Aux, Spec

SUBLANES = 8
LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels: multiples of 8, of 128 for real TPUs.

  Lengths sit in lanes in the per-token blocks, so Mosaic needs each block to
  be a multiple of 128 or the whole padded length (which `clipped` may give).
  """
  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 256
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 256

  def __post_init__(self):
    backend_lib.check_tiles(self, tiles.BLOCK_FIELDS, 'tpu')

  @classmethod
  def default(cls, head_dim: int) -> 'BlockSizes':
    # Large tiles amortise the ~0.35us per grid step; the backward keeps more
    # [block, block] f32 temporaries live, so it gets half-size tiles on the
    # streamed side. Wide heads need more VMEM per row: smaller tiles.
    if head_dim <= 128:
      return cls()
    return cls(block_q=256, block_k=512, block_q_dkv=256, block_k_dkv=256,
               block_q_dq=256, block_k_dq=256)

  def clipped(self, q_len: int, kv_len: int) -> 'BlockSizes':
    """Blocks no longer than the lengths rounded up to 8.

    A block longer than that shrinks to the longest sibling block (same axis)
    that fits, so clipping brings no new factor into q_multiple / kv_multiple
    (an lcm: blocks 256 and 304 would pad to 4864), or to the rounded length
    when no sibling fits (then it spans the whole padded length, which Mosaic
    accepts whatever its size).
    """
    def clip(blocks, n):
      n8 = backend_lib.round_up(n, 8)
      fits = [b for b in blocks if b <= n8]
      cap = max(fits) if fits else n8
      return [min(b, cap) for b in blocks]

    bq, bq_dkv, bq_dq = clip((self.block_q, self.block_q_dkv, self.block_q_dq), q_len)
    bk, bk_dkv, bk_dq = clip((self.block_k, self.block_k_dkv, self.block_k_dq), kv_len)
    return dataclasses.replace(self, block_q=bq, block_k=bk, block_q_dkv=bq_dkv,
                               block_k_dkv=bk_dkv, block_q_dq=bq_dq, block_k_dq=bk_dq)

  @property
  def q_multiple(self) -> int:
    return math.lcm(self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_multiple(self) -> int:
    return math.lcm(self.block_k, self.block_k_dkv, self.block_k_dq)


def head_dim_multiple(head_dim: int) -> int:
  """head_dim is zero-padded to this: 1, no padding.

  Every block spans the whole head_dim, which satisfies Mosaic's rule (last
  dim a multiple of 128 or the full dim), and Mosaic pads a short contraction
  inside vregs; padding in HBM would only add DMA traffic.
  """
  del head_dim
  return 1


def _kv_head(h, groups):
  # lax.div rather than //: jnp's floor division goes through lax.sign, whose
  # Mosaic lowering asks which TPU it targets (heads are >= 0, so both agree).
  return lax.div(h, groups)


def _dot(a, b, dims):
  # f32 inputs get exact f32 products (fp32 contract precision on the MXU).
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _sublanes(x):
  """[..., length] -> [..., 8, length], broadcast: Mosaic's lane-major row blocks."""
  return jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (SUBLANES, x.shape[-1]))


def _col(ref):
  return ref[0][:, None]  # [block, 1] from a lane-major [8, block] block


class _Tokens(NamedTuple):
  """One side's per-token refs ([8, block] blocks), None where unused."""
  pos: Any
  seg: Any
  pre: Any

  def rows(self) -> '_Tokens':  # [1, block] each
    return _Tokens(*(None if r is None else r[:1, :] for r in self))

  def cols(self) -> '_Tokens':  # [block, 1] each
    return _Tokens(*(None if r is None else _col(r) for r in self))


def _token_arrays(spec: Spec, aux: Aux):
  """q-side and kv-side per-token arrays [batch, 8, len] (None where unused)."""
  need_pos = spec.causal or spec.biased
  q = (aux.q_positions if need_pos else None,
       aux.q_segment_ids if spec.has_segments else None,
       aux.q_prefix if spec.has_prefix else None)
  kv = (aux.kv_positions if need_pos else None,
        aux.kv_segment_ids if spec.has_segments else None,
        aux.kv_prefix if spec.has_prefix else None)
  return [None if x is None else _sublanes(x) for x in q + kv]


def _token_specs(arrays, q_block, kv_block, q_map, kv_map):
  q_spec = pl.BlockSpec((None, SUBLANES, q_block), q_map)
  kv_spec = pl.BlockSpec((None, SUBLANES, kv_block), kv_map)
  return [None if x is None else (q_spec if n < 3 else kv_spec) for n, x in enumerate(arrays)]


def _scalars(spec: Spec, aux: Aux):
  """ALiBi slopes [heads] and the flat T5 table [heads * num_buckets], in SMEM.

  Flat 1-D arrays, since SMEM pads the minor dims of 2-D ones; each tile reads
  one slope and one table entry per bucket as scalars.
  """
  slopes = aux.alibi_slopes.astype(jnp.float32) if spec.has_alibi else None
  table = aux.rel_table.astype(jnp.float32).reshape(-1) if spec.has_t5 else None
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  return [slopes, table], [None if x is None else smem for x in (slopes, table)]


def _tables(spec: Spec, aux: Aux, block_q: int, block_k: int, transpose: bool = False):
  """The scalar-prefetch table, flat int32 [batch * outer * inner]; () unmasked.

  Outer/inner are q/kv blocks, or kv/q blocks when `transpose` (dK/dV). One
  SMEM word per grid step packs the block class (low 2 bits) with the inner
  block to DMA: the step's own when live, else the last live one before it
  (already in VMEM), else the first live one (needed next). So a SKIP step
  repeats the previous step's block index and Pallas copies nothing (splash
  attention's "data next"; clamping to tiles.block_range would still fetch
  the SKIP blocks inside the range, common with per-segment positions).
  """
  if not spec.masked:
    return ()
  cls = tiles.block_classes(spec, aux, block_q, block_k)
  if transpose:
    cls = jnp.swapaxes(cls, 1, 2)
  lo, _ = tiles.block_range(cls)
  inner = jnp.arange(cls.shape[-1], dtype=jnp.int32)
  last_live = lax.cummax(jnp.where(cls != tiles.SKIP, inner, -1), axis=2)
  fetch = jnp.where(last_live >= 0, last_live, lo[..., None])
  return ((fetch << 2) | cls).reshape(-1),


def _lookup(spec: Spec, n_outer: int, n_inner: int, b, outer, inner, t):
  """(block class, inner block to DMA) of grid step (b, outer, inner)."""
  if not spec.masked:
    return tiles.FULL, inner
  entry = t[0][(b * n_outer + outer) * n_inner + inner]
  return entry & 3, entry >> 2


def _dispatch(spec: Spec, step, cls):
  """Runs step(masked=False) on FULL blocks, step(masked=True) on PARTIAL ones."""
  if not spec.masked:
    step(False)
    return
  pl.when(cls == tiles.FULL)(lambda: step(False))
  pl.when(cls == tiles.PARTIAL)(lambda: step(True))


def _logits(spec: Spec, a, b, qv: _Tokens, kv: _Tokens, head, slopes_ref, table_ref,
            masked: bool):
  """Base-2 logits a @ b.T of one tile, its mask (or None) and T5 buckets (or None).

  With query vectors as columns and key vectors as rows the tile is
  [block_q, block_k]; the dK/dV kernel passes (k, q) with rows and columns
  swapped and gets the transposed tile, since tiles' math only broadcasts.
  """
  s = _dot(a, b, _NT) * (spec.scale * tiles.LOG2E)
  buckets = tiles.t5_buckets(spec, qv.pos, kv.pos) if spec.has_t5 else None
  bias = tiles.tile_bias(
      spec, qv.pos, kv.pos, slope=slopes_ref[head] if spec.has_alibi else None,
      table_value=lambda bucket: table_ref[head * spec.num_buckets + bucket], buckets=buckets)
  if bias is not None:
    s = s + bias * tiles.LOG2E
  mask = None
  if masked:
    mask = tiles.tile_mask(spec, qv.pos, kv.pos, qv.seg, kv.seg, qv.pre, kv.pre)
  return s, mask, buckets


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, tables, semantics,
          interpret, name):
  return pl.pallas_call(
      kernel, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(tables), grid=grid, in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=pltpu.InterpretParams() if interpret else False, name=name)


# ---------------------------------------------------------------- forward


def _fwd_kernel(*refs, spec: Spec, nq: int, nk: int):
  t = refs[:1] if spec.masked else ()
  (q_ref, k_ref, v_ref, *tok, slopes_ref, table_ref, o_ref, lse_ref,
   m_scr, l_scr, acc_scr) = refs[len(t):]
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, tiles.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked):
    v = v_ref[...]  # [block_k, head_dim]
    s, mask, _ = _logits(spec, q_ref[...], k_ref[...], _Tokens(*tok[:3]).cols(),
                         _Tokens(*tok[3:]).rows(), h, slopes_ref, table_ref, masked)
    if mask is not None:
      s = jnp.where(mask, s, tiles.MASK_VALUE)
    m_prev = m_scr[...]  # [block_q, 128], all lanes equal (no [block_q, 1] scratch)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp2(s - m_new[:, :1])  # [block_q, block_k]
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # a row with nothing allowed yet adds nothing
    alpha = jnp.exp2(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_new
    acc_scr[...] = alpha[:, :1] * acc_scr[...] + _dot(p.astype(v.dtype), v, _NN)

  _dispatch(spec, step, _lookup(spec, nq, nk, b, i, j, t)[0])

  @pl.when(j == nk - 1)
  def _():
    l = l_scr[...]
    empty = l == 0.0  # no allowed key: output 0, and the backward pass sees p = 0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / safe_l[:, :1]).astype(o_ref.dtype)
    lse = jnp.where(empty, jnp.inf, m_scr[...] + jnp.log2(safe_l))  # [block_q, 128]
    lse_ref[...] = lse.T[:SUBLANES]  # lane-major [8, block_q]


def forward(q, k, v, aux: Aux, spec: Spec, bs: BlockSizes, interpret: bool = False):
  """Flash attention forward.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads,
      head_dim]; lengths are whole multiples of bs.q_multiple / kv_multiple.
    aux, spec: per-token facts and the static problem (see tiles).
    bs: clipped block sizes.
    interpret: run in the TPU interpreter (CPU) instead of compiling.

  Returns:
    out [batch, q_len, heads, head_dim] (q's dtype; 0 for rows without an
    allowed key) and the base-2 lse [batch, heads, q_len] f32 (+inf there).
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  groups = spec.groups
  bq, bk = bs.block_q, bs.block_k
  nq, nk = q_len // bq, kv_len // bk
  tables = _tables(spec, aux, bq, bk)
  fetch = lambda b, i, j, t: _lookup(spec, nq, nk, b, i, j, t)[1]
  tok = _token_arrays(spec, aux)
  scalars, scalar_specs = _scalars(spec, aux)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *t: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                         lambda b, h, i, j, *t: (b, _kv_head(h, groups), fetch(b, i, j, t), 0))
  in_specs = [q_spec, kv_spec, kv_spec] + _token_specs(
      tok, bq, bk, lambda b, h, i, j, *t: (b, 0, i),
      lambda b, h, i, j, *t: (b, 0, fetch(b, i, j, t))) + scalar_specs
  out_specs = [q_spec, pl.BlockSpec((None, None, SUBLANES, bq),
                                    lambda b, h, i, j, *t: (b, h, 0, i))]
  out_shape = [jax.ShapeDtypeStruct((batch, heads, q_len, head_dim), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, SUBLANES, q_len), jnp.float32)]
  scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, head_dim), jnp.float32)]
  out, lse = _call(
      functools.partial(_fwd_kernel, spec=spec, nq=nq, nk=nk), (batch, heads, nq, nk),
      in_specs, out_specs, out_shape, scratch, tables,
      ('parallel', 'parallel', 'parallel', 'arbitrary'), interpret, 'flash_attention_fwd',
  )(*tables, *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), *tok, *scalars)
  return jnp.swapaxes(out, 1, 2), lse[:, :, 0]


# --------------------------------------------------------------- backward


def _dkdv_kernel(*refs, spec: Spec, nq: int, nk: int):
  """One K/V block of one K/V head: dK, dV over its query heads and blocks.

  Works on the transposed tile [block_k, block_q], so both accumulating
  matmuls (dV += P^T dO, dK += dS^T Q) take their left side as is.
  """
  t = refs[:1] if spec.masked else ()
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *tok, slopes_ref, table_ref,
   dk_ref, dv_ref, dk_scr, dv_scr) = refs[len(t):]
  b, kv_head, j, g, i = (pl.program_id(a) for a in range(5))

  @pl.when((g == 0) & (i == 0))
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(masked):
    q, do = q_ref[...], do_ref[...]  # [block_q, head_dim]
    v = v_ref[...]  # [block_k, head_dim]
    s, mask, _ = _logits(spec, k_ref[...], q, _Tokens(*tok[:3]).rows(),
                         _Tokens(*tok[3:]).cols(), kv_head * spec.groups + g,
                         slopes_ref, table_ref, masked)
    p = jnp.exp2(s - lse_ref[:1, :])  # [block_k, block_q]
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dv_scr[...] += _dot(p.astype(do.dtype), do, _NN)
    ds = p * (_dot(v, do, _NT) - delta_ref[:1, :])  # d loss / d (natural-log logits)
    dk_scr[...] += _dot(ds.astype(q.dtype), q, _NN)

  _dispatch(spec, step, _lookup(spec, nk, nq, b, j, i, t)[0])

  @pl.when((g == spec.groups - 1) & (i == nq - 1))
  def _():
    dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, spec: Spec, nq: int, nk: int):
  """One query block of one head: dQ and this block's T5 table gradient."""
  t = refs[:1] if spec.masked else ()
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *tok, slopes_ref, table_ref,
   dq_ref, dtable_ref, dq_scr) = refs[len(t):]
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    if dtable_ref is not None:
      dtable_ref[...] = jnp.zeros(dtable_ref.shape, jnp.float32)

  def step(masked):
    do = do_ref[...]  # [block_q, head_dim]
    k, v = k_ref[...], v_ref[...]  # [block_k, head_dim]
    s, mask, buckets = _logits(spec, q_ref[...], k, _Tokens(*tok[:3]).cols(),
                               _Tokens(*tok[3:]).rows(), h, slopes_ref, table_ref, masked)
    p = jnp.exp2(s - _col(lse_ref))  # [block_q, block_k]
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    ds = p * (_dot(do, v, _NT) - _col(delta_ref))  # d loss / d (natural-log logits)
    dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN)
    if spec.has_t5:
      dtable_ref[...] += tiles.t5_table_grad(spec, buckets, ds)[None, :]

  _dispatch(spec, step, _lookup(spec, nq, nk, b, i, j, t)[0])

  @pl.when(j == nk - 1)
  def _():
    dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def backward(q, k, v, aux: Aux, spec: Spec, bs: BlockSizes, out, lse, do,
             interpret: bool = False):
  """Flash attention backward.

  Args:
    q, k, v, aux, spec, bs, interpret: as for `forward`.
    out, lse: what `forward` returned.
    do: the output cotangent, like out.

  Returns:
    dq, dk, dv (shaped and typed like q, k, v) and the T5 table gradient
    [heads, num_buckets] f32, or None without a T5 bias.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = spec.groups
  # delta = rowsum(dO * O): O(length) work, left to XLA.
  delta = jnp.einsum('bqhd,bqhd->bhq', do.astype(jnp.float32), out.astype(jnp.float32))
  rows = [_sublanes(lse), _sublanes(delta)]  # [batch, heads, 8, q_len]
  qt, kt, vt, do_t = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
  tok = _token_arrays(spec, aux)
  scalars, scalar_specs = _scalars(spec, aux)

  # dK, dV: grid (batch, K/V head, key block | group head, query block), the
  # last two reduced over in VMEM; q-side blocks clamp to the live range.
  bq, bk = bs.block_q_dkv, bs.block_k_dkv
  nq, nk = q_len // bq, kv_len // bk
  tables = _tables(spec, aux, bq, bk, transpose=True)
  fetch = lambda b, j, i, t: _lookup(spec, nk, nq, b, j, i, t)[1]
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, kh, j, g, i, *t: (
      b, kh * groups + g, fetch(b, j, i, t), 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, kh, j, g, i, *t: (b, kh, j, 0))
  row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, kh, j, g, i, *t: (
      b, kh * groups + g, 0, fetch(b, j, i, t)))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + _token_specs(
      tok, bq, bk, lambda b, kh, j, g, i, *t: (b, 0, fetch(b, j, i, t)),
      lambda b, kh, j, g, i, *t: (b, 0, j)) + scalar_specs
  dk, dv = _call(
      functools.partial(_dkdv_kernel, spec=spec, nq=nq, nk=nk),
      (batch, kv_heads, nk, groups, nq), in_specs, [kv_spec, kv_spec],
      [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      [pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
      tables, ('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary'), interpret,
      'flash_attention_dkdv',
  )(*tables, qt, kt, vt, do_t, *rows, *tok, *scalars)

  # dQ (and the T5 table gradient): grid (batch, head, query block | key block).
  bq, bk = bs.block_q_dq, bs.block_k_dq
  nq, nk = q_len // bq, kv_len // bk
  tables = _tables(spec, aux, bq, bk)
  fetch = lambda b, i, j, t: _lookup(spec, nq, nk, b, i, j, t)[1]
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *t: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                         lambda b, h, i, j, *t: (b, _kv_head(h, groups), fetch(b, i, j, t), 0))
  row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, *t: (b, h, 0, i))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + _token_specs(
      tok, bq, bk, lambda b, h, i, j, *t: (b, 0, i),
      lambda b, h, i, j, *t: (b, 0, fetch(b, i, j, t))) + scalar_specs
  out_specs = [q_spec, None]
  out_shape = [jax.ShapeDtypeStruct(qt.shape, q.dtype), None]
  if spec.has_t5:  # per-(batch, head, query block) partials: [..., 1, num_buckets] rows
    out_specs[1] = pl.BlockSpec((None, None, None, 1, spec.num_buckets),
                                lambda b, h, i, j, *t: (b, h, i, 0, 0))
    out_shape[1] = jax.ShapeDtypeStruct((batch, heads, nq, 1, spec.num_buckets), jnp.float32)
  dq, dtable = _call(
      functools.partial(_dq_kernel, spec=spec, nq=nq, nk=nk), (batch, heads, nq, nk),
      in_specs, out_specs, out_shape, [pltpu.VMEM((bq, head_dim), jnp.float32)], tables,
      ('parallel', 'parallel', 'parallel', 'arbitrary'), interpret, 'flash_attention_dq',
  )(*tables, qt, kt, vt, do_t, *rows, *tok, *scalars)
  if dtable is not None:
    dtable = dtable.sum(axis=(0, 2, 3))
  return (jnp.swapaxes(dq, 1, 2), jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2), dtable)
