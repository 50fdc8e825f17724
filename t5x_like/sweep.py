"""Gin sweeps: many training runs that differ in a few bindings, run locally or on Slurm.

    python -m t5x_like.sweep --gin_file=runs/pretrain_default.gin --sweep=my.sweep.json \
        --root=/tmp/sweeps/lr [--executor=local --workers=2 | --executor=slurm] [--gin.K=V ...]
    python -m t5x_like.sweep report /tmp/sweeps/lr          # any time, also while it runs
    python -m t5x_like.sweep export /tmp/sweeps/lr DEST [--every=50]  # records, no checkpoints

A sweep file (JSON) names gin bindings and their values:

    {"grid":   {"LEARNING_RATE": [1e-3, 3e-3]},                     every combination
     "zip":    {"model_config.DecoderConfig.emb_dim": [64, 128],     values that move
                "model_config.DecoderConfig.num_heads": [2, 4]},      together (tied)
     "random": {"count": 4, "seed": 0,                              random search
                "space": {"WARMUP_STEPS": {"int_uniform": [10, 100]},
                          "DROPOUT": {"choice": [0.0, 0.1]},
                          "WEIGHT_DECAY": {"log_uniform": [1e-4, 1e-1]}}},
     "fixed":  {"TRAIN_STEPS": 200}}                                  every trial

The trials are the product of the grid's axes, each zip group (one axis) and the random
samples (one axis). Each trial trains in ROOT/<trial>/ (its MODEL_DIR) with its bindings
recorded in ROOT/sweep.json and ROOT/<trial>/trial.json. A trial that finished has
ROOT/<trial>/done.json; restarting the same command skips those and resumes the others from
their checkpoints (training resumes bit-exactly), so a killed sweep loses nothing.

Executors: `local` runs `--workers` trials at once, each pinned to its share of the CPU cores
(and of the GPUs, when there are as many as workers), and they stop with it; `slurm` writes
ROOT/sweep.sbatch (an array job, one unfinished trial per task, requeued on preemption with a
SIGTERM before the time limit so the trial checkpoints) and submits it when `sbatch` exists.
"""

import dataclasses
import fcntl
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from t5x_like import gin_utils
from t5x_like import utils

SPEC_KEYS = ('grid', 'zip', 'random', 'fixed')
DISTRIBUTIONS = ('uniform', 'log_uniform', 'int_uniform', 'choice')
EXECUTORS = ('local', 'slurm')


class SweepError(utils.InputError):
  """A sweep that cannot run as given (one line: the problem and the fix)."""


# --- the sweep file -------------------------------------------------------------------
def _binding_value(value: Any) -> str:
  """A JSON value as gin syntax."""
  if isinstance(value, str) and (value.startswith(('@', '%')) or value in ('True', 'False',
                                                                          'None')):
    return value  # a gin reference, macro or constant
  if isinstance(value, bool):
    return 'True' if value else 'False'
  if value is None:
    return 'None'
  return repr(value) if not isinstance(value, (list, dict)) else json.dumps(value)


def _sample(rng, name: str, dist: Dict[str, Any]):
  if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
    raise SweepError(f'random.space.{name}={dist!r}: give one of '
                     + ', '.join(f'{{"{d}": ...}}' for d in DISTRIBUTIONS))
  kind, args = next(iter(dist.items()))
  if kind == 'choice':
    return args[int(rng.randint(len(args)))]
  lo, hi = args
  if kind == 'uniform':
    return float(rng.uniform(lo, hi))
  if kind == 'log_uniform':
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
  return int(rng.randint(lo, hi + 1))


