"""NF4 and int8 blockwise quantization (QLoRA's frozen base) against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from models import peft
from models import quantization

import testing_utils as tu

# Appendix E of Dettmers et al. (2023), QLoRA: the NF4 data type.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.2461123019456863, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_levels_are_the_papers():
  np.testing.assert_allclose(quantization.nf4_levels(), PAPER_NF4, atol=1e-6)


def _reference_blockwise(w, levels, block):
  """Plain numpy: scale each block by its absmax, round to the nearest level, scale back."""
  flat = np.asarray(w, np.float64).reshape(-1, block)
  absmax = np.abs(flat).max(axis=1, keepdims=True)
  normed = flat / absmax
  idx = np.abs(normed[..., None] - np.asarray(levels)[None, None]).argmin(-1)
  return (np.asarray(levels)[idx] * absmax).reshape(np.shape(w)), absmax


def test_nf4_and_int8_errors_of_a_gaussian_matrix():
  w = jax.random.normal(jax.random.PRNGKey(0), (512, 256), jnp.float32)
  errors = {}
  for kind, levels in (('nf4', PAPER_NF4), ('int8', np.arange(-127, 128) / 127),
                       ('int4', np.arange(-7, 8) / 7)):
    want, _ = _reference_blockwise(w, levels, 64)
    if kind != 'int4':
      stored = quantization.quantize(w, kind, 64)
      got = np.asarray(quantization.dequantize(stored, w.shape))
      # Equal to the plain construction up to the double quantization of the maxima.
      tol = 0.01 if kind == 'nf4' else 1e-6
      assert np.mean(np.abs(got - want)) < tol * np.mean(np.abs(np.asarray(w)))
      errors[kind] = float(np.mean(np.abs(got - np.asarray(w))))
      bytes_per_weight = quantization.stored_bytes(stored) / w.size
      assert bytes_per_weight == pytest.approx({'nf4': 0.516, 'int8': 1.0625}[kind], abs=1e-3)
    else:
      errors[kind] = float(np.mean(np.abs(want - np.asarray(w))))
  print('mean abs error of N(0, 1) weights, blocks of 64:', errors, '(f32: 0)')
  # NF4 spends its 16 levels where normal weights are: better than uniform 4-bit.
  assert errors['int8'] < errors['nf4'] < errors['int4']
  assert errors['nf4'] == pytest.approx(0.0729, rel=0.03)


def test_double_quantized_maxima_are_close():
  w = jax.random.normal(jax.random.PRNGKey(1), (1000, 70)) * 0.02
  stored = quantization.quantize(w, 'nf4', 64)  # 70000 weights: padded to whole blocks
  _, absmax = _reference_blockwise(jnp.pad(jnp.ravel(w), (0, -w.size % 64)), PAPER_NF4, 64)
  np.testing.assert_allclose(quantization.block_maxima(stored), absmax[:, 0], rtol=0.01,
                             atol=1e-6)
  assert quantization.dequantize(stored, w.shape).shape == w.shape


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_stored_bits_do_not_depend_on_the_mesh(kind):
  # A QLoRA run's frozen base is checked by digest on resume, perhaps on another mesh.
  # (A mean of the block maxima, as in bitsandbytes, differs here in its last bits.)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('x',))
  quantize = jax.jit(lambda x: quantization.quantize(x, kind, 64))
  for seed, shape in ((0, (2048, 128)), (1, (2048, 128)), (1, (1000, 64))):
    w = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * 0.02
    want = quantization.quantize(w, kind, 64)
    sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x')))
    for got in (quantize(w), quantize(sharded)):
      for name, x in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(x), err_msg=name)


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
@pytest.mark.parametrize('dim', [128, 96])  # rows of whole blocks (gathered), or not
def test_dequantized_rows_equal_the_dequantized_table(kind, dim):
  table = jax.random.normal(jax.random.PRNGKey(1), (50, dim), jnp.float32)
  stored = quantization.quantize(table, kind, 64)
  ids = jnp.asarray([[0, 49, 7], [7, 3, 3]])
  want = jnp.take(quantization.dequantize(stored, table.shape), ids, axis=0)
  got = quantization.dequantize_rows(stored, table.shape, ids, 64)
  np.testing.assert_array_equal(got, want)


MOE = dict(num_experts=4, num_experts_per_token=2, moe_layer_interval=1, num_shared_experts=1)


@pytest.mark.rotate(2)
@pytest.mark.parametrize('scan,embeddings,tie,moe', [
    (True, True, False, False), (False, False, False, False), (False, True, True, False),
    (True, True, True, True), (False, False, False, True)])
def test_qlora_starts_as_the_dequantized_base(scan, embeddings, tie, moe):
  q = cfg.PeftConfig(method='lora', targets='.', quantization='nf4',
                     quantize_embeddings=embeddings)
  overrides = dict(scan_layers=scan, tie_embeddings=tie, **(MOE if moe else {}))
  base = model_lib.DecoderOnlyModel(tu.tiny_decoder(**overrides))
  qlora = model_lib.DecoderOnlyModel(tu.tiny_decoder(peft=q, **overrides))
  batch = tu.random_batch(base, 2, {'targets': 16})
  base_params = tu.init_params(base, batch)
  fresh = tu.init_params(qlora, batch)
  quantized = peft.quantize_like(base_params, jax.eval_shape(lambda: fresh), q)
  flat = peft.flat(quantized)
  assert set(flat) == set(peft.flat(peft.split(fresh, qlora.added_pattern())[1]))
  vocab = ['token_embedder/embedding'] + ([] if tie else ['decoder/logits_dense/kernel'])
  for name in vocab:  # the vocabulary-sized matrices: quantized unless told otherwise
    assert (name in flat) != embeddings and (f'{name}_codes' in flat) == embeddings, name
  # Every other matrix (dense kernels, the experts' weights) is stored quantized.
  assert not [k for k in flat if k.endswith(('/kernel', '/wi_0', '/wi_1', '/wo'))
              and 'logits_dense' not in k]
  assert any(k.endswith('/wi_0_codes') for k in flat) == moe
  params = peft.combine(peft.split(fresh, qlora.added_pattern())[0], quantized)
  plain = jax.eval_shape(lambda: base_params)
  dequantized = peft.dequantize_like(quantized, plain)
  assert jax.tree.structure(dequantized) == jax.tree.structure(plain)
  np.testing.assert_allclose(qlora.apply(params, batch), base.apply(dequantized, batch),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides', [
    dict(emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024, num_layers=4),
    # The vocabulary-sized matrices dominate (as in a small model with a 32k vocabulary).
    dict(vocab_size=8192, emb_dim=128, num_heads=2, head_dim=64, mlp_dim=256, num_layers=2,
         tie_embeddings=False),
    dict(emb_dim=128, num_heads=2, head_dim=64, mlp_dim=256, num_layers=2, **MOE),
])
def test_stored_bytes_per_frozen_base_parameter(overrides):
  q = cfg.PeftConfig(method='lora', quantization='nf4')
  base = model_lib.DecoderOnlyModel(tu.tiny_decoder(**overrides))
  qlora = model_lib.DecoderOnlyModel(tu.tiny_decoder(peft=q, **overrides))
  shapes = lambda m: jax.eval_shape(lambda: tu.init_params(m, m.dummy_batch(1, {'targets': 8})))
  base_flat = peft.flat(shapes(base))
  frozen = peft.flat(peft.split(shapes(qlora), qlora.added_pattern())[1])
  nbytes = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
  # Each quantized matrix: 4 bits per weight plus the double-quantized block maxima.
  matrices = sum(x.size for k, x in base_flat.items() if f'{k}_codes' in frozen)
  assert nbytes(v for k, v in frozen.items() if '_codes' in k or '_absmax' in k) / matrices \
      == pytest.approx(0.516, abs=2e-3)
  # The whole frozen base (the norms and the router stay f32).
  ratio = nbytes(frozen.values()) / sum(x.size for x in base_flat.values())
  assert ratio <= 0.6, ratio
  # QLoRA paper style (embedding and output layer in f32) is allowed, but not this small.
  if 'vocab_size' in overrides:
    paper = model_lib.DecoderOnlyModel(tu.tiny_decoder(
        peft=cfg.PeftConfig(method='lora', quantization='nf4', quantize_embeddings=False),
        **overrides))
    frozen = peft.flat(peft.split(shapes(paper), paper.added_pattern())[1])
    assert nbytes(frozen.values()) / sum(x.size for x in base_flat.values()) > 1.5
