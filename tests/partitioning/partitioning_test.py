"""Mesh construction, the rule table, and logical names on every parameter."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models import model as model_lib
from partitioning import axes as ax
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from partitioning import rules as rules_lib
from t5x_like import optimizers

import testing_utils as tu


def test_mesh_shape_resolution():
  # Three sizes are (data, fsdp, tensor) with no expert parallelism.
  assert mesh_lib.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1, 1)
  assert mesh_lib.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2, 1)
  assert mesh_lib.resolve_mesh_shape((1, 2, 1, -1), 8) == (1, 2, 1, 4)
  assert dict(mesh_lib.create_mesh((1, 2, 4)).shape) == {'data': 1, 'fsdp': 2, 'tensor': 4,
                                                         'expert': 1}


def test_experts_must_divide_the_expert_axis():
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 1, 2, 4)))
  part.check_experts(8)
  part.check_experts(0)  # a dense model: the expert axis is data parallelism
  with pytest.raises(mesh_lib.MeshError, match='num_experts=6 is not divisible by the expert '
                     'mesh axis of size 4'):
    part.check_experts(6)
  # Batches split over data * fsdp * expert.
  assert part.data_parallel_size == 4


@pytest.mark.parametrize('shape,msg', [
    ((2, 2, 4), 'needs 16 devices but 8 are available'),
    ((3, -1, 1), 'not divisible by 3'),
    ((-1, -1, 1), 'more than one -1'),
    ((8, 1), 'has 2 entries'),
    ((8, 1, 1, 1, 1), 'has 5 entries'),
])
def test_bad_mesh_shapes_fail_clearly(shape, msg):
  with pytest.raises(mesh_lib.MeshError, match=msg):
    mesh_lib.create_mesh(shape)


def test_every_logical_name_has_a_rule():
  for fsdp in (True, False):
    for tensor in (True, False):
      names = [r[0] for r in rules_lib.standard_rules(fsdp=fsdp, tensor=tensor)]
      assert set(ax.LOGICAL) <= set(names)


@pytest.mark.parametrize('make,cls,lengths', [
    (lambda: tu.tiny_decoder(position_encoding='learned', max_length=32, use_bias=True,
                             norm='layer', embed_norm=True, tie_embeddings=False),
     model_lib.DecoderOnlyModel, {'targets': 8}),
    (lambda: tu.tiny_decoder(parallel_block=True, num_kv_heads=1, scan_layers=False),
     model_lib.DecoderOnlyModel, {'targets': 8}),
    (lambda: tu.tiny_encdec(position_encoding='t5_bias'), model_lib.EncoderDecoderModel,
     {'inputs': 8, 'targets': 8}),
])
def test_every_parameter_has_declared_names(make, cls, lengths):
  model = cls(make())
  boxed = jax.eval_shape(lambda: model.init_variables(
      jax.random.PRNGKey(0), model.dummy_batch(1, lengths))['params'])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), f'unnamed parameter {leaf}'
    assert len(leaf.names) == leaf.value.ndim, leaf.names
    assert set(leaf.names) <= set(ax.LOGICAL), leaf.names


def test_spec_replicates_dimensions_that_do_not_divide():
  p = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 2, 4)))
  assert p.spec((ax.EMBED, ax.HEADS, ax.HEAD_DIM), (32, 8, 16)) == P('fsdp', 'tensor', None)
  assert p.spec((ax.EMBED, ax.HEADS, ax.HEAD_DIM), (32, 2, 16)) == P('fsdp', None, None)
  # activations: batch takes fsdp first, so embed is not sharded twice; the
  # batch is split over the expert axis too (size 1 here)
  assert p.spec((ax.BATCH, ax.LENGTH, ax.EMBED)) == P(('data', 'fsdp', 'expert'), None, None)
  # expert weights take the expert axis; in expert-major activations the batch
  # falls back to (data, fsdp)
  assert p.spec((ax.EXPERT, ax.EMBED, ax.MLP), (8, 32, 64)) == P('expert', 'fsdp', 'tensor')
  assert p.spec((ax.EXPERT, ax.BATCH, None, ax.EMBED)) == P('expert', ('data', 'fsdp'), None,
                                                            None)


def test_adafactor_factored_state_follows_parameter_sharding():
  p = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 2, 4)))
  params = {'w': jax.ShapeDtypeStruct((256, 512), np.float32)}
  shardings = {'w': p.sharding((ax.EMBED, ax.MLP), (256, 512))}
  opt = optimizers.adafactor(min_dim_size_to_factor=128)
  abstract = jax.eval_shape(opt.tx.init, params)
  derived = p.derived_shardings(abstract, params, shardings)
  specs = {tuple(l.shape): s.spec for l, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(derived))}
  assert specs[(256,)] == P('fsdp')  # row statistics keep the embed sharding
  assert specs[(512,)] == P('tensor')  # column statistics keep the mlp sharding


def test_batch_divisibility_errors():
  p = partitioner_lib.Partitioner(mesh_lib.create_mesh((2, 2, 2)))
  with pytest.raises(partitioner_lib.BatchError, match='not divisible by the data-parallel size 4'):
    p.check_batch_size(6)
