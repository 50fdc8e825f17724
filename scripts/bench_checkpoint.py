"""Checkpoint save/restore time with and without digests (verified checkpoints).

    python scripts/bench_checkpoint.py [--model models/llama/20m.gin] [--repeats 5] [--record]

Builds the model's full train state (parameters + AdamW state), then times, in
the same process and alternating so machine noise hits both alike:
- save: `Checkpointer.save` (digests + finiteness check + orbax save + file
  manifest, waited for) against the same orbax save without the `meta` item;
  and the digest pass alone, which is all an asynchronous save adds to the
  train loop (the manifest is written by orbax's background thread);
- restore: `Checkpointer.restore` (orbax restore + digest comparison) against
  the plain orbax restore.
Prints a table (best of --repeats); --record appends it to docs/benchmarks.md.
"""

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,wrong-import-position

from partitioning import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from partitioning import partitioner as partitioner_lib  # pylint: disable=wrong-import-position
from t5x_like import checkpoints  # pylint: disable=wrong-import-position
from t5x_like import gin_utils  # pylint: disable=wrong-import-position
from t5x_like import optimizers  # pylint: disable=wrong-import-position
from t5x_like import trainer as trainer_lib  # pylint: disable=wrong-import-position


def measure(model_file: str, repeats: int, length: int = 256, batch: int = 8):
  model = gin_utils.model_from_gin([model_file])
  shapes = {k: v.shape for k, v in model.dummy_batch(batch, {'targets': length}).items()}
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-3), part, shapes)
  state = trainer.init_state()
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  data = {'batches_consumed': 1}
  tmp = tempfile.mkdtemp(prefix='bench_checkpoint_')
  ckpt = checkpoints.Checkpointer(tmp, keep=2 * repeats + 2, async_save=False)
  times = {'save': [], 'save_plain': [], 'restore': [], 'restore_plain': [], 'digest': []}
  step = 0
  for _ in range(repeats):
    step += 1
    t = time.perf_counter()
    ckpt.save(step, state, data)
    ckpt.wait()
    times['save'].append(time.perf_counter() - t)
    step += 1
    t = time.perf_counter()
    ckpt.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)
    ckpt.wait()
    times['save_plain'].append(time.perf_counter() - t)
    t = time.perf_counter()
    restored = ckpt.restore(step - 1, trainer.abstract_state)
    jax.block_until_ready(restored.state)
    times['restore'].append(time.perf_counter() - t)
    t = time.perf_counter()
    plain = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state), data=ocp.args.JsonRestore()))
    jax.block_until_ready(plain['state'])
    times['restore_plain'].append(time.perf_counter() - t)
    t = time.perf_counter()
    checkpoints.state_digests(state)
    times['digest'].append(time.perf_counter() - t)
  ckpt.close()
  shutil.rmtree(tmp, ignore_errors=True)
  best = {k: min(v) for k, v in times.items()}
  return trainer.num_params, size, best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='models/llama/20m.gin')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--record', action='store_true')
  args = parser.parse_args(argv)
  params, size, best = measure(args.model, args.repeats)
  rows = [
      ('save, waited for (digests + finiteness + orbax write + file manifest)', best['save'],
       best['save_plain']),
      ('what an async save adds to the train loop (digests + finiteness; the manifest is '
       'written in the background)', best['save_plain'] + best['digest'], best['save_plain']),
      ('restore (orbax read + file manifest + digests + finiteness)', best['restore'],
       best['restore_plain']),
  ]
  header = (f'{args.model}: {params:,} parameters, train state {size / 2**20:.0f} MiB on '
            f'{jax.device_count()} {jax.devices()[0].platform} device(s); best of {args.repeats}; '
            f'digest pass alone {best["digest"] * 1e3:.0f} ms')
  table = ['| operation | with digests (s) | without (s) | overhead |', '|---|---|---|---|']
  table += [f'| {name} | {w:.3f} | {wo:.3f} | {100 * (w / wo - 1):+.1f}% |' for name, w, wo in rows]
  print(header)
  print('\n'.join(table))
  if args.record:
    cmd = 'python scripts/bench_checkpoint.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(ROOT, 'docs', 'benchmarks.md'), 'a') as f:
      f.write(f'\n## Verified checkpoints: digest overhead ({datetime.date.today()}, '
              f'{platform.node() or "this machine"}, {os.cpu_count()} CPUs)\n\n`{cmd}`\n\n'
              f'{header}.\n\n' + '\n'.join(table) + '\n')


if __name__ == '__main__':
  main()
