"""Two processes joined by jax.distributed (CPU collectives over localhost) train
exactly like one process with the same devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4


def command(model_dir, *extra):
  return [sys.executable, '-m', 'train', '--gin_file=models/llama/tiny.gin',
          '--gin_file=runs/pretrain.gin', "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", f'--gin.TRAIN_STEPS={STEPS}',
          f"--gin.MODEL_DIR='{model_dir}'", '--gin.BATCH_SIZE=8', '--gin.WARMUP_STEPS=2',
          '--gin.MESH_SHAPE=(2, 2, 1)', '--gin.train_lib.train.eval_split=None',
          '--gin.train_lib.train.peak_flops=1e11', *extra]


def env(devices):
  e = dict(os.environ)
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  e['JAX_PLATFORMS'] = 'cpu'
  return e


def losses(model_dir):
  out = {}
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if r['kind'] == 'step':
        out[r['step']] = (r['loss'], r['batch_hash'])
  return out


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  one = str(tmp_path / 'one')
  done = subprocess.run(command(one), cwd=ROOT, env=env(4), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]

  two = str(tmp_path / 'two')
  port = free_port()
  procs = [subprocess.Popen(
      command(two, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'),
      cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert '2 process(es)' in outs[0][0]
  single, multi = losses(one), losses(two)
  assert sorted(multi) == list(range(1, STEPS + 1))
  for step in single:
    # Process 0 logs the hash of its own rows; the losses are of the global batch.
    assert multi[step][0] == pytest.approx(single[step][0], rel=1e-6)
