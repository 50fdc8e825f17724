"""Typed metrics: small pytrees that know how to combine and report themselves.

A loss function, the train step and evaluation return `Metrics`, a dict
name -> `Metric`. Each metric keeps sums, not means, so microbatches,
devices and evaluation batches combine exactly with `merge`; `compute()`
gives the reported value. Metrics are jax pytrees: they cross `jit`,
`lax.scan` and `device_get` as they are. (In the spirit of clu's
`metrics.Sum`/`metrics.Average`, without its collection machinery.)

Adding a metric is one entry where its inputs are: e.g. in
`models/model.py:BaseModel.loss_fn`

    metrics['my_stat'] = Average(jnp.sum(stat * weights), jnp.sum(weights), console='.3f')

and it reaches the console line (because `console` is set), metrics.jsonl
and TensorBoard with no other change.

`console` is a format spec (e.g. '.4f'); metrics that set it are shown on the
console lines of training and evaluation: `loss` first, then by name (dicts
crossing `jit` come back sorted by key, so insertion order is not kept).
"""

import math
from typing import Dict, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


class Metric:
  """Interface: `merge` two partial results, `compute` the reported value."""

  console: Optional[str]

  def merge(self, other: 'Metric') -> 'Metric':
    raise NotImplementedError

  def compute(self) -> Array:
    """The reported value: a scalar; NaN when it is undefined (nothing to average)."""
    raise NotImplementedError


@flax.struct.dataclass
class Sum(Metric):
  """A total: token counts, example counts."""
  total: Array
  console: Optional[str] = flax.struct.field(pytree_node=False, default=None)

  def merge(self, other: 'Sum') -> 'Sum':
    return self.replace(total=self.total + other.total)

  def compute(self) -> Array:
    return jnp.asarray(self.total, jnp.float32)


@flax.struct.dataclass
class Average(Metric):
  """A weighted mean kept as (sum of weight * value, sum of weights).

  Averages of per-token quantities use the number of target tokens as weight,
  so the mean over merged microbatches or batches is the mean over all their
  tokens. An average with no weight is undefined: NaN, and not reported.
  """
  total: Array
  weight: Array
  console: Optional[str] = flax.struct.field(pytree_node=False, default=None)

  def merge(self, other: 'Average') -> 'Average':
    return self.replace(total=self.total + other.total, weight=self.weight + other.weight)

  def compute(self) -> Array:
    total, weight = jnp.asarray(self.total, jnp.float32), jnp.asarray(self.weight, jnp.float32)
    return jnp.where(weight > 0, total / jnp.where(weight > 0, weight, 1.0), jnp.nan)


@flax.struct.dataclass
class Perplexity(Average):
  """exp of an averaged per-token negative log-likelihood (capped at exp(50))."""

  def compute(self) -> Array:
    return jnp.exp(jnp.minimum(super().compute(), 50.0))


@flax.struct.dataclass
class Last(Metric):
  """A value of the step, not of its tokens (learning rate, gradient norm):
  merging keeps the later one."""
  value: Array
  console: Optional[str] = flax.struct.field(pytree_node=False, default=None)

  def merge(self, other: 'Last') -> 'Last':
    return other

  def compute(self) -> Array:
    return jnp.asarray(self.value, jnp.float32)


Metrics = Dict[str, Metric]


def merge(a: Mapping[str, Metric], b: Mapping[str, Metric]) -> Metrics:
  """Combines two results of the same metrics (microbatches, batches, hosts)."""
  if a.keys() != b.keys():
    raise ValueError(f'cannot merge metrics with different names: {sorted(a)} vs {sorted(b)}')
  return {k: a[k].merge(b[k]) for k in a}


def compute(metrics: Mapping[str, Metric]) -> Dict[str, float]:
  """The reported values as Python floats (fetched from device), by name.

  Undefined values (an average over no tokens, e.g. the loss of a denoiser
  family absent from a batch) are left out.
  """
  host = jax.device_get(dict(metrics))
  out = {}
  for name, metric in host.items():
    value = float(metric.compute())
    if not (math.isnan(value) and isinstance(metric, Average)):
      out[name] = value
  return out


def console_fields(metrics: Mapping[str, Metric], values: Mapping[str, float]) -> str:
  """' | name value' for each metric with a console format: `loss` first, then by name."""
  names = sorted((n for n, m in metrics.items() if m.console and n in values),
                 key=lambda n: (n != 'loss', n))
  return ''.join(f' | {n} {values[n]:{metrics[n].console}}' for n in names)
