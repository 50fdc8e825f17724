"""DPO and IPO: the loss is the paper's formula; the reference is the starting policy; a
sharded DPO step equals a single-device one."""

import jax
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from models import peft
from models import preference
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import optimizers
from t5x_like import trainer as trainer_lib

import testing_utils as tu

LENGTHS = {'inputs': 8, 'chosen': 8, 'rejected': 8}


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_losses_are_the_papers_formulas():
  pc, pr = np.array([-3.0, -5.0, -1.0]), np.array([-4.0, -2.0, -1.5])
  rc, rr = np.array([-3.5, -4.0, -2.0]), np.array([-3.0, -2.5, -1.0])
  beta = 0.1
  loss, chosen, rejected = preference.preference_loss(pc, pr, rc, rr, beta)
  # Rafailov et al. (2023), eq. 7: -log sigma(beta log(pi(yw)/ref(yw)) - beta log(pi(yl)/ref(yl)))
  want = -_log_sigmoid(beta * np.log(np.exp(pc) / np.exp(rc)) - beta * np.log(np.exp(pr) /
                                                                               np.exp(rr)))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(chosen, beta * (pc - rc), rtol=1e-6)
  np.testing.assert_allclose(rejected, beta * (pr - rr), rtol=1e-6)
  # Azar et al. (2023), IPO: (h - 1 / (2 tau))^2.
  loss, _, _ = preference.preference_loss(pc, pr, rc, rr, beta, preference.PreferenceLoss.IPO)
  np.testing.assert_allclose(loss, ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2, rtol=1e-6)


def _pair_batch(model, n=4, seed=0):
  """Hand-made pairs: each row's prompt is shared, the responses differ; row 3 is padding."""
  rng = np.random.RandomState(seed)
  batch = model.dummy_batch(n, LENGTHS)
  length = batch['chosen_decoder_target_tokens'].shape[1]
  for r in range(n - 1):
    p = rng.randint(3, 8)
    prompt = rng.randint(2, 200, p)
    for side in preference.SIDES:
      resp = rng.randint(2, 200, rng.randint(2, 8))
      seq = np.concatenate([prompt, resp, [1]])[:length]
      tgt = np.zeros(length, np.int32)
      tgt[:len(seq)] = seq
      batch[f'{side}_decoder_target_tokens'][r] = tgt
      batch[f'{side}_decoder_input_tokens'][r] = np.concatenate([[0], tgt[:-1]])
      w = np.zeros(length, np.int32)
      w[p:len(seq)] = 1
      batch[f'{side}_decoder_loss_weights'][r] = w
      batch[f'{side}_decoder_causal_attention'][r] = 0
  for k in list(batch):
    if k.endswith(('positions', 'segment_ids')):
      del batch[k]
  return batch


