"""Layers against direct formulas: RoPE, norms, MLPs, dense, losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import config as cfg
from models import layers
from models import losses


def rope_direct(x, positions, rotary_dim, base=10_000.0):
  """Rotation of complex pairs (x[i], x[i + half]) by angle pos * base^(-2i/rotary_dim)."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  half = rotary_dim // 2
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(half):
        theta = positions[b, t] * base ** (-2 * i / rotary_dim)
        z = (x[b, t, :, i] + 1j * x[b, t, :, i + half]) * np.exp(1j * theta)
        out[b, t, :, i], out[b, t, :, i + half] = z.real, z.imag
  return out


@pytest.mark.parametrize('fraction', [1.0, 0.25])
def test_rope_matches_complex_rotation(fraction):
  r = np.random.RandomState(0)
  x = r.randn(2, 5, 3, 16).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4], [7, 0, 1, 30, 2]])
  rot = int(16 * fraction)
  got = layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), rot)
  np.testing.assert_allclose(got, rope_direct(x, pos, rot), rtol=1e-5, atol=1e-5)
  # dims past the rotary fraction pass through untouched (GPT-NeoX)
  np.testing.assert_array_equal(np.asarray(got)[..., rot:], x[..., rot:])


def test_rope_scores_depend_on_offset_only():
  r = np.random.RandomState(1)
  q = r.randn(1, 1, 1, 8).astype(np.float32)
  k = r.randn(1, 1, 1, 8).astype(np.float32)
  def score(m, n):
    qm = layers.apply_rope(q, jnp.array([[m]]), 8)
    kn = layers.apply_rope(k, jnp.array([[n]]), 8)
    return float(jnp.sum(qm * kn))
  np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-4)


def test_rope_scaling_rules():
  """Linear divides every frequency; llama3 keeps short wavelengths and divides long
  ones; yarn scales the rotated dims by its attention factor; dynamic changes only
  beyond the original length."""
  base = layers.Rope(16, 10_000.0).inv_freq()
  np.testing.assert_allclose(layers.Rope(16, scaling='linear', factor=4.0).inv_freq(),
                             base / 4, rtol=1e-6)
  l3 = layers.Rope(16, scaling='llama3', factor=8.0, original_max_length=64).inv_freq()
  wavelen = 2 * np.pi / base
  short, long = wavelen < 64 / 4.0, wavelen > 64 / 1.0
  np.testing.assert_allclose(l3[short], base[short], rtol=1e-6)
  np.testing.assert_allclose(l3[long], base[long] / 8, rtol=1e-6)
  assert ((l3 <= base + 1e-9) & (l3 >= base / 8 - 1e-9)).all()
  yarn = layers.Rope(16, scaling='yarn', factor=4.0, original_max_length=64)
  assert np.isclose(yarn.output_scale, 0.1 * np.log(4.0) + 1)
  x = np.random.RandomState(0).randn(1, 3, 1, 16).astype(np.float32)
  pos = jnp.array([[0, 0, 0]])  # at position 0 the rotation is the identity
  np.testing.assert_allclose(layers.apply_rope(x, pos, yarn), x * yarn.output_scale,
                             rtol=1e-6)
  dyn = layers.Rope(16, scaling='dynamic', factor=2.0, original_max_length=8)
  short_pos, long_pos = jnp.arange(8)[None], jnp.arange(20)[None]
  np.testing.assert_allclose(dyn.frequencies(short_pos), base, rtol=1e-6)
  grown = 10_000.0 * (2.0 * 20 / 8 - 1) ** (16 / 14)
  np.testing.assert_allclose(dyn.frequencies(long_pos),
                             grown ** (-np.arange(0, 16, 2) / 16), rtol=1e-5)


def test_exact_and_tanh_gelu():
  from scipy import special  # pylint: disable=g-import-not-at-top
  x = np.linspace(-4, 4, 101).astype(np.float32)
  exact = layers.activation(cfg.MlpKind.GELU, gelu_approximate=False)(x)
  np.testing.assert_allclose(exact, 0.5 * x * (1 + special.erf(x / np.sqrt(2))), rtol=1e-5,
                             atol=1e-6)
  tanh = layers.activation(cfg.MlpKind.GELU)(x)
  np.testing.assert_allclose(tanh, 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (
      x + 0.044715 * x ** 3))), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(exact) - np.asarray(tanh)).max() > 1e-4


def test_norms_match_formula():
  x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  rms = layers.RMSNorm(epsilon=1e-6)
  p = rms.init(jax.random.PRNGKey(0), x)
  p = jax.tree.map(lambda a: a * 1.5, nn.unbox(p))
  want = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * 1.5
  np.testing.assert_allclose(rms.apply(p, x), want, rtol=1e-5)
  ln = layers.LayerNorm(epsilon=1e-6)
  p = nn.unbox(ln.init(jax.random.PRNGKey(0), x))
  p = {'params': {'scale': p['params']['scale'] * 2.0, 'bias': p['params']['bias'] + 0.5}}
  want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * 2.0 + 0.5
  np.testing.assert_allclose(ln.apply(p, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', list(cfg.MlpKind))
@pytest.mark.parametrize('use_bias', [False, True])
def test_mlp_matches_formula(kind, use_bias):
  x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  mlp = layers.MlpBlock(16, kind, use_bias=use_bias)
  p = nn.unbox(mlp.init(jax.random.PRNGKey(0), x))['params']
  if use_bias:  # non-zero biases, so that they are exercised
    p = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 if path[-1].key == 'bias' else a, p)
  def dense(name, h):
    y = h @ np.asarray(p[name]['kernel'])
    return y + np.asarray(p[name]['bias']) if use_bias else y
  act = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu, 'swiglu': jax.nn.silu, 'geglu': jax.nn.gelu}[kind.value]
  if kind.gated:
    h = np.asarray(act(dense('wi_0', x))) * dense('wi_1', x)
  else:
    h = np.asarray(act(dense('wi', x)))
  want = dense('wo', h)
  np.testing.assert_allclose(mlp.apply({'params': p}, x), want, rtol=1e-5, atol=1e-5)


