"""Two processes joined by jax.distributed (CPU collectives over localhost) train
exactly like one process with the same devices."""

import socket
import subprocess

import pytest

import testing_utils as tu

STEPS = 4


def command(model_dir, *extra):
  return tu.train_command(model_dir, STEPS, 32, '--gin.MESH_SHAPE=(2, 2, 1)', *extra)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  one = str(tmp_path / 'one')
  done = subprocess.run(command(one), cwd=tu.ROOT, env=tu.subprocess_env(4), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]

  two = str(tmp_path / 'two')
  port = free_port()
  procs = [subprocess.Popen(
      command(two, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'),
      cwd=tu.ROOT, env=tu.subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert '2 process(es)' in outs[0][0]
  single, multi = tu.step_records(one), tu.step_records(two)
  assert sorted(multi) == list(range(1, STEPS + 1))
  for step in single:
    # Process 0 logs the hash of its own rows; the losses are of the global batch.
    assert multi[step][0] == pytest.approx(single[step][0], rel=1e-6)

