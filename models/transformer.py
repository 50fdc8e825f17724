"""Transformer layers and stacks: decoder-only and T5-style encoder-decoder.

Layers take explicit arguments derived from the config; stacks pick scan or
an unrolled loop and the rematerialisation policy. Parameter paths:
  DecoderOnly:    token_embedder, decoder/{pos_embedder, embed_norm, relpos_bias,
                  layers[_i], decoder_norm, logits_dense}
  EncoderDecoder: token_embedder, encoder/{... encoder_norm}, decoder/{...}
With `scan_layers`, `layers` holds every parameter stacked on a leading
`layers` axis; unrolled, `layers_0`, `layers_1`, ... hold one layer each.
"""

import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention as attn
from models import config as cfg
from models import layers
from models import moe as moe_lib
from pallas_kernels.flash_attention import xla
from partitioning import axes as ax

Array = jax.Array
CACHE = 'cache'  # the decoding collection: per-layer keys and values (attention.py)

# The checkpoint_name tags the layers put on their tensors (see RematPolicy).
MINIMAL_NAMES = ('query_proj', 'key_proj', 'value_proj', 'attention_out', 'out_proj',
                 'mlp_wi_0', 'mlp_wi_1', 'mlp_out')
_POLICIES = jax.checkpoint_policies
_REMAT_POLICIES = {
    cfg.RematPolicy.FULL: None,  # save nothing
    cfg.RematPolicy.DOTS: _POLICIES.checkpoint_dots,
    cfg.RematPolicy.DOTS_NO_BATCH: _POLICIES.checkpoint_dots_with_no_batch_dims,
    cfg.RematPolicy.MINIMAL: _POLICIES.save_only_these_names(*MINIMAL_NAMES),
    cfg.RematPolicy.SAVE_QKV_PROJ: _POLICIES.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj'),
    cfg.RematPolicy.SAVE_OUT_PROJ: _POLICIES.save_only_these_names(
        'attention_out', 'out_proj', 'mlp_out'),
    cfg.RematPolicy.MINIMAL_OFFLOADED: _POLICIES.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(MINIMAL_NAMES),
        offload_src='device', offload_dst='pinned_host'),
}


def deepnorm_constants(num_encoder_layers: int, num_decoder_layers: int,
                       encoder: bool) -> Tuple[float, float]:
  """DeepNet's (alpha, beta) (Wang et al., 2022, Table 1)."""
  n, m = num_encoder_layers, num_decoder_layers
  if n == 0:  # decoder-only
    return (2 * m) ** 0.25, (8 * m) ** -0.25
  if encoder:
    return 0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)
  return (3 * m) ** 0.25, (12 * m) ** -0.25


def rope(c: cfg.DecoderConfig) -> Optional[layers.Rope]:
  """The rotary embedding a config describes (None without RoPE)."""
  if c.position_encoding != cfg.PositionEncoding.ROPE:
    return None
  return layers.Rope(
      c.rotary_dim, c.rope_max_wavelength, c.rope_scaling.value, c.rope_scaling_factor,
      c.rope_original_max_length, c.rope_low_freq_factor, c.rope_high_freq_factor,
      c.rope_yarn_beta_fast, c.rope_yarn_beta_slow, c.rope_yarn_attention_factor)


