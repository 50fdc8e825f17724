"""`python -m train` as a process: SIGKILL and resume, SIGTERM, one-line errors."""

import os
import signal
import subprocess
import time

import pytest

from t5x_like import checkpoints

import testing_utils as tu

STEPS = 40
EVERY = 5


def command(model_dir, *extra):
  return tu.train_command(model_dir, STEPS, 128, f'--gin.train_lib.train.checkpoint_every={EVERY}',
                          *extra)


def start(model_dir, *extra):
  return subprocess.Popen(command(model_dir, *extra), cwd=tu.ROOT, env=tu.subprocess_env(),
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
  done = subprocess.run(command(model_dir), cwd=tu.ROOT, env=tu.subprocess_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return tu.step_records(model_dir)


def test_sigkill_then_restart_is_bit_identical(uninterrupted, tmp_path):
  model_dir = str(tmp_path / 'killed')
  proc = start(model_dir)
  # Kill as soon as a second checkpoint is committed: later steps are lost and redone.
  wait_for(proc, lambda: len(committed_steps(model_dir)) >= 2, timeout=240)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(tu.step_records(model_dir)) < STEPS, 'the run finished before it was killed'
  again = subprocess.run(command(model_dir), cwd=tu.ROOT, env=tu.subprocess_env(), capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step' in again.stdout
  assert tu.step_records(model_dir) == uninterrupted  # every step: same batch, same loss bits
  # No half-written checkpoint is left, and every kept one restores.
  ckpt_dir = checkpoints.checkpoint_dir(model_dir)
  assert all(name.isdigit() for name in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)
  assert checkpoints.latest_step(model_dir) == STEPS


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
  model_dir = str(tmp_path / 'term')
  proc = start(model_dir)
  wait_for(proc, lambda: max(tu.step_records(model_dir), default=0) >= 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM: saved a checkpoint at step' in out
  saved = checkpoints.latest_step(model_dir)
  assert saved == max(tu.step_records(model_dir)) and 5 <= saved < STEPS


@pytest.mark.parametrize('entry', ['train', 't5x_like.train'])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, entry):
  model_dir = str(tmp_path / 'bad')
  cmd = command(model_dir, '--gin.model_config.DecoderConfig.num_hedas=2')
  cmd[2] = entry  # python -m train, or python -m t5x_like.train
  done = subprocess.run(cmd, cwd=tu.ROOT, env=tu.subprocess_env(), capture_output=True, text=True)
  assert done.returncode == 2
  lines = [l for l in done.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'did you mean model_config.DecoderConfig.num_heads?' in lines[0]
  assert 'Traceback' not in done.stderr
  assert not os.path.exists(model_dir)
