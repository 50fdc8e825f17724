"""Sharded training equals single-device training; accumulation equals one big batch.

The parameter comparisons use SGD with momentum: its update is linear in the
gradient, so summation-order noise (~1e-7 relative) stays that small. Adam
divides by sqrt(v) and turns that noise on near-zero gradients into visible
parameter differences, so with AdamW the test compares the per-step losses.
"""

import jax
import numpy as np
import pytest

from models import model as model_lib
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import optimizers
from t5x_like import trainer as trainer_lib

import testing_utils as tu

MESHES = [(8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 2, 4)]
STEPS = 3


def _setup(encdec):
  if encdec:
    model = model_lib.EncoderDecoderModel(tu.tiny_encdec(position_encoding='t5_bias'))
    lengths = {'inputs': 32, 'targets': 32}
  else:
    model = model_lib.DecoderOnlyModel(tu.tiny_decoder(num_kv_heads=1, mlp_dim=64))
    lengths = {'targets': 32}
  batches = [tu.random_batch(model, 8, lengths, seed=s, packed=True) for s in range(STEPS)]
  return model, batches


def _run(model, batches, mesh, num_microbatches=1, optimizer=None, split_update=None,
         all_metrics=None):
  devices = jax.devices()[:int(np.prod(mesh))]
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh(mesh, devices=devices))
  shapes = {k: v.shape for k, v in batches[0].items()}
  opt = optimizer or optimizers.sgd(0.5, momentum=0.9)
  trainer = trainer_lib.Trainer(model, opt, part, shapes, num_microbatches=num_microbatches,
                                split_update=split_update)
  state = trainer.init_state()
  def mean_loss(p, b):  # the loss the trainer optimises: per target token
    loss_sum, metrics = model.loss_fn(p, b)
    return loss_sum / metrics['loss'].weight
  grad_fn = jax.jit(jax.grad(mean_loss))
  first_grads = None
  losses = []
  for b in batches:
    gb = trainer.shard_batch(b)
    if first_grads is None:
      with part.context():
        first_grads = jax.device_get(grad_fn(state.params, gb))
    state, metrics = trainer.jit_train_step(state, gb)
    losses.append(float(metrics['loss'].compute()))
    if all_metrics is not None:
      all_metrics.append({k: float(v.compute()) for k, v in metrics.items()})
  return losses, first_grads, jax.device_get(state.params), trainer


@pytest.fixture(scope='module', params=[False, True], ids=['decoder', 'encdec'])
def reference(request):
  model, batches = _setup(request.param)
  return model, batches, _run(model, batches, (1, 1, 1))


@pytest.mark.rotate(2)
@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_equals_single_device(reference, mesh):
  model, batches, (losses, grads, params, _) = reference
  s_losses, s_grads, s_params, trainer = _run(model, batches, mesh)
  np.testing.assert_allclose(s_losses, losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree.leaves(s_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Parameters really are sharded (FSDP / tensor meshes): no device holds the embedding whole.
  if mesh[1] > 1 or mesh[2] > 1:
    state = trainer.init_state()
    leaf = state.params['token_embedder']['embedding']
    assert leaf.addressable_shards[0].data.size < leaf.size


def test_adamw_sharded_losses_equal_single_device():
  model, batches = _setup(False)
  adamw = lambda: optimizers.adamw(1e-2, weight_decay=0.1)
  losses = _run(model, batches, (1, 1, 1), optimizer=adamw())[0]
  np.testing.assert_allclose(_run(model, batches, (2, 2, 2), optimizer=adamw())[0], losses, rtol=1e-5)


@pytest.mark.parametrize('mesh', [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
def test_split_update_equals_one_program(mesh, opt):
  """The step as two programs (gradient, then update: the CPU default) gives the
  one program's parameters, optimizer state and every metric."""
  model, batches = _setup(False)
  optimizer = (optimizers.sgd(0.5, momentum=0.9) if opt == 'sgd' else
               optimizers.adamw(optimizers.warmup_cosine(1e-2, 1, STEPS), clip_norm=0.5))
  runs = []
  for split in (False, True):
    metrics = []
    _, _, params, trainer = _run(model, batches, mesh, optimizer=optimizer, split_update=split,
                                 all_metrics=metrics)
    assert len(trainer._train_programs) == (2 if split else 1)
    runs.append((params, metrics))
  (p1, m1), (p2, m2) = runs
  for a, b in zip(m1, m2):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_full_batch(reference):
  model, batches, (losses, _, params, _) = reference
  a_losses, _, a_params, _ = _run(model, batches, (2, 2, 2), num_microbatches=2)
  np.testing.assert_allclose(a_losses, losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(a_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_adafactor_trains_sharded():
  model, batches = _setup(False)
  losses, _, _, _ = _run(model, batches * 2, (1, 2, 4), optimizer=optimizers.adafactor(1e-2))
  assert losses[-1] < losses[0]


def test_microbatch_that_does_not_divide_fails():
  model, batches = _setup(False)
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((8, 1, 1)))
  shapes = {k: v.shape for k, v in batches[0].items()}
  with pytest.raises(partitioner_lib.BatchError, match='microbatch size 4'):
    trainer_lib.Trainer(model, optimizers.adamw(), part, shapes, num_microbatches=2)
