"""Gin sweeps: trial expansion, checks, SIGKILL + restart, the report and the Slurm script."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from t5x_like import sweep as sweep_lib

import testing_utils as tu

FILES = ['models/llama/tiny.gin', 'runs/pretrain.gin']
STEPS = 6
COMMON = ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
          'BATCH_SIZE = 8', 'WARMUP_STEPS = 2', 'train_lib.train.peak_flops = 1e11',
          'train_lib.train.checkpoint_every = 2', f'train_lib.train.eval_every = {STEPS}',
          'train_lib.train.eval_steps = 1',
          f'TRAIN_STEPS = {STEPS}']


def _write(tmp_path, spec, name='s.json'):
  path = tmp_path / name
  path.write_text(json.dumps(spec))
  return str(path)


def test_grid_zip_and_random_expand_to_their_product():
  spec = {'grid': {'LEARNING_RATE': [1e-3, 3e-3]},
          'zip': {'model_config.DecoderConfig.emb_dim': [32, 64],
                  'model_config.DecoderConfig.num_heads': [2, 4]},
          'random': {'count': 3, 'seed': 7,
                     'space': {'WARMUP_STEPS': {'int_uniform': [1, 5]},
                               'WEIGHT_DECAY': {'log_uniform': [1e-4, 1e-1]}}},
          'fixed': {'TRAIN_STEPS': 5}}
  trials = sweep_lib.expand(spec)
  assert len(trials) == 2 * 2 * 3
  assert all(t['TRAIN_STEPS'] == 5 for t in trials)
  # Tied values move together.
  assert {(t['model_config.DecoderConfig.emb_dim'], t['model_config.DecoderConfig.num_heads'])
          for t in trials} == {(32, 2), (64, 4)}
  assert all(1 <= t['WARMUP_STEPS'] <= 5 and 1e-4 <= t['WEIGHT_DECAY'] <= 1e-1 for t in trials)
  assert len({t['WEIGHT_DECAY'] for t in trials}) == 3  # three random draws, each reused
  assert sweep_lib.expand(spec) == trials  # the seed fixes them
  assert sweep_lib.bindings_of({'A': 'text', 'B': True, 'C': '@f()', 'D': [1, 2]}) == [
      "A = 'text'", 'B = True', 'C = @f()', 'D = [1, 2]']


@pytest.mark.parametrize('spec,message', [
    ({}, 'defines no trials'),
    ({'fixed': {'TRAIN_STEPS': 3}}, 'defines no trials'),
    ({'grids': {'A': [1]}}, "unknown key 'grids'"),
    ({'grid': {'A': []}}, 'non-empty list'),
    ({'zip': {'A': [1, 2], 'B': [1]}}, 'of one length'),
    ({'random': {'count': 2, 'space': {'A': {'normal': [0, 1]}}}}, 'give one of'),
])
def test_bad_sweep_files_say_what_is_wrong(spec, message):
  with pytest.raises(sweep_lib.SweepError, match=message) as e:
    sweep_lib.expand(spec)
  assert '\n' not in str(e.value)


def test_bad_invocations_fail_in_one_line(tmp_path):
  spec = _write(tmp_path, {'grid': {'LEARNING_RAT': [1e-3]}})
  with pytest.raises(sweep_lib.SweepError, match='did you mean LEARNING_RATE') as e:
    sweep_lib.create(FILES, spec, str(tmp_path / 'root'), COMMON)
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'root')  # nothing written
  good = _write(tmp_path, {'grid': {'LEARNING_RATE': [1e-3]}}, 'good.json')
  with pytest.raises(sweep_lib.SweepError, match="unknown executor 'kubernetes'"):
    sweep_lib.main([f'--gin_file={f}' for f in FILES] + [
        f'--sweep={good}', f'--root={tmp_path / "r"}', '--executor=kubernetes'])
  with pytest.raises(sweep_lib.SweepError, match='holds no sweep'):
    sweep_lib.main(['report', str(tmp_path)])
  with pytest.raises(sweep_lib.SweepError, match='not found'):
    sweep_lib.create(FILES, str(tmp_path / 'missing.json'), str(tmp_path / 'r2'), COMMON)


def test_slurm_script_runs_one_unfinished_trial_per_task(tmp_path, capsys, monkeypatch):
  spec = _write(tmp_path, {'grid': {'LEARNING_RATE': [1e-3, 2e-3, 3e-3, 4e-3]}})
  sweep = sweep_lib.create(FILES, spec, str(tmp_path / 'root'), COMMON)
  # A finished trial is left out of the array.
  with open(os.path.join(sweep.trial_dir(1), 'done.json'), 'w') as f:
    json.dump({'step': STEPS}, f)
  monkeypatch.setenv('PATH', str(tmp_path))  # no sbatch here
  script = sweep_lib.run_slurm(sweep, ['--time=01:00:00'], max_parallel=2)
  lines = script.splitlines()
  assert '#SBATCH --array=0,2,3%2' in lines
  assert '#SBATCH --requeue' in lines and '#SBATCH --signal=B:TERM@120' in lines
  assert '#SBATCH --time=01:00:00' in lines
  assert lines[-1].endswith('-m t5x_like.sweep run_trial '
                            f'{os.path.abspath(sweep.root)} "$SLURM_ARRAY_TASK_ID"')
  out = capsys.readouterr().out
  assert out.splitlines()[0].startswith('sbatch not found on this machine: wrote ')
  assert script in out
  with open(os.path.join(sweep.root, 'sweep.sbatch')) as f:
    assert f.read() == script


def _step_losses(model_dir):
  losses = {}
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if r['kind'] == 'step':
        losses[r['step']] = r['loss']  # a step run again after a resume: the last record
  return losses


def _sweep_command(spec, root):
  return ([sys.executable, '-m', 't5x_like.sweep'] + [f'--gin_file={f}' for f in FILES] +
          [f'--sweep={spec}', f'--root={root}', '--workers=2'] +
          [f'--gin.{b.replace(" = ", "=", 1)}' for b in COMMON])


def test_killed_sweep_restarts_and_finishes_each_trial_once(tmp_path):
  # t000 and t001 run first and are interrupted; t002 and t003 are the same trainings (the
  # logging interval changes no step), run after the restart without interruption.
  spec = _write(tmp_path, {'grid': {'train_lib.train.log_every': [2, 3]},
                           'zip': {'LEARNING_RATE': [1e-3, 3e-3], 'WARMUP_STEPS': [1, 3]}})
  root = str(tmp_path / 'root')
  env = tu.subprocess_env()
  proc = subprocess.Popen(_sweep_command(spec, root), cwd=tu.ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # SIGKILL the sweep while its first two trials are between checkpoints.
  deadline = time.time() + 300
  while time.time() < deadline:
    ckpts = [os.path.join(root, t, 'checkpoints') for t in ('t000', 't001')]
    if all(os.path.isdir(c) and any(n.isdigit() for n in os.listdir(c)) for c in ckpts):
      break
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  first = proc.communicate()[0]
  del first
  sweep = sweep_lib.Sweep.load(root)
  # The trials it ran get SIGTERM (they checkpoint and stop) or finish.
  deadline = time.time() + 120
  while any(sweep_lib.is_running(sweep, i) for i in range(4)) and time.time() < deadline:
    time.sleep(0.2)
  finished = {i: os.path.getmtime(os.path.join(sweep.trial_dir(i), 'done.json'))
              for i in range(4) if sweep.done(i) is not None}
  assert len(finished) < 4
  # The report works on an unfinished sweep.
  rows = sweep_lib.report(root)['rows']
  assert {r['status'] for r in rows} - {'done'} and len(rows) == 4
  # Restarted: every trial finishes, none twice.
  out = subprocess.run(_sweep_command(spec, root), cwd=tu.ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert 'sweep finished: 4 trials' in out.stdout
  for i in range(4):
    done = sweep.done(i)
    assert done is not None and done['step'] == STEPS
    name = sweep.trials[i]['id']
    if i in finished:  # not run again
      assert f'trial {name} started' not in out.stdout
      assert os.path.getmtime(os.path.join(sweep.trial_dir(i), 'done.json')) == finished[i]
    else:
      assert out.stdout.count(f'trial {name} finished') == 1
  # An interrupted trial's per-step losses equal the same training run without a stop.
  for interrupted, whole in ((0, 2), (1, 3)):
    if interrupted in finished:
      continue
    want = _step_losses(sweep.trial_dir(whole))
    assert sorted(want) == list(range(1, STEPS + 1))
    assert _step_losses(sweep.trial_dir(interrupted)) == want
  assert len(finished) < 2, 'the sweep was killed too late to interrupt a trial'

  # The report: one row per trial, PNGs with one colour per trial.
  result = sweep_lib.report(root)
  assert [r['status'] for r in result['rows']] == ['done'] * 4
  assert all(r['final_val_loss'] is not None and r['flops'] > 0 for r in result['rows'])
  # The trainer's 'model' record: what scaling fits take as N, and the FLOPs per token.
  from models import param_count  # pylint: disable=g-import-not-at-top
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  tiny = param_count.accounting(gin_utils.model_from_gin(FILES[:1]).config, 0, 32)
  for r in result['rows']:
    assert r['params'] == tiny['params'] and r['flops_per_token'] == tiny['flops_per_token']
    assert r['flops'] == r['tokens'] * tiny['flops_per_token']
  # An export (records, no checkpoints) reports the same rows, tokens/s aside.
  exported = sweep_lib.main(['export', root, str(tmp_path / 'export'), '--every=4'])
  assert not any('checkpoints' in dirs for _, dirs, _ in os.walk(exported))
  again = sweep_lib.report(exported)['rows']
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rows]  # pylint: disable=unnecessary-lambda-assignment
  assert strip(again) == strip(result['rows'])
  with pytest.raises(sweep_lib.SweepError, match='already exists'):
    sweep_lib.export(root, exported)
  with open(os.path.join(root, 'report.csv')) as f:
    assert len(f.read().splitlines()) == 5
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  assert len(result['plots']) == 6
  for path in result['plots']:
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 500
    colours = {tuple(np.round(p[:3], 2)) for p in img.reshape(-1, img.shape[-1])}
    # tab10's first four colours are all drawn.
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    for k in range(4):
      want_colour = tuple(np.round(plt.get_cmap('tab10')(k)[:3], 2))
      assert any(np.allclose(c, want_colour, atol=0.02) for c in colours), (path, k)


def test_shipped_sweeps_check_and_chinchilla_is_an_isoflop_design(tmp_path):
  lr = sweep_lib.create(FILES, 'sweeps/lr_tiny.json', str(tmp_path / 'lr'),
                        ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'"])
  assert len(lr.trials) == 4
  sweep = sweep_lib.create(['sweeps/chinchilla_tiny.gin'], 'sweeps/chinchilla_tiny.json',
                           str(tmp_path / 'chinchilla'))
  assert len(sweep.trials) == 20
  # 5 sizes x 4 budgets: each trial's exact training FLOPs is its budget to within a step.
  from models import param_count  # pylint: disable=g-import-not-at-top
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_like import scaling  # pylint: disable=g-import-not-at-top
  flops, sizes = [], set()
  for i in range(len(sweep.trials)):
    model = gin_utils.model_from_gin(sweep.gin_files, sweep.trial_bindings(i))
    per_token = param_count.accounting(model.config, 0, 128)['flops_per_token']
    flops.append(sweep.trials[i]['bindings']['TRAIN_STEPS'] * 16 * 128 * per_token)
    sizes.add(model.config.emb_dim)
  budgets = scaling.group_budgets(flops)
  assert len(sizes) == 5
  np.testing.assert_allclose(sorted(set(np.round(budgets, -10))), [1e12, 2.2e12, 4.8e12, 1.05e13],
                             rtol=0.01)
  for b in set(budgets):
    assert sum(budgets == b) == 5