def expand(spec: Dict[str, Any], source: str = 'the sweep') -> List[Dict[str, Any]]:
  """The trials (binding -> value, in a fixed order) a sweep spec describes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not isinstance(spec, dict):
    raise SweepError(f'{source} must be a JSON object with keys {", ".join(SPEC_KEYS)}')
  unknown = [k for k in spec if k not in SPEC_KEYS]
  if unknown:
    raise SweepError(f'{source}: unknown key {unknown[0]!r}: use {", ".join(SPEC_KEYS)}')
  axes: List[List[Dict[str, Any]]] = []
  for name, values in (spec.get('grid') or {}).items():
    if not isinstance(values, list) or not values:
      raise SweepError(f'{source}: grid.{name} must be a non-empty list of values')
    axes.append([{name: v} for v in values])
  zips = spec.get('zip') or []
  for group in (zips if isinstance(zips, list) else [zips]):
    lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
    if not lengths or len(set(lengths.values())) != 1 or -1 in lengths.values() or (
        0 in lengths.values()):
      raise SweepError(f'{source}: zip lists must be non-empty and of one length, got '
                       f'{lengths}: give each tied binding the same number of values')
    n = next(iter(lengths.values()))
    axes.append([{k: v[i] for k, v in group.items()} for i in range(n)])
  random = spec.get('random')
  if random:
    count, space = random.get('count'), random.get('space')
    if not isinstance(count, int) or count < 1 or not isinstance(space, dict) or not space:
      raise SweepError(f'{source}: random needs "count" (>= 1) and a non-empty "space"')
    rng = np.random.RandomState(int(random.get('seed', 0)))
    axes.append([{name: _sample(rng, name, dist) for name, dist in sorted(space.items())}
                 for _ in range(count)])
  if not axes:
    raise SweepError(f'{source} defines no trials: give "grid", "zip" or "random" values')
  fixed = spec.get('fixed') or {}
  trials = []
  for combo in itertools.product(*axes):
    trial = dict(fixed)
    for part in combo:
      trial.update(part)
    trials.append(trial)
  return trials


def load_spec(path: str) -> Dict[str, Any]:
  """A sweep file: a path, or a shipped one relative to gin/ (e.g. sweeps/lr_tiny.json)."""
  shipped = os.path.join(gin_utils.GIN_DIR, path)
  if not os.path.exists(path) and os.path.exists(shipped):
    path = shipped
  if not os.path.exists(path):
    raise SweepError(f'sweep file {path} not found: give --sweep=FILE.json')
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise SweepError(f'sweep file {path} is not JSON ({e}): fix it there') from None


def bindings_of(trial: Dict[str, Any]) -> List[str]:
  return [f'{k} = {_binding_value(v)}' for k, v in trial.items()]


def check_bindings(gin_files: Sequence[str], common: Sequence[str],
                   trials: Sequence[Dict[str, Any]]) -> None:
  """Every trial's bindings parse with the gin files: each names a gin binding (a macro
  the files define or use, or a configurable's parameter), one line with a did-you-mean
  otherwise (`gin_utils.parse`)."""
  import gin  # pylint: disable=g-import-not-at-top
  for trial in trials:
    gin.clear_config()
    try:
      gin_utils.parse(gin_files, list(common) + bindings_of(trial) +
                      ["MODEL_DIR = '/sweep/trial'"])  # (each trial's own, when it runs)
    except gin_utils.GinError as e:
      raise SweepError(f'sweep trial {trial}: {e}') from None
    finally:
      gin.clear_config()


# --- the sweep's record ---------------------------------------------------------------
@dataclasses.dataclass
class Sweep:
  """What ROOT/sweep.json records: the gin files, common bindings and each trial."""
  root: str
  gin_files: List[str]
  common: List[str]
  trials: List[Dict[str, Any]]  # {'id': 't000', 'bindings': {...}}

  @property
  def path(self) -> str:
    return os.path.join(self.root, 'sweep.json')

  def trial_dir(self, index: int) -> str:
    return os.path.join(self.root, self.trials[index]['id'])

  def trial_bindings(self, index: int) -> List[str]:
    return (list(self.common) + bindings_of(self.trials[index]['bindings']) +
            [f'MODEL_DIR = {self.trial_dir(index)!r}'])

  def done(self, index: int) -> Optional[Dict[str, Any]]:
    path = os.path.join(self.trial_dir(index), 'done.json')
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def save(self) -> None:
    os.makedirs(self.root, exist_ok=True)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({'gin_files': self.gin_files, 'common': self.common, 'trials': self.trials},
                f, indent=1)
    os.replace(tmp, self.path)

  @classmethod
  def load(cls, root: str) -> 'Sweep':
    path = os.path.join(root, 'sweep.json')
    if not os.path.exists(path):
      raise SweepError(f'{root} holds no sweep (no sweep.json): give the --root of a sweep '
                       'that was started')
    with open(path) as f:
      rec = json.load(f)
    return cls(root, rec['gin_files'], rec['common'], rec['trials'])


def create(gin_files: Sequence[str], spec_path: str, root: str,
           common: Sequence[str] = ()) -> Sweep:
  """The sweep of `spec_path` over `gin_files` in `root`, checked and recorded; or the one
  `root` already holds, when it is the same sweep (a restart)."""
  trials = expand(load_spec(spec_path), f'sweep file {spec_path}')
  files = [os.path.abspath(gin_utils.find_gin_file(f)) for f in gin_files]
  if not files:
    raise SweepError('no --gin_file given: e.g. --gin_file=runs/pretrain_default.gin')
  width = max(3, len(str(len(trials) - 1)))
  sweep = Sweep(root, files, list(common),
                [{'id': f't{i:0{width}d}', 'bindings': t} for i, t in enumerate(trials)])
  if os.path.exists(sweep.path):
    old = Sweep.load(root)
    if (old.gin_files, old.common, old.trials) != (sweep.gin_files, sweep.common,
                                                   json.loads(json.dumps(sweep.trials))):
      raise SweepError(f'{root} holds another sweep (its sweep.json differs from this one): '
                       'use another --root, or rerun the command that started it')
    return old  # (checked when it was created)
  check_bindings(files, common, trials)
  if os.path.isdir(root) and os.listdir(root):
    raise SweepError(f'{root} is not empty and holds no sweep: give a new or empty --root')
  sweep.save()
  for i, trial in enumerate(sweep.trials):
    os.makedirs(sweep.trial_dir(i), exist_ok=True)
    with open(os.path.join(sweep.trial_dir(i), 'trial.json'), 'w') as f:
      json.dump(trial, f, indent=1)
  return sweep


# --- one trial ------------------------------------------------------------------------
def run_trial(root: str, index: int) -> Dict[str, Any]:
  """Trains trial `index` of the sweep in `root` to the end (resuming from its checkpoints)
  and writes its done.json; what Slurm tasks and local workers run. A trial another
  process is running (its lock is held) is an error; a finished one returns its record."""
  from t5x_like import train as train_lib  # pylint: disable=g-import-not-at-top
  sweep = Sweep.load(root)
  if not 0 <= index < len(sweep.trials):
    raise SweepError(f'trial index {index} is out of range: the sweep in {root} has '
                     f'{len(sweep.trials)} trials')
  done = sweep.done(index)
  if done is not None:
    print(f'trial {sweep.trials[index]["id"]} finished already', flush=True)
    return done
  tdir = sweep.trial_dir(index)
  os.makedirs(tdir, exist_ok=True)
  lock = open(os.path.join(tdir, '.lock'), 'w')  # held while this process lives
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise SweepError(f'trial {sweep.trials[index]["id"]} is running in another process '
                     f'(its lock {lock.name} is held): wait for it') from None
  start = time.time()
  result = train_lib.run(sweep.gin_files, sweep.trial_bindings(index))
  attempts = _attempts(tdir, time.time() - start)
  record = {'id': sweep.trials[index]['id'], 'bindings': sweep.trials[index]['bindings'],
            'step': int(result.get('step', 0)), 'wall_s': sum(attempts),
            'attempts': len(attempts), 'train_loss': result.get('train_loss'),
            'eval_loss': (result.get('eval') or {}).get('loss')}
  if result.get('stopped_by_signal'):
    print(f'trial {record["id"]} stopped by a signal at step {record["step"]}; the next run '
          'of the sweep resumes it', flush=True)
    return record
  tmp = os.path.join(tdir, 'done.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(tdir, 'done.json'))
  return record


def _attempts(tdir: str, seconds: float) -> List[float]:
  """Appends this attempt's wall time to the trial's record of attempts; all of them."""
  path = os.path.join(tdir, 'attempts.json')
  attempts = []
  if os.path.exists(path):
    with open(path) as f:
      attempts = json.load(f)
  attempts.append(seconds)
  with open(path, 'w') as f:
    json.dump(attempts, f)
  return attempts


def is_running(sweep: Sweep, index: int) -> bool:
  """Whether a process holds trial `index`'s lock."""
  path = os.path.join(sweep.trial_dir(index), '.lock')
  if not os.path.exists(path):
    return False
  with open(path, 'w') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
  return False