def test_dense_general_keeps_shape_and_fan_in():
  x = jnp.ones((2, 3, 32))
  d = layers.DenseGeneral((4, 8), ('embed', 'heads', 'head_dim'))
  v = d.init(jax.random.PRNGKey(0), x)
  k = v['params']['kernel']
  assert isinstance(k, nn.LogicallyPartitioned) and k.names == ('embed', 'heads', 'head_dim')
  assert k.value.shape == (32, 4, 8)
  # fan-in is the contracted dim (32), not 32*4: std ~ 1/sqrt(32)
  assert 0.1 < float(jnp.std(k.value)) < 0.25
  out = layers.DenseGeneral((6,), ('heads', 'head_dim', 'embed'), axis=(-2, -1))
  y = jnp.ones((2, 3, 4, 8))
  assert out.apply(out.init(jax.random.PRNGKey(0), y), y).shape == (2, 3, 6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_smoothing_and_z_loss(smoothing):
  r = np.random.RandomState(0)
  logits = r.randn(2, 5, 11).astype(np.float32) * 3
  targets = r.randint(0, 11, size=(2, 5))
  loss, z = losses.cross_entropy_with_logits(logits, targets, z_loss=1e-3, label_smoothing=smoothing)
  onehot = np.eye(11)[targets]
  soft = onehot * (1 - smoothing) + (1 - onehot) * smoothing / 10
  ce = optax.softmax_cross_entropy(logits, soft)
  if smoothing:
    conf, low = 1 - smoothing, smoothing / 10
    ce = ce + (conf * np.log(conf) + 10 * low * np.log(low))  # minus the target entropy
  logz = jax.nn.logsumexp(logits, -1)
  np.testing.assert_allclose(z, 1e-3 * logz ** 2, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 1e-3 * logz ** 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_gradient_matches_autodiff(smoothing):
  """The written-out backward pass equals autodiff of the plain formula, through both outputs."""
  r = np.random.RandomState(1)
  logits = jnp.asarray(r.randn(3, 4, 13).astype(np.float32) * 4)
  targets = jnp.asarray(r.randint(0, 13, size=(3, 4)))
  w_loss, w_z = (jnp.asarray(r.rand(3, 4).astype(np.float32)) for _ in range(2))

  def reference(lg):
    onehot = jax.nn.one_hot(targets, 13)
    soft = onehot * (1 - smoothing) + (1 - onehot) * smoothing / 12
    logz = jax.nn.logsumexp(lg, -1)
    ce = -jnp.sum(soft * (lg - logz[..., None]), -1)
    z = 1e-3 * logz ** 2
    return jnp.sum((ce + z) * w_loss) + jnp.sum(z * w_z)

  def ours(lg):
    loss, z = losses.cross_entropy_with_logits(lg, targets, z_loss=1e-3, label_smoothing=smoothing)
    return jnp.sum(loss * w_loss) + jnp.sum(z * w_z)

  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits),
                             rtol=1e-5, atol=1e-6)
  bf16 = logits.astype(jnp.bfloat16)
  g = jax.grad(ours)(bf16)
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(g.astype(np.float32), jax.grad(reference)(bf16.astype(jnp.float32)),
                             rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize('overrides', [
    dict(), dict(tie_embeddings=True, scale_tied_logits=True),
    dict(tie_embeddings=True, scale_tied_logits=False, dtype='bfloat16')])
def test_fused_head_loss_equals_full_logits(overrides):
  """loss_fn with the output layer and loss fused over slices (loss_chunk_length) gives the
  full-logits loss, metrics and gradients; prefix-LM and packed batches included."""
  from models import model as model_lib  # pylint: disable=g-import-not-at-top
  import testing_utils as tu  # pylint: disable=g-import-not-at-top
  bf16 = overrides.get('dtype') == 'bfloat16'
  def make(chunk):
    return model_lib.DecoderOnlyModel(tu.tiny_decoder(loss_chunk_length=chunk, **overrides),
                                      z_loss=1e-3, label_smoothing=0.1)
  fused, full = make(8), make(0)
  batch = tu.random_batch(fused, 2, {'inputs': 8, 'targets': 24}, packed=True)
  assert fused._head_chunk(batch) == 8 and not full._head_chunk(batch)  # pylint: disable=protected-access
  params = tu.init_params(fused, batch)
  def run(model):
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: model.loss_fn(p, batch), has_aux=True)(params)
    return loss, {k: float(m.compute()) for k, m in metrics.items()}, grads
  l1, m1, g1 = run(fused)
  l2, m2, g2 = run(full)
  rtol = 2e-2 if bf16 else 1e-5
  np.testing.assert_allclose(l1, l2, rtol=rtol)
  for k in m2:
    np.testing.assert_allclose(m1[k], m2[k], rtol=rtol, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0.1 if bf16 else 1e-4, atol=2e-2 if bf16 else 1e-6)
