"""Typed metrics: merging is exact, reporting drops what is undefined, and a
model's metrics over a batch equal its metrics merged over the batch's parts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import metrics as metrics_lib
from models import model as model_lib

import testing_utils as tu


def test_each_kind_merges_and_computes():
  a = {'s': metrics_lib.Sum(jnp.float32(3.0)),
       'avg': metrics_lib.Average(jnp.float32(6.0), jnp.float32(2.0), console='.2f'),
       'ppl': metrics_lib.Perplexity(jnp.float32(2.0), jnp.float32(2.0)),
       'last': metrics_lib.Last(jnp.float32(1.0))}
  b = {'s': metrics_lib.Sum(jnp.float32(4.0)),
       'avg': metrics_lib.Average(jnp.float32(2.0), jnp.float32(6.0), console='.2f'),
       'ppl': metrics_lib.Perplexity(jnp.float32(6.0), jnp.float32(2.0)),
       'last': metrics_lib.Last(jnp.float32(5.0))}
  got = metrics_lib.compute(metrics_lib.merge(a, b))
  assert got == pytest.approx({'s': 7.0, 'avg': 1.0, 'ppl': math.exp(2.0), 'last': 5.0})
  assert list(got) == ['avg', 'last', 'ppl', 's']  # reported by name
  a['loss'] = metrics_lib.Average(jnp.float32(1.0), jnp.float32(4.0), console='.3f')
  assert metrics_lib.console_fields(a, metrics_lib.compute(a)) == ' | loss 0.250 | avg 3.00'


def test_undefined_average_is_not_reported_and_mismatched_names_refuse():
  m = {'loss/R': metrics_lib.Average(jnp.float32(0.0), jnp.float32(0.0), console='.3f'),
       'n': metrics_lib.Sum(jnp.float32(0.0))}
  assert metrics_lib.compute(m) == {'n': 0.0}
  assert metrics_lib.console_fields(m, metrics_lib.compute(m)) == ''
  with pytest.raises(ValueError, match='different names'):
    metrics_lib.merge(m, {'n': m['n']})


def test_metrics_cross_jit_and_scan_as_pytrees():
  def step(carry, x):
    return metrics_lib.merge(carry, {'avg': metrics_lib.Average(x, jnp.float32(1.0)),
                                     'last': metrics_lib.Last(x)}), None
  zero = {'avg': metrics_lib.Average(jnp.float32(0), jnp.float32(0)),
          'last': metrics_lib.Last(jnp.float32(0))}
  out, _ = jax.jit(lambda xs: jax.lax.scan(step, zero, xs))(jnp.arange(4.0))
  assert metrics_lib.compute(out) == pytest.approx({'avg': 1.5, 'last': 3.0})


@pytest.mark.parametrize('encdec', [False, True], ids=['decoder', 'encdec'])
def test_model_metrics_of_a_batch_equal_its_halves_merged(encdec):
  """Sums, not means: every metric of loss_fn over 4 rows equals the merge of
  its values over rows 0-1 and 2-3 (with uneven padding and token groups).
  (Router losses are per batch, so MoE models are left out here.)"""
  if encdec:
    model = model_lib.EncoderDecoderModel(tu.tiny_encdec(), z_loss=1e-3)
    lengths = {'inputs': 12, 'targets': 16}
  else:
    model = model_lib.DecoderOnlyModel(tu.tiny_decoder(), z_loss=1e-3)
    lengths = {'targets': 16}
  batch = tu.random_batch(model, 4, lengths, seed=3, packed=True)
  batch['decoder_loss_weights'][0, 5:] = 0  # rows with different token counts
  batch['decoder_loss_weights'][3, 2:] = 0
  params = tu.init_params(model, batch)
  groups = {'even': np.asarray(np.arange(4)[:, None] % 2 == 0, np.float32) *
                    np.ones((4, 16), np.float32)}
  groups['none'] = np.zeros((4, 16), np.float32)
  fn = jax.jit(model.loss_fn)

  def part(rows):
    return fn(params, {k: v[rows] for k, v in batch.items()}, None,
              {k: v[rows] for k, v in groups.items()})
  whole_sum, whole = fn(params, batch, None, groups)
  (s1, m1), (s2, m2) = part(slice(0, 2)), part(slice(2, 4))
  merged = metrics_lib.compute(metrics_lib.merge(m1, m2))
  want = metrics_lib.compute(whole)
  assert 'loss/none' not in want and 'loss/even' in want
  assert set(merged) == set(want)
  for name in want:
    assert merged[name] == pytest.approx(want[name], rel=2e-5, abs=1e-6), name
  assert float(s1 + s2) == pytest.approx(float(whole_sum), rel=2e-5)
  # The objective is cross-entropy + z-loss + router losses; perplexity is exp(cross-entropy).
  assert want['loss'] == pytest.approx(want['cross_entropy'] + want['z_loss'] + want['moe_loss'],
                                       rel=1e-5)
  assert want['perplexity'] == pytest.approx(math.exp(want['cross_entropy']), rel=1e-5)
  assert want['target_tokens'] == float(batch['decoder_loss_weights'].sum())