# --- executors ------------------------------------------------------------------------
def _die_with_parent(cores: Optional[List[int]]):
  """A child's pre-exec: SIGTERM when the sweep process dies (Linux; the trial then
  checkpoints and stops), pinned to `cores`."""
  def pre_exec():
    os.setsid()
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
      pass
    if cores:
      os.sched_setaffinity(0, cores)
  return pre_exec


def _gpu_count() -> int:
  if not shutil.which('nvidia-smi'):
    return 0
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(1 for line in out.stdout.splitlines() if line.startswith('GPU '))


def shares(workers: int) -> List[Dict[str, Any]]:
  """Each local worker's CPU cores (and GPUs when there are at least as many as workers)."""
  cores = sorted(os.sched_getaffinity(0))
  per = max(1, len(cores) // workers)
  gpus = _gpu_count()
  out = []
  for w in range(workers):
    share = {'cores': cores[w * per:(w + 1) * per] or cores[-per:]}
    if gpus >= workers:
      g = gpus // workers
      share['gpus'] = list(range(w * g, (w + 1) * g))
    out.append(share)
  return out


def run_local(sweep: Sweep, workers: int, poll_s: float = 0.5) -> List[int]:
  """Runs the unfinished trials, `workers` at a time; returns the failed trials' indices."""
  pending = [i for i in range(len(sweep.trials)) if sweep.done(i) is None]
  free = shares(workers)
  running: Dict[int, Any] = {}
  failed = []
  print(f'sweep {sweep.root}: {len(sweep.trials)} trials, {len(pending)} to run, {workers} '
        f'workers', flush=True)
  while pending or running:
    for i, (proc, share, log) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[i]
      free.append(share)
      if proc.returncode == 0:
        status = 'finished' if sweep.done(i) else 'stopped by a signal (rerun to resume it)'
      else:
        status = f'failed (exit {proc.returncode}; see {log.name})'
        failed.append(i)
      print(f'trial {sweep.trials[i]["id"]} {status}', flush=True)
    while pending and free:
      i = pending.pop(0)
      if is_running(sweep, i):  # left running by a sweep process that was killed
        pending.append(i)
        if all(is_running(sweep, j) for j in pending):
          break
        continue
      share = free.pop(0)
      env = dict(os.environ)
      if 'gpus' in share:
        env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, share['gpus']))
      log = open(os.path.join(sweep.trial_dir(i), 'log.txt'), 'a')
      cmd = [sys.executable, '-m', 't5x_like.sweep', 'run_trial', sweep.root, str(i)]
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=_die_with_parent(share['cores']))
      running[i] = (proc, share, log)
      described = ', '.join(f'{k}={v}' for k, v in sweep.trials[i]['bindings'].items())
      print(f'trial {sweep.trials[i]["id"]} started ({described})', flush=True)
    time.sleep(poll_s)
  return failed


