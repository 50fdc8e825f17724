"""Model-level equivalences: scan == unrolled, packed == unpacked, GQA == MHA, remat == none."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from models import param_count
from models import transformer

import testing_utils as tu

ENCODINGS = ['rope', 'alibi', 't5_bias', 'learned', 'none']


def unstack_layers(tree):
  """Scanned params (stack/layers with a leading layer axis) -> layers_0, layers_1, ..."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k == 'layers':
      n = jax.tree.leaves(v)[0].shape[0]
      for i in range(n):
        out[f'layers_{i}'] = jax.tree.map(lambda a: a[i], v)
    else:
      out[k] = unstack_layers(v)
  return out


_SCAN_VARIANTS = [
    dict(), dict(position_encoding='t5_bias', norm_position='post'),
    dict(parallel_block=True, num_kv_heads=1), dict(norm_position='deepnorm', norm='layer'),
    dict(remat_policy='full'), dict(remat_policy='dots_no_batch', dropout_rate=0.1)]


# Every variant for the decoder; the encoder-decoder shares the stack code, so two suffice.
@pytest.mark.rotate(2)
@pytest.mark.parametrize('encdec,variant', [(False, v) for v in _SCAN_VARIANTS] +
                         [(True, v) for v in _SCAN_VARIANTS[:2]])
def test_scan_equals_unrolled(encdec, variant):
  make = tu.tiny_encdec if encdec else tu.tiny_decoder
  cls = model_lib.EncoderDecoderModel if encdec else model_lib.DecoderOnlyModel
  scanned = cls(make(scan_layers=True, **variant))
  unrolled = cls(make(scan_layers=False, **variant))
  lengths = {'inputs': 12, 'targets': 16} if encdec else {'targets': 16}
  batch = tu.random_batch(scanned, 2, lengths, packed=True)
  params = tu.init_params(scanned, batch)
  flat = unstack_layers(params)
  # The unrolled model has exactly the unstacked parameter tree.
  ref_tree = jax.eval_shape(lambda: tu.init_params(unrolled, batch))
  assert jax.tree.structure(ref_tree) == jax.tree.structure(flat)
  rng = jax.random.PRNGKey(3) if variant.get('dropout_rate') else None
  def loss(model, p):
    l, metrics = model.loss_fn(p, batch, rng)
    return l / metrics['loss'].weight
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(flat)
  if rng is None:  # dropout masks differ between scan's split rngs and the loop's
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(unstack_layers(g1)), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert np.isfinite(l1) and np.isfinite(l2)


def _pack_case(model, lengths, encdec):
  """Two sequences packed into one row, and the same two unpacked (padded) rows."""
  rng = np.random.RandomState(0)
  vocab = model.config.vocab_size
  dec_lens, enc_lens = (9, 13), (7, 10)
  def seqs(ls):
    return [rng.randint(2, vocab, size=n).astype(np.int32) for n in ls]
  targets = seqs(dec_lens)
  inputs = seqs(enc_lens)
  L = lengths['targets']
  Li = lengths.get('inputs', 0)

  def rowify(items, length):
    tok = np.zeros((len(items), length), np.int32)
    for r, s in enumerate(items):
      tok[r, :len(s)] = s
    return tok

  unpacked = {'decoder_target_tokens': rowify(targets, L)}
  unpacked['decoder_input_tokens'] = np.zeros_like(unpacked['decoder_target_tokens'])
  unpacked['decoder_input_tokens'][:, 1:] = unpacked['decoder_target_tokens'][:, :-1]
  unpacked['decoder_loss_weights'] = (unpacked['decoder_target_tokens'] > 0).astype(np.int32)
  packed = {k: np.zeros((1, L), np.int32) for k in (
      'decoder_target_tokens', 'decoder_input_tokens', 'decoder_loss_weights',
      'decoder_segment_ids', 'decoder_positions')}
  o = 0
  for i, s in enumerate(targets):
    n = len(s)
    packed['decoder_target_tokens'][0, o:o + n] = s
    packed['decoder_input_tokens'][0, o + 1:o + n] = s[:-1]
    packed['decoder_loss_weights'][0, o:o + n] = 1
    packed['decoder_segment_ids'][0, o:o + n] = i + 1
    packed['decoder_positions'][0, o:o + n] = np.arange(n)
    o += n
  if encdec:
    unpacked['encoder_input_tokens'] = rowify(inputs, Li)
    packed['encoder_input_tokens'] = np.zeros((1, Li), np.int32)
    packed['encoder_segment_ids'] = np.zeros((1, Li), np.int32)
    packed['encoder_positions'] = np.zeros((1, Li), np.int32)
    o = 0
    for i, s in enumerate(inputs):
      n = len(s)
      packed['encoder_input_tokens'][0, o:o + n] = s
      packed['encoder_segment_ids'][0, o:o + n] = i + 1
      packed['encoder_positions'][0, o:o + n] = np.arange(n)
      o += n
  return packed, unpacked, dec_lens


