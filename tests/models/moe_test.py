"""The MoE block against loop-over-experts references, and its configuration errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as cfg
from models import layers
from models import model as model_lib
from models import moe
from pallas_kernels.moe_routing import xla as routing

import testing_utils as tu

EMB, MLP, BATCH, LENGTH = 16, 24, 2, 12


def _x(seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(BATCH, LENGTH, EMB), jnp.float32)


def _token_ids(seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(1, 50, (BATCH, LENGTH)), jnp.int32)


def _init(block, x, token_ids=None):
  return nn.unbox(jax.jit(block.init)(jax.random.PRNGKey(1), x, token_ids)['params'])


def _apply(block, params, x, token_ids=None):
  out, state = block.apply({'params': params}, x, token_ids, mutable=[moe.MOE_COLLECTION])
  return out, moe.collect_stats(state[moe.MOE_COLLECTION])


def _expert_fn(params, kind=cfg.MlpKind.SWIGLU):
  act = moe._ACTIVATIONS[kind]  # pylint: disable=protected-access

  def fn(e, x):
    h = act(x @ params['wi_0'][e]) * (x @ params['wi_1'][e])
    return h @ params['wo'][e]
  return fn


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= tol * max(np.max(np.abs(b)), 1e-6), np.max(np.abs(a - b))


def _block(**kw):
  return moe.MoeBlock(**{'num_experts': 4, 'num_selected': 2, 'mlp_dim': MLP, **kw})


def _grads(block, params, x):
  cot = jnp.asarray(np.random.RandomState(5).randn(*x.shape), jnp.float32)
  return jax.grad(lambda p, x: jnp.sum(_apply(block, p, x)[0] * cot), argnums=(0, 1))(params, x)


@pytest.mark.rotate(2)
@pytest.mark.parametrize('impl', ['ragged_dot', 'dropless'])
@pytest.mark.parametrize('experts,k', [(4, 2), (8, 1), (3, 3)])
def test_dropless_equals_capacity_when_nothing_is_dropped(impl, experts, k):
  x = _x()
  # capacity_factor = experts / k gives every expert room for every token.
  # k = 1 as Switch (no renormalisation), so the router gets a real gradient.
  kw = dict(num_experts=experts, num_selected=k, renormalize=k > 1)
  capacity = _block(**kw, capacity_factor=experts / k)
  dropless = _block(**kw, impl=cfg.MoeImpl(impl))
  params = _init(capacity, x)
  (out_c, stats_c), (out_d, _) = _apply(capacity, params, x), _apply(dropless, params, x)
  assert float(stats_c['dropped_fraction'][0]) == 0.0
  _close(out_d, out_c)
  for g_d, g_c in zip(jax.tree.leaves(_grads(dropless, params, x)),
                      jax.tree.leaves(_grads(capacity, params, x))):
    _close(g_d, g_c)


@pytest.mark.parametrize('impl', ['capacity', 'dropless', 'ragged_dot'])
def test_one_expert_top1_is_the_dense_mlp(impl):
  x = _x()
  block = _block(num_experts=1, num_selected=1, impl=cfg.MoeImpl(impl))
  params = _init(block, x)
  dense = layers.MlpBlock(MLP, cfg.MlpKind.SWIGLU)
  dense_params = {name: {'kernel': params[name][0]} for name in ('wi_0', 'wi_1', 'wo')}
  _close(_apply(block, params, x)[0], dense.apply({'params': dense_params}, x))
  g_moe = _grads(block, params, x)
  g_dense = jax.grad(lambda p, x: jnp.sum(dense.apply({'params': p}, x) * jnp.asarray(
      np.random.RandomState(5).randn(*x.shape), jnp.float32)), argnums=(0, 1))(dense_params, x)
  for name in ('wi_0', 'wi_1', 'wo'):
    _close(g_moe[0][name][0], g_dense[0][name]['kernel'])
  _close(g_moe[1], g_dense[1])
  np.testing.assert_array_equal(g_moe[0]['router'], 0.0)  # one expert: the gate is always 1


@pytest.mark.parametrize('renormalize', [True, False])
def test_token_choice_equals_the_loop_over_experts(renormalize):
  x = _x()
  block = _block(renormalize=renormalize, capacity_factor=2.0)
  params = _init(block, x)
  logits = jnp.einsum('bld,de->ble', x, params['router']).reshape(-1, 4)
  weights, experts = routing.top_k_gating(logits, 2, renormalize)
  want = routing.moe_mlp_loop(x.reshape(-1, EMB), weights, experts, _expert_fn(params), 4)
  _close(_apply(block, params, x)[0].reshape(-1, EMB), want)


def test_capacity_drops_overflow_in_gshard_priority_order():
  x = _x(3)
  block = _block(capacity_factor=0.5)  # capacity ceil(2 * 12 * 0.5 / 4) = 3 of 6 per expert
  params = _init(block, x)
  out, stats = _apply(block, params, x)
  logits = np.asarray(jnp.einsum('bld,de->ble', x, params['router']))
  weights, experts = (np.asarray(a) for a in routing.top_k_gating(
      jnp.asarray(logits.reshape(-1, 4)), 2))
  weights, experts = weights.reshape(BATCH, LENGTH, 2), experts.reshape(BATCH, LENGTH, 2)
  cap = moe.expert_capacity(LENGTH, 2, 4, 0.5)
  keep = np.zeros((BATCH, LENGTH, 2), bool)
  for b in range(BATCH):
    used = [0] * 4
    for choice in range(2):  # all first choices, then all second choices
      for t in range(LENGTH):
        e = experts[b, t, choice]
        keep[b, t, choice] = used[e] < cap
        used[e] += 1
  fn = _expert_fn(params)
  want = np.zeros((BATCH, LENGTH, EMB))
  for b in range(BATCH):
    for t in range(LENGTH):
      for choice in range(2):
        if keep[b, t, choice]:
          want[b, t] += weights[b, t, choice] * np.asarray(fn(experts[b, t, choice], x[b, t]))
  _close(out, want)
  assert 0 < float(stats['dropped_fraction'][0]) == pytest.approx(1 - keep.mean())


def test_expert_choice_fills_every_expert_exactly():
  x = _x(1)
  block = _block(router=cfg.RouterKind.EXPERT_CHOICE, num_selected=1, capacity_factor=1.0)
  params = _init(block, x)
  probs = jax.nn.softmax(jnp.einsum('bld,de->ble', x, params['router']), axis=-1)
  cap = moe.expert_capacity(LENGTH, 1, 4, 1.0)
  dispatch, gates = moe.expert_choice_dispatch(probs, cap)
  dispatch = np.asarray(dispatch)
  # Every (sequence, expert) has exactly `cap` slots, each holding one distinct token.
  np.testing.assert_array_equal(dispatch.sum(axis=(2, 3)), cap)
  np.testing.assert_array_equal(dispatch.sum(axis=3), 1)
  assert (dispatch.sum(axis=2) <= 1).all()
  fn = _expert_fn(params)
  want = np.zeros((BATCH, LENGTH, EMB))
  for b in range(BATCH):
    for e in range(4):
      for c in range(cap):
        t = int(np.argmax(dispatch[b, e, c]))
        want[b, t] += float(gates[b, e, c]) * np.asarray(fn(e, x[b, t]))
  out, stats = _apply(block, params, x)
  _close(out, want)
  assert float(stats['load_balance_loss'][0]) == 0.0


def test_hash_routing_is_a_fixed_function_of_the_token():
  ids = _token_ids()
  experts = np.asarray(moe.hash_experts(ids, 8))
  assert experts.min() >= 0 and experts.max() < 8
  for tok in np.unique(np.asarray(ids)):
    assert len(set(experts[np.asarray(ids) == tok])) == 1
  spread = np.asarray(moe.hash_experts(jnp.arange(4000), 8))
  assert np.bincount(spread, minlength=8).min() > 400  # roughly uniform over experts
  x = _x()
  block = _block(router=cfg.RouterKind.HASH, num_selected=1, capacity_factor=4.0)
  params = _init(block, x, ids)
  assert 'router' not in params
  fn = _expert_fn(params)
  experts = np.asarray(moe.hash_experts(ids, 4))
  want = np.stack([np.stack([np.asarray(fn(int(experts[b, t]), x[b, t])) for t in range(LENGTH)])
                   for b in range(BATCH)])
  _close(_apply(block, params, x, ids)[0], want)
  with pytest.raises(ValueError, match='hash routing needs the token ids'):
    _apply(block, params, x)


def test_shared_experts_add_a_dense_mlp():
  x = _x()
  block = _block(num_shared_experts=2, capacity_factor=2.0)
  params = _init(block, x)
  routed = _block(capacity_factor=2.0)
  shared = layers.MlpBlock(2 * MLP, cfg.MlpKind.SWIGLU)
  want = (_apply(routed, {k: v for k, v in params.items() if k != 'shared_mlp'}, x)[0] +
          shared.apply({'params': params['shared_mlp']}, x))
  _close(_apply(block, params, x)[0], want)


def test_router_losses_match_their_formulas():
  x = _x(2)
  block = _block()
  params = _init(block, x)
  _, stats = _apply(block, params, x)
  logits = np.asarray(jnp.einsum('bld,de->ble', x, params['router']), np.float64).reshape(-1, 4)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top2 = np.argsort(-probs, axis=-1)[:, :2]
  fraction = np.bincount(top2.reshape(-1), minlength=4) / top2.size
  lb = 4 * np.sum(fraction * probs.mean(0))
  lse = np.log(np.exp(logits).sum(-1))
  assert float(stats['load_balance_loss'][0]) == pytest.approx(lb, rel=1e-5)
  assert float(stats['router_z_loss'][0]) == pytest.approx(np.mean(lse ** 2), rel=1e-5)
  assert float(stats['expert_load'][0]) == pytest.approx(fraction.max() * 4, rel=1e-6)


@pytest.mark.parametrize('interval,scan', [(1, True), (2, True), (2, False)])
def test_moe_model_logs_one_statistic_per_moe_layer(interval, scan):
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(
      num_layers=4, num_experts=4, moe_layer_interval=interval, scan_layers=scan))
  batch = tu.random_batch(model, 2, {'targets': 16})
  params = tu.init_params(model, batch)
  moe_layers = [k for k in jax.tree_util.tree_flatten_with_path(params)[0]
                if 'router' in jax.tree_util.keystr(k[0])]
  assert len(moe_layers) == 1 if scan else 4 // interval
  loss_sum, metrics = model.loss_fn(params, batch)
  names = sorted(k for k in metrics if k.startswith('moe/load_balance_loss/'))
  assert len(names) == 4 // interval
  stats = {k.split('/')[1]: [] for k in metrics if k.startswith('moe/')}
  for k, m in metrics.items():
    if k.startswith('moe/'):
      stats[k.split('/')[1]].append(float(m.compute()))
  want = (model.config.load_balance_loss_weight * sum(stats['load_balance_loss']) +
          model.config.router_z_loss_weight * sum(stats['router_z_loss']))
  assert float(metrics['moe_loss'].compute()) == pytest.approx(want, rel=1e-5)
  assert math.isfinite(float(loss_sum))


@pytest.mark.parametrize('overrides,message', [
    (dict(num_experts=4, num_experts_per_token=5), 'num_experts_per_token=5 must be between 1'),
    (dict(num_experts=4, capacity_factor=0.0), 'capacity_factor=0.0 must be > 0'),
    (dict(num_experts=4, capacity_factor=-1.0), 'capacity_factor=-1.0 must be > 0'),
    (dict(num_experts=4, moe_layer_interval=3), 'moe_layer_interval=3 must divide num_layers=2'),
    (dict(num_experts=4, router='hash'), 'router=hash routes each token to one expert'),
    (dict(num_experts=4, router='expert_choice', moe_impl='dropless'),
     'router=expert_choice fills fixed capacities'),
    (dict(num_experts=4, router='top2'), "router='top2' is not one of"),
])
def test_bad_moe_configs_fail_with_one_line(overrides, message):
  with pytest.raises(cfg.ConfigError, match=message):
    tu.tiny_decoder(**overrides)


def test_encoder_layers_must_divide_by_the_moe_interval():
  with pytest.raises(cfg.ConfigError, match='moe_layer_interval=2 must divide '
                     'num_encoder_layers=3'):
    tu.tiny_encdec(num_layers=2, num_encoder_layers=3, num_experts=4, moe_layer_interval=2)


@pytest.fixture(scope='module')
def mixtral_like():
  """A tiny Mixtral-style decoder (8 experts, top-2, GQA) and its one-device results."""
  def make(impl):
    return model_lib.DecoderOnlyModel(tu.tiny_decoder(
        num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8, num_experts_per_token=2,
        moe_impl=impl, capacity_factor=1.0))
  batch = tu.random_batch(make('capacity'), 8, {'targets': 16}, seed=3, packed=True)
  params = tu.init_params(make('capacity'), batch)
  want = {impl: _loss_and_grads(make(impl), params, batch)
          for impl in ('capacity', 'ragged_dot', 'dropless')}
  return make, batch, params, want


def _loss_and_grads(model, params, batch):
  def mean_loss(p):
    loss_sum, metrics = model.loss_fn(p, batch)
    return loss_sum / metrics['loss'].weight
  return jax.jit(jax.value_and_grad(mean_loss))(params)


# (data, fsdp, tensor, expert)
EP_MESHES = [(8, 1, 1, 1), (4, 1, 1, 2), (2, 1, 1, 4), (1, 1, 1, 8), (1, 2, 2, 2)]


# The Pallas grouped matmul (interpreted here) runs per device in shard_map on
# any mesh, so two meshes cover it: no expert axis, and expert x fsdp x tensor.
@pytest.mark.rotate(2)
@pytest.mark.parametrize('impl,mesh', [(impl, m) for impl in ('capacity', 'ragged_dot')
                                       for m in EP_MESHES] +
                         [('dropless', (2, 2, 2, 1)), ('dropless', (1, 2, 2, 2))])
def test_expert_parallel_equals_single_device(mixtral_like, impl, mesh):
  from partitioning import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from partitioning import partitioner as partitioner_lib  # pylint: disable=g-import-not-at-top
  make, batch, params, want = mixtral_like
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh(mesh))
  with part.context():
    got = _loss_and_grads(make(impl), params, part.shard_batch(batch, 8))
  (gl, gg), (wl, wg) = got, want[impl]
  np.testing.assert_allclose(gl, wl, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gg), jax.tree.leaves(wg)):
    diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert diff <= 1e-5 * float(np.max(np.abs(b))) + 1e-8, jax.tree_util.keystr(path)


def test_expert_weights_and_optimizer_state_are_split_over_the_expert_axis():
  from partitioning import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from partitioning import partitioner as partitioner_lib  # pylint: disable=g-import-not-at-top
  from t5x_like import optimizers  # pylint: disable=g-import-not-at-top
  from t5x_like import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(num_experts=8, num_experts_per_token=2))
  batch = tu.random_batch(model, 8, {'targets': 16})
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 2, 1, 4)))
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-3), part,
                                {k: v.shape for k, v in batch.items()})
  shardings = trainer.state_shardings
  expert_leaves = 0
  for tree in (shardings.params, shardings.opt_state):
    for path, s in jax.tree_util.tree_leaves_with_path(tree):
      name = jax.tree_util.keystr(path)
      if '/moe/' in name.replace("']['", '/') and any(w in name for w in ('wi_0', 'wi_1', 'wo')):
        assert s.spec[1] == 'expert', (name, s.spec)  # [layers, expert, ...]
        expert_leaves += 1
  assert expert_leaves >= 6  # params and both Adam moments of wi_0, wi_1, wo
