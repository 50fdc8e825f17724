"""`python -m train` as a process: SIGKILL and resume, SIGTERM, one-line errors."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from t5x_like import checkpoints

import testing_utils as tu

STEPS = 40
EVERY = 5


def command(model_dir, *extra):
  return tu.train_command(model_dir, STEPS, 32, f'--gin.train_lib.train.checkpoint_every={EVERY}',
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
def uninterrupted_dir(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('whole') / 'run')
  tu.load_script('chaos').run_to_end(model_dir, STEPS, EVERY)
  return model_dir


def test_chaos_sigkills_lose_nothing(uninterrupted_dir, tmp_path):
  """The short form of scripts/chaos.py: three SIGKILLs, two of them while a
  checkpoint is being written; every step, the final state and every
  checkpoint left are checked."""
  chaos = tu.load_script('chaos')
  figures = chaos.chaos(uninterrupted_dir, str(tmp_path / 'killed'), kills=3, mid_save=2,
                        steps=STEPS, every=EVERY, seed=1, log=lambda *_: None)
  assert figures['mid_save'] == 2 and figures['steps_compared'] == STEPS
  ckpt_dir = checkpoints.checkpoint_dir(str(tmp_path / 'killed'))
  assert all(name.isdigit() for name in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/PID/status')
@pytest.mark.parametrize('entry', ['train', 't5x_like.train'])
def test_sigterm_at_start_exits_zero_writing_nothing_and_start_is_quiet(tmp_path, entry):
  model_dir = str(tmp_path / 'early')
  cmd = command(model_dir)
  cmd[2] = entry  # python -m train, or python -m t5x_like.train
  env = tu.subprocess_env()
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # the entry itself keeps TensorFlow's probing quiet
  proc = subprocess.Popen(cmd, cwd=tu.ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for(proc, lambda: tu.catches_sigterm(proc.pid))  # before jax is even imported
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM before training started: exiting without writing anything' in out
  assert not os.path.exists(model_dir)
  assert err == ''  # no CUDA/TPU probing lines on a CPU-only machine


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
  model_dir = str(tmp_path / 'term')
  proc = start(model_dir)
  wait_for(proc, lambda: max(tu.step_records(model_dir), default=0) >= 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert re.search(r'SIGTERM: (saved a checkpoint at step|the checkpoint of step \d+ is already '
                   r'saved)', out), out
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
