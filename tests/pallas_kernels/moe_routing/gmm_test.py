"""Grouped matmul kernels against the reference and jax.lax.ragged_dot.

Forward values and `jax.vjp` gradients of gmm and tgmm, for both backends. On
CPU the kernels run in the Pallas interpreter (the TPU ones in the TPU
interpreter, which simulates VMEM blocks, so a visit that clobbered another
group's rows of a shared output block would show); with a GPU or TPU present
(`GMM_TEST_COMPILED=1`) the same cases run compiled with the default tiles.
The compiled kernels' lowering (Triton IR, Mosaic) is checked on any machine.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.moe_routing import gmm_gpu
from pallas_kernels.moe_routing import gmm_ops
from pallas_kernels.moe_routing import gmm_reference as ref

import testing_utils as tu

COMPILED = os.environ.get('GMM_TEST_COMPILED') == '1'
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
HIGHEST = lax.Precision.HIGHEST


def _backends():
  if COMPILED:
    return ['tpu' if jax.default_backend() == 'tpu' else 'gpu']
  return ['gpu', 'tpu']


def _small_blocks(backend):
  """Tiles much smaller than the groups' spread, so row tiles straddle groups."""
  if COMPILED:
    return None
  if backend == 'gpu':
    return gmm_gpu.BlockSizes(16, 16, 16)  # Triton's smallest dot
  from pallas_kernels.moe_routing import gmm_tpu  # pylint: disable=g-import-not-at-top
  return gmm_tpu.BlockSizes(8, 16, 16)