class TransformerLayer(nn.Module):
  """One encoder or decoder layer.

  Residual placement follows `config.norm_position` (pre, post, DeepNorm) or
  PaLM's parallel block; decoder layers of an encoder-decoder add
  cross-attention over the encoder output.
  """
  config: cfg.DecoderConfig
  causal: bool
  cross_attention: bool = False
  deterministic: bool = True
  deepnorm_alpha: float = 1.0
  deepnorm_beta: float = 1.0
  moe: bool = False  # an MoE block (`moe`) in place of the MLP (`mlp`)

  @nn.compact
  def __call__(self, x: Array, ctx: attn.Context, rel_table: Optional[Array],
               encoded: Optional[Array], enc_ctx: Optional[attn.Context]):
    """x [batch, length, embed] -> ([batch, length, embed], None) (scan carry)."""
    c = self.config
    deepnorm = c.norm_position == cfg.NormPosition.DEEPNORM
    beta = self.deepnorm_beta if deepnorm else 1.0
    rel_bias = None
    if rel_table is not None:
      rel_bias = xla.RelativeBias(rel_table, c.relative_attention_num_buckets,
                                  c.relative_attention_max_distance,
                                  bidirectional=not self.causal)
    make_attention = functools.partial(
        attn.MultiHeadAttention, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope=rope(c), query_scale=c.query_scale,
        kernel=c.attention_kernel, block_size=c.attention_block_size,
        max_blocks=c.attention_max_blocks,
        use_bias=c.use_bias if c.attention_bias is None else c.attention_bias,
        dropout_rate=c.dropout_rate,
        deterministic=self.deterministic, dtype=c.compute_dtype, param_dtype=c.params_dtype,
        value_init_scale=beta, peft=c.peft)
    self_attention = make_attention(position_encoding=c.position_encoding, name='self_attention')
    if self.moe:
      moe_block = moe_lib.MoeBlock(
          c.num_experts, c.num_experts_per_token, c.moe_mlp_dim or c.mlp_dim, c.mlp,
          router=c.router, impl=c.moe_impl, capacity_factor=c.capacity_factor,
          renormalize=c.renormalize_gates, router_jitter=c.router_jitter,
          num_shared_experts=c.num_shared_experts, use_bias=c.use_bias,
          gelu_approximate=c.gelu_approximate,
          deterministic=self.deterministic, dtype=c.compute_dtype, param_dtype=c.params_dtype,
          init_scale=beta, peft=c.peft, name='moe')
      mlp = lambda y: moe_block(y, ctx.token_ids)
    else:
      mlp = layers.MlpBlock(c.mlp_dim, c.mlp, use_bias=c.use_bias, dropout_rate=c.dropout_rate,
                            deterministic=self.deterministic, dtype=c.compute_dtype,
                            param_dtype=c.params_dtype, init_scale=beta,
                            gelu_approximate=c.gelu_approximate, peft=c.peft, name='mlp')
    drop = lambda y: nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))

    def self_attend(y):
      return self_attention(y, y, q_ctx=ctx, kv_ctx=ctx, causal=self.causal, rel_bias=rel_bias)

    def cross_attend(y):
      # Positions only matter for position biases, which cross-attention lacks.
      return make_attention(position_encoding=cfg.PositionEncoding.NONE,
                            cross_attention=True, name='cross_attention')(
          y, encoded, q_ctx=ctx, kv_ctx=enc_ctx, causal=False)

    if c.peft is not None and c.peft.method == cfg.PeftMethod.ADAPTERS:
      # Houlsby adapters on the attention and MLP outputs, before the residual add.
      self_attend = _adapted(self_attend, layers.Adapter(
          c.peft.adapter_dim, c.compute_dtype, c.params_dtype, name='adapter_attention'))
      mlp = _adapted(mlp, layers.Adapter(c.peft.adapter_dim, c.compute_dtype, c.params_dtype,
                                         name='adapter_mlp'))

    if c.parallel_block:
      y = layers.make_norm(c, 'pre_norm')(x)
      y_mlp = layers.make_norm(c, 'pre_mlp_norm')(x) if c.parallel_mlp_norm else y
      x = x + drop(self_attend(y)) + drop(mlp(y_mlp))
      if self.cross_attention:
        x = x + drop(cross_attend(layers.make_norm(c, 'pre_cross_attention_norm')(x)))
    elif c.norm_position == cfg.NormPosition.PRE:
      x = x + drop(self_attend(layers.make_norm(c, 'pre_self_attention_norm')(x)))
      if self.cross_attention:
        x = x + drop(cross_attend(layers.make_norm(c, 'pre_cross_attention_norm')(x)))
      x = x + drop(mlp(layers.make_norm(c, 'pre_mlp_norm')(x)))
    else:  # POST or DEEPNORM: norm(alpha * x + f(x)), alpha = 1 for POST
      alpha = self.deepnorm_alpha if deepnorm else 1.0
      x = layers.make_norm(c, 'post_self_attention_norm')(alpha * x + drop(self_attend(x)))
      if self.cross_attention:
        x = layers.make_norm(c, 'post_cross_attention_norm')(alpha * x + drop(cross_attend(x)))
      x = layers.make_norm(c, 'post_mlp_norm')(alpha * x + drop(mlp(x)))
    x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))
    return x, None


def _adapted(f, adapter):
  return lambda y: adapter(f(y))


