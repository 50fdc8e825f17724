"""Routing kernels against the reference: gating, permutation and the dropless MoE path.

Forward values and `jax.vjp` gradients of `gating_ops.top_k_gating`,
`routing_ops.permute` / `unpermute` and `routing_ops.moe_dropless` (gating ->
permute -> grouped matmuls -> unpermute) against `xla.py`, for both
backends. On CPU the kernels run in the Pallas interpreter (the TPU ones in
the TPU interpreter); with a GPU or TPU present (`ROUTING_TEST_COMPILED=1`)
the same cases run compiled with the default blocks. The compiled gating
kernels' lowering (Triton IR, Mosaic) is checked on any machine.

The gating grid covers every (experts, k) pair of {1, 2, 8, 64} x {1..4} on
each backend, with (renormalize, dtype) rotating so that every pair meets
both dtypes (one per backend; the kernel bodies are shared) and every expert
count meets renormalize on and off. `ROUTING_TEST_FULL=1` (and compiled
runs, where a case costs little) take the whole product instead: 88 gating
cases rather than 22. The gating and dropless grids also rotate
(`@pytest.mark.rotate`, tests/conftest.py): a run takes half of their cases.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe_routing import gating_gpu
from pallas_kernels.moe_routing import gating_ops
from pallas_kernels.moe_routing import gmm_gpu
from pallas_kernels.moe_routing import routing_ops
from pallas_kernels.moe_routing import xla as ref

import testing_utils as tu

COMPILED = os.environ.get('ROUTING_TEST_COMPILED') == '1'
FULL = os.environ.get('ROUTING_TEST_FULL') == '1'
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
HIGHEST = jax.lax.Precision.HIGHEST
F32, BF16 = jnp.float32, jnp.bfloat16


def _backends():
  if COMPILED:
    return ['tpu' if jax.default_backend() == 'tpu' else 'gpu']
  return ['gpu', 'tpu']


def _gating_blocks(backend):
  """Token blocks smaller than the tokens, so the grid has several steps and a
  padded last block."""
  if COMPILED:
    return None
  if backend == 'gpu':
    return gating_gpu.BlockSizes(16)
  from pallas_kernels.moe_routing import gating_tpu  # pylint: disable=g-import-not-at-top
  return gating_tpu.BlockSizes(8)


def _gmm_blocks(backend):
  """Row tiles much smaller than the groups' spread: tiles straddle groups."""
  if COMPILED:
    return None
  if backend == 'gpu':
    return gmm_gpu.BlockSizes(16, 16, 16)
  from pallas_kernels.moe_routing import gmm_tpu  # pylint: disable=g-import-not-at-top
  return gmm_tpu.BlockSizes(16, 16, 16)


def _rel_err(got, want, floor=1e-30):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), floor))


def _check(label, tol, names, got, want, floor=1e-30):
  """Max error relative to the largest reference value (at least `floor`)."""
  for name, g, w in zip(names, got, want):
    assert g.shape == w.shape, (label, name, g.shape, w.shape)
    err = _rel_err(g, w, floor)
    assert err < tol, f'{label}: {name} relative error {err:.2e} (tolerance {tol:.0e})'


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(F32), tree)


def _value_and_vjp(fn, args, cot):
  out, vjp = jax.vjp(fn, *args)
  return (out,) + vjp(cot)


def _run(fn, *args):
  """jax.jit(fn)(*args), on CPU compiled without XLA's backend optimisations:
  every program here (interpreted kernels, the reference's unrolled expert
  loop) runs once, and optimising it took twice as long as running it."""
  options = {'xla_backend_optimization_level': '0'} if jax.default_backend() == 'cpu' else None
  return jax.jit(fn).lower(*args).compile(options)(*args)


# ----------------------------------------------------------------- gating

_PAIRS = [(e, k) for e in (1, 2, 8, 64) for k in (1, 2, 3, 4) if k <= e]
_COMBOS = [(True, F32), (False, BF16), (False, F32), (True, BF16)]


