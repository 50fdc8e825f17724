"""`python -m train/infer/eval --help` (and `-m t5x_like.train/infer/evaluate --help`)
answers without importing jax, gin or TensorFlow and lists every shipped run file (with
its required macros) and model file."""

import os
import subprocess
import sys

import pytest

from t5x_like import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize('module,entry', [
    ('train', 'train'), ('infer', 'infer'), ('eval', 'eval'),
    ('t5x_like.train', 'train'), ('t5x_like.infer', 'infer'), ('t5x_like.evaluate', 'eval')])
def test_help_is_light_and_lists_configs(module, entry):
  out = subprocess.run([sys.executable, '-X', 'importtime', '-m', module, '--help'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  imported = {line.split('|')[-1].strip().split('.')[0] for line in out.stderr.splitlines()
              if line.startswith('import time:')}
  assert not imported & {'jax', 'jaxlib', 'gin', 'tensorflow', 'numpy', 'flax', 'seqio'}, \
      sorted(imported & {'jax', 'jaxlib', 'gin', 'tensorflow', 'numpy', 'flax', 'seqio'})
  assert f'python -m {entry}' in out.stdout
  assert '--gin_file' in out.stdout
  runs, models = flags.shipped('runs'), flags.shipped('models')
  assert len(runs) > 5 and len(models) > 10
  for path, _, required in runs:
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith(path))
    for macro in required:
      assert macro in line, (path, macro)
  for path, _, _ in models:
    assert path in out.stdout
  pretrain = next(r for r in runs if r[0] == os.path.join('runs', 'pretrain.gin'))
  assert pretrain[2] == ['MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS', 'TRAIN_STEPS',
                         'MODEL_DIR']


def test_bad_flag_is_one_line():
  out = subprocess.run([sys.executable, '-m', 'train', '--gin_fil=x.gin'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().count('\n') == 0, out.stderr
  assert 'unrecognised arguments: --gin_fil=x.gin: see python -m train --help' in out.stderr
