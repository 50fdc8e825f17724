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


def test_streamed_arrays_are_written_piece_by_piece_and_restore_verified(tmp_path):
  """A Checkpointer(streamed=True) writes StreamedArrays one piece at a time, each
  piece its own chunk, and they restore (verified) as ordinary arrays on any sharding."""
  rng = np.random.RandomState(0)
  stacked = rng.randn(4, 6, 8).astype(np.float32)
  flat = rng.randn(10).astype(np.float32)
  made = []

  def layers():
    for i in range(4):
      made.append(i)
      yield stacked[i:i + 1]
  state = {'params': {
      'stacked': checkpoints.StreamedArray('stacked', stacked.shape, stacked.dtype, 1, layers),
      'flat': checkpoints.StreamedArray('flat', flat.shape, flat.dtype, 3,
                                        lambda: (flat[i:i + 3] for i in range(0, 10, 3))),
      'scalar': checkpoints.StreamedArray('scalar', (), np.int32, 1,
                                          lambda: iter([np.int32(7)]))}}
  ckpt = checkpoints.Checkpointer(str(tmp_path), streamed=True)
  ckpt.save(0, state, {'from': 'test'})
  ckpt.close()
  assert made == [0, 1, 2, 3] * 2  # digested, then written
  with checkpoints.open_read_only(checkpoints.checkpoint_dir(str(tmp_path))) as manager:
    saved = manager.item_metadata(0)['state']['params']
  assert saved['stacked'].storage.chunk_shape == (1, 6, 8)
  assert saved['flat'].storage.chunk_shape == (3,)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('a', 'b'))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a', None, 'b'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {'params': {
      'stacked': jax.ShapeDtypeStruct(stacked.shape, np.float32, sharding=sharding),
      'flat': jax.ShapeDtypeStruct(flat.shape, np.float32, sharding=replicated),
      'scalar': jax.ShapeDtypeStruct((), np.int32, sharding=replicated)}}
  restored = checkpoints.Checkpointer(str(tmp_path)).restore(0, abstract)
  assert restored.verified and restored.data == {'from': 'test'}
  np.testing.assert_array_equal(restored.state['params']['stacked'], stacked)
  np.testing.assert_array_equal(restored.state['params']['flat'], flat)
  assert int(restored.state['params']['scalar']) == 7
  assert restored.state['params']['stacked'].sharding == sharding
  assert checkpoints.verify(str(tmp_path)) == [(0, 'ok', checkpoints.verify(str(tmp_path))[0][2])]
