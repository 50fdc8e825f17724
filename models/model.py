"""Model wrappers: a Flax module plus its loss, scoring and batch contract.

The trainer only sees this interface: `init_variables`, `loss_fn` (returning
a loss sum and typed metrics, `models/metrics.py`, so that sharded,
accumulated and single-device steps normalise the same way), `per_token_loss`
and `score_batch` (per-sequence log-likelihoods, the
seam DPO and reward models build on).
"""

import abc
import copy
import dataclasses
import functools
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models import config as cfg
from models import losses
from models import metrics as metrics_lib
from models import moe as moe_lib
from models import param_count
from models import peft
from models import transformer
from partitioning import axes as ax

Array = jax.Array
Batch = Mapping[str, Array]


@struct.dataclass
class DecodeState:
  """What a decode step carries besides the parameters.

  cache: the `cache` collection: per layer keys, values, segment ids and
    prefix flags of every slot [batch, max_length, ...] (a leading layers axis
    when scanned).
  encoded, encoder_input_tokens: the encoder output [batch, inputs_length,
    embed] and its tokens (encoder-decoder only), or None.
  batch_axes: the batch axis of each leaf of `cache`, in leaf order (static),
    so beam search can reorder rows.
  """
  cache: Any
  encoded: Optional[Array] = None
  encoder_input_tokens: Optional[Array] = None
  batch_axes: Tuple[int, ...] = struct.field(pytree_node=False, default=())

  def take_rows(self, rows: Array) -> 'DecodeState':
    """The state of rows `rows` [new_batch] (beam search reorders and repeats rows)."""
    leaves, tree = jax.tree.flatten(self.cache)
    leaves = [jnp.take(x, rows, axis=a) for x, a in zip(leaves, self.batch_axes)]
    take = lambda x: None if x is None else jnp.take(x, rows, axis=0)
    return self.replace(cache=jax.tree.unflatten(tree, leaves), encoded=take(self.encoded),
                        encoder_input_tokens=take(self.encoder_input_tokens))


