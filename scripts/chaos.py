"""Chaos: SIGKILL a training run again and again, then check that nothing was lost.

    python scripts/chaos.py --kills 50 --mid_save 20 --steps 2000

Runs the tiny LLaMA on the embedded corpus once without interruption (the
reference), then again in another MODEL_DIR, killing the process with SIGKILL
`--kills` times: `--mid_save` of them the moment a checkpoint is being written
(orbax's temporary folder exists), the others at a random time after the run
made progress. After the last kill the run is allowed to finish. Then:

- every step's loss and batch hash (metrics.jsonl) equal the reference's, bit
  for bit;
- the final parameters and optimizer state equal the reference's, bit for bit;
- every checkpoint left in the killed run's MODEL_DIR passes `verify`.

Prints a table and, with --record, appends it to docs/reliability.md.
`tests/t5x_like/train_process_test.py` runs the short form (a few kills).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(model_dir, steps, every):
  """`python -m train` for the tiny LLaMA (batch 8, length 32) on the embedded corpus."""
  return [sys.executable, '-m', 'train', '--gin_file=models/llama/tiny.gin',
          '--gin_file=runs/pretrain.gin', "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", f'--gin.TRAIN_STEPS={steps}',
          f"--gin.MODEL_DIR='{model_dir}'", '--gin.BATCH_SIZE=8', '--gin.WARMUP_STEPS=2',
          '--gin.train_lib.train.eval_split=None', '--gin.train_lib.train.peak_flops=1e11',
          f'--gin.train_lib.train.checkpoint_every={every}', '--gin.train_lib.train.log_every=50']


def env(devices=None):
  e = dict(os.environ)
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  if devices is not None:
    flags = [f for f in e.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    e['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  return e


def step_records(model_dir):
  """step -> (loss, batch hash), the last record of each step (a resumed run
  repeats the steps after its checkpoint); a line cut short by SIGKILL is skipped."""
  out = {}
  path = os.path.join(model_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if r.get('kind') == 'step':
        out[r['step']] = (r['loss'], r['batch_hash'])
  return out


def saves_in_progress(model_dir):
  """orbax's temporary folders: a checkpoint being written (or one a kill cut short)."""
  return set(glob.glob(os.path.join(model_dir, 'checkpoints', '*.orbax-checkpoint-tmp*')))


def run_to_end(model_dir, steps, every, devices=None):
  done = subprocess.run(command(model_dir, steps, every), cwd=ROOT, env=env(devices),
                        capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f'run failed ({done.returncode}): {done.stderr[-3000:]}')
  return done