def _gating_cases():
  if FULL or COMPILED:
    return [(b, e, k, r, d) for b in _backends() for e, k in _PAIRS for r, d in _COMBOS]
  cases = []
  for b, offset in zip(_backends(), (0, 1)):
    # The combination rotates with k and, shifted by one, with the backend:
    # the two backends give each pair both dtypes. One and two experts have
    # k <= 2 only: one more shift gives them renormalize on and off too.
    cases += [(b, e, k, *_COMBOS[(k + offset + (e <= 2)) % 4]) for e, k in _PAIRS]
  return cases


def _logits(num_tokens, num_experts, dtype, seed):
  r = np.random.RandomState(seed)
  return jnp.asarray(2.0 * r.randn(num_tokens, num_experts), dtype)


@functools.lru_cache(maxsize=None)
def _gating_reference(num_experts, k, renormalize, dtype):
  """Reference weights, experts and logits gradient on the same (rounded) logits, in f32."""
  logits = _logits(37, num_experts, dtype, seed=num_experts + k)
  cot = jnp.asarray(np.random.RandomState(k).randn(37, k), F32)
  return logits, cot, _run(functools.partial(_gating_value_and_vjp, ref.top_k_gating, k,
                                             renormalize), logits.astype(F32), cot)


def _gating_value_and_vjp(top_k_gating, k, renormalize, logits, cot):
  (weights, experts), vjp = jax.vjp(lambda x: top_k_gating(x, k, renormalize), logits)
  return weights, experts, vjp((cot, np.zeros(experts.shape, jax.dtypes.float0)))[0]


@pytest.mark.rotate(2)
@pytest.mark.parametrize('backend,num_experts,k,renormalize,dtype', _gating_cases())
def test_gating_matches_reference(backend, num_experts, k, renormalize, dtype):
  logits, cot, (w_want, e_want, d_want) = _gating_reference(num_experts, k, renormalize,
                                                            dtype)
  ours = functools.partial(gating_ops.top_k_gating, backend=backend,
                           block_sizes=_gating_blocks(backend))
  weights, experts, dlogits = _run(
      functools.partial(_gating_value_and_vjp, ours, k, renormalize), logits, cot)
  assert weights.dtype == F32 and experts.dtype == jnp.int32 and dlogits.dtype == dtype
  # The chosen experts are exact: the softmax is the reference's formula on
  # the same f32 values, and ties go to the lower index in both.
  np.testing.assert_array_equal(experts, e_want)
  label = f'gating {backend} experts={num_experts} k={k} renorm={renormalize} {dtype.__name__}'
  # f32 weights whatever the logits' dtype: the weights meet 1e-5 even for
  # bf16 logits; the bf16 logits gradient is rounded to bf16.
  _check(label, 1e-5, ('weights',), (weights,), (w_want,))
  # With one expert, or k = 1 renormalised, the weight is constantly 1 and
  # the true gradient 0: both sides hold rounding noise there (the
  # reference's up to ~1e-7), measured against the O(1) cotangent instead.
  constant = num_experts == 1 or (k == 1 and renormalize)
  _check(label, TOL[dtype], ('dlogits',), (dlogits,), (d_want,),
         floor=1.0 if constant else 1e-30)


@pytest.mark.parametrize('backend', _backends())
def test_gating_ties_go_to_the_lower_expert(backend):
  """Exact ties (equal logits, -inf logits whose probabilities are all 0, and
  k = num_experts) choose the lower expert first, as lax.top_k does; padded
  expert columns (also probability 0) are never chosen."""
  num_experts = 10  # padded to 16 (GPU) or 128 (TPU) columns
  rows = [np.zeros(num_experts), np.arange(num_experts) % 3,
          np.where(np.arange(num_experts) % 4 == 1, 0.0, -np.inf),
          np.r_[np.full(num_experts - 2, -np.inf), 1.0, 1.0]]
  logits = jnp.asarray(np.stack(rows * 5), F32)  # [20, 10]
  for k in (3, num_experts):
    weights, experts = _run(functools.partial(
        gating_ops.top_k_gating, k=k, renormalize=False, backend=backend,
        block_sizes=_gating_blocks(backend)), logits)
    w_want, e_want = ref.top_k_gating(logits, k, renormalize=False)
    np.testing.assert_array_equal(experts, e_want)
    np.testing.assert_allclose(weights, w_want, rtol=1e-6)
  np.testing.assert_array_equal(experts[0], np.arange(num_experts))