class Stack(nn.Module):
  """`num_layers` TransformerLayers, scanned or unrolled, with remat."""
  config: cfg.DecoderConfig
  num_layers: int
  causal: bool
  cross_attention: bool = False
  deterministic: bool = True
  deepnorm_alpha: float = 1.0
  deepnorm_beta: float = 1.0

  @nn.compact
  def __call__(self, x, ctx, rel_table=None, encoded=None, enc_ctx=None):
    c = self.config
    layer_cls = TransformerLayer
    if c.remat_policy != cfg.RematPolicy.NONE:
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[c.remat_policy],
                           prevent_cse=not c.scan_layers)
    kwargs = dict(config=c, causal=self.causal, cross_attention=self.cross_attention,
                  deterministic=self.deterministic, deepnorm_alpha=self.deepnorm_alpha,
                  deepnorm_beta=self.deepnorm_beta)
    # With experts every `interval`-th layer, the scanned unit is a group of
    # `interval` layers whose last one is MoE (`layers/sublayer_<j>`).
    interval = c.moe_layer_interval if c.num_experts else 1
    if c.scan_layers:
      if interval == 1:
        unit, unit_kwargs = layer_cls, dict(kwargs, moe=c.num_experts > 0)
      else:
        unit, unit_kwargs = LayerGroup, dict(layer_cls=layer_cls, layer_kwargs=kwargs,
                                             size=interval)
      scanned = nn.scan(unit, variable_axes={'params': 0, moe_lib.MOE_COLLECTION: 0,
                                                 CACHE: 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,) * 4, length=self.num_layers // interval,
                        metadata_params={nn.PARTITION_NAME: ax.LAYERS})
      x, _ = scanned(**unit_kwargs, name='layers')(x, ctx, rel_table, encoded, enc_ctx)
    else:
      for i in range(self.num_layers):
        x, _ = layer_cls(**kwargs, moe=c.is_moe_layer(i), name=f'layers_{i}')(
            x, ctx, rel_table, encoded, enc_ctx)
    return x


class LayerGroup(nn.Module):
  """`size` consecutive layers, the last with an MoE block: the scan unit of
  models with experts every `size`-th layer."""
  layer_cls: Any
  layer_kwargs: Dict[str, Any]
  size: int

  @nn.compact
  def __call__(self, x, ctx, rel_table, encoded, enc_ctx):
    for j in range(self.size):
      x, _ = self.layer_cls(**self.layer_kwargs, moe=j == self.size - 1, name=f'sublayer_{j}')(
          x, ctx, rel_table, encoded, enc_ctx)
    return x, None


class _StackIO(nn.Module):
  """Shared input/output handling of an encoder or decoder stack."""
  config: cfg.DecoderConfig
  embedder: layers.Embed
  deterministic: bool = True

  def embed(self, tokens: Array, ctx: attn.Context) -> Array:
    c = self.config
    x = self.embedder(tokens)  # [batch, length, embed]
    if c.position_encoding == cfg.PositionEncoding.LEARNED:
      pos_table = self.param('pos_embedder', nn.with_logical_partitioning(
          nn.initializers.normal(stddev=1.0), (ax.ABSPOS, ax.EMBED)),
          (c.max_length, c.emb_dim), c.params_dtype)
      x = x + jnp.take(jnp.asarray(pos_table, c.compute_dtype), ctx.positions, axis=0)
    if c.embed_norm:
      x = layers.make_norm(c, 'embed_norm')(x)
    x = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))(x, deterministic=self.deterministic)
    return x.astype(c.compute_dtype)

  def _prepend_soft_prompt(self, x: Array, ctx: attn.Context, n: int):
    """Prompt tuning: the learned `soft_prompt` [n, embed] before each row's tokens
    (unpacked rows: one sequence per row), its positions 0..n-1 and the tokens' after."""
    c = self.config
    ctx = _with_prompt(ctx, n)
    if ctx.decode == 'step':  # (the prompt is in the cache since prefill)
      return x, ctx
    prompt = self.param('soft_prompt', nn.with_logical_partitioning(
        _soft_prompt_init(self.embedder.table()), (ax.ADAPTER, ax.EMBED)),
        (n, c.emb_dim), c.params_dtype)
    prompt = jnp.broadcast_to(jnp.asarray(prompt, x.dtype)[None], (x.shape[0], n, c.emb_dim))
    return jnp.concatenate([prompt, x], axis=1), ctx

  def rel_table(self) -> Optional[Array]:
    c = self.config
    if c.position_encoding != cfg.PositionEncoding.T5_BIAS:
      return None
    return self.param('relpos_bias', nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
        (ax.HEADS, ax.RELPOS_BUCKETS)),
        (c.num_heads, c.relative_attention_num_buckets), c.params_dtype)

  def final_norm(self, x: Array, name: str) -> Array:
    c = self.config
    if c.norm_position == cfg.NormPosition.PRE or c.parallel_block:
      x = layers.make_norm(c, name)(x)
    return nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))(x, deterministic=self.deterministic)