def kill_once(model_dir, steps, every, mid_save, rng, devices=None, timeout=300):
  """Starts the run and SIGKILLs it; returns ('mid_save' | 'random' | 'finished', step)."""
  proc = subprocess.Popen(command(model_dir, steps, every), cwd=ROOT, env=env(devices),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  start_step = max(step_records(model_dir), default=0)
  stale = saves_in_progress(model_dir)  # left by an earlier kill; this run removes them
  t0 = time.time()
  kind = None
  delay = None
  try:
    while time.time() - t0 < timeout:
      if proc.poll() is not None:
        return 'finished', max(step_records(model_dir), default=0)
      progressed = max(step_records(model_dir), default=0) > start_step
      if mid_save and saves_in_progress(model_dir) - stale:
        kind = 'mid_save'
        break
      if not mid_save and progressed:
        if delay is None:
          delay = time.time() + rng.uniform(0.0, 1.5)
        elif time.time() >= delay:
          kind = 'random'
          break
      time.sleep(0.002)
    else:
      raise RuntimeError('timed out waiting for the moment to kill')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return kind, max(step_records(model_dir), default=0)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def final_state(model_dir):
  """The newest checkpoint's arrays, as saved (numpy)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from t5x_like import checkpoints  # pylint: disable=g-import-not-at-top
  directory = checkpoints.checkpoint_dir(model_dir)
  with checkpoints.open_read_only(directory) as manager:
    step = manager.latest_step()
    state = manager.restore(step)['state']
  return step, {checkpoints._describe(p): np.asarray(x)  # pylint: disable=protected-access
                for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def chaos(reference_dir, model_dir, kills, mid_save, steps, every, seed=0, devices=None,
          log=print):
  """Kills a run `kills` times (`mid_save` of them during a save) and compares it
  with the finished `reference_dir`. Returns a dict of figures; raises
  AssertionError on any difference."""
  rng = random.Random(seed)
  plan = ['mid_save'] * mid_save + ['random'] * (kills - mid_save)
  rng.shuffle(plan)
  counts = {'mid_save': 0, 'random': 0}
  t0 = time.time()
  for i, want in enumerate(plan):
    kind, step = kill_once(model_dir, steps, every, want == 'mid_save', rng, devices)
    if kind == 'finished':
      raise AssertionError(f'the run finished after {i} kills: raise --steps')
    counts[kind] += 1
    log(f'kill {i + 1}/{kills}: {kind} at step {step}')
  run_to_end(model_dir, steps, every, devices)
  seconds = time.time() - t0

  want, got = step_records(reference_dir), step_records(model_dir)
  assert sorted(got) == list(range(1, steps + 1)), 'steps missing from metrics.jsonl'
  different = [s for s in want if got.get(s) != want[s]]
  assert not different, f'steps {different[:5]} differ from the uninterrupted run'
  (ref_step, ref_state), (step, state) = final_state(reference_dir), final_state(model_dir)
  assert ref_step == step == steps
  assert ref_state.keys() == state.keys()
  for name in ref_state:
    assert ref_state[name].tobytes() == state[name].tobytes(), f'{name} differs'
  from t5x_like import checkpoints  # pylint: disable=g-import-not-at-top
  report = checkpoints.verify(model_dir)
  failed = [(s, detail) for s, status, detail in report if status != 'ok']
  assert not failed, f'checkpoints fail verify: {failed}'
  return {'kills': kills, 'mid_save': counts['mid_save'], 'random': counts['random'],
          'steps': steps, 'checkpoint_every': every, 'steps_compared': len(want),
          'arrays_compared': len(ref_state), 'checkpoints_verified': len(report),
          'seconds': round(seconds)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=50)
  parser.add_argument('--mid_save', type=int, default=20)
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--checkpoint_every', type=int, default=5)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='/tmp/t5x_like/chaos')
  parser.add_argument('--record', action='store_true',
                      help='append the results to docs/reliability.md')
  args = parser.parse_args(argv)
  if args.mid_save > args.kills:
    parser.error('--mid_save cannot exceed --kills')
  shutil.rmtree(args.workdir, ignore_errors=True)
  reference, killed = os.path.join(args.workdir, 'reference'), os.path.join(args.workdir, 'killed')
  t = time.time()
  run_to_end(reference, args.steps, args.checkpoint_every)
  print(f'reference run: {args.steps} steps in {time.time() - t:.0f} s')
  figures = chaos(reference, killed, args.kills, args.mid_save, args.steps,
                  args.checkpoint_every, args.seed)
  rows = [(k, v) for k, v in figures.items()]
  width = max(len(k) for k, _ in rows)
  table = '\n'.join(f'| {k:<{width}} | {v} |' for k, v in rows)
  print(f'| {"":<{width}} | result |\n|{"-" * (width + 2)}|--------|\n{table}')
  print('every step, the final parameters and optimizer state: bit-identical; every '
        'checkpoint verifies')
  if args.record:
    cmd = 'python scripts/chaos.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(ROOT, 'docs', 'reliability.md'), 'a') as f:
      f.write(f'\n### {datetime.date.today()}: `{cmd}` on {platform.node() or "this machine"} '
              f'({os.cpu_count()} CPUs)\n\n| figure | result |\n|---|---|\n' +
              '\n'.join(f'| {k} | {v} |' for k, v in rows) +
              '\n\nEvery step\'s loss and batch hash, the final parameters and optimizer '
              'state: bit-identical to the uninterrupted run; every checkpoint left passes '
              '`verify`.\n')


if __name__ == '__main__':
  main()