class BaseModel(abc.ABC):
  """Loss and batch contract around a Flax module."""

  # Features the module reads, and which of them are optional.
  FEATURES: Tuple[str, ...] = ()
  OPTIONAL_FEATURES: Tuple[str, ...] = ()

  def __init__(self, config: cfg.DecoderConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0, decoder_start_token: Optional[int] = 0):
    """decoder_start_token: what the decoder reads before the first token (seqio's
    converters shift targets right with 0); None: the prompt's own first token
    (e.g. a BOS the tokenizer adds, as Hugging Face decoders expect)."""
    if z_loss < 0:
      raise cfg.ConfigError(f'z_loss={z_loss} must be >= 0')
    if not 0.0 <= label_smoothing < 1.0:
      raise cfg.ConfigError(f'label_smoothing={label_smoothing} must be in [0, 1)')
    if decoder_start_token is not None and not 0 <= decoder_start_token < config.vocab_size:
      raise cfg.ConfigError(f'decoder_start_token={decoder_start_token} must be a token id '
                            f'in [0, {config.vocab_size}) or None')
    self.config = config
    self.decoder_start_token = decoder_start_token
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.module = self._make_module(config)  # deterministic: init, eval, scoring
    self._train_module = self.module.clone(deterministic=False)  # dropout on

  @abc.abstractmethod
  def _make_module(self, config: cfg.DecoderConfig) -> nn.Module:
    ...

  @abc.abstractmethod
  def feature_shapes(self, batch_size: int, feature_lengths: Mapping[str, int]) -> Dict[str, tuple]:
    """Shapes of the model features for task feature lengths."""

  def _module_inputs(self, batch: Batch) -> Dict[str, Array]:
    names = self.FEATURES + self.OPTIONAL_FEATURES
    return {k: batch[k] for k in names if k in batch and k != 'decoder_loss_weights'}

  def dummy_batch(self, batch_size: int, feature_lengths: Mapping[str, int]) -> Dict[str, np.ndarray]:
    return {k: np.zeros(s, np.int32) for k, s in
            self.feature_shapes(batch_size, feature_lengths).items()}

  def init_variables(self, rng: Array, batch: Batch):
    """Boxed (logically partitioned) variables; call under jit / eval_shape."""
    variables = self.module.init({'params': rng}, **self._module_inputs(batch))
    peft.check(self.config.peft, variables['params'])  # paths only: fine on abstract values
    return variables

  def trainable_pattern(self) -> Optional[str]:
    """The parameters training updates by default (a regular expression of paths):
    those of the PEFT method, or None: all."""
    return peft.trainable_pattern(self.config.peft)

  def added_pattern(self) -> Optional[str]:
    """The parameters a checkpoint of the base model lacks (the PEFT method's)."""
    return peft.added_pattern(self.config.peft)

  def without_peft(self, keep_quantization: bool = False) -> 'BaseModel':
    """The same model without its PEFT parameters (the base it started from); with
    `keep_quantization`, a quantized base stays quantized (the parameters it reads are
    then the PEFT model's frozen ones)."""
    base = copy.copy(self)
    peft_config = None
    if keep_quantization and self.config.peft is not None and (
        self.config.peft.quantization != cfg.BaseQuantization.NONE):
      # LoRA targeting no layer: only the quantized kernels remain.
      peft_config = dataclasses.replace(self.config.peft, method=cfg.PeftMethod.LORA,
                                        targets='(?!)')
    base.config = dataclasses.replace(self.config, peft=peft_config)
    base.module = base._make_module(base.config)
    base._train_module = base.module.clone(deterministic=False)
    base.__dict__.pop('_decode_module', None)
    return base

  def flops_per_example(self, feature_lengths: Mapping[str, int]) -> float:
    """Training FLOPs of one example (forward and backward)."""
    return param_count.train_flops_per_example(self.config, feature_lengths.get('inputs', 0),
                                               feature_lengths['targets'], **self._flops_options())

  def _flops_options(self) -> Dict[str, Any]:
    return {}

  @property
  def needs_rng(self) -> bool:
    """Whether training draws randomness (dropout, router jitter)."""
    c = self.config
    return (c.dropout_rate > 0.0 or (c.num_experts > 0 and c.router_jitter > 0.0) or
            (c.peft is not None and c.peft.method == cfg.PeftMethod.LORA and c.peft.dropout > 0))

  def apply_with_stats(self, params, batch: Batch, dropout_rng: Optional[Array] = None,
                       **call_kwargs) -> Tuple[Array, Dict[str, Array]]:
    """Logits [batch, length, vocab] (f32) and the MoE router statistics:
    name -> [num_moe_layers] f32 (empty for a dense model). `call_kwargs` go to
    the module's __call__ (e.g. hidden_only)."""
    module, kwargs = self.module, dict(call_kwargs)
    if dropout_rng is not None:
      module, kwargs['rngs'] = self._train_module, {'dropout': dropout_rng}
    if not self.config.num_experts:
      return module.apply({'params': params}, **self._module_inputs(batch), **kwargs), {}
    logits, state = module.apply({'params': params}, **self._module_inputs(batch),
                                 mutable=[moe_lib.MOE_COLLECTION], **kwargs)
    return logits, moe_lib.collect_stats(state[moe_lib.MOE_COLLECTION])

  def apply(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """Logits [batch, length, vocab] (f32)."""
    return self.apply_with_stats(params, batch, dropout_rng)[0]

  def per_token_loss(self, params, batch: Batch, dropout_rng=None) -> Tuple[Array, Array, Array]:
    """(loss, z_loss term, logits): loss and z-term [batch, length], unweighted."""
    loss, z, logits, _ = self._per_token_loss_and_stats(params, batch, dropout_rng)
    return loss, z, logits

  def _per_token_loss_and_stats(self, params, batch, dropout_rng):
    logits, stats = self.apply_with_stats(params, batch, dropout_rng)
    loss, z = losses.cross_entropy_with_logits(
        logits, batch['decoder_target_tokens'], self.z_loss, self.label_smoothing)
    return loss, z, logits, stats

  def _loss_terms(self, params, batch, dropout_rng):
    """(loss, z-term, correct, router stats): the first three [batch, length] f32,
    `correct` 1.0 where the arg-max prediction is the target."""
    loss, z, logits, stats = self._per_token_loss_and_stats(params, batch, dropout_rng)
    correct = (jnp.argmax(logits, -1) == batch['decoder_target_tokens']).astype(jnp.float32)
    return loss, z, correct, stats

  def moe_loss(self, stats: Mapping[str, Array]) -> Array:
    """The weighted router losses, summed over MoE layers (0 for a dense model)."""
    if not stats:
      return jnp.zeros((), jnp.float32)
    c = self.config
    return (c.load_balance_loss_weight * jnp.sum(stats['load_balance_loss']) +
            c.router_z_loss_weight * jnp.sum(stats['router_z_loss']))

  def loss_fn(self, params, batch: Batch, dropout_rng=None,
              token_groups: Optional[Mapping[str, Array]] = None
              ) -> Tuple[Array, metrics_lib.Metrics]:
    """The weighted loss *sum* (what is differentiated) and the step's metrics.

    Sums, not means, so that microbatches, shards and evaluation batches
    combine exactly: `metrics['loss']` is the `Average` of the objective whose
    weight is the number of target tokens (the normaliser of the gradient).

    Args:
      params: the model parameters.
      batch: model features.
      dropout_rng: a key to train with dropout (and router jitter); None: deterministic.
      token_groups: name -> [batch, length] 0/1 mask over the targets; each
        group's cross-entropy is reported as metric `loss/<name>`.

    Returns:
      (loss sum, metrics): the objective is cross-entropy (label-smoothed when
      configured) + z-loss + the weighted router losses; `cross_entropy`,
      `z_loss` and `moe_loss` are its parts, `perplexity` is exp(cross_entropy),
      `moe/<stat>/<layer>` the router statistics of each MoE layer.
    """
    loss, z, correct, stats = self._loss_terms(params, batch, dropout_rng)
    ce = loss - z  # [batch, length]
    weights = batch['decoder_loss_weights'].astype(jnp.float32)
    weight_sum = jnp.sum(weights)
    # Router losses are per batch, not per token: scaled by the weight sum so
    # that merged microbatches average them like the token losses.
    moe_loss_sum = self.moe_loss(stats) * weight_sum
    loss_sum = jnp.sum(loss * weights) + moe_loss_sum
    ce_sum = jnp.sum(ce * weights)

    def per_token(total, console=None):
      return metrics_lib.Average(total, weight_sum, console=console)
    metrics = {
        'loss': per_token(loss_sum, '.4f'),
        'cross_entropy': per_token(ce_sum),
        'z_loss': per_token(jnp.sum(z * weights)),
        'moe_loss': per_token(moe_loss_sum),
        'accuracy': per_token(jnp.sum(correct * weights), '.4f'),
        'perplexity': metrics_lib.Perplexity(ce_sum, weight_sum, console='.2f'),
        'target_tokens': metrics_lib.Sum(weight_sum),
        # Packing efficiency: the share of the batch's target positions that carry loss.
        'nonpadding_fraction': metrics_lib.Average(
            jnp.sum((weights > 0).astype(jnp.float32)), jnp.float32(weights.size), console='.2f'),
    }
    for name, values in stats.items():  # [num_moe_layers] each
      for i in range(values.shape[0]):
        metrics[f'moe/{name}/{i}'] = per_token(values[i] * weight_sum)
    for name, mask in (token_groups or {}).items():
      w = weights * mask.astype(jnp.float32)
      metrics[f'loss/{name}'] = metrics_lib.Average(jnp.sum(ce * w), jnp.sum(w), console='.3f')
    return loss_sum, metrics

  # --- decoding (t5x_like/decoding.py drives these) ---------------------------------
  @functools.cached_property
  def _decode_module(self) -> nn.Module:
    """The module decoding runs: no dropout, no remat, the XLA attention path
    (single-token queries against a cache), layers unrolled (each layer's cache
    is then its own buffer, updated in place; a scanned stack would restack the
    whole cache every step), the same parameters (`decode_params`)."""
    c = dataclasses.replace(self.config, dropout_rate=0.0, remat_policy=cfg.RematPolicy.NONE,
                            attention_kernel=cfg.AttentionKernel.XLA, scan_layers=False)
    return self._make_module(c)

  def decode_params(self, params):
    """Scanned parameters as the unrolled decode module names them (slices, under
    jit); unrolled ones are returned as they are. `decoding.generate` converts
    once, outside its loop, so the steps do not slice the stacked weights again."""
    if not self.config.scan_layers:
      return params
    interval = self.config.moe_layer_interval if self.config.num_experts else 1

    def unstack(tree):
      if not isinstance(tree, Mapping):
        return tree
      out = {}
      for k, v in tree.items():
        if k != 'layers':
          out[k] = unstack(v)
          continue
        n = jax.tree.leaves(v)[0].shape[0]
        for i in range(n):
          layer = jax.tree.map(lambda x, i=i: x[i], v)
          if interval == 1:
            out[f'layers_{i}'] = layer
          else:
            for j in range(interval):
              out[f'layers_{i * interval + j}'] = layer[f'sublayer_{j}']
      return out
    return unstack(params)

  def check_decodable(self) -> None:
    """Fails for a model that cannot generate one token at a time."""
    c = self.config
    if c.num_experts and c.router == cfg.RouterKind.EXPERT_CHOICE:
      raise cfg.ConfigError(
          'router=expert_choice lets each expert pick tokens from the whole sequence, so a '
          'token\'s output depends on later tokens and the model cannot decode one token '
          'at a time: decode a token-choice or hash-routed model')

  def init_cache(self, batch_size: int, max_length: int, encoder_length: int = 0):
    """A zero cache of `max_length` slots per row, constrained to the mesh in scope.

    Returns (cache, batch axis of each cache leaf in leaf order).
    """
    boxed = jax.eval_shape(lambda: self._init_cache_boxed(batch_size, max_length,
                                                         encoder_length))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    boxes, tree = jax.tree.flatten(boxed, is_leaf=is_box)
    leaves = [nn.with_logical_constraint(jnp.zeros(b.value.shape, b.value.dtype), b.names)
              for b in boxes]
    return jax.tree.unflatten(tree, leaves), tuple(b.names.index(ax.BATCH) for b in boxes)

  def token_log_likelihoods(self, params, batch: Batch) -> Array:
    """log p(target token) at every position [batch, length] (f32; no z-loss, no
    smoothing), 0 where `decoder_loss_weights` is 0."""
    logits = self.apply(params, batch)
    loss, _ = losses.cross_entropy_with_logits(logits, batch['decoder_target_tokens'])
    return jnp.where(batch['decoder_loss_weights'] > 0, -loss, 0.0)

  def score_batch(self, params, batch: Batch) -> Array:
    """Sum of target-token log-likelihoods per example [batch], weighted by
    `decoder_loss_weights` (no z-loss, no smoothing)."""
    logp = self.token_log_likelihoods(params, batch)
    return jnp.sum(logp * batch['decoder_loss_weights'].astype(jnp.float32), axis=-1)


class DecoderOnlyModel(BaseModel):
  """Causal LM, or prefix-LM when batches carry `decoder_causal_attention`."""
  FEATURES = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
  OPTIONAL_FEATURES = ('decoder_positions', 'decoder_segment_ids', 'decoder_causal_attention')

  def __init__(self, config: cfg.DecoderConfig,
               inputs_bidirectional_attention: Optional[bool] = None, **kwargs):
    """inputs_bidirectional_attention: True: a prefix-LM, in training (where
    batches mark the prompt with `decoder_causal_attention`) and in decoding and
    scoring; False: causal everywhere, the batches' prefix marks ignored (e.g.
    supervised fine-tuning of a causal LM on prompt/response pairs); None:
    training follows the batches, decoding is causal."""
    super().__init__(config, **kwargs)
    if inputs_bidirectional_attention not in (None, True, False):
      raise cfg.ConfigError(f'DecoderOnlyModel.inputs_bidirectional_attention='
                            f'{inputs_bidirectional_attention!r} must be True, False or None')
    self.inputs_bidirectional_attention = inputs_bidirectional_attention

  def _flops_options(self):
    # The inputs are a bidirectional prefix unless the model ignores the batches' prefix marks.
    return {'prefix_lm': self.inputs_bidirectional_attention is not False}

  def _head_chunk(self, batch: Batch) -> int:
    """Positions per slice of the fused output layer + loss (0: the plain path)."""
    c = self.config
    length = batch['decoder_target_tokens'].shape[1]
    chunk = c.loss_chunk_length
    if chunk <= 0 or length % chunk or length < 2 * chunk or c.peft is not None:
      return 0
    return chunk

  def _loss_terms(self, params, batch, dropout_rng):
    # The output layer and cross-entropy fused over slices of `loss_chunk_length` positions
    # (losses.chunked_head_cross_entropy): no [batch, length, vocab] logits in memory.
    chunk = self._head_chunk(batch)
    if not chunk:
      return super()._loss_terms(params, batch, dropout_rng)
    c = self.config
    x, stats = self.apply_with_stats(params, batch, dropout_rng, hidden_only=True)
    if c.tie_embeddings:
      kernel = nn.meta.unbox(params['token_embedder']['embedding']).T
      scale = 1.0 / math.sqrt(c.emb_dim) if c.scale_tied_logits else 1.0
    else:
      kernel, scale = nn.meta.unbox(params['decoder']['logits_dense']['kernel']), 1.0
    loss, z, correct = losses.chunked_head_cross_entropy(
        x, kernel, batch['decoder_target_tokens'], chunk=chunk, scale=scale,
        z_loss=self.z_loss, label_smoothing=self.label_smoothing)
    return loss, z, correct, stats

  def _module_inputs(self, batch):
    inputs = super()._module_inputs(batch)
    if self.inputs_bidirectional_attention is False:
      inputs.pop('decoder_causal_attention', None)
    return inputs

  def _make_module(self, config):
    return transformer.DecoderOnly(config)

  def _decode_apply(self, params, cache, tokens, positions, segment_ids, prefix, mode):
    logits, variables = self._decode_module.apply(
        {'params': self.decode_params(params), transformer.CACHE: cache}, tokens,
        decoder_positions=positions,
        decoder_segment_ids=segment_ids, decoder_causal_attention=prefix, decode=mode,
        mutable=[transformer.CACHE])
    return logits, variables[transformer.CACHE]

  def _init_cache_boxed(self, batch_size, max_length, encoder_length):
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    return self._decode_module.init(
        {'params': jax.random.PRNGKey(0)}, tokens, decoder_positions=tokens,
        decoder_segment_ids=tokens, decode='prefill')[transformer.CACHE]

  def prefill(self, params, batch: Batch, max_length: int):
    """Runs the prompts through the model once, filling a cache of `max_length` slots.

    Args:
      params: the model parameters.
      batch: `prompt_tokens` [batch, prompt_length] (right-padded; what the
        model reads, start token included) and `prompt_lengths` [batch] (>= 1).
      max_length: cache slots: the longest prompt plus the tokens to generate.

    Returns:
      (DecodeState, logits [batch, vocab] (f32) at each row's last prompt
      token, positions [batch] of each row's next token).
    """
    tokens = jnp.asarray(batch['prompt_tokens'], jnp.int32)
    lengths = jnp.asarray(batch['prompt_lengths'], jnp.int32)
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    valid = positions < lengths[:, None]
    prefix = valid if self.inputs_bidirectional_attention else None
    cache, batch_axes = self.init_cache(b, max_length)
    logits, cache = self._decode_apply(params, cache, tokens, positions,
                                       valid.astype(jnp.int32), prefix, 'prefill')
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return DecodeState(cache, batch_axes=batch_axes), last, lengths

  def decode_step(self, params, state: DecodeState, tokens: Array, positions: Array):
    """One token per row: tokens, positions [batch] -> (logits [batch, vocab], state)."""
    ones = jnp.ones(tokens.shape + (1,), jnp.int32)
    logits, cache = self._decode_apply(params, state.cache, tokens[:, None],
                                       positions[:, None], ones, None, 'step')
    return logits[:, 0], state.replace(cache=cache)

  def feature_shapes(self, batch_size, feature_lengths):
    length = feature_lengths['targets'] + feature_lengths.get('inputs', 0)
    return {k: (batch_size, length) for k in self.FEATURES + self.OPTIONAL_FEATURES}

  def check_lengths(self, feature_lengths: Mapping[str, int]) -> None:
    self.config.check_length(feature_lengths['targets'] + feature_lengths.get('inputs', 0))


class EncoderDecoderModel(BaseModel):
  """T5-style encoder-decoder."""
  FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
              'decoder_loss_weights')
  OPTIONAL_FEATURES = ('encoder_positions', 'decoder_positions', 'encoder_segment_ids',
                       'decoder_segment_ids')

  def __init__(self, config: cfg.EncoderDecoderConfig, **kwargs):
    if kwargs.get('decoder_start_token', 0) is None:
      raise cfg.ConfigError('EncoderDecoderModel.decoder_start_token must be a token id (T5: '
                            '0), not None')
    if config.peft is not None and config.peft.method == cfg.PeftMethod.PROMPT:
      raise cfg.ConfigError("prompt tuning is built for decoder-only models: use method "
                            "'prefix' or 'lora' on an encoder-decoder")
    if not isinstance(config, cfg.EncoderDecoderConfig):
      raise cfg.ConfigError('EncoderDecoderModel needs an EncoderDecoderConfig, got '
                            f'{type(config).__name__}: bind EncoderDecoderModel.config = '
                            '@EncoderDecoderConfig()')
    super().__init__(config, **kwargs)

  def _make_module(self, config):
    return transformer.EncoderDecoder(config)

  def _init_cache_boxed(self, batch_size, max_length, encoder_length):
    c = self.config
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    enc_tokens = jnp.zeros((batch_size, encoder_length), jnp.int32)
    encoded = jnp.zeros((batch_size, encoder_length, c.emb_dim), c.compute_dtype)
    return self._decode_module.init(
        {'params': jax.random.PRNGKey(0)}, encoded, enc_tokens, tokens, tokens, tokens,
        'prefill', method='decode')[transformer.CACHE]

  def _decode_apply(self, params, state, tokens, positions, segment_ids, mode):
    logits, variables = self._decode_module.apply(
        {'params': self.decode_params(params), transformer.CACHE: state.cache}, state.encoded,
        state.encoder_input_tokens, tokens, positions, segment_ids, mode, method='decode',
        mutable=[transformer.CACHE])
    return logits, state.replace(cache=variables[transformer.CACHE])

  def prefill(self, params, batch: Batch, max_length: int):
    """Encodes `encoder_input_tokens` [batch, inputs_length] and runs the decoder
    prompt (`prompt_tokens`/`prompt_lengths`; default: `decoder_start_token`) into a
    cache of `max_length` slots. Returns what `DecoderOnlyModel.prefill` does."""
    enc_tokens = jnp.asarray(batch['encoder_input_tokens'], jnp.int32)
    b = enc_tokens.shape[0]
    start = jnp.full((b, 1), self.decoder_start_token, jnp.int32)
    tokens = jnp.asarray(batch.get('prompt_tokens', start), jnp.int32)
    lengths = jnp.asarray(batch.get('prompt_lengths', jnp.ones((b,), jnp.int32)), jnp.int32)
    encoded, _ = self._decode_module.apply({'params': self.decode_params(params)}, enc_tokens,
                                           method='encode')
    cache, batch_axes = self.init_cache(b, max_length, enc_tokens.shape[1])
    state = DecodeState(cache, encoded, enc_tokens, batch_axes)
    p = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    valid = (positions < lengths[:, None]).astype(jnp.int32)
    logits, state = self._decode_apply(params, state, tokens, positions, valid, 'prefill')
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return state, last, lengths

  def decode_step(self, params, state: DecodeState, tokens: Array, positions: Array):
    """One token per row: tokens, positions [batch] -> (logits [batch, vocab], state)."""
    ones = jnp.ones(tokens.shape + (1,), jnp.int32)
    logits, state = self._decode_apply(params, state, tokens[:, None], positions[:, None],
                                       ones, 'step')
    return logits[:, 0], state

  def feature_shapes(self, batch_size, feature_lengths):
    shapes = {}
    for k in self.FEATURES + self.OPTIONAL_FEATURES:
      side = 'inputs' if k.startswith('encoder') else 'targets'
      shapes[k] = (batch_size, feature_lengths[side])
    return shapes

  def check_lengths(self, feature_lengths: Mapping[str, int]) -> None:
    self.config.check_length(feature_lengths['inputs'], 'inputs')
    self.config.check_length(feature_lengths['targets'], 'targets')
