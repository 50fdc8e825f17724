"""`python -m train` as a process: SIGKILL and resume, SIGTERM, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from t5x_like import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 40
EVERY = 5


def command(model_dir, *extra):
  return [sys.executable, '-m', 'train', '--gin_file=models/llama/tiny.gin',
          '--gin_file=runs/pretrain.gin', "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", f'--gin.TRAIN_STEPS={STEPS}',
          f"--gin.MODEL_DIR='{model_dir}'", '--gin.BATCH_SIZE=8', '--gin.WARMUP_STEPS=2',
          f'--gin.train_lib.train.checkpoint_every={EVERY}', '--gin.train_lib.train.eval_split=None',
          '--gin.train_lib.train.peak_flops=1e11', *extra]


def env():
  e = dict(os.environ)
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  return e


def step_records(model_dir):
  path = os.path.join(model_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  out = {}
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # a line cut by SIGKILL
        continue
      if r['kind'] == 'step':
        out[r['step']] = (r['loss'], r['batch_hash'])
  return out


def start(model_dir, *extra):
  return subprocess.Popen(command(model_dir, *extra), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed_steps(model_dir):
  d = checkpoints.checkpoint_dir(model_dir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for(proc, done, timeout=240):
  t = time.time()
  while time.time() - t < timeout:
    if done():
      return
    if proc.poll() is not None:
      raise AssertionError(f'exited early: {proc.communicate()}')
    time.sleep(0.05)
  raise AssertionError('timed out')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('whole'))
  done = subprocess.run(command(model_dir), cwd=ROOT, env=env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return step_records(model_dir)


def test_sigkill_then_restart_is_bit_identical(uninterrupted, tmp_path):
  model_dir = str(tmp_path / 'killed')
  proc = start(model_dir)
  # Kill as soon as a second checkpoint is committed: later steps are lost and redone.
  wait_for(proc, lambda: len(committed_steps(model_dir)) >= 2, timeout=240)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(step_records(model_dir)) < STEPS, 'the run finished before it was killed'
  again = subprocess.run(command(model_dir), cwd=ROOT, env=env(), capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step' in again.stdout
  assert step_records(model_dir) == uninterrupted  # every step: same batch, same loss bits
  # No half-written checkpoint is left, and every kept one restores.
  ckpt_dir = checkpoints.checkpoint_dir(model_dir)
  assert all(name.isdigit() for name in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)
  assert checkpoints.latest_step(model_dir) == STEPS


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
  model_dir = str(tmp_path / 'term')
  proc = start(model_dir)
  wait_for(proc, lambda: max(step_records(model_dir), default=0) >= 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM: saved a checkpoint at step' in out
  saved = checkpoints.latest_step(model_dir)
  assert saved == max(step_records(model_dir)) and 5 <= saved < STEPS


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
  model_dir = str(tmp_path / 'bad')
  done = subprocess.run(command(model_dir, '--gin.model_config.DecoderConfig.num_hedas=2'),
                        cwd=ROOT, env=env(), capture_output=True, text=True)
  assert done.returncode == 2
  lines = [l for l in done.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'did you mean model_config.DecoderConfig.num_heads?' in lines[0]
  assert 'Traceback' not in done.stderr
  assert not os.path.exists(model_dir)