# ---------------------------------------------------- permute / unpermute


def _biased_logits(num_tokens, num_experts, dtype, seed, empty):
  """Random logits with `empty` experts pushed far down: those get no token
  while k <= num_experts - empty."""
  logits = 2.0 * np.random.RandomState(seed).randn(num_tokens, num_experts)
  unused = np.random.RandomState(seed + 1).permutation(num_experts)[:empty]
  logits[:, unused] -= 40.0
  return jnp.asarray(logits, dtype), sorted(unused.tolist())


def test_permute_unpermute_match_reference_and_round_trip():
  num_tokens, embed, num_experts, k = 29, 12, 8, 3
  logits, unused = _biased_logits(num_tokens, num_experts, F32, 0, empty=3)
  weights, experts = ref.top_k_gating(logits, k)
  tokens = jnp.asarray(np.random.RandomState(1).randn(num_tokens, embed), F32)

  rows, order, sizes = routing_ops.permute(tokens, experts, num_experts)
  for got, want in zip((rows, order, sizes), ref.permute(tokens, experts, num_experts)):
    np.testing.assert_array_equal(got, want)
  assert sizes.dtype == jnp.int32 and int(sizes.sum()) == num_tokens * k
  np.testing.assert_array_equal(np.asarray(sizes)[unused], 0)
  # Renormalised gates sum to 1: unpermute(permute(x)) is x.
  back = routing_ops.unpermute(rows, order, weights)
  np.testing.assert_allclose(back, tokens, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(back, ref.unpermute(rows, order, weights), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('dtype', [F32, BF16])
def test_permute_unpermute_gradients(dtype):
  """Gradients of both ops (gathers by the inverse permutation) equal autodiff
  of the reference (scatters), with an expert-wise transform in between so
  each row's cotangent differs."""
  num_tokens, embed, num_experts, k = 23, 8, 8, 2
  logits, _ = _biased_logits(num_tokens, num_experts, F32, 2, empty=4)
  weights, experts = ref.top_k_gating(logits, k, renormalize=False)
  r = np.random.RandomState(3)
  tokens = jnp.asarray(r.randn(num_tokens, embed), dtype)
  scale = jnp.asarray(r.randn(num_tokens * k, embed), dtype)
  cot = jnp.asarray(r.randn(num_tokens, embed), dtype)

  def pipeline(lib):
    def fn(tokens, weights):
      rows, order, _ = lib.permute(tokens, experts, num_experts)
      return lib.unpermute(rows * scale, order, weights)
    return fn

  got = _run(lambda *a: _value_and_vjp(pipeline(routing_ops), a, cot), tokens, weights)
  want = _run(lambda *a: _value_and_vjp(pipeline(ref), a, cot.astype(F32)),
              tokens.astype(F32), weights)
  assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == F32
  _check(f'permute/unpermute {dtype.__name__}', TOL[dtype], ('out', 'dtokens', 'dweights'),
         got, want)


# ------------------------------------------------ the dropless MoE path

# name: (num_experts, k, empty experts, gated, activation, renormalize, dtype).
# Together: expert counts 1, 8, 64; k 1..4; empty experts; gated and plain
# MLPs; Switch-style unrenormalised gates; f32 and bf16. (The reference's
# unrolled loop over 64 experts dominates the file's compile time: that case
# takes the plain MLP, two matmuls per expert instead of three.)
MOE_CASES = {
    'one_expert': (1, 1, 0, False, jax.nn.relu, True, F32),
    'eight_k2_bf16': (8, 2, 3, True, jax.nn.silu, True, BF16),
    'eight_k3_unnormalized': (8, 3, 2, True, jax.nn.gelu, False, F32),
    'sixty_four_k4': (64, 4, 40, False, jax.nn.gelu, True, F32),
}
_MOE_SHAPES = dict(num_tokens=24, embed=8, mlp=16)


@functools.lru_cache(maxsize=None)
def _moe_inputs_and_reference(case):
  num_experts, k, empty, gated, act, renormalize, dtype = MOE_CASES[case]
  t, d, m = _MOE_SHAPES['num_tokens'], _MOE_SHAPES['embed'], _MOE_SHAPES['mlp']
  r = np.random.RandomState(num_experts + k)
  tokens = jnp.asarray(r.randn(t, d), dtype)
  logits, unused = _biased_logits(t, num_experts, F32, num_experts, empty)
  wi = tuple(jnp.asarray(r.randn(num_experts, d, m) / np.sqrt(d), dtype)
             for _ in range(2 if gated else 1))
  wo = jnp.asarray(r.randn(num_experts, m, d) / np.sqrt(m), dtype)
  cot = jnp.asarray(r.randn(t, d), dtype)
  args = (tokens, logits, wi, wo)

  def spec(tokens, logits, wi, wo):
    weights, experts = ref.top_k_gating(logits, k, renormalize)

    def expert_fn(e, x):
      h = act(jnp.dot(x, wi[0][e], precision=HIGHEST))
      if gated:
        h = h * jnp.dot(x, wi[1][e], precision=HIGHEST)
      return jnp.dot(h, wo[e], precision=HIGHEST)
    return ref.moe_mlp_loop(tokens, weights, experts, expert_fn, num_experts)

  # The reference runs in f32 on the same (possibly bf16-rounded) inputs.
  want = _run(lambda *a: _value_and_vjp(spec, a, cot.astype(F32)), *_f32(args))
  return args, cot, unused, want


@pytest.mark.rotate(2)
@pytest.mark.parametrize('backend', _backends())
@pytest.mark.parametrize('case', list(MOE_CASES))
def test_moe_dropless_matches_expert_loop(case, backend):
  """The acceptance check: forward and gradients (tokens, router logits, wi,
  wo) of gating -> permute -> grouped matmul -> unpermute equal the
  loop-over-experts reference, with empty experts."""
  num_experts, k, _, gated, act, renormalize, dtype = MOE_CASES[case]
  args, cot, unused, want = _moe_inputs_and_reference(case)

  def ours(*args):
    def fn(tokens, logits, wi, wo):
      return routing_ops.moe_dropless(
          tokens, logits, wi, wo, k, renormalize, act, gated, backend=backend,
          gating_block_sizes=_gating_blocks(backend), gmm_block_sizes=_gmm_blocks(backend))
    (out, weights, experts), vjp = jax.vjp(fn, *args)
    # The routing is returned for statistics: only the output gets a cotangent.
    cots = (cot, jnp.zeros_like(weights), np.zeros(experts.shape, jax.dtypes.float0))
    return (out,) + vjp(cots), (weights, experts)

  got, (weights, experts) = _run(ours, *args)
  assert got[0].dtype == dtype and got[3][0].dtype == dtype
  # The routing it returns (for router statistics) is the reference's.
  w_want, e_want = ref.top_k_gating(args[1], k, renormalize)
  np.testing.assert_array_equal(experts, e_want)
  assert _rel_err(weights, w_want) < 1e-5
  assert not np.isin(np.asarray(experts), unused).any()  # the empty experts are empty
  names = ('out', 'dtokens', 'dlogits') + ('dwi_0', 'dwi_1')[:len(args[2])] + ('dwo',)
  _check(f'moe {case} {backend}', TOL[dtype], names, jax.tree.leaves(got),
         jax.tree.leaves(want))
  # Empty experts get exactly zero weight gradients.
  np.testing.assert_array_equal(np.asarray(got[4], F32)[unused], 0.0)


# -------------------------------------------------------------- bad input

_X = jnp.zeros((16, 8), F32)
_E = jnp.zeros((16, 2), jnp.int32)
_W = jnp.ones((16, 2), F32)
_WI = jnp.zeros((8, 8, 4), F32)
_WO = jnp.zeros((8, 4, 8), F32)


@pytest.mark.parametrize('call,message', [
    (lambda: gating_ops.top_k_gating(jnp.zeros((2, 16, 8)), 2), r'^logits must have rank 2'),
    (lambda: gating_ops.top_k_gating(jnp.zeros((16, 8), jnp.int32), 2),
     '^logits has dtype int32'),
    (lambda: gating_ops.top_k_gating(jnp.zeros((0, 8)), 2), '^num_tokens=0'),
    (lambda: gating_ops.top_k_gating(_X, 0), r'^k=0 must be an integer between 1 and '
     'num_experts=8'),
    (lambda: gating_ops.top_k_gating(_X, 9), '^k=9 must be'),
    (lambda: gating_ops.top_k_gating(_X, 2.0), '^k=2.0 must be'),
    (lambda: gating_ops.top_k_gating(_X, 2, renormalize=None), '^renormalize=None'),
    (lambda: gating_ops.top_k_gating(_X, 2, backend='cuda'), "^backend='cuda' is not one of"),
    (lambda: gating_ops.top_k_gating(_X, 2, interpret=False), '^interpret=False needs a GPU'),
    (lambda: gating_ops.top_k_gating(_X, 2, backend='tpu',
                                     block_sizes=gating_gpu.BlockSizes()),
     '^block_sizes is a .*gating_gpu.BlockSizes; the tpu backend takes'),
    (lambda: gating_gpu.BlockSizes(tm=24), r'^BlockSizes.tm=24 must be a power of 2'),
    (lambda: routing_ops.permute(_X, _E.astype(F32), 8), '^experts has dtype float32'),
    (lambda: routing_ops.permute(_X, _E[:15], 8), r'^experts has shape \(15, 2\)'),
    (lambda: routing_ops.permute(_X[0], _E, 8), '^tokens must have rank 2'),
    (lambda: routing_ops.permute(_X, _E, 0), '^num_experts=0'),
    (lambda: routing_ops.unpermute(jnp.zeros((31, 8)), jnp.arange(32), _W),
     '^rows has 31 rows; expected num_tokens \\* k = 32'),
    (lambda: routing_ops.unpermute(jnp.zeros((32, 8)), jnp.arange(31), _W),
     r'^order has shape \(31,\)'),
    (lambda: routing_ops.unpermute(jnp.zeros((32, 8)), jnp.arange(32), _E),
     '^weights must be a float'),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((15, 8)), _WI, _WO, 2, gated=False),
     r'^router_logits has shape \(15, 8\)'),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((16, 8)), _WI, _WO, 2, gated=True),
     r'^wi has 1 matrices; gated=True takes a pair'),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((16, 8)), (_WI, _WI[:, :, :3]), _WO, 2),
     r'^wi\[1\] has shape \(8, 8, 3\); expected \(8, 8, 4\)'),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((16, 8)), _WI.astype(BF16), _WO, 2,
                                      gated=False), r"^wi\[0\] has dtype bfloat16"),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((16, 4)), _WI, _WO, 2, gated=False),
     r'^wi\[0\] has shape \(8, 8, 4\); expected \(4, 8, 4\)'),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((16, 8)), _WI, _WO[:, :, :5], 2,
                                      gated=False), r'^wo has shape \(8, 4, 5\)'),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((16, 8)), _WI, _WO, 2, activation=1,
                                      gated=False), '^activation=1 must be callable'),
    (lambda: routing_ops.moe_dropless(_X, jnp.zeros((16, 8)), _WI, _WO, 9, gated=False),
     '^k=9 must be'),
])
def test_bad_input_is_one_clear_error(call, message):
  if COMPILED:
    pytest.skip('CPU-only expectations (interpret=False is legal on a GPU)')
  with pytest.raises(ValueError, match=message):
    call()


