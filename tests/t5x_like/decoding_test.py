"""KV-cache decoding: incremental == full forward for every family, samplers, beam search,
sharded == single device."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import decoding
from t5x_like import gin_utils

import testing_utils as tu

PROMPT, NEW = 7, 6  # padded prompt length, forced continuation length
LENGTHS = np.array([7, 3, 5], np.int32)  # one prompt length per row


def _gin_model(name, **overrides):
  """A shipped tiny model with config overrides."""
  model = gin_utils.model_from_gin([f'models/{name}.gin'])
  c = model.config.__class__(**{**{f: getattr(model.config, f) for f in
                                   model.config.__dataclass_fields__}, **overrides})
  kwargs = dict(z_loss=model.z_loss)
  return type(model)(c, **kwargs)


# Every shipped tiny family plus the position encodings and routers they do not cover.
FAMILIES = {
    't5': lambda **o: _gin_model('t5_1_1/tiny', **o),
    'llama_gqa': lambda **o: _gin_model('llama/tiny', num_heads=4, num_kv_heads=2, **o),
    'palm_mqa_parallel': lambda **o: _gin_model('palm/tiny', **o),
    'bloom_alibi': lambda **o: _gin_model('bloom/tiny', **o),
    'mixtral': lambda **o: _gin_model('mixtral/tiny', moe_impl='ragged_dot', **o),
    'prefix_lm': lambda **o: model_lib.DecoderOnlyModel(
        _gin_model('llama/tiny', **o).config, inputs_bidirectional_attention=True),
    'learned_partial_rope_hash': lambda **o: model_lib.DecoderOnlyModel(tu.tiny_decoder(
        position_encoding='learned', max_length=32, num_experts=4, router='hash',
        num_experts_per_token=1, capacity_factor=4.0, moe_layer_interval=2, **o)),
    'partial_rotary_bias_post': lambda **o: model_lib.DecoderOnlyModel(tu.tiny_decoder(
        rotary_fraction=0.5, use_bias=True, norm='layer', norm_position='post', **o)),
    't5_decoder_only': lambda **o: model_lib.DecoderOnlyModel(tu.tiny_decoder(
        position_encoding='t5_bias', num_kv_heads=1, **o)),
}


def _prompts(model, seed=1):
  rng = np.random.RandomState(seed)
  vocab = model.config.vocab_size
  b = len(LENGTHS)
  prompt = rng.randint(2, vocab, (b, PROMPT)).astype(np.int32)
  for r, n in enumerate(LENGTHS):
    prompt[r, n:] = 0
  batch = {'prompt_tokens': prompt, 'prompt_lengths': LENGTHS}
  if isinstance(model, model_lib.EncoderDecoderModel):
    enc = rng.randint(2, vocab, (b, 9)).astype(np.int32)
    enc[1, 6:] = 0  # padded encoder inputs too
    batch['encoder_input_tokens'] = enc
  return batch, rng.randint(2, vocab, (b, NEW)).astype(np.int32)


def _params(model, batch):
  lengths = {'inputs': 9, 'targets': PROMPT + NEW} if 'encoder_input_tokens' in batch else {
      'targets': PROMPT + NEW}
  return tu.init_params(model, tu.random_batch(model, 1, lengths), seed=3)


@functools.lru_cache(maxsize=None)
def _jitted(model):
  prefill = jax.jit(lambda p, b: model.prefill(p, b, PROMPT + NEW))
  step = jax.jit(model.decode_step)
  return prefill, step


def forced_logits(model, params, batch, continuation):
  """Logits of each decode step when the continuation is fed token by token: [b, NEW, vocab]."""
  prefill, step = _jitted(model)
  state, logits, positions = prefill(params, batch)
  out = [logits]
  for t in range(continuation.shape[1] - 1):
    logits, state = step(params, state, continuation[:, t], positions + t)
    out.append(logits)
  return np.stack(out, axis=1)


def full_logits(model, params, batch, continuation):
  """The full forward over prompt + continuation, read where each decode step predicts."""
  b = len(LENGTHS)
  n = continuation.shape[1]
  tokens = np.zeros((b, PROMPT + n), np.int32)
  seg = np.zeros_like(tokens)
  prefix = np.zeros_like(tokens)
  for r, length in enumerate(LENGTHS):
    tokens[r, :length] = batch['prompt_tokens'][r, :length]
    tokens[r, length:length + n] = continuation[r]
    seg[r, :length + n] = 1
    prefix[r, :length] = 1
  pos = np.broadcast_to(np.arange(PROMPT + n, dtype=np.int32), tokens.shape)
  if isinstance(model, model_lib.EncoderDecoderModel):
    logits = model.module.apply({'params': params}, batch['encoder_input_tokens'], tokens,
                                decoder_positions=pos, decoder_segment_ids=seg)
  else:
    extra = {'decoder_causal_attention': prefix} if model.inputs_bidirectional_attention else {}
    logits = model.module.apply({'params': params}, tokens, decoder_positions=pos,
                                decoder_segment_ids=seg, **extra)
  logits = np.asarray(logits)
  return np.stack([logits[r, length - 1:length - 1 + n] for r, length in enumerate(LENGTHS)])


@pytest.mark.rotate(2)
@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_incremental_decoding_equals_full_forward(family, scan):
  model = FAMILIES[family](scan_layers=scan)
  batch, cont = _prompts(model)
  params = _params(model, batch)
  got = forced_logits(model, params, batch, cont)
  want = full_logits(model, params, batch, cont)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropless_pallas_mixtral_decodes_like_its_full_forward():
  model = _gin_model('mixtral/tiny')  # moe_impl = 'dropless': the Pallas kernels, interpreted
  batch, cont = _prompts(model)
  params = _params(model, batch)
  np.testing.assert_allclose(forced_logits(model, params, batch, cont[:, :3]),
                             full_logits(model, params, batch, cont[:, :3]),
                             rtol=1e-5, atol=1e-5)


def test_cache_holds_only_kv_heads():
  model = FAMILIES['llama_gqa']()
  cache, axes = model.init_cache(3, 16)
  shapes = {k: v.shape for k, v in jax.tree_util.tree_flatten_with_path(cache)[0]}
  key = [s for p, s in shapes.items() if 'cached_key' in jax.tree_util.keystr(p)]
  # one buffer per layer: [batch, kv_heads=2 (not 4), length, head_dim]
  assert key == [(3, 2, 16, 16)] * 2
  assert set(axes) == {0}


@pytest.fixture(scope='module')
def llama():
  model = FAMILIES['llama_gqa']()
  batch, _ = _prompts(model)
  return model, _params(model, batch), batch


def _generate(model, params, batch, **kwargs):
  config = decoding.DecodingConfig(**{'max_decode_length': NEW, 'eos_id': -1, **kwargs})
  out = jax.jit(lambda p, b: decoding.generate(model, p, b, config))(params, batch)
  return jax.device_get(out)


def _log_likelihood(logits, tokens):
  logp = np.asarray(jax.nn.log_softmax(logits))
  return np.take_along_axis(logp, tokens[..., None], -1).sum((1, 2))


def test_greedy_is_the_argmax_of_the_full_forward(llama):
  model, params, batch = llama
  out = _generate(model, params, batch)
  assert (out.lengths == NEW).all()
  # full_logits[:, t] is the full forward's prediction of new token t, each row
  # reading from after its own prompt
  want = full_logits(model, params, batch, out.tokens)
  np.testing.assert_array_equal(out.tokens, want.argmax(-1))
  # scores are the log-likelihoods of the chosen tokens
  np.testing.assert_allclose(out.scores, _log_likelihood(want, out.tokens), rtol=1e-5)


def test_beam_one_top_k_one_and_tiny_top_p_equal_greedy(llama):
  model, params, batch = llama
  greedy = _generate(model, params, batch).tokens
  beam = _generate(model, params, batch, method='beam', beam_size=1, length_penalty=0.0)
  np.testing.assert_array_equal(beam.tokens, greedy)
  for kwargs in (dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_p=1e-6)):
    np.testing.assert_array_equal(_generate(model, params, batch, **kwargs).tokens, greedy)


def test_sampling_is_reproducible_by_seed(llama):
  model, params, batch = llama
  a = _generate(model, params, batch, temperature=1.0, seed=5).tokens
  b = _generate(model, params, batch, temperature=1.0, seed=5).tokens
  c = _generate(model, params, batch, temperature=1.0, seed=6).tokens
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_top_k_samples_only_among_the_k_best():
  logits = jnp.asarray(np.random.RandomState(0).randn(64, 50), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 20)
  top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
  for key in keys:
    tok = np.asarray(decoding.sample_logits(logits, key, 1.0, top_k=3))
    assert all(t in row for t, row in zip(tok, top3))


def test_top_p_keeps_the_smallest_set_reaching_p():
  # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two, 0.85 three
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 400))
  for p, allowed in ((0.7, {1, 3}), (0.85, {1, 2, 3}), (0.5, {1})):
    tok = np.asarray(decoding.sample_logits(logits, jax.random.PRNGKey(1), 1.0, top_p=p))
    assert set(tok.tolist()) == allowed, p


def test_rows_stop_at_eos(llama):
  model, params, batch = llama
  greedy = _generate(model, params, batch).tokens
  eos = int(greedy[0, 2])
  out = _generate(model, params, batch, eos_id=eos)
  for r in range(len(LENGTHS)):
    hits = np.flatnonzero(greedy[r] == eos)
    n = hits[0] + 1 if len(hits) else NEW
    assert out.lengths[r] == n
    np.testing.assert_array_equal(out.tokens[r, :n], greedy[r, :n])
    assert (out.tokens[r, n:] == 0).all()


def test_beam_search_finds_likelier_sequences_than_greedy(llama):
  model, params, batch = llama
  greedy = _generate(model, params, batch)
  beam = _generate(model, params, batch, method='beam', beam_size=4, length_penalty=0.0)
  assert (beam.scores >= greedy.scores - 1e-5).all()
  # the beam score is the sequence's log-likelihood under the full forward
  want = full_logits(model, params, batch, beam.tokens)
  np.testing.assert_allclose(beam.scores, _log_likelihood(want, beam.tokens), rtol=1e-5)


def test_beam_search_is_exhaustive_search_when_the_beam_is_wide():
  """With beam >= vocab ** (steps - 1) nothing is pruned: the best of all sequences."""
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=5))
  batch = {'prompt_tokens': np.array([[0, 3, 4], [0, 2, 0]], np.int32),
           'prompt_lengths': np.array([3, 2], np.int32)}
  params = tu.init_params(model, tu.random_batch(model, 1, {'targets': 8}), seed=7)
  config = decoding.DecodingConfig(method='beam', beam_size=25, length_penalty=0.0,
                                   max_decode_length=3, eos_id=-1)
  out = jax.device_get(decoding.generate(model, params, batch, config))
  seqs = np.array(list(itertools.product(range(5), repeat=3)), np.int32)
  for r in range(2):
    n = batch['prompt_lengths'][r]
    tokens = np.concatenate([np.repeat(batch['prompt_tokens'][r:r + 1, :n], len(seqs), 0),
                             seqs], 1)
    logp = jax.nn.log_softmax(model.module.apply({'params': params}, tokens,
                                                 decoder_segment_ids=np.ones_like(tokens)))
    total = np.take_along_axis(np.asarray(logp)[:, n - 1:-1], seqs[..., None], -1).sum((1, 2))
    np.testing.assert_array_equal(out.tokens[r], seqs[total.argmax()])
    np.testing.assert_allclose(out.scores[r], total.max(), rtol=1e-5)


def test_encoder_decoder_generates_from_the_start_token():
  model = FAMILIES['t5']()
  batch, _ = _prompts(model)
  params = _params(model, batch)
  enc_only = {'encoder_input_tokens': batch['encoder_input_tokens']}
  out = _generate(model, params, enc_only)
  tokens = np.concatenate([np.zeros((3, 1), np.int32), out.tokens[:, :-1]], 1)
  logits = model.module.apply({'params': params}, enc_only['encoder_input_tokens'], tokens,
                              decoder_segment_ids=np.ones_like(tokens))
  np.testing.assert_array_equal(out.tokens, np.asarray(logits).argmax(-1))


@pytest.mark.parametrize('mesh', [(2, 2, 2), (1, 2, 4)])
@pytest.mark.parametrize('family', ['llama_gqa', 't5', 'mixtral'])
def test_sharded_decoding_equals_one_device(family, mesh):
  model = FAMILIES[family](num_heads=4, num_kv_heads=4) if family != 'llama_gqa' else \
      FAMILIES[family]()
  batch, cont = _prompts(model)
  batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}  # batch 4 divides
  cont = np.concatenate([cont, cont[:1]])
  params = _params(model, batch)
  config = decoding.DecodingConfig(max_decode_length=NEW, eos_id=-1, method='beam',
                                   beam_size=2)
  gen = lambda p, b: decoding.generate(model, p, b, config)
  want = jax.device_get(jax.jit(gen)(params, batch))

  part = partitioner_lib.Partitioner(mesh_lib.create_mesh(mesh))
  with part.context():
    boxed = jax.eval_shape(lambda: model.init_variables(
        jax.random.PRNGKey(0), tu.random_batch(model, 1, {'inputs': 9, 'targets': 8})))
  shardings = part.boxed_shardings(boxed['params'])
  sharded = jax.device_put(params, shardings)
  sbatch = {k: jax.device_put(v, part.batch_sharding(v.ndim)) for k, v in batch.items()}
  with part.context():
    got = jax.device_get(jax.jit(gen)(sharded, sbatch))
    # the cache really is split by batch and kv heads
    cache = jax.jit(lambda: model.init_cache(4, 16, 9)[0])()
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
  key = [x for p, x in jax.tree_util.tree_flatten_with_path(cache)[0]
         if 'self_attention' in jax.tree_util.keystr(p) and 'cached_key' in
         jax.tree_util.keystr(p)][0]
  # [batch, kv_heads, length, head_dim]: batch over (data, fsdp), kv heads over
  # tensor where they divide (llama_gqa's 2 K/V heads do not divide over 4)
  kv_split = mesh[2] if key.shape[1] % mesh[2] == 0 else 1
  assert key.addressable_shards[0].data.size * mesh[0] * mesh[1] * kv_split == key.size


@pytest.mark.parametrize('kwargs,msg', [
    (dict(beam_size=0), 'beam_size=0 must be at least 1'),
    (dict(top_p=0.0), r'top_p=0.0 must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p=1.5 must be in \(0, 1\]'),
    (dict(top_k=-1), 'top_k=-1 must be >= 0'),
    (dict(temperature=-0.5), 'temperature=-0.5 must be >= 0'),
    (dict(method='nucleus'), "method='nucleus' must be 'sample' or 'beam'"),
    (dict(max_decode_length=0), 'max_decode_length=0 must be at least 1'),
])
def test_bad_decoding_settings_fail_clearly(kwargs, msg):
  with pytest.raises(decoding.DecodingError, match=msg):
    decoding.DecodingConfig(**kwargs)


def test_prompt_longer_than_the_model_fails_before_decoding():
  model = FAMILIES['learned_partial_rope_hash']()  # max_length 32
  batch = {'prompt_tokens': np.ones((1, 30), np.int32), 'prompt_lengths': np.array([30])}
  with pytest.raises(decoding.DecodingError, match='a prompt of 30 tokens plus '
                     'max_decode_length=6 new tokens is longer than the model.s max_length=32'):
    decoding.generate(model, None, batch, decoding.DecodingConfig(max_decode_length=6))


def test_expert_choice_models_refuse_to_decode():
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(num_experts=4, router='expert_choice'))
  with pytest.raises(cfg.ConfigError, match='expert_choice .* cannot decode one token at a time'):
    decoding.generate(model, None, {'prompt_tokens': np.ones((1, 3), np.int32),
                                    'prompt_lengths': np.array([3])},
                      decoding.DecodingConfig())