@pytest.mark.rotate(2)
@pytest.mark.parametrize('encdec', [False, True])
@pytest.mark.parametrize('encoding', ENCODINGS)
def test_packed_equals_unpacked(encdec, encoding):
  make = tu.tiny_encdec if encdec else tu.tiny_decoder
  cls = model_lib.EncoderDecoderModel if encdec else model_lib.DecoderOnlyModel
  model = cls(make(position_encoding=encoding, max_length=64, num_kv_heads=1))
  lengths = {'inputs': 24, 'targets': 32} if encdec else {'targets': 32}
  packed, unpacked, dec_lens = _pack_case(model, lengths, encdec)
  params = tu.init_params(model, tu.random_batch(model, 1, lengths))
  per_token = jax.jit(lambda p, b: model.per_token_loss(p, b)[0])
  lp = per_token(params, packed)
  lu = per_token(params, unpacked)
  n0, n1 = dec_lens
  np.testing.assert_allclose(lp[0, :n0], lu[0, :n0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lp[0, n0:n0 + n1], lu[1, :n1], rtol=1e-5, atol=1e-5)
  # per-sequence log-likelihoods too
  seq_p = [float(np.sum(lp[0, :n0])), float(np.sum(lp[0, n0:n0 + n1]))]
  np.testing.assert_allclose(seq_p, np.sum(np.asarray(lu) * unpacked['decoder_loss_weights'], -1),
                             rtol=1e-5)


@pytest.mark.parametrize('kv_heads', [1, 2])
def test_gqa_equals_mha_with_repeated_kv_weights(kv_heads):
  gqa = model_lib.DecoderOnlyModel(tu.tiny_decoder(num_heads=4, num_kv_heads=kv_heads, head_dim=8))
  mha = model_lib.DecoderOnlyModel(tu.tiny_decoder(num_heads=4, num_kv_heads=4, head_dim=8))
  batch = tu.random_batch(gqa, 2, {'targets': 16})
  p = tu.init_params(gqa, batch)
  groups = 4 // kv_heads
  def repeat(path, a):
    names = [getattr(k, 'key', None) for k in path]
    if ('key' in names or 'value' in names) and names[-1] == 'kernel':
      return jnp.repeat(a, groups, axis=-2)  # [layers, embed, kv_heads, head_dim]
    return a
  p_mha = jax.tree_util.tree_map_with_path(repeat, p)
  np.testing.assert_allclose(gqa.apply(p, batch), mha.apply(p_mha, batch), rtol=1e-5, atol=1e-5)
  # GQA's key/value parameters are really kv_heads wide (not repeated in memory).
  assert p['decoder']['stack']['layers']['self_attention']['key']['kernel'].shape[-2] == kv_heads


def test_learned_positions_are_rows_of_the_table():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(position_encoding='learned', max_length=16))
  batch = tu.random_batch(model, 1, {'targets': 8})
  p = tu.init_params(model, batch)
  # Shifting every position by one changes logits exactly as using table rows 1.. does.
  table = p['decoder']['pos_embedder']
  p2 = jax.tree.map(lambda a: a, p)
  p2['decoder']['pos_embedder'] = jnp.roll(table, -1, axis=0)
  b2 = dict(batch, decoder_positions=batch['decoder_positions'])
  b_shift = dict(batch, decoder_positions=batch['decoder_positions'] + 1)
  np.testing.assert_allclose(model.apply(p2, b2), model.apply(p, b_shift), rtol=1e-5, atol=1e-5)


def test_prefix_lm_attends_bidirectionally_in_the_prefix():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder())
  batch = tu.random_batch(model, 1, {'targets': 8})
  p = tu.init_params(model, batch)
  causal = model.apply(p, batch)
  prefix = dict(batch, decoder_causal_attention=np.array([[1, 1, 1, 1, 0, 0, 0, 0]], np.int32))
  out = model.apply(p, prefix)
  changed = np.abs(np.asarray(out) - np.asarray(causal)).max(-1)[0]
  assert np.all(changed[:3] > 1e-6)  # prefix tokens now see later prefix tokens
  # Changing a token after the prefix does not change prefix outputs.
  b2 = dict(prefix)
  b2['decoder_input_tokens'] = prefix['decoder_input_tokens'].copy()
  b2['decoder_input_tokens'][0, 6] += 1
  np.testing.assert_allclose(model.apply(p, b2)[0, :6], out[0, :6], rtol=1e-6)


def test_deepnorm_constants():
  assert transformer.deepnorm_constants(0, 12, False) == pytest.approx(((24) ** 0.25, (96) ** -0.25))
  a, b = transformer.deepnorm_constants(6, 6, True)
  assert a == pytest.approx(0.81 * (6 ** 5) ** (1 / 16))
  assert b == pytest.approx(0.87 * (6 ** 5) ** (-1 / 16))


