"""Generation with a key/value cache: sampling (greedy, temperature, top-k,
top-p) and beam search, each one compiled loop (`lax.while_loop`).

The model fills its cache from the prompts in one call (`Model.prefill`) and
then runs one token per row per step (`Model.decode_step`). Rows of different
prompt lengths advance together, each at its own position; a row stops at
`eos_id` or after `max_decode_length` new tokens, and the loop stops when every
row has. Everything here is jittable; under a `Partitioner.context()` it runs
sharded on the training mesh (the cache by batch and K/V heads).

Anchors: T5X's `decoding.temperature_sample` and `decoding.beam_search`
(length penalty ((5 + length) / 6) ** alpha, Wu et al. 2016).
"""

import dataclasses
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import struct

from models import model as model_lib

Array = jax.Array
NEG_INF = -1.0e10  # a finite "impossible" score: sums of a few stay finite


class DecodingError(ValueError):
  """An invalid decoding setting or a prompt the model cannot take."""


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How to generate.

  Attributes:
    method: 'sample' (temperature 0 is greedy) or 'beam' (beam search).
    max_decode_length: new tokens per row at most.
    temperature: 0: argmax; otherwise logits / temperature are sampled.
    top_k: sample among the k most likely tokens (0: all).
    top_p: sample among the smallest set of tokens whose probability reaches
      top_p (nucleus; 1.0: all).
    beam_size: beams per row (method 'beam').
    length_penalty: alpha of the beam score log p / ((5 + length) / 6) ** alpha.
    eos_id: the token that ends a row (seqio's vocabularies: 1).
    seed: the sampling seed.
  """
  method: str = 'sample'
  max_decode_length: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  beam_size: int = 4
  length_penalty: float = 0.6
  eos_id: int = 1
  seed: int = 0

  def __post_init__(self):
    name = 'DecodingConfig'
    if self.method not in ('sample', 'beam'):
      raise DecodingError(f"{name}.method={self.method!r} must be 'sample' or 'beam'")
    if int(self.max_decode_length) < 1:
      raise DecodingError(f'{name}.max_decode_length={self.max_decode_length} must be at '
                          'least 1')
    if not self.temperature >= 0.0:
      raise DecodingError(f'{name}.temperature={self.temperature} must be >= 0 (0: greedy)')
    if int(self.top_k) < 0:
      raise DecodingError(f'{name}.top_k={self.top_k} must be >= 0 (0: no top-k cut)')
    if not 0.0 < self.top_p <= 1.0:
      raise DecodingError(f'{name}.top_p={self.top_p} must be in (0, 1] (1.0: no nucleus '
                          'cut)')
    if int(self.beam_size) < 1:
      raise DecodingError(f'{name}.beam_size={self.beam_size} must be at least 1')
    if not self.length_penalty >= 0.0:
      raise DecodingError(f'{name}.length_penalty={self.length_penalty} must be >= 0')


@struct.dataclass
class Decoded:
  """tokens [batch, max_decode_length] (0 after a row's end; eos included),
  lengths [batch] (tokens generated, eos included), scores [batch]: the sum of
  the model's log-probabilities of the tokens (sample), or the length-penalised
  beam score (beam)."""
  tokens: Array
  lengths: Array
  scores: Array


def check_lengths(model: model_lib.BaseModel, prompt_length: int,
                  decode_length: int) -> None:
  """Fails when prompt + new tokens exceed what the model's positions support."""
  limit = model.config.max_length
  if limit and prompt_length + decode_length > limit:
    raise DecodingError(
        f'a prompt of {prompt_length} tokens plus max_decode_length={decode_length} new '
        f'tokens is longer than the model\'s max_length={limit}: shorten the prompt or '
        'lower DecodingConfig.max_decode_length')


def generate(model: model_lib.BaseModel, params, batch: Mapping[str, Array],
             config: DecodingConfig, rng: Optional[Array] = None) -> Decoded:
  """Generates continuations of a batch of prompts.

  Args:
    model: a DecoderOnlyModel or EncoderDecoderModel.
    params: its parameters.
    batch: `prompt_tokens` [batch, prompt_length] (right-padded, start token
      included) and `prompt_lengths` [batch]; for an encoder-decoder also
      `encoder_input_tokens` [batch, inputs_length] (the decoder prompt then
      defaults to the start token 0).
    config: how to decode.
    rng: sampling key (default: PRNGKey(config.seed)).

  Returns:
    Decoded (for beam search: the best beam of each row).
  """
  model.check_decodable()
  n = int(config.max_decode_length)
  prompt_length = batch['prompt_tokens'].shape[1] if 'prompt_tokens' in batch else 1
  check_lengths(model, prompt_length, n)
  params = model.decode_params(params)  # once, not in every step of the loop
  state, logits, positions = model.prefill(params, batch, prompt_length + n)
  step = lambda s, tokens, pos: model.decode_step(params, s, tokens, pos)
  if config.method == 'beam':
    return beam_search(step, state, logits, positions, config)
  if rng is None:
    rng = jax.random.PRNGKey(config.seed)
  return sample(step, state, logits, positions, config, rng)


def sample_logits(logits: Array, rng: Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """One token per row from logits [batch, vocab] -> [batch] int32."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(int(top_k), logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    # Keep a token while the mass strictly before it is below top_p: the most
    # likely token always stays.
    before = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1) - jax.nn.softmax(
        ordered, axis=-1)
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample(step_fn, state, logits: Array, positions: Array, config: DecodingConfig,
           rng: Array) -> Decoded:
  """Temperature / top-k / top-p sampling (greedy at temperature 0).

  step_fn(state, tokens [batch], positions [batch]) -> (logits [batch, vocab], state).
  """
  b = logits.shape[0]
  n = int(config.max_decode_length)

  def cond(carry):
    i, done = carry[0], carry[5]
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, state, logits, positions, tokens, done, lengths, scores, rng = carry
    rng, key = jax.random.split(rng)
    token = sample_logits(logits, key, config.temperature, config.top_k, config.top_p)
    token = jnp.where(done, 0, token)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                               token[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(done, 0.0, logp)
    tokens = tokens.at[:, i].set(token)
    lengths = jnp.where(done, lengths, i + 1)
    done = done | (token == config.eos_id) | (i + 1 >= n)
    # Always one step, also after the last token (its logits go unused): a
    # lax.cond around it would make XLA copy the whole cache every step.
    logits, state = step_fn(state, token, positions)
    return i + 1, state, logits, positions + 1, tokens, done, lengths, scores, rng

  carry = (jnp.zeros((), jnp.int32), state, logits.astype(jnp.float32), positions,
           jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
           jnp.zeros((b,), jnp.float32), rng)
  carry = jax.lax.while_loop(cond, body, carry)
  return Decoded(carry[4], carry[6], carry[7])


def brevity_penalty(alpha: float, length: Array) -> Array:
  """GNMT's length normaliser ((5 + length) / 6) ** alpha."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(step_fn, state, logits: Array, positions: Array,
                config: DecodingConfig) -> Decoded:
  """Beam search keeping `beam_size` live and `beam_size` finished hypotheses per row.

  Each step extends every live beam by every token, keeps the 2 * beam_size
  best extensions, moves those ending in eos (or reaching max_decode_length)
  to the finished set scored by log p / brevity_penalty, and keeps the best
  beam_size others live. A row stops once no live beam can beat its worst
  finished one. With beam_size 1 and length_penalty 0 it is greedy decoding.
  """
  b, vocab = logits.shape
  k = int(config.beam_size)
  n = int(config.max_decode_length)
  alpha = float(config.length_penalty)
  # Every row's state repeated k times: row r, beam j is row r * k + j.
  state = state.take_rows(jnp.repeat(jnp.arange(b), k))
  logits = jnp.repeat(logits.astype(jnp.float32), k, axis=0)
  positions = jnp.repeat(positions, k)
  alive_logp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  neg = jnp.full((b, k), NEG_INF, jnp.float32)

  def cond(carry):
    i, alive_logp, fin_scores = carry[0], carry[4], carry[6]
    # The best a live beam can still score: its log p now (it only falls)
    # over the largest normaliser it can reach.
    best_alive = alive_logp[:, 0] / brevity_penalty(alpha, jnp.asarray(n))
    worst_fin = jnp.min(fin_scores, axis=1)
    return (i < n) & ~jnp.all(worst_fin > best_alive)

  def body(carry):
    i, state, logits, positions, alive_logp, alive_seqs, fin_scores, fin_seqs, fin_lens = carry
    logp = jax.nn.log_softmax(logits).reshape(b, k, vocab)
    cand = (alive_logp[:, :, None] + logp).reshape(b, k * vocab)
    top, idx = jax.lax.top_k(cand, 2 * k)  # [b, 2k]
    beam, token = idx // vocab, (idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seqs, beam[:, :, None], axis=1)  # [b, 2k, n]
    seqs = seqs.at[:, :, i].set(token)
    ends = (token == config.eos_id) | (i + 1 >= n)
    # Finished: merge the new endings into the best k so far.
    new_fin = jnp.where(ends, top / brevity_penalty(alpha, i + 1), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_fin], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)
    all_lens = jnp.concatenate([fin_lens, jnp.full((b, 2 * k), i + 1, jnp.int32)], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
    fin_lens = jnp.take_along_axis(all_lens, keep, axis=1)
    # Live: the best k extensions that did not end.
    alive_logp, keep = jax.lax.top_k(jnp.where(ends, NEG_INF, top), k)
    alive_seqs = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    tokens = jnp.take_along_axis(token, keep, axis=1).reshape(b * k)
    rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(beam, keep, axis=1)).reshape(-1)
    state = state.take_rows(rows)
    positions = jnp.take(positions, rows)
    logits, state = step_fn(state, tokens, positions)  # no lax.cond: see `sample`
    return (i + 1, state, logits, positions + 1, alive_logp, alive_seqs, fin_scores, fin_seqs,
            fin_lens)

  carry = (jnp.zeros((), jnp.int32), state, logits, positions, alive_logp,
           jnp.zeros((b, k, n), jnp.int32), neg, jnp.zeros((b, k, n), jnp.int32),
           jnp.zeros((b, k), jnp.int32))
  carry = jax.lax.while_loop(cond, body, carry)
  fin_scores, fin_seqs, fin_lens = carry[6:]
  # The last step finishes every live beam, so each row has a finished one
  # unless the loop stopped early, which needs finished beams too.
  return Decoded(fin_seqs[:, 0], fin_lens[:, 0], fin_scores[:, 0])