def test_block_sizes():
  from pallas_kernels.moe_routing import gating_tpu  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='^BlockSizes.tm=12 must be a positive multiple of 8'):
    gating_tpu.BlockSizes(tm=12)
  assert gating_gpu.BlockSizes.default(64).tm == 128
  assert gating_gpu.BlockSizes.default(1000).tm == 16  # 1024 columns
  assert gating_gpu.BlockSizes(128).clipped(20).tm == 32
  assert gating_tpu.BlockSizes.default(64).tm == 512  # 128 lanes
  assert gating_tpu.BlockSizes.default(300).tm == 160  # 384 lanes
  assert gating_tpu.BlockSizes(256).clipped(20).tm == 24
  assert (gating_gpu.padded_experts(1), gating_gpu.padded_experts(40)) == (16, 64)
  assert (gating_tpu.padded_experts(1), gating_tpu.padded_experts(200)) == (128, 256)


# --------------------------------------------------------------- lowering


def _lower_gating(backend, num_tokens, num_experts, k, renormalize, dtype):
  """Forward and backward text of the gating weights lowered for the device."""
  fn = lambda x: gating_ops.top_k_gating(x, k, renormalize, backend=backend,
                                         interpret=False)[0]
  return tu.lower_forward_and_grad(
      backend, fn, (jax.ShapeDtypeStruct((num_tokens, num_experts), dtype),), argnums=(0,))