def test_dpo_loss_equals_a_direct_implementation():
  policy = model_lib.DecoderOnlyModel(tu.tiny_decoder())
  dpo = preference.DpoModel(policy, beta=0.5)
  batch = _pair_batch(dpo)
  params = tu.init_params(dpo, batch)
  params['reference'] = tu.init_params(policy, {k[len('chosen_'):]: v for k, v in batch.items()
                                                 if k.startswith('chosen_')}, seed=5)
  loss_sum, metrics = jax.jit(dpo.loss_fn)(params, batch)
  # Directly: the log-likelihoods by the model's own scoring path, then the formula.
  side = lambda s: {k[len(s) + 1:]: v for k, v in batch.items() if k.startswith(s + '_')}
  policy_params = {k: v for k, v in params.items() if k != 'reference'}
  logp = {s: np.asarray(policy.score_batch(policy_params, side(s))) for s in preference.SIDES}
  ref = {s: np.asarray(policy.score_batch(params['reference'], side(s)))
         for s in preference.SIDES}
  h = (logp['chosen'] - ref['chosen']) - (logp['rejected'] - ref['rejected'])
  per_pair = -_log_sigmoid(0.5 * h)[:3]  # row 3 is padding: no pair
  np.testing.assert_allclose(float(loss_sum), per_pair.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss'].compute()), per_pair.mean(), rtol=1e-5)
  margin = 0.5 * h[:3]
  np.testing.assert_allclose(float(metrics['rewards/margin'].compute()), margin.mean(),
                             rtol=1e-5, atol=1e-6)
  assert float(metrics['pairs'].compute()) == 3
  np.testing.assert_allclose(float(metrics['rewards/accuracy'].compute()),
                             np.mean(0.5 * (1 + np.sign(margin))), atol=1e-6)
  assert float(metrics['kl'].compute()) > 0


@pytest.mark.parametrize('peft_config', [
    None, cfg.PeftConfig(method='lora', targets='.'),
    cfg.PeftConfig(method='lora', targets='.', quantization='nf4'),
    cfg.PeftConfig(method='adapters')], ids=['full', 'lora', 'qlora', 'adapters'])
def test_at_the_start_the_policy_is_the_reference(peft_config):
  policy = model_lib.DecoderOnlyModel(tu.tiny_decoder(peft=peft_config))
  dpo = preference.DpoModel(policy, beta=0.1)
  batch = _pair_batch(dpo)
  params = dpo.with_reference(tu.init_params(dpo, batch))
  assert ('reference' in params) == (peft_config is None)
  _, metrics = jax.jit(dpo.loss_fn)(params, batch)
  np.testing.assert_allclose(float(metrics['loss'].compute()), np.log(2), rtol=1e-6)
  assert float(metrics['kl'].compute()) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics['rewards/accuracy'].compute()) == 0.5
  assert dpo.trainable_pattern() == ('^(?!reference/)' if peft_config is None else
                                     peft.trainable_pattern(peft_config))


def test_precomputed_reference_reads_the_batch():
  policy = model_lib.DecoderOnlyModel(tu.tiny_decoder())
  dpo = preference.DpoModel(policy, beta=0.2, loss='ipo', reference='precomputed')
  batch = _pair_batch(dpo)
  batch['reference_chosen_log_likelihood'][:] = [-10.0, -20.0, -30.0, 0.0]
  batch['reference_rejected_log_likelihood'][:] = [-11.0, -19.0, -35.0, 0.0]
  params = tu.init_params(dpo, batch)
  assert 'reference' not in params
  loss_sum, metrics = jax.jit(dpo.loss_fn)(params, batch)
  side = lambda s: {k[len(s) + 1:]: v for k, v in batch.items() if k.startswith(s + '_')}
  lc, lr = (np.asarray(policy.score_batch(params, side(s)))[:3] for s in preference.SIDES)
  h = (lc - batch['reference_chosen_log_likelihood'][:3]) - (
      lr - batch['reference_rejected_log_likelihood'][:3])
  np.testing.assert_allclose(float(loss_sum), np.sum((h - 1 / 0.4) ** 2), rtol=1e-5)
  assert 'kl' not in metrics


def test_bad_settings_fail_in_one_line():
  policy = model_lib.DecoderOnlyModel(tu.tiny_decoder())
  with pytest.raises(cfg.ConfigError, match=r'beta=0 must be > 0'):
    preference.DpoModel(policy, beta=0)
  with pytest.raises(cfg.ConfigError, match="loss='dp' is not one of"):
    preference.DpoModel(policy, loss='dp')
  with pytest.raises(cfg.ConfigError, match="needs a length for 'rejected'"):
    preference.DpoModel(policy).check_lengths({'inputs': 8, 'chosen': 8})


