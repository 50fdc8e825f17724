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

from t5x_like import gin_utils
from t5x_like import utils

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and the schedule it follows (for logging)."""
  tx: optax.GradientTransformation
  learning_rate: Schedule


def _name(fn: str, param: str, value) -> str:
  """How a user sets `optimizers.<fn>.<param>` to `value` (its macro when gin binds one)."""
  return gin_utils.setting(f'optimizers.{fn}', param, value)


def _schedule(fn: str, lr: Union[float, Schedule]) -> Schedule:
  if callable(lr):
    return lr
  utils.check_float(_name(fn, 'learning_rate', lr), lr, 0.0)
  return optax.constant_schedule(lr)


def _check_warmup(fn: str, warmup_steps: int, decay_steps: Optional[int] = None,
                  decays: bool = True):
  utils.check_int(_name(fn, 'warmup_steps', warmup_steps), warmup_steps, 0)
  if decays:
    utils.check_int(_name(fn, 'decay_steps', decay_steps), decay_steps, 1)
    if decay_steps <= warmup_steps:
      raise utils.InputError(
          f'{_name(fn, "decay_steps", decay_steps)}={decay_steps} must exceed {_name(fn, "warmup_steps", warmup_steps)}='
          f'{warmup_steps}: lower the warmup or raise the number of steps')


def _check_peak(fn: str, peak_value: float, end_ratio: Optional[float] = None):
  utils.check_float(_name(fn, 'peak_value', peak_value), peak_value, 0.0)
  if end_ratio is not None:
    utils.check_float(_name(fn, 'end_ratio', end_ratio), end_ratio, 0.0, 1.0, include_high=True)


def _check_clip(fn: str, clip_norm: Optional[float]):
  if clip_norm is not None:
    utils.check_float(_name(fn, 'clip_norm', clip_norm), clip_norm, 0.0, include_low=False,
                      fix=f'set optimizers.{fn}.clip_norm > 0, or None for no clipping')


def constant(value: float = 1e-3) -> Schedule:
  utils.check_float(_name('constant', 'value', value), value, 0.0)
  return optax.constant_schedule(value)


def warmup_cosine(peak_value: float = 1e-3, warmup_steps: int = 1000,
                  decay_steps: int = 100_000, end_ratio: float = 0.1) -> Schedule:
  """Linear warmup to `peak_value`, then cosine decay to `end_ratio * peak_value`
  at `decay_steps` (total steps, warmup included)."""
  _check_peak('warmup_cosine', peak_value, end_ratio)
  _check_warmup('warmup_cosine', warmup_steps, decay_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak_value, warmup_steps, decay_steps,
                                            end_value=end_ratio * peak_value)


def warmup_linear(peak_value: float = 1e-3, warmup_steps: int = 1000,
                  decay_steps: int = 100_000, end_ratio: float = 0.0) -> Schedule:
  """Linear warmup, then linear decay to `end_ratio * peak_value` at `decay_steps`."""
  _check_peak('warmup_linear', peak_value, end_ratio)
  _check_warmup('warmup_linear', warmup_steps, decay_steps)
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak_value, max(warmup_steps, 1)),
      optax.linear_schedule(peak_value, end_ratio * peak_value, decay_steps - warmup_steps),
  ], [warmup_steps])


def warmup_rsqrt(peak_value: float = 1e-2, warmup_steps: int = 10_000) -> Schedule:
  """T5's schedule: linear warmup, then peak * sqrt(warmup / step)."""
  _check_peak('warmup_rsqrt', peak_value)
  _check_warmup('warmup_rsqrt', warmup_steps, decays=False)
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
  lr = _schedule('adamw', learning_rate)
  for name, value in (('b1', b1), ('b2', b2)):
    utils.check_float(_name('adamw', name, value), value, 0.0, 1.0)
  utils.check_float(_name('adamw', 'eps', eps), eps, 0.0)
  utils.check_float(_name('adamw', 'weight_decay', weight_decay), weight_decay, 0.0)
  _check_clip('adamw', clip_norm)
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
  lr = _schedule('adafactor', learning_rate)
  utils.check_float(_name('adafactor', 'decay_rate', decay_rate), decay_rate, 0.0, 1.0, include_low=False,
                    include_high=True)
  utils.check_int(_name('adafactor', 'min_dim_size_to_factor', min_dim_size_to_factor), min_dim_size_to_factor, 1)
  if momentum is not None:
    utils.check_float(_name('adafactor', 'momentum', momentum), momentum, 0.0, 1.0)
  if weight_decay is not None:
    utils.check_float(_name('adafactor', 'weight_decay', weight_decay), weight_decay, 0.0)
  _check_clip('adafactor', clip_norm)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adafactor(lr, min_dim_size_to_factor=min_dim_size_to_factor,
                               decay_rate=decay_rate, momentum=momentum,
                               multiply_by_parameter_scale=True,
                               weight_decay_rate=weight_decay, factored=True))
  return Optimizer(optax.chain(*parts), lr)


def sgd(learning_rate: Union[float, Schedule] = 1e-2, momentum: Optional[float] = None,
        clip_norm: Optional[float] = None) -> Optimizer:
  lr = _schedule('sgd', learning_rate)
  if momentum is not None:
    utils.check_float(_name('sgd', 'momentum', momentum), momentum, 0.0, 1.0)
  _check_clip('sgd', clip_norm)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.sgd(lr, momentum=momentum))
  return Optimizer(optax.chain(*parts), lr)