def slurm_script(sweep: Sweep, options: Sequence[str] = (), max_parallel: int = 0) -> str:
  """An sbatch array script: one unfinished trial per task, requeued on preemption, with a
  SIGTERM two minutes before the time limit (the trial checkpoints and a requeued task
  resumes it)."""
  todo = [i for i in range(len(sweep.trials)) if sweep.done(i) is None]
  if not todo:
    raise SweepError(f'every trial of the sweep in {sweep.root} has finished: nothing to submit')
  array = ','.join(map(str, todo)) + (f'%{max_parallel}' if max_parallel else '')
  logs = os.path.join(sweep.root, 'slurm')
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name=sweep-{os.path.basename(os.path.normpath(sweep.root))}',
           f'#SBATCH --array={array}',
           f'#SBATCH --output={logs}/%A_%a.out',
           '#SBATCH --open-mode=append',
           '#SBATCH --requeue',
           '#SBATCH --signal=B:TERM@120']
  lines += [f'#SBATCH {o}' for o in options]
  lines += ['', '# One trial per array task; the trial resumes from its checkpoints when the',
            '# task is requeued.',
            f'cd {shlex.quote(os.getcwd())}',
            f'exec {shlex.quote(sys.executable)} -m t5x_like.sweep run_trial '
            f'{shlex.quote(os.path.abspath(sweep.root))} "$SLURM_ARRAY_TASK_ID"', '']
  return '\n'.join(lines)


