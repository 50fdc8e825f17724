"""Model wrappers: a Flax module plus its loss, scoring and batch contract.

The trainer only sees this interface: `init_variables`, `loss_fn` (returning
a loss sum and typed metrics, `models/metrics.py`, so that sharded,
accumulated and single-device steps normalise the same way), `per_token_loss`
and `score_batch` (per-sequence log-likelihoods, the
seam DPO and reward models build on).
"""

import abc
from typing import Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import config as cfg
from models import losses
from models import metrics as metrics_lib
from models import moe as moe_lib
from models import transformer

Array = jax.Array
Batch = Mapping[str, Array]


class BaseModel(abc.ABC):
  """Loss and batch contract around a Flax module."""

  # Features the module reads, and which of them are optional.
  FEATURES: Tuple[str, ...] = ()
  OPTIONAL_FEATURES: Tuple[str, ...] = ()

  def __init__(self, config: cfg.DecoderConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0):
    if z_loss < 0:
      raise cfg.ConfigError(f'z_loss={z_loss} must be >= 0')
    if not 0.0 <= label_smoothing < 1.0:
      raise cfg.ConfigError(f'label_smoothing={label_smoothing} must be in [0, 1)')
    self.config = config
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.module = self._make_module()  # deterministic: init, eval, scoring
    self._train_module = self.module.clone(deterministic=False)  # dropout on

  @abc.abstractmethod
  def _make_module(self) -> nn.Module:
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
    return self.module.init({'params': rng}, **self._module_inputs(batch))

  @property
  def needs_rng(self) -> bool:
    """Whether training draws randomness (dropout, router jitter)."""
    c = self.config
    return c.dropout_rate > 0.0 or (c.num_experts > 0 and c.router_jitter > 0.0)

  def apply_with_stats(self, params, batch: Batch, dropout_rng: Optional[Array] = None
                       ) -> Tuple[Array, Dict[str, Array]]:
    """Logits [batch, length, vocab] (f32) and the MoE router statistics:
    name -> [num_moe_layers] f32 (empty for a dense model)."""
    module, kwargs = self.module, {}
    if dropout_rng is not None:
      module, kwargs = self._train_module, {'rngs': {'dropout': dropout_rng}}
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
    loss, z, logits, stats = self._per_token_loss_and_stats(params, batch, dropout_rng)
    ce = loss - z  # [batch, length]
    weights = batch['decoder_loss_weights'].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch['decoder_target_tokens']).astype(jnp.float32)
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

  def score_batch(self, params, batch: Batch) -> Array:
    """Sum of target-token log-likelihoods per example [batch] (no z-loss, no smoothing)."""
    logits = self.apply(params, batch)
    logp, _ = losses.cross_entropy_with_logits(logits, batch['decoder_target_tokens'])
    return -jnp.sum(logp * batch['decoder_loss_weights'], axis=-1)


class DecoderOnlyModel(BaseModel):
  """Causal LM, or prefix-LM when batches carry `decoder_causal_attention`."""
  FEATURES = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
  OPTIONAL_FEATURES = ('decoder_positions', 'decoder_segment_ids', 'decoder_causal_attention')

  def _make_module(self):
    return transformer.DecoderOnly(self.config)

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
    if not isinstance(config, cfg.EncoderDecoderConfig):
      raise cfg.ConfigError('EncoderDecoderModel needs an EncoderDecoderConfig, got '
                            f'{type(config).__name__}: bind EncoderDecoderModel.config = '
                            '@EncoderDecoderConfig()')
    super().__init__(config, **kwargs)

  def _make_module(self):
    return transformer.EncoderDecoder(self.config)

  def feature_shapes(self, batch_size, feature_lengths):
    shapes = {}
    for k in self.FEATURES + self.OPTIONAL_FEATURES:
      side = 'inputs' if k.startswith('encoder') else 'targets'
      shapes[k] = (batch_size, feature_lengths[side])
    return shapes

  def check_lengths(self, feature_lengths: Mapping[str, int]) -> None:
    self.config.check_length(feature_lengths['inputs'], 'inputs')
    self.config.check_length(feature_lengths['targets'], 'targets')