class Encoder(_StackIO):
  """Bidirectional encoder: tokens [batch, length] -> [batch, length, embed]."""
  num_decoder_layers: int = 0

  @nn.compact
  def __call__(self, tokens: Array, ctx: attn.Context) -> Array:
    c = self.config
    alpha, beta = deepnorm_constants(c.num_encoder_layers, self.num_decoder_layers, encoder=True)
    x = self.embed(tokens, ctx)
    x = Stack(c, c.num_encoder_layers, causal=False, deterministic=self.deterministic,
              deepnorm_alpha=alpha, deepnorm_beta=beta, name='stack')(x, ctx, self.rel_table())
    return self.final_norm(x, 'encoder_norm')


class Decoder(_StackIO):
  """Causal decoder (optionally prefix-LM, or cross-attending to an encoder).

  tokens [batch, length] -> logits [batch, length, vocab] in f32; with
  `reward_head`, a scalar per position [batch, length] instead (w . the final
  hidden state, parameter `reward_head` [embed]; the output layer keeps its
  parameters, unused).
  """
  num_encoder_layers: int = 0
  reward_head: bool = False

  @nn.compact
  def __call__(self, tokens: Array, ctx: attn.Context, encoded: Optional[Array] = None,
               enc_ctx: Optional[attn.Context] = None, hidden_only: bool = False) -> Array:
    """hidden_only: return the final hidden states [batch, length, embed] (compute dtype)
    instead of the logits, for a loss that applies the output layer itself
    (losses.chunked_head_cross_entropy); not while initializing."""
    c = self.config
    alpha, beta = deepnorm_constants(self.num_encoder_layers, c.num_layers, encoder=False)
    x = self.embed(tokens, ctx)
    n = 0
    if c.peft is not None and c.peft.method == cfg.PeftMethod.PROMPT and encoded is None:
      n = c.peft.num_virtual_tokens
      if n:  # (zero length: the base model)
        x, ctx = self._prepend_soft_prompt(x, ctx, n)
    x = Stack(c, c.num_layers, causal=True, cross_attention=encoded is not None,
              deterministic=self.deterministic, deepnorm_alpha=alpha, deepnorm_beta=beta,
              name='stack')(x, ctx, self.rel_table(), encoded, enc_ctx)
    x = self.final_norm(x, 'decoder_norm')
    if n and ctx.decode != 'step':
      x = x[:, n:]  # the soft prompt's positions predict nothing
    if hidden_only and not self.is_initializing():
      return x
    if self.reward_head:
      w = self.param('reward_head', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (ax.EMBED,)), (c.emb_dim,), c.params_dtype)
      rewards = jnp.einsum('ble,e->bl', x.astype(jnp.float32), w.astype(jnp.float32))
      if not self.is_initializing():
        return rewards  # [batch, length]
    if c.tie_embeddings:
      logits = self.embedder.attend(x)
      if c.scale_tied_logits:
        # Scaled by 1/sqrt(embed) since embeddings are init'd N(0, 1) (as T5 v1.0).
        logits = logits / jnp.sqrt(jnp.asarray(c.emb_dim, c.compute_dtype))
    else:
      logits = layers.DenseGeneral((c.vocab_size,), (ax.EMBED, ax.VOCAB), dtype=c.compute_dtype,
                                   param_dtype=c.params_dtype, peft=c.peft,
                                   deterministic=self.deterministic, name='logits_dense')(x)
    logits = nn.with_logical_constraint(logits, (ax.BATCH, ax.LENGTH, ax.VOCAB))
    if self.reward_head:  # (initializing: the output layer's parameters are made too)
      return rewards
    return logits.astype(jnp.float32)  # [batch, length, vocab]


def _soft_prompt_init(table: Array):
  """Soft prompts start as the embeddings of random vocabulary tokens (Lester et al.)."""
  def init(key, shape, dtype):
    ids = jax.random.randint(key, (shape[0],), 0, table.shape[0])
    return jnp.take(table, ids, axis=0).astype(dtype)
  return init


def _with_prompt(ctx: attn.Context, n: int) -> attn.Context:
  """The Context of a row with `n` soft-prompt positions before its tokens (at a decode
  step: the token's positions, moved past the prompt)."""
  positions = ctx.positions + n
  if ctx.decode == 'step':
    return ctx.replace(positions=positions)
  batch = positions.shape[0]
  lead = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (batch, n))
  seg = ctx.segment_ids
  if seg is not None:  # the prompt belongs to the row's (first, only) sequence
    seg = jnp.concatenate([jnp.broadcast_to(seg[:, :1], (batch, n)), seg], axis=1)
  prefix = ctx.prefix
  if prefix is not None:  # a prefix LM reads its prompt bidirectionally, the soft one too
    prefix = jnp.concatenate([jnp.ones((batch, n), bool), prefix], axis=1)
  token_ids = ctx.token_ids
  if token_ids is not None:
    token_ids = jnp.concatenate([jnp.zeros((batch, n), token_ids.dtype), token_ids], axis=1)
  return ctx.replace(positions=jnp.concatenate([lead, positions], axis=1), segment_ids=seg,
                     prefix=prefix, token_ids=token_ids)