def _sparse_sizes(num_groups, m, seed):
  """Mostly tiny groups, about 40% empty, one long one; sum < m."""
  r = np.random.RandomState(seed)
  sizes = r.randint(1, 3, num_groups) * (r.rand(num_groups) < 0.6)
  sizes[num_groups // 2] = 17  # spans several row tiles
  assert sizes.sum() < m
  return sizes.tolist()


# name: (num_groups, m, k, n, group size patterns). m, k and n are not tile
# multiples (padded); group sizes are runtime data, so a case's patterns share
# one compilation.
CASES = {
    # Every row in the one group; then sum < m: the last rows belong to none.
    'one_group': (1, 37, 20, 12, [[37], [30]]),
    # An empty first group; then a boundary mid-tile and sum < m.
    'two_groups': (2, 37, 20, 12, [[0, 34], [21, 9]]),
    # Uneven with empty groups inside and at the end, sum < m; then groups
    # running past m (cut at m, as ragged_dot does) with empty groups between.
    'eight_groups': (8, 50, 20, 12, [[5, 0, 13, 1, 0, 9, 17, 0], [0, 0, 40, 0, 0, 30, 0, 0]]),
    # Most row tiles hold several groups; many groups are empty.
    'sixty_four_groups': (64, 100, 12, 12, [_sparse_sizes(64, 100, 0)]),
}


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _check(label, dtype, names, got, wants):
  for source, want in wants.items():
    for name, g, w in zip(names, got, want):
      assert g.shape == w.shape, (label, source, name)
      err = _rel_err(g, w)
      assert err < TOL[dtype], (f'{label} vs {source}: {name} relative error {err:.2e} '
                                f'(tolerance {TOL[dtype]:.0e})')


def _value_and_vjp(fn, x, y, cot):
  out, vjp = jax.vjp(fn, x, y)
  return (out,) + vjp(cot)


def _arrays(shapes, dtype, seed=0):
  r = np.random.RandomState(seed)
  return [jnp.asarray(r.randn(*s), dtype) for s in shapes]


def _compare_gmm(case, backend, dtype, transpose_rhs=False, num_patterns=None):
  num_groups, m, k, n, patterns = CASES[case]
  patterns = patterns[:num_patterns]
  rhs_shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
  lhs, rhs, cot = _arrays([(m, k), rhs_shape, (m, n)], dtype)
  bs = _small_blocks(backend)

  @jax.jit
  def ours(lhs, rhs, gs, cot):
    return _value_and_vjp(lambda x, w: gmm_ops.gmm(
        x, w, gs, transpose_rhs=transpose_rhs, backend=backend, block_sizes=bs),
                          lhs, rhs, cot)

  @jax.jit
  def spec(lhs, rhs, gs, cot):
    return _value_and_vjp(lambda x, w: ref.gmm(x, w, gs, transpose_rhs=transpose_rhs),
                          lhs, rhs, cot)

  @jax.jit
  def xla(lhs, rhs, gs, cot):
    def fn(x, w):
      w = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
      return lax.ragged_dot(x, w, gs, precision=HIGHEST)
    return _value_and_vjp(fn, lhs, rhs, cot)

  # The references run in f32 on the same (possibly bf16-rounded) inputs.
  f32 = [x.astype(jnp.float32) for x in (lhs, rhs, cot)]
  for sizes in patterns:
    gs = jnp.asarray(sizes, jnp.int32)
    got = ours(lhs, rhs, gs, cot)
    assert got[0].dtype == dtype and got[2].dtype == dtype
    _check(f'gmm {case} {sizes} {backend} {dtype.__name__}', dtype, ('out', 'dlhs', 'drhs'),
           got,
           {'reference': spec(f32[0], f32[1], gs, f32[2]),
            'ragged_dot': xla(f32[0], f32[1], gs, f32[2])})


def _compare_tgmm(case, backend, dtype, num_patterns=None):
  num_groups, m, k, n, patterns = CASES[case]
  patterns = patterns[:num_patterns]
  lhs, dout, cot = _arrays([(m, k), (m, n), (num_groups, k, n)], dtype, seed=1)
  bs = _small_blocks(backend)

  @jax.jit
  def ours(lhs, dout, gs, cot):
    return _value_and_vjp(lambda x, d: gmm_ops.tgmm(x, d, gs, backend=backend, block_sizes=bs),
                          lhs, dout, cot)

  @jax.jit
  def spec(lhs, dout, gs, cot):
    return _value_and_vjp(lambda x, d: ref.tgmm(x, d, gs), lhs, dout, cot)

  @jax.jit
  def xla(lhs, dout, gs, cot):
    # ragged_dot_general's ragged-contraction mode has no autodiff rule: its
    # gradients are written as the two ragged_dots they are.
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    out = lax.ragged_dot_general(lhs, dout, gs, dims, precision=HIGHEST)
    dlhs = lax.ragged_dot(dout, jnp.swapaxes(cot, 1, 2), gs, precision=HIGHEST)
    ddout = lax.ragged_dot(lhs, cot, gs, precision=HIGHEST)
    return out, dlhs, ddout

  f32 = [x.astype(jnp.float32) for x in (lhs, dout, cot)]
  for sizes in patterns:
    gs = jnp.asarray(sizes, jnp.int32)
    got = ours(lhs, dout, gs, cot)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    _check(f'tgmm {case} {sizes} {backend} {dtype.__name__}', dtype, ('out', 'dlhs', 'ddout'),
           got,
           {'reference': spec(*f32[:2], gs, f32[2]),
            'ragged_dot': xla(*f32[:2], gs, f32[2])})


@pytest.mark.rotate(2)
@pytest.mark.parametrize('backend', _backends())
@pytest.mark.parametrize('case', list(CASES))
def test_gmm_matches_reference_and_ragged_dot_f32(case, backend):
  _compare_gmm(case, backend, jnp.float32)


@pytest.mark.rotate(2)
@pytest.mark.parametrize('backend', _backends())
@pytest.mark.parametrize('case', list(CASES))
def test_tgmm_matches_reference_and_ragged_dot_f32(case, backend):
  _compare_tgmm(case, backend, jnp.float32)


@pytest.mark.parametrize('backend', _backends())
def test_gmm_transpose_rhs_f32(backend):
  _compare_gmm('eight_groups', backend, jnp.float32, transpose_rhs=True, num_patterns=1)


@pytest.mark.parametrize('backend', _backends())
def test_gmm_and_tgmm_bf16(backend):
  # One pattern: the kernels are those of f32 (checked on every pattern),
  # only the operand and output dtypes change.
  _compare_gmm('eight_groups', backend, jnp.bfloat16, num_patterns=1)
  _compare_tgmm('eight_groups', backend, jnp.bfloat16, num_patterns=1)


@pytest.mark.parametrize('backend', _backends())
def test_preferred_element_type_and_garbage_outside_groups(backend):
  """An f32 output from bf16 inputs; inf and nan in rows of no group stay out."""
  lhs, rhs = _arrays([(24, 16), (2, 16, 16)], jnp.bfloat16)
  lhs = lhs.at[20:].set(jnp.inf).at[22].set(jnp.nan)  # rows past sum(group_sizes)
  gs = jnp.asarray([7, 13], jnp.int32)
  bs = _small_blocks(backend)
  out = gmm_ops.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32, backend=backend,
                    block_sizes=bs)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out[20:], 0.0)
  assert _rel_err(out, ref.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32)) < 1e-5
  dw = gmm_ops.tgmm(lhs, jnp.ones((24, 16), jnp.bfloat16), gs, backend=backend,
                    block_sizes=bs)
  assert np.isfinite(np.asarray(dw, np.float32)).all()
  assert _rel_err(dw, ref.tgmm(lhs, jnp.ones((24, 16), jnp.bfloat16), gs)) < 1e-5