@pytest.mark.parametrize('variant', [
    dict(), dict(norm='layer', use_bias=True, mlp='gelu', tie_embeddings=False,
                 position_encoding='learned', max_length=64, embed_norm=True),
    dict(parallel_block=True, position_encoding='t5_bias'),
    dict(norm_position='post', num_kv_heads=1, mlp='relu')])
@pytest.mark.parametrize('encdec', [False, True])
def test_analytic_param_count(variant, encdec):
  make = tu.tiny_encdec if encdec else tu.tiny_decoder
  cls = model_lib.EncoderDecoderModel if encdec else model_lib.DecoderOnlyModel
  model = cls(make(**variant))
  lengths = {'inputs': 8, 'targets': 8} if encdec else {'targets': 8}
  abstract = jax.eval_shape(lambda: tu.init_params(model, model.dummy_batch(1, lengths)))
  counted = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  assert counted == param_count.analytic_param_count(model.config)


def test_bf16_compute_keeps_f32_params():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(dtype='bfloat16'))
  batch = tu.random_batch(model, 2, {'targets': 8})
  p = tu.init_params(model, batch)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))
  logits = model.apply(p, batch)
  assert logits.dtype == jnp.float32
  f32 = model_lib.DecoderOnlyModel(tu.tiny_decoder()).apply(p, batch)
  np.testing.assert_allclose(logits, f32, atol=0.1, rtol=0.05)


def test_invalid_configs_fail_with_one_line():
  with pytest.raises(cfg.ConfigError, match='num_heads=8 is not divisible by num_kv_heads=3'):
    cfg.DecoderConfig(num_heads=8, num_kv_heads=3)
  with pytest.raises(cfg.ConfigError, match="position_encoding='rotary' is not one of"):
    cfg.DecoderConfig(position_encoding='rotary')
  with pytest.raises(cfg.ConfigError, match='needs max_length'):
    cfg.DecoderConfig(position_encoding='learned')
  c = cfg.DecoderConfig(position_encoding='learned', max_length=128)
  with pytest.raises(cfg.ConfigError, match='longer than DecoderConfig.max_length=128'):
    c.check_length(256)


_OFFLOAD = {cfg.RematPolicy.MINIMAL_OFFLOADED}


@pytest.mark.parametrize('encdec', [False, True])
def test_remat_policies_change_nothing(encdec):
  """Every rematerialisation policy gives the loss and gradients of no remat (scanned,
  packed, with the blockwise causal attention in the decoder)."""
  make = tu.tiny_encdec if encdec else tu.tiny_decoder
  cls = model_lib.EncoderDecoderModel if encdec else model_lib.DecoderOnlyModel
  lengths = {'inputs': 12, 'targets': 32} if encdec else {'targets': 32}
  base = cls(make(scan_layers=True, attention_block_size=8))
  batch = tu.random_batch(base, 2, lengths, packed=True)
  params = tu.init_params(base, batch)

  def loss_and_grad(policy):
    model = cls(make(scan_layers=True, attention_block_size=8, remat_policy=policy))
    def loss(p):
      l, metrics = model.loss_fn(p, batch)
      return l / metrics['loss'].weight
    return jax.jit(jax.value_and_grad(loss))(params)

  l0, g0 = loss_and_grad('none')
  on_cpu = jax.devices()[0].platform == 'cpu'
  for policy in cfg.RematPolicy:
    if policy == cfg.RematPolicy.NONE or (on_cpu and policy in _OFFLOAD):
      continue  # (host offloading needs a GPU/TPU: its device and host memories differ)
    l1, g1 = loss_and_grad(policy.value)
    np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=policy.value)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy.value)


def test_named_policies_save_what_they_name():
  """The named policies keep exactly their tensors for the backward pass (what makes
  them cheaper in memory): a jaxpr of the rematerialised layer saves the named values."""
  from jax.ad_checkpoint import print_saved_residuals  # pylint: disable=g-import-not-at-top
  import io, contextlib  # pylint: disable=g-import-not-at-top,multiple-imports
  def saved(policy):
    model = model_lib.DecoderOnlyModel(tu.tiny_decoder(scan_layers=False, num_layers=1,
                                                       remat_policy=policy))
    batch = tu.random_batch(model, 2, {'targets': 16}, packed=False)
    params = tu.init_params(model, batch)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(lambda p: model.loss_fn(p, batch)[0], params)
    return out.getvalue()
  def names(text):
    return set(re.findall(r"named '([a-z_0-9]+)'", text))
  # (mlp_out's only use, the residual add, needs nothing for its backward pass)
  assert names(saved('minimal')) == set(transformer.MINIMAL_NAMES) - {'mlp_out'}
  assert names(saved('save_qkv_proj')) == {'query_proj', 'key_proj', 'value_proj'}
  assert names(saved('save_out_proj')) == {'attention_out', 'out_proj'}
  assert not names(saved('full'))
