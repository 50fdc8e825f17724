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


def chunked_head_cross_entropy(x: jax.Array, kernel: jax.Array, targets: jax.Array, *,
                               chunk: int, scale: float = 1.0, z_loss: float = 0.0,
                               label_smoothing: float = 0.0
                               ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The output layer and `cross_entropy_with_logits` fused, `chunk` positions at a time.

  x [batch, length, embed] (the final hidden states, in the compute dtype), kernel
  [embed, vocab] (cast to x's dtype, as the output layer does), targets [batch, length].
  logits = (x @ kernel) * scale in f32 exist for one [batch, chunk, vocab] slice at a
  time, forward and backward (the backward recomputes each slice's logits), so the
  [batch, length, vocab] logits and their gradient are never in memory at once: the
  largest activation of a large-vocabulary model's step.

  Returns (loss, z_loss term, correct), each [batch, length] f32: the first two as
  `cross_entropy_with_logits`, `correct` = 1.0 where the arg-max logit is the target
  (no gradient). `length` must be a multiple of `chunk`.
  """
  batch, length, _ = x.shape
  if chunk <= 0 or length % chunk:
    raise ValueError(f'chunked_head_cross_entropy: length {length} is not a multiple of '
                     f'chunk {chunk}')
  loss, z, correct = _head_ce(x, kernel.astype(x.dtype), targets.astype(jnp.int32), chunk,
                              float(scale), float(z_loss), float(label_smoothing))
  return loss, z, jax.lax.stop_gradient(correct)


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
  """[batch, length, ...] -> [length // chunk, batch, chunk, ...] (the scanned axis first)."""
  batch, length = a.shape[:2]
  return jnp.swapaxes(a.reshape(batch, length // chunk, chunk, *a.shape[2:]), 0, 1)


def _unchunk(a: jax.Array) -> jax.Array:
  n, batch, chunk = a.shape[:3]
  return jnp.swapaxes(a, 0, 1).reshape(batch, n * chunk, *a.shape[3:])


def _chunk_logits(x_c, kernel, scale):
  logits = jax.lax.dot_general(x_c, kernel, (((2,), (0,)), ((), ()))).astype(jnp.float32)
  return logits * scale if scale != 1.0 else logits


def _head_forward(x, kernel, targets, chunk, scale, z_loss, label_smoothing):
  def body(_, xs):
    x_c, t_c = xs
    logits = _chunk_logits(x_c, kernel, scale)
    (loss, z), log_z = _forward(logits, t_c, z_loss, label_smoothing)
    correct = (jnp.argmax(logits, -1) == t_c).astype(jnp.float32)
    return None, (loss, z, correct, log_z)
  _, outs = jax.lax.scan(body, None, (_chunks(x, chunk), _chunks(targets, chunk)))
  return tuple(_unchunk(o) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _head_ce(x, kernel, targets, chunk, scale, z_loss, label_smoothing):
  return _head_forward(x, kernel, targets, chunk, scale, z_loss, label_smoothing)[:3]


def _head_ce_fwd(x, kernel, targets, chunk, scale, z_loss, label_smoothing):
  loss, z, correct, log_z = _head_forward(x, kernel, targets, chunk, scale, z_loss,
                                          label_smoothing)
  return (loss, z, correct), (x, kernel, targets, log_z)


def _head_ce_bwd(chunk, scale, z_loss, label_smoothing, res, cotangents):
  x, kernel, targets, log_z = res
  d_total, d_z, _ = cotangents

  def body(d_kernel, xs):
    x_c, t_c, lz_c, dt_c, dz_c = xs
    logits = _chunk_logits(x_c, kernel, scale)
    d_logits, _ = _cross_entropy_bwd(z_loss, label_smoothing, (logits, t_c, lz_c), (dt_c, dz_c))
    d_logits = (d_logits * scale if scale != 1.0 else d_logits).astype(x.dtype)
    dx_c = jax.lax.dot_general(d_logits, kernel, (((2,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    d_kernel = d_kernel + jax.lax.dot_general(x_c, d_logits, (((0, 1), (0, 1)), ((), ())),
                                              preferred_element_type=jnp.float32)
    return d_kernel, dx_c.astype(x.dtype)

  d_kernel, dx = jax.lax.scan(
      body, jnp.zeros(kernel.shape, jnp.float32),
      tuple(_chunks(a, chunk) for a in (x, targets, log_z, d_total, d_z)))
  return (_unchunk(dx), d_kernel.astype(kernel.dtype),
          np.zeros(targets.shape, jax.dtypes.float0))


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)