def test_tpu_visits_cover_each_tile_once_per_group():
  """The TPU metadata: (group, row tile) pairs in row order, exactly the pairs
  that meet, every tile visited (tail group included), visits bounded."""
  from pallas_kernels.moe_routing import gmm_tpu  # pylint: disable=g-import-not-at-top
  r = np.random.RandomState(0)
  tm, tiles_m = 8, 12
  m = tm * tiles_m
  make_visits = jax.jit(gmm_tpu._visits, static_argnums=(1, 2), static_argnames='visit_empty')
  for trial in range(12):
    num_groups = int(r.choice([1, 5, 40]))
    sizes = r.randint(0, 12, num_groups) * (r.rand(num_groups) < 0.7)
    offsets = ref.group_offsets(jnp.asarray(sizes), m - 5)
    for visit_empty, tail in ((False, True), (True, False)):
      offs = jnp.concatenate([offsets, jnp.asarray([m], jnp.int32)]) if tail else offsets
      gids, tids, count = (np.asarray(x) for x in make_visits(
          offs, tm, tiles_m, visit_empty=visit_empty))
      offs = np.asarray(offs)
      visits = list(zip(gids[:count], tids[:count]))
      want = []
      for g in range(len(offs) - 1):
        lo, hi = offs[g], offs[g + 1]
        if hi > lo:
          want += [(g, t) for t in range(lo // tm, -(-hi // tm))]
        elif visit_empty:
          want.append((g, min(lo // tm, tiles_m - 1)))
      assert visits == want, (trial, sizes.tolist())
      assert count <= len(gids)
      assert (np.diff(gids[:count]) >= 0).all() and (np.diff(tids[:count]) >= 0).all()
      if tail:
        assert set(tids[:count]) == set(range(tiles_m))


# -------------------------------------------------------------- bad input


def _ok(m=16, k=8, n=8, groups=2, dtype=jnp.float32):
  return jnp.zeros((m, k), dtype), jnp.zeros((groups, k, n), dtype), jnp.asarray([8, 8])


@pytest.mark.parametrize('call,message', [
    (lambda: gmm_ops.gmm(jnp.zeros((2, 16, 8)), *_ok()[1:]), r'^lhs must have rank 2'),
    (lambda: gmm_ops.gmm(_ok()[0], jnp.zeros((8, 8)), _ok()[2]), r'^rhs must have rank 3'),
    (lambda: gmm_ops.gmm(_ok()[0], jnp.zeros((2, 4, 8)), _ok()[2]), r'^rhs has shape .* k=4'),
    (lambda: gmm_ops.gmm(_ok()[0], jnp.zeros((2, 8, 4)), _ok()[2], transpose_rhs=True),
     r'transpose_rhs=True\), so k=4'),
    (lambda: gmm_ops.gmm(*_ok()[:2], jnp.asarray([8, 4, 4])),
     r'^group_sizes has shape \(3,\); expected \[num_groups\] = \(2,\)'),
    (lambda: gmm_ops.gmm(*_ok()[:2], jnp.asarray([8.0, 8.0])),
     '^group_sizes has dtype float32'),
    (lambda: gmm_ops.gmm(*_ok(dtype=jnp.int32)), '^lhs has dtype int32'),
    (lambda: gmm_ops.gmm(_ok()[0], _ok(dtype=jnp.bfloat16)[1], _ok()[2]),
     '^lhs and rhs must share a dtype'),
    (lambda: gmm_ops.gmm(*_ok(), preferred_element_type=jnp.int32),
     '^preferred_element_type=int32'),
    (lambda: gmm_ops.gmm(*_ok(m=0)), '^m=0'),
    (lambda: gmm_ops.gmm(*_ok(), backend='cuda'), "^backend='cuda' is not one of"),
    (lambda: gmm_ops.gmm(*_ok(), interpret=False), '^interpret=False needs a GPU'),
    (lambda: gmm_ops.gmm(*_ok(), backend='tpu', block_sizes=gmm_gpu.BlockSizes()),
     '^block_sizes is a .*gmm_gpu.BlockSizes; the tpu backend takes'),
    (lambda: gmm_ops.tgmm(_ok()[0], jnp.zeros((15, 8)), _ok()[2]), '^dout has 15 rows'),
    (lambda: gmm_ops.tgmm(_ok()[0], jnp.zeros((16, 8), jnp.bfloat16), _ok()[2]),
     '^lhs and dout must share a dtype'),
    (lambda: gmm_ops.tgmm(_ok()[0], jnp.zeros((16, 8)), jnp.asarray([[8, 8]])),
     r'^group_sizes must have rank 1'),
    (lambda: gmm_gpu.BlockSizes(tm=24), r'^BlockSizes.tm=24 must be a power of 2'),
])
def test_bad_input_is_one_clear_error(call, message):
  if COMPILED:
    pytest.skip('CPU-only expectations (interpret=False is legal on a GPU)')
  with pytest.raises(ValueError, match=message):
    call()


def test_tpu_block_sizes():
  from pallas_kernels.moe_routing import gmm_tpu  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='^BlockSizes.tn=100 must be a positive multiple of 8'):
    gmm_tpu.BlockSizes(tn=100)
  bs = gmm_tpu.BlockSizes(128, 512, 256).clipped(1000, 300, 1000)
  assert (bs.tm, bs.tk, bs.tn) == (128, 304, 256)  # tk spans the whole padded k
  assert bs.swapped() == gmm_tpu.BlockSizes(128, 256, 304)
  gpu = gmm_gpu.BlockSizes(64, 64, 128).clipped(10, 300, 40)
  assert (gpu.tm, gpu.tk, gpu.tn) == (16, 64, 64)


# --------------------------------------------------------------- lowering


def _lower(backend, name, dtype, m, k, n, groups, transpose_rhs=False, block_sizes=None):
  """Forward and backward text of gmm (name='gmm') or tgmm lowered for the device."""
  gs = jax.ShapeDtypeStruct((groups,), jnp.int32)
  if name == 'gmm':
    args = (jax.ShapeDtypeStruct((m, k), dtype),
            jax.ShapeDtypeStruct((groups, n, k) if transpose_rhs else (groups, k, n), dtype), gs)
    fn = lambda x, w, g: gmm_ops.gmm(x, w, g, transpose_rhs=transpose_rhs, backend=backend,
                                     block_sizes=block_sizes, interpret=False)
  else:
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m, n), dtype), gs)
    fn = lambda x, d, g: gmm_ops.tgmm(x, d, g, backend=backend, block_sizes=block_sizes,
                                      interpret=False)
  return tu.lower_forward_and_grad(backend, fn, args, argnums=(0, 1))


# (name, dtype, m, k, n, groups, transpose_rhs): odd sizes are padded.
LOWERED = [
    ('gmm', jnp.bfloat16, 1000, 512, 768, 8, False),
    ('gmm', jnp.float32, 300, 200, 130, 64, True),
    ('tgmm', jnp.bfloat16, 1000, 512, 768, 8, False),
]


@pytest.mark.usefixtures('lowering_only')
@pytest.mark.parametrize('name,dtype,m,k,n,groups,transpose_rhs', LOWERED)
def test_lowers_to_triton(name, dtype, m, k, n, groups, transpose_rhs):
  fwd, bwd = _lower('gpu', name, dtype, m, k, n, groups, transpose_rhs)
  for text in (fwd, bwd):
    assert 'tt.divisibility' in text  # serialized Triton IR, not an interpreted loop
  assert f'moe_{name}' in fwd
  # d lhs is a gmm; d rhs a tgmm (gmm's backward) or d dout a gmm (tgmm's).
  assert 'moe_gmm' in bwd and ('moe_tgmm' in bwd) == (name == 'gmm')


@pytest.mark.usefixtures('lowering_only')
@pytest.mark.parametrize('name,dtype,m,k,n,groups,transpose_rhs', LOWERED)
def test_lowers_for_tpu(name, dtype, m, k, n, groups, transpose_rhs):
  fwd, bwd = _lower('tpu', name, dtype, m, k, n, groups, transpose_rhs)
  assert fwd.count('tpu_custom_call') == 1 and f'moe_{name}' in fwd
  assert bwd.count('tpu_custom_call') == 2  # d lhs and d rhs (or d dout): one kernel each
  assert 'moe_gmm' in bwd and ('moe_tgmm' in bwd) == (name == 'gmm')
