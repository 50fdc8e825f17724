"""Cross-entropy with label smoothing and logit z-loss (f32)."""

from typing import Tuple

import jax
import jax.numpy as jnp


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
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  log_probs = logits - log_z[..., None]
  target_logp = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing > 0.0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    # sum_v soft_v * logp_v with soft = low everywhere except `confidence` at the target
    smoothed = low * jnp.sum(log_probs, axis=-1) + (confidence - low) * target_logp
    loss = -smoothed - normalizer
  else:
    loss = -target_logp
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term