def run_slurm(sweep: Sweep, options: Sequence[str] = (), max_parallel: int = 0) -> str:
  script = slurm_script(sweep, options, max_parallel)
  path = os.path.join(sweep.root, 'sweep.sbatch')
  os.makedirs(os.path.join(sweep.root, 'slurm'), exist_ok=True)
  with open(path, 'w') as f:
    f.write(script)
  if not shutil.which('sbatch'):
    print(f'sbatch not found on this machine: wrote {path}; submit it on your cluster with '
          f'`sbatch {path}`', flush=True)
    print(script, flush=True)
    return script
  out = subprocess.run(['sbatch', path], capture_output=True, text=True, check=False)
  if out.returncode:
    raise SweepError(f'sbatch {path} failed: {out.stderr.strip().splitlines()[-1:]}')
  print(out.stdout.strip(), flush=True)
  return script


# --- the report -----------------------------------------------------------------------
def _records(tdir: str) -> List[Dict[str, Any]]:
  path = os.path.join(tdir, 'metrics.jsonl')
  out = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          pass  # a line being written
  return out


# From the trainer's 'model' record (models/param_count.accounting): what scaling fits need.
MODEL_COLUMNS = ('params', 'non_embedding_params', 'active_params', 'flops_per_token')


def trial_curves(sweep: Sweep, index: int) -> Dict[str, Any]:
  """A trial's training loss per step and validation loss per evaluation (a resumed step's
  last record wins), tokens and FLOPs per step, and its status."""
  recs = _records(sweep.trial_dir(index))
  train = {r['step']: r['loss'] for r in recs if r.get('kind') == 'step' and 'loss' in r}
  evals = {r['step']: r['loss'] for r in recs if r.get('kind') == 'eval' and 'loss' in r}
  logs = [r for r in recs if r.get('kind') == 'train' and r.get('step')]
  models = [r for r in recs if r.get('kind') == 'model']
  per_step = {}
  if logs:
    per_step = {'tokens': logs[-1].get('tokens', 0) / logs[-1]['step'],
                'flops': logs[-1].get('flops', 0) / logs[-1]['step']}
  done = sweep.done(index)
  status = ('done' if done else 'running' if is_running(sweep, index) else
            'stopped' if recs else 'pending')
  times = [r['time'] for r in recs if 'time' in r]
  wall = done['wall_s'] if done else (max(times) - min(times) if times else 0.0)
  speeds = [r['tokens_per_second'] for r in logs if 'tokens_per_second' in r]
  model = {k: models[-1][k] for k in MODEL_COLUMNS if k in models[-1]} if models else {}
  return dict(train=dict(sorted(train.items())), eval=dict(sorted(evals.items())),
              per_step=per_step, model=model, status=status, wall_s=wall,
              tokens_per_second=float(sorted(speeds)[len(speeds) // 2]) if speeds else None)


def summary_rows(sweep: Sweep) -> List[Dict[str, Any]]:
  rows = []
  for i, trial in enumerate(sweep.trials):
    c = trial_curves(sweep, i)
    step = max(c['train'], default=0)
    evals = list(c['eval'].values())
    row = {'trial': trial['id'], **trial['bindings'], 'status': c['status'], 'step': step,
           'train_loss': c['train'].get(step), 'final_val_loss': evals[-1] if evals else None,
           'best_val_loss': min(evals) if evals else None,
           **c['model'], 'tokens': step * c['per_step'].get('tokens', 0),
           'flops': step * c['per_step'].get('flops', 0), 'wall_s': c['wall_s'],
           'tokens_per_s': c['tokens_per_second']}
    rows.append(row)
  return rows


def export(root: str, dest: str, every: int = 50) -> str:
  """A sweep's record without its checkpoints, small enough to share or commit: sweep.json,
  each trial's trial.json, done.json and log.txt, and its metrics.jsonl keeping every
  'model' and 'eval' line, the 'step' and 'train' lines of every `every`-th step, and each
  trial's last 'step' and 'train' line (so its report row is unchanged but for tokens/s).
  `dest` must not exist yet."""
  sweep = Sweep.load(root)
  if every < 1:
    raise SweepError(f'--every={every} must be at least 1')
  if os.path.exists(dest):
    raise SweepError(f'{dest} already exists: give a new folder to export to')
  out = Sweep(dest, sweep.gin_files, sweep.common, sweep.trials)
  out.save()
  for i in range(len(sweep.trials)):
    src, dst = sweep.trial_dir(i), out.trial_dir(i)
    os.makedirs(dst)
    for name in ('trial.json', 'done.json', 'log.txt'):
      if os.path.exists(os.path.join(src, name)):
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    recs = _records(src)
    last = {kind: max((r['step'] for r in recs if r.get('kind') == kind), default=None)
            for kind in ('step', 'train')}
    with open(os.path.join(dst, 'metrics.jsonl'), 'w') as f:
      for r in recs:
        kind = r.get('kind')
        if kind not in ('step', 'train') or r['step'] % every == 0 or r['step'] == last[kind]:
          f.write(json.dumps(r) + '\n')
  return dest


def _fmt(v: Any) -> str:
  if v is None:
    return '-'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def report(root: str) -> Dict[str, Any]:
  """Writes ROOT/report.md, ROOT/report.csv and ROOT/plots/*.png; works while trials run."""
  import csv  # pylint: disable=g-import-not-at-top
  sweep = Sweep.load(root)
  rows = summary_rows(sweep)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(root, 'report.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, columns)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k) for k in columns})
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_fmt(r.get(k)) for k in columns) + ' |' for r in rows]
  plots = plot(sweep)
  with open(os.path.join(root, 'report.md'), 'w') as f:
    f.write(f'# Sweep {root}\n\n' + '\n'.join(lines) + '\n\n' +
            ''.join(f'![{os.path.basename(p)}](plots/{os.path.basename(p)})\n' for p in plots))
  return {'rows': rows, 'table': '\n'.join(lines), 'plots': plots}


def plot(sweep: Sweep) -> List[str]:
  """Training and validation loss of every trial against steps, tokens and FLOPs: one PNG
  each, one colour per trial."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  curves = [trial_curves(sweep, i) for i in range(len(sweep.trials))]
  cmap = plt.get_cmap('tab10' if len(curves) <= 10 else 'turbo')
  colours = [cmap(i if len(curves) <= 10 else i / max(len(curves) - 1, 1))
             for i in range(len(curves))]
  values = {}
  for trial in sweep.trials:
    for k, v in trial['bindings'].items():
      values.setdefault(k, set()).add(json.dumps(v))
  varying = {k for k, v in values.items() if len(v) > 1}
  out_dir = os.path.join(sweep.root, 'plots')
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for kind, label in (('train', 'training loss'), ('eval', 'validation loss')):
    for axis in ('steps', 'tokens', 'flops'):
      fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
      for trial, c, colour in zip(sweep.trials, curves, colours):
        if not c[kind]:
          continue
        steps = list(c[kind])
        scale = 1.0 if axis == 'steps' else c['per_step'].get(axis, 0.0)
        if axis != 'steps' and not scale:
          continue
        ys = list(c[kind].values())
        if axis != 'steps':  # a log axis: step 0 has no tokens yet
          steps, ys = zip(*[(s, y) for s, y in zip(steps, ys) if s > 0]) if any(steps) else ((), ())
        xs = [s * scale for s in steps]
        marker = 'o' if kind == 'eval' else None
        described = ', '.join(f'{k.rsplit(".", 1)[-1]}={_fmt(v)}'
                              for k, v in trial['bindings'].items() if k in varying)
        ax.plot(xs, list(ys), color=colour, marker=marker, markersize=3,
                linewidth=1.2, label=f'{trial["id"]}: {described}'[:60])
      if axis != 'steps' and ax.lines:
        ax.set_xscale('log')
      ax.set_xlabel({'steps': 'step', 'tokens': 'tokens', 'flops': 'training FLOPs'}[axis])
      ax.set_ylabel(label)
      ax.set_title(f'{label} vs {axis} ({os.path.basename(os.path.normpath(sweep.root))})')
      ax.grid(alpha=0.3)
      if ax.lines:
        legend = ax.legend(fontsize=7, loc='upper right')
        for line in legend.get_lines():  # every trial's colour shows, even under another curve
          line.set_linewidth(3)
      path = os.path.join(out_dir, f'{kind}_loss_vs_{axis}.png')
      fig.tight_layout()
      fig.savefig(path)
      plt.close(fig)
      paths.append(path)
  return paths


# --- the command line -------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Any:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == 'run_trial':
    if len(argv) != 3 or not argv[2].isdigit():
      raise SweepError('usage: python -m t5x_like.sweep run_trial ROOT INDEX')
    from t5x_like import signals  # pylint: disable=g-import-not-at-top
    signals.install()
    return run_trial(argv[1], int(argv[2]))
  if argv and argv[0] == 'report':
    if len(argv) != 2:
      raise SweepError('usage: python -m t5x_like.sweep report ROOT')
    result = report(argv[1])
    print(result['table'])
    print(f'wrote {os.path.join(argv[1], "report.md")}, report.csv and '
          f'{len(result["plots"])} plots in {os.path.join(argv[1], "plots")}')
    return result
  if argv and argv[0] == 'export':
    if len(argv) not in (3, 4) or (len(argv) == 4 and not argv[3].startswith('--every=')):
      raise SweepError('usage: python -m t5x_like.sweep export ROOT DEST [--every=N]')
    every = argv[3].split('=', 1)[1] if len(argv) == 4 else '50'
    if not every.isdigit():
      raise SweepError(f'--every={every} must be a whole number of steps')
    dest = export(argv[1], argv[2], int(every))
    print(f'exported {argv[1]} to {dest} (no checkpoints; step lines every {every} steps)')
    return dest
  from t5x_like import cli  # pylint: disable=g-import-not-at-top
  parser = cli.ArgumentParser(prog='python -m t5x_like.sweep',
                              description=__doc__.split('\n')[0])
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--sweep', required=True, help='the sweep file (JSON)')
  parser.add_argument('--root', required=True, help='the sweep folder: one MODEL_DIR per trial')
  parser.add_argument('--executor', default='local')
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument('--slurm_option', action='append', default=[],
                      help="an extra '#SBATCH' line, e.g. --slurm_option='--gres=gpu:1'")
  parser.add_argument('--max_parallel', type=int, default=0, help='Slurm: tasks at once')
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith('--gin.')]
  if unknown:
    parser.error(f'unrecognised arguments: {" ".join(unknown)}')
  if args.executor not in EXECUTORS:
    raise SweepError(f'unknown executor {args.executor!r}: use one of {", ".join(EXECUTORS)}')
  if args.workers < 1:
    raise SweepError(f'--workers={args.workers} must be at least 1')
  sweep = create(args.gin_file, args.sweep, args.root, gin_utils.split_argv(rest))
  if args.executor == 'slurm':
    return run_slurm(sweep, args.slurm_option, args.max_parallel)
  failed = run_local(sweep, args.workers)
  report(sweep.root)
  if failed:
    raise utils.TrainingError(f'{len(failed)} trials failed: '
                              + ', '.join(sweep.trials[i]['id'] for i in failed)
                              + ' (see their log.txt); rerun the same command to retry them')
  print(f'sweep finished: {len(sweep.trials)} trials; report in '
        f'{os.path.join(sweep.root, "report.md")}', flush=True)
  return sweep


if __name__ == '__main__':
  from t5x_like import cli as _cli  # pylint: disable=g-import-not-at-top
  _cli.console(main, None)
