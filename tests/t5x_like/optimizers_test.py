"""Learning-rate schedules against their formulas; optimizer construction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import optimizers


def test_warmup_cosine():
  s = optimizers.warmup_cosine(peak_value=1.0, warmup_steps=10, decay_steps=110, end_ratio=0.1)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  # halfway through the decay: end + (peak - end) * (1 + cos(pi/2)) / 2
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  assert float(s(110)) == pytest.approx(0.1)


def test_warmup_linear():
  s = optimizers.warmup_linear(peak_value=2.0, warmup_steps=4, decay_steps=14, end_ratio=0.0)
  assert [float(s(i)) for i in (0, 2, 4, 9, 14)] == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0])


def test_warmup_rsqrt():
  s = optimizers.warmup_rsqrt(peak_value=1.0, warmup_steps=100)
  assert float(s(50)) == pytest.approx(0.5)
  assert float(s(100)) == pytest.approx(1.0)
  assert float(s(400)) == pytest.approx(math.sqrt(100 / 400))


def test_schedule_errors():
  with pytest.raises(ValueError, match='decay_steps=10 must exceed .*warmup_steps=20'):
    optimizers.warmup_cosine(warmup_steps=20, decay_steps=10)


def test_adamw_decays_matrices_only_and_clips():
  opt = optimizers.adamw(learning_rate=0.1, weight_decay=0.5, clip_norm=1.0)
  params = {'w': jnp.ones((2, 2)), 'scale': jnp.ones((2,))}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['scale'], 0.0)


def test_errors_name_a_macro_only_when_it_holds_the_value():
  """After a gin run (TRAIN_STEPS = 10, WARMUP_STEPS = 2), a direct call with other
  values is not blamed on those macros; one with their values is."""
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse(['models/llama/tiny.gin', 'runs/pretrain.gin'], [
      "MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
      'TRAIN_STEPS = 10', "MODEL_DIR = '/tmp/unused'", 'WARMUP_STEPS = 20'])
  with pytest.raises(ValueError, match=r'^optimizers.warmup_cosine.decay_steps=5 must exceed '
                     r'optimizers.warmup_cosine.warmup_steps=8:'):
    optimizers.warmup_cosine(warmup_steps=8, decay_steps=5)
  with pytest.raises(ValueError, match=r'^TRAIN_STEPS=10 must exceed WARMUP_STEPS=20:'):
    optimizers.warmup_cosine(warmup_steps=20, decay_steps=10)
  gin.clear_config()