def _run(dpo, batches, mesh):
  devices = jax.devices()[:int(np.prod(mesh))]
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh(mesh, devices=devices))
  shapes = {k: v.shape for k, v in batches[0].items()}
  trainer = trainer_lib.Trainer(dpo, optimizers.sgd(0.5, momentum=0.9), part, shapes)
  state = trainer.init_state()
  # Move the policy off the reference so the first step has a non-trivial loss.
  params = jax.device_get(state.params)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  params = peft.unflat({k: v if k.startswith('reference/') else
                        v + 0.05 * jax.random.normal(next(keys), v.shape)
                        for k, v in peft.flat(params).items()})
  state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
  grad_fn = jax.jit(jax.grad(lambda t, f, b: (lambda l, m: l / m['loss'].weight)(
      *dpo.loss_fn(trainer.combine(t, f), b))))
  gb = trainer.shard_batch(batches[0])
  with part.context():
    grads = jax.device_get(grad_fn(trainer.trainable(state.params), trainer.frozen(state.params),
                                   gb))
  losses = []
  for b in batches:
    state, metrics = trainer.jit_train_step(state, trainer.shard_batch(b))
    losses.append(float(metrics['loss'].compute()))
  return losses, grads


@pytest.fixture(scope='module')
def dpo_reference():
  dpo = preference.DpoModel(model_lib.DecoderOnlyModel(tu.tiny_decoder(num_kv_heads=1)))
  batches = [_pair_batch(dpo, 8, seed=s) for s in range(3)]
  return dpo, batches, _run(dpo, batches, (1, 1, 1))


@pytest.mark.parametrize('mesh', [(2, 2, 2), (1, 2, 4)])
def test_dpo_sharded_equals_single_device(dpo_reference, mesh):
  dpo, batches, (losses, grads) = dpo_reference
  s_losses, s_grads = _run(dpo, batches, mesh)
  np.testing.assert_allclose(s_losses, losses, rtol=1e-5)
  assert not any(k.startswith('reference/') for k in peft.flat(grads))
  for k, g in peft.flat(grads).items():
    np.testing.assert_allclose(peft.flat(s_grads)[k], g, rtol=1e-4, atol=1e-6, err_msg=k)


def test_reward_model_bradley_terry_loss():
  policy = model_lib.DecoderOnlyModel(tu.tiny_decoder())
  rm = preference.RewardModel(policy)
  batch = _pair_batch(rm)
  params = tu.init_params(rm, batch)
  assert params['decoder']['reward_head'].shape == (32,)
  assert rm.added_pattern().startswith('(^|/)reward_head$')
  _, metrics = jax.jit(rm.loss_fn)(params, batch)
  np.testing.assert_allclose(float(metrics['loss'].compute()), np.log(2), rtol=1e-6)  # r = 0
  params['decoder']['reward_head'] = jax.random.normal(jax.random.PRNGKey(0), (32,))
  loss_sum, metrics = jax.jit(rm.loss_fn)(params, batch)
  side = lambda s: preference.side_batch(batch, s)
  r = {s: np.asarray(rm.rewards(params, side(s))) for s in preference.SIDES}
  np.testing.assert_allclose(float(loss_sum), np.sum(-_log_sigmoid((r['chosen'] - r['rejected'])[:3])),
                             rtol=1e-5)
  assert r['chosen'][3] == 0.0  # the padding row
  # The reward is read at each row's last response token: what follows it changes nothing.
  b = dict(side('chosen'))
  last = int(np.max(np.nonzero(b['decoder_loss_weights'][0])[0]))
  changed = dict(b, decoder_input_tokens=b['decoder_input_tokens'].copy())
  changed['decoder_input_tokens'][0, last + 1:] = 7
  assert rm.rewards(params, changed)[0] == pytest.approx(float(r['chosen'][0]), abs=1e-6)
  changed['decoder_input_tokens'][0, last] = 9
  assert rm.rewards(params, changed)[0] != pytest.approx(float(r['chosen'][0]), abs=1e-6)
  with pytest.raises(cfg.ConfigError, match='decoder-only'):
    preference.RewardModel(model_lib.EncoderDecoderModel(tu.tiny_encdec()))
