"""The XLA options the entry points add (t5x_like/xla_env.py): a user's own option wins,
and a train step's values are the same with and without them."""

import json
import os
import subprocess
import sys

import numpy as np

from t5x_like import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_STEP = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax, numpy as np
from models import model as model_lib
import testing_utils as tu
model = model_lib.DecoderOnlyModel(tu.tiny_decoder(attention_block_size=8))
batch = tu.random_batch(model, 2, {{'targets': 32}}, packed=True)
params = tu.init_params(model, batch)
loss, grads = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]))(params)
print(json.dumps([float(loss)] + [float(np.sum(np.abs(g))) for g in jax.tree.leaves(grads)]))
"""


def test_user_flags_win():
  flag = xla_env.CPU_FLAGS[0].split('=')[0]
  assert xla_env.flags_with_defaults('') == ' '.join(xla_env.CPU_FLAGS)
  mine = f'--foo=1 {flag}=-eltwise'
  assert xla_env.flags_with_defaults(mine) == mine


def test_train_step_values_unchanged():
  script = _STEP.format(root=ROOT, tests=os.path.join(ROOT, 'tests'))
  out = []
  for flags in ('', xla_env.flags_with_defaults('')):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
    res = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out.append(json.loads(res.stdout.strip().splitlines()[-1]))
  np.testing.assert_allclose(out[1], out[0], rtol=1e-6)
