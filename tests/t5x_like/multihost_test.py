"""Two processes joined by jax.distributed (CPU collectives over localhost) train
exactly like one process with the same devices, resume a one-process run
with the same global batches (data shards 1 -> 2), and both stop cleanly when
only one of them gets SIGTERM."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import testing_utils as tu

STEPS = 4


def command(model_dir, *extra):
  return tu.train_command(model_dir, STEPS, 32, '--gin.MESH_SHAPE=(2, 2, 1)',
                          '--gin.train_lib.train.checkpoint_every=2', *extra)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_two(cmd, env=None):
  """Starts `cmd + [process flags]` as processes 0 and 1 of one job."""
  port = free_port()
  return [subprocess.Popen(
      cmd + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=tu.ROOT, env=env or tu.subprocess_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def two_processes(model_dir):
  procs = start_two(command(model_dir))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert '2 process(es)' in outs[0][0]
  return outs


def test_two_processes_equal_one_and_resume_across_host_counts(tmp_path):
  one = str(tmp_path / 'one')
  done = subprocess.run(command(one), cwd=tu.ROOT, env=tu.subprocess_env(4), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  single = tu.step_records(one)

  two = str(tmp_path / 'two')
  two_processes(two)
  multi = tu.step_records(two)
  assert sorted(multi) == list(range(1, STEPS + 1))
  for step in single:
    assert multi[step][1] == single[step][1]  # the same global batches
    assert multi[step][0] == pytest.approx(single[step][0], rel=1e-6)

  # Stop the one-process run after step 2 (drop its later checkpoint) and resume it
  # with two processes, each feeding half of every batch: the global batches go on
  # exactly as in the uninterrupted run.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(one, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', str(STEPS)))
  outs = two_processes(resumed)
  assert 'resumed from step 2' in outs[0][0]
  after = tu.step_records(resumed)
  for step in range(3, STEPS + 1):
    assert after[step][1] == single[step][1], step
    assert after[step][0] == pytest.approx(single[step][0], rel=1e-6)


# --- SIGTERM to one of two processes ---------------------------------------------------

SIGTERM_STEPS = 100  # far more than a stop needs: a missed SIGTERM runs to the end


def wait_until(procs, done, timeout=300):
  t = time.time()
  while not done():
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f'a process exited early: {[p.communicate() for p in procs]}')
    assert time.time() - t < timeout, 'timed out'
    time.sleep(0.01)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/PID/status')
@pytest.mark.parametrize('when', ['start', 'training'])
def test_sigterm_to_one_process_stops_both(tmp_path, when):
  """SIGTERM to process 1 only: at start-up (as soon as its handler is in place,
  before jax.distributed.initialize) both exit 0 without writing anything; during
  training both save the same step and exit 0."""
  from t5x_like import checkpoints  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / 'term')
  env = tu.subprocess_env(2)
  env['TF_CPP_MIN_LOG_LEVEL'] = '1'  # XLA's "SIGTERM caught at ..." shows in a failure
  procs = start_two(tu.train_command(model_dir, SIGTERM_STEPS, 32, '--gin.MESH_SHAPE=(2, 2, 1)'),
                    env)
  try:
    if when == 'start':
      wait_until(procs, lambda: tu.catches_sigterm(procs[1].pid))
    else:
      wait_until(procs, lambda: max(tu.step_records(model_dir), default=0) >= 3)
    procs[1].send_signal(signal.SIGTERM)  # only the second process is told
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  out0 = outs[0][0]
  if when == 'start':
    assert 'SIGTERM before training started: exiting without writing anything' in out0, outs
    assert not os.path.exists(model_dir)
  else:
    saved = checkpoints.latest_step(model_dir)
    steps = max(tu.step_records(model_dir))
    assert (f'SIGTERM: saved a checkpoint at step {saved}' in out0 or
            f'SIGTERM: the checkpoint of step {saved} is already saved' in out0), outs
    assert 3 <= saved == steps < SIGTERM_STEPS, (saved, steps, outs)


def test_joining_the_job_keeps_our_sigterm_handler():
  """jax.distributed.initialize must not leave XLA's preemption notifier holding
  SIGTERM (its C handler would swallow the signal; signal.getsignal still names ours)."""
  code = (
      'import os, signal, sys, time\n'
      'from t5x_like import signals, train\n'
      'signals.install()\n'
      'try:\n'
      f'  train.main(["--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=1",'
      ' "--process_id=0"])\n'
      'except train.gin_utils.GinError:\n'
      '  pass  # no gin file: main() stops right after joining the job\n'
      'from jax.experimental import multihost_utils\n'
      'try:\n'
      '  multihost_utils.reached_preemption_sync_point(0)\n'
      '  print("XLA preemption notifier running")\n'
      'except RuntimeError:  # "Preemption sync manager has not been initialized"\n'
      '  pass\n'
      'os.kill(os.getpid(), signal.SIGTERM)\n'
      'time.sleep(0.5)\n'
      'print("requested", signals.requested())\n')
  done = subprocess.run([sys.executable, '-c', code], cwd=tu.ROOT, env=tu.subprocess_env(1),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'XLA preemption notifier running' not in done.stdout
  assert 'requested True' in done.stdout, done.stderr[-3000:]


def test_a_sigterm_during_the_all_gather_is_not_lost(monkeypatch):
  """The handler can run while agreed()'s all-gather waits, after the flag went
  in as False: the gathered False must not overwrite it (it stops the next step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from t5x_like import signals  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(signals._state, 'requested', False)  # pylint: disable=protected-access
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  sent = []

  def allgather(x):  # the other process's flag is 0; SIGTERM lands once, mid-gather
    if not sent:
      sent.append(True)
      signals._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
    return np.stack([np.int32(x), np.int32(0)])

  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  assert not signals.agreed()  # this round read the flag before the signal
  assert signals.requested()
  assert signals.agreed()  # the next round stops every process