# (num_tokens, num_experts, k, renormalize, dtype): padded tokens and experts
# (a power of 2 on GPUs, 128 lanes on TPUs), k = 1 and k not a power of 2.
LOWERED = [
    (4096, 64, 2, True, BF16),
    (1000, 200, 3, False, F32),
    (300, 8, 1, True, F32),
]


@pytest.mark.usefixtures('lowering_only')
@pytest.mark.parametrize('num_tokens,num_experts,k,renormalize,dtype', LOWERED)
def test_lowers_to_triton(num_tokens, num_experts, k, renormalize, dtype):
  fwd, bwd = _lower_gating('gpu', num_tokens, num_experts, k, renormalize, dtype)
  for text in (fwd, bwd):
    assert 'tt.divisibility' in text  # serialized Triton IR, not an interpreted loop
  assert 'moe_gating_fwd' in fwd and 'moe_gating_bwd' not in fwd
  assert 'moe_gating_fwd' in bwd and 'moe_gating_bwd' in bwd  # forward's residuals, then VJP


@pytest.mark.usefixtures('lowering_only')
@pytest.mark.parametrize('num_tokens,num_experts,k,renormalize,dtype', LOWERED)
def test_lowers_for_tpu(num_tokens, num_experts, k, renormalize, dtype):
  fwd, bwd = _lower_gating('tpu', num_tokens, num_experts, k, renormalize, dtype)
  assert fwd.count('tpu_custom_call') == 1 and 'moe_gating_fwd' in fwd
  assert bwd.count('tpu_custom_call') == 2  # the forward (residuals) and the VJP kernel
  assert 'moe_gating_bwd' in bwd


@pytest.mark.usefixtures('lowering_only')
@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
def test_moe_dropless_lowers(backend):
  """The whole kernel path lowers: gating, three grouped matmuls and their VJPs."""
  t, d, m, e = 512, 256, 512, 8
  args = (jax.ShapeDtypeStruct((t, d), BF16), jax.ShapeDtypeStruct((t, e), F32),
          (jax.ShapeDtypeStruct((e, d, m), BF16),) * 2, jax.ShapeDtypeStruct((e, m, d), BF16))
  fn = lambda x, l, wi, wo: routing_ops.moe_dropless(x, l, wi, wo, 2, backend=backend,
                                                     interpret=False)[0]
  fwd, bwd = tu.lower_forward_and_grad(backend, fn, args, argnums=(0, 1, 2, 3))
  assert 'moe_gating_fwd' in fwd and 'moe_gmm' in fwd
  assert 'moe_gating_bwd' in bwd and 'moe_tgmm' in bwd
