"""Cross-entropy with label smoothing and logit z-loss (f32)."""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy_with_logits(logits: jax.Array, targets: jax.Array,
                              z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """Per-token loss and z-loss term.

  Args:
    logits: [batch, length, vocab].
    targets: [batch, length] int ids.
    z_loss: weight of log(Z)^2, which keeps the softmax normaliser near 1
      (PaLM uses 1e-4).
    label_smoothing: mass spread uniformly over the other vocab entries; the
      constant entropy of the smoothed target is subtracted so a perfect model
      scores 0.

  Returns:
    (loss, z_loss_term), each [batch, length] f32; loss includes the z-loss term.
  """
  return _cross_entropy(logits, targets.astype(jnp.int32), float(z_loss), float(label_smoothing))


def _smoothing_constants(vocab: int, label_smoothing: float):
  """(confidence, low, normalizer) of label smoothing over `vocab` entries."""
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  return confidence, low, normalizer


def _forward(logits, targets, z_loss, label_smoothing):
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  target_logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
  if label_smoothing > 0.0:
    confidence, low, normalizer = _smoothing_constants(vocab, label_smoothing)
    # sum_v soft_v * logp_v with soft = low everywhere except `confidence` at the target
    smoothed = low * (jnp.sum(logits, axis=-1) - vocab * log_z) + (confidence - low) * target_logp
    loss = -smoothed - normalizer
  else:
    loss = -target_logp
  z_term = z_loss * jnp.square(log_z)
  return (loss + z_term, z_term), log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy(logits, targets, z_loss, label_smoothing):
  return _forward(logits, targets, z_loss, label_smoothing)[0]


def _cross_entropy_fwd(logits, targets, z_loss, label_smoothing):
  out, log_z = _forward(logits, targets, z_loss, label_smoothing)
  return out, (logits, targets, log_z)


def _cross_entropy_bwd(z_loss, label_smoothing, res, cotangents):
  # Written out so the backward pass keeps only the logits and log Z: the
  # gradient is one fused pass, softmax * coefficient - target distribution,
  # instead of autodiff's saved softmax, log-probabilities and scattered one-hot.
  logits, targets, log_z = res
  d_total, d_z = cotangents
  vocab = logits.shape[-1]
  probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
  # d/dlogits of (loss + z): (p - soft) + 2 z log_z p; of z alone: 2 z log_z p
  coef = d_total * (1.0 + 2.0 * z_loss * log_z) + d_z * (2.0 * z_loss * log_z)
  onehot = jnp.arange(vocab, dtype=jnp.int32) == targets[..., None]
  if label_smoothing > 0.0:
    confidence, low, _ = _smoothing_constants(vocab, label_smoothing)
    soft = jnp.where(onehot, confidence, low)
  else:
    soft = onehot.astype(jnp.float32)
  d_logits = coef[..., None] * probs - d_total[..., None] * soft
  return d_logits.astype(logits.dtype), np.zeros(targets.shape, jax.dtypes.float0)


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
