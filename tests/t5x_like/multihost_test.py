"""Two processes joined by jax.distributed (CPU collectives over localhost) train
exactly like one process with the same devices, and resume a one-process run
with the same global batches (data shards 1 -> 2)."""

import os
import shutil
import socket
import subprocess

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


def two_processes(model_dir):
  port = free_port()
  procs = [subprocess.Popen(
      command(model_dir, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'),
      cwd=tu.ROOT, env=tu.subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
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
