"""Optimizers and learning-rate schedules, each a gin-configurable function.

    train.optimizer = @optimizers.adamw()
    optimizers.adamw.learning_rate = @optimizers.warmup_cosine()
    optimizers.warmup_cosine.peak_value = 3e-4
"""

import dataclasses
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and the schedule it follows (for logging)."""
  tx: optax.GradientTransformation
  learning_rate: Schedule


def _schedule(lr: Union[float, Schedule]) -> Schedule:
  return lr if callable(lr) else optax.constant_schedule(lr)


def _check_warmup(warmup_steps: int, decay_steps: Optional[int] = None):
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps={warmup_steps} must be >= 0')
  if decay_steps is not None and decay_steps <= warmup_steps:
    raise ValueError(f'decay_steps={decay_steps} must exceed warmup_steps={warmup_steps}: '
                     'set them from TRAIN_STEPS')


def constant(value: float = 1e-3) -> Schedule:
  return optax.constant_schedule(value)


def warmup_cosine(peak_value: float = 1e-3, warmup_steps: int = 1000,
                  decay_steps: int = 100_000, end_ratio: float = 0.1) -> Schedule:
  """Linear warmup to `peak_value`, then cosine decay to `end_ratio * peak_value`
  at `decay_steps` (total steps, warmup included)."""
  _check_warmup(warmup_steps, decay_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak_value, warmup_steps, decay_steps,
                                            end_value=end_ratio * peak_value)


def warmup_linear(peak_value: float = 1e-3, warmup_steps: int = 1000,
                  decay_steps: int = 100_000, end_ratio: float = 0.0) -> Schedule:
  """Linear warmup, then linear decay to `end_ratio * peak_value` at `decay_steps`."""
  _check_warmup(warmup_steps, decay_steps)
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak_value, max(warmup_steps, 1)),
      optax.linear_schedule(peak_value, end_ratio * peak_value, decay_steps - warmup_steps),
  ], [warmup_steps])


def warmup_rsqrt(peak_value: float = 1e-2, warmup_steps: int = 10_000) -> Schedule:
  """T5's schedule: linear warmup, then peak * sqrt(warmup / step)."""
  _check_warmup(warmup_steps)
  w = max(warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return peak_value * jnp.minimum(step / w, jnp.sqrt(w / jnp.maximum(step, w)))
  return schedule


def _decay_mask(params):
  # No weight decay on vectors (norm scales, biases) or the relative-bias table.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(learning_rate: Union[float, Schedule] = 1e-3, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1,
          clip_norm: Optional[float] = 1.0) -> Optimizer:
  """AdamW with decoupled weight decay on matrices, after global-norm clipping."""
  lr = _schedule(learning_rate)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask))
  return Optimizer(optax.chain(*parts), lr)


def adafactor(learning_rate: Union[float, Schedule] = 1e-2, decay_rate: float = 0.8,
              min_dim_size_to_factor: int = 128, momentum: Optional[float] = None,
              weight_decay: Optional[float] = None,
              clip_norm: Optional[float] = 1.0) -> Optimizer:
  """Adafactor (Shazeer & Stern, 2018) with factored second moments for matrices
  whose two largest dims are at least `min_dim_size_to_factor`."""
  lr = _schedule(learning_rate)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adafactor(lr, min_dim_size_to_factor=min_dim_size_to_factor,
                               decay_rate=decay_rate, momentum=momentum,
                               multiply_by_parameter_scale=True,
                               weight_decay_rate=weight_decay, factored=True))
  return Optimizer(optax.chain(*parts), lr)


def sgd(learning_rate: Union[float, Schedule] = 1e-2, momentum: Optional[float] = None,
        clip_norm: Optional[float] = None) -> Optimizer:
  lr = _schedule(learning_rate)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.sgd(lr, momentum=momentum))
  return Optimizer(optax.chain(*parts), lr)
