"""Checkpoint retention and restore onto an abstract target."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like import checkpoints


def test_keep_last_n_plus_every_k(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, keep_period=4, async_save=False)
  state = {'w': jnp.arange(4.0)}
  for step in range(1, 11):
    ckpt.save(step, jax.tree.map(lambda x: x + step, state), {'batches_consumed': step})
  ckpt.close()
  kept = sorted(int(n) for n in os.listdir(checkpoints.checkpoint_dir(str(tmp_path))) if n.isdigit())
  assert kept == [4, 8, 9, 10]
  assert checkpoints.latest_step(str(tmp_path)) == 10
  again = checkpoints.Checkpointer(str(tmp_path))
  abstract = {'w': jax.ShapeDtypeStruct((4,), jnp.float32)}
  restored = again.restore(8, abstract)
  again.close()
  np.testing.assert_array_equal(restored.state['w'], np.arange(4.0) + 8)
  assert restored.data == {'batches_consumed': 8} and restored.verified