def _context(tokens: Array, positions: Optional[Array], segment_ids: Optional[Array],
             prefix: Optional[Array] = None, valid: Optional[Array] = None,
             decode: str = '') -> attn.Context:
  """Fills positions (arange) and segment ids (1 = token, 0 = padding) when unpacked."""
  batch, length = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if segment_ids is None:
    segment_ids = (valid if valid is not None else tokens > 0).astype(jnp.int32)
  return attn.Context(positions=positions, segment_ids=segment_ids,
                      prefix=None if prefix is None else prefix.astype(bool), token_ids=tokens,
                      decode=decode)


def _embedder(c: cfg.DecoderConfig) -> layers.Embed:
  quant = layers.base_quantization(c.peft)
  return layers.Embed(c.vocab_size, c.emb_dim, dtype=c.compute_dtype,
                      param_dtype=c.params_dtype,
                      quantization=quant if quant and c.peft.quantize_embeddings else None,
                      name='token_embedder')


class DecoderOnly(nn.Module):
  """GPT/PaLM/LLaMA/BLOOM-style decoder; prefix-LM when `causal_attention` is given."""
  config: cfg.DecoderConfig
  deterministic: bool = True  # False enables dropout
  reward_head: bool = False  # a scalar per position instead of logits (preference.RewardModel)

  @nn.compact
  def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               decoder_causal_attention: Optional[Array] = None, decode: str = '',
               hidden_only: bool = False) -> Array:
    """Returns logits [batch, length, vocab] (f32) (hidden_only: the final hidden states,
    see Decoder).

    `decode` ('prefill' or 'step', with the `cache` collection mutable) runs
    against the key/value cache (`Context.decode`); positions and segment ids
    must then be given.
    """
    valid = None if decoder_target_tokens is None else decoder_target_tokens > 0
    ctx = _context(decoder_input_tokens, decoder_positions, decoder_segment_ids,
                   decoder_causal_attention, valid, decode)
    return Decoder(self.config, _embedder(self.config), deterministic=self.deterministic,
                   reward_head=self.reward_head, name='decoder')(decoder_input_tokens, ctx,
                                                                 hidden_only=hidden_only)


class EncoderDecoder(nn.Module):
  """T5-style encoder-decoder sharing one token embedding."""
  config: cfg.EncoderDecoderConfig
  deterministic: bool = True  # False enables dropout

  def setup(self):
    c = self.config
    self.token_embedder = _embedder(c)
    self.encoder = Encoder(c, self.token_embedder, deterministic=self.deterministic,
                           num_decoder_layers=c.num_layers)
    self.decoder = Decoder(c, self.token_embedder, deterministic=self.deterministic,
                           num_encoder_layers=c.num_encoder_layers)

  def encode(self, encoder_input_tokens: Array, encoder_positions: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None):
    """-> (encoded [batch, inputs_length, embed], encoder Context)."""
    ctx = _context(encoder_input_tokens, encoder_positions, encoder_segment_ids)
    return self.encoder(encoder_input_tokens, ctx), ctx

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None) -> Array:
    """Returns logits [batch, target_length, vocab] (f32)."""
    encoded, enc_ctx = self.encode(encoder_input_tokens, encoder_positions, encoder_segment_ids)
    valid = None if decoder_target_tokens is None else decoder_target_tokens > 0
    ctx = _context(decoder_input_tokens, decoder_positions, decoder_segment_ids, None, valid)
    return self.decoder(decoder_input_tokens, ctx, encoded, enc_ctx)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_positions: Array, decoder_segment_ids: Array, decode: str,
             encoder_segment_ids: Optional[Array] = None) -> Array:
    """The decoder alone over `encoded` ([batch, inputs_length, embed]) against
    the `cache` collection: `decode` is 'prefill' or 'step'. -> logits (f32)."""
    enc_ctx = _context(encoder_input_tokens, None, encoder_segment_ids)
    ctx = _context(decoder_input_tokens, decoder_positions, decoder_segment_ids, decode=decode)
    return self.decoder(decoder_input_tokens, ctx, encoded, enc_ctx)
