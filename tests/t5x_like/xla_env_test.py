"""The XLA options the entry points add (t5x_like/xla_env.py): a user's own option wins,
and a train step's values are the same with and without them; the start-up pause of
the garbage collector ends as it should."""

import gc
import json
import os
import subprocess
import sys
import weakref

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
  assert xla_env.flags_with_defaults(mine) == ' '.join((mine,) + xla_env.CPU_FLAGS[1:])
  everything = mine + ''.join(f' {f.split("=")[0]}=x' for f in xla_env.CPU_FLAGS[1:])
  assert xla_env.flags_with_defaults(everything) == everything


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


_REEXEC = """
import os, sys
sys.path.insert(0, {root!r})
from t5x_like import xla_env
print('start', os.getpid(), flush=True)
xla_env.reexec_with_malloc_tunables()
xla_env.apply()
print('tunables', os.environ.get('GLIBC_TUNABLES'))
print('cache', os.environ.get('JAX_COMPILATION_CACHE_DIR'))
"""


def _run_reexec(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', 'JAX_COMPILATION_CACHE_DIR', 'T5X_LIKE_XLA_DEFAULTS')}
  env.update(T5X_LIKE_CACHE=str(tmp_path), **extra)
  res = subprocess.run([sys.executable, '-c', _REEXEC.format(root=ROOT)], env=env,
                       capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stderr[-2000:]
  return dict(line.split(' ', 1) for line in res.stdout.strip().splitlines()
              if not line.startswith('start')), res.stdout.count('start')


def test_malloc_tunables_and_compilation_cache(tmp_path):
  """Huge pages where glibc and the kernel offer them on request, by restarting the
  interpreter exactly once; JAX's compilation cache under the cache root; a user's
  own settings win; T5X_LIKE_XLA_DEFAULTS=0 turns both off."""
  out, starts = _run_reexec(tmp_path)
  if xla_env._glibc_at_least(2, 35) and xla_env._huge_pages_on_request():  # pylint: disable=protected-access
    assert out['tunables'] == xla_env.HUGETLB and starts == 2
  else:
    assert out['tunables'] == 'None' and starts == 1
  assert out['cache'] == os.path.join(str(tmp_path), 'jax_compilation')

  out, starts = _run_reexec(tmp_path, GLIBC_TUNABLES='glibc.malloc.hugetlb=0',
                            JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'mine'))
  assert (out['tunables'], starts) == ('glibc.malloc.hugetlb=0', 1)
  assert out['cache'] == str(tmp_path / 'mine')

  out, starts = _run_reexec(tmp_path, T5X_LIKE_XLA_DEFAULTS='0')
  assert (out['tunables'], out['cache'], starts) == ('None', 'None', 1)


def test_elementwise_compiler_options():
  assert xla_env.elementwise_compiler_options('gpu') == {}
  assert set(xla_env.elementwise_compiler_options('cpu')) == {'xla_cpu_experimental_ynn_fusion_type'}


def test_gc_pause_and_resume(monkeypatch):
  """pause_gc turns the collector off (not with T5X_LIKE_XLA_DEFAULTS=0, nor when it is
  off already); resume_gc collects start-up's unreachable cycles and turns it on,
  freezing nothing; a resume without a pause changes nothing."""

  class Cycle:
    pass

  monkeypatch.setattr(xla_env, '_gc_paused', False)  # (nothing of another test's pause)
  monkeypatch.delenv('T5X_LIKE_XLA_DEFAULTS', raising=False)
  assert gc.isenabled()
  try:
    xla_env.resume_gc()
    assert gc.isenabled()
    monkeypatch.setenv('T5X_LIKE_XLA_DEFAULTS', '0')
    xla_env.pause_gc()
    assert gc.isenabled()
    monkeypatch.delenv('T5X_LIKE_XLA_DEFAULTS')
    xla_env.pause_gc()
    assert not gc.isenabled()
    xla_env.pause_gc()  # (already off: one resume still ends it)
    frozen = gc.get_freeze_count()
    cycle = Cycle()
    cycle.me = cycle
    probe = weakref.ref(cycle)
    del cycle
    assert probe() is not None  # (only the collector frees a cycle)
    xla_env.resume_gc()
    assert gc.isenabled() and probe() is None and gc.get_freeze_count() == frozen
    gc.disable()  # (off by the user: neither paused nor resumed)
    xla_env.pause_gc()
    xla_env.resume_gc()
    assert not gc.isenabled()
  finally:
    gc.enable()
