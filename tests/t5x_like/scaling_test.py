"""Scaling-law fits: Epoch AI's Chinchilla replication recovered, and fits of known laws."""

import csv
import os

import numpy as np
import pytest
import scipy.optimize

from t5x_like import scaling

import testing_utils

DATA = os.path.join(os.path.dirname(scaling.__file__), 'data', 'published',
                    'chinchilla_epoch_ai.csv')
# Epoch AI's fit and standard errors (Besiroglu et al., 2024, Table 1).
EPOCH = dict(E=(1.817, 0.026), A=(482.01, 124.5), B=(2085.43, 1293.3), alpha=(0.3478, 0.0154),
             beta=(0.3658, 0.0206))
TRUE = scaling.Law(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.30)
# A few starts of Epoch's grid (the whole grid is 4500 starts: scripts/fit_scaling.py).
SMALL_GRID = dict(a=[0.0, 10.0, 20.0], b=[0.0, 10.0, 20.0], e=[-1.0, 0.5], alpha=[0.0, 0.5],
                  beta=[0.0, 0.5])


def chinchilla_points():
  with open(DATA) as f:
    rows = list(csv.DictReader(f))
  n = np.array([float(r['Model Size']) for r in rows])
  flops = np.array([float(r['Training FLOP']) for r in rows])
  loss = np.array([float(r['loss']) for r in rows])
  keep = loss < np.sort(loss)[-5]  # Epoch AI left out the 5 highest losses
  return n[keep], flops[keep] / (6 * n[keep]), loss[keep]


def test_epoch_ai_fit_is_recovered_within_their_standard_errors():
  n, d, loss = chinchilla_points()
  assert n.size == 240
  fit = scaling.fit_law(n, d, loss, grid=SMALL_GRID)
  for name, (want, stderr) in EPOCH.items():
    got = getattr(fit.law, name)
    assert abs(got - want) <= stderr, (name, got, want, stderr)
  # Their Huber objective at their optimum (their notebook prints 0.0010183).
  assert fit.objective == pytest.approx(0.0010183, abs=2e-7)


def _synthetic(law, sizes, tokens, noise, seed=0):
  n, d = (x.ravel() for x in np.meshgrid(sizes, tokens))
  rng = np.random.RandomState(seed)
  return n, d, law.loss(n, d) * np.exp(noise * rng.randn(n.size))


def test_a_known_law_is_recovered():
  n, d, loss = _synthetic(TRUE, np.geomspace(1e7, 1e10, 8), np.geomspace(1e8, 1e12, 8), 0.0)
  fit = scaling.fit_law(n, d, loss, grid=SMALL_GRID)
  for name in scaling.PARAMETERS:
    assert getattr(fit.law, name) == pytest.approx(getattr(TRUE, name), rel=1e-3), name
  np.testing.assert_allclose(fit.residuals(n, d, loss), 0, atol=1e-5)


def test_compute_optimal_allocation_minimises_the_law():
  for flops in (1e18, 5.76e23):
    n_opt, d_opt = TRUE.optimal(flops)
    assert n_opt * d_opt * 6 == pytest.approx(flops)
    # The closed form against a direct minimisation of L(N, C / 6N) over log N.
    res = scipy.optimize.minimize_scalar(lambda x: TRUE.loss(np.exp(x), flops / (6 * np.exp(x))),
                                         bounds=(np.log(1e3), np.log(1e15)), method='bounded',
                                         options=dict(xatol=1e-10))
    assert np.log(n_opt) == pytest.approx(res.x, abs=1e-4)
  # Another FLOPs-per-parameter-token factor moves the optimum consistently.
  n8, d8 = TRUE.optimal(1e21, flops_per_param_token=8.0)
  assert n8 * d8 * 8 == pytest.approx(1e21)


def test_bootstrap_intervals_cover_the_truth():
  n, d, loss = _synthetic(TRUE, np.geomspace(1e7, 1e10, 6), np.geomspace(1e8, 1e12, 6), 0.01)
  fit = scaling.fit_law(n, d, loss, grid=SMALL_GRID)
  boot = scaling.bootstrap(n, d, loss, fit, resamples=40, seed=1)
  assert boot.samples.shape == (40, 5)
  stderr, interval = boot.stderr(), boot.interval()
  for name in ('E', 'alpha', 'beta'):
    lo, hi = interval[name]
    assert stderr[name] > 0 and lo < hi
    assert abs(getattr(fit.law, name) - getattr(TRUE, name)) < 4 * stderr[name], name


def test_isoflop_parabolas_find_the_optimum():
  law = TRUE
  budgets, sizes, losses = [], [], []
  for c in (1e17, 1e18, 1e19, 1e20):
    n_opt, _ = law.optimal(c)
    for n in n_opt * np.geomspace(1 / 8, 8, 9):
      budgets.append(c)
      sizes.append(n)
      losses.append(law.loss(n, c / (6 * n)))
  iso = scaling.fit_isoflop(sizes, losses, budgets)
  # A parabola in log N is an approximation: within a few percent of the exact optimum.
  np.testing.assert_allclose(iso.n_opt, law.optimal(iso.budgets)[0], rtol=0.05)
  assert iso.a == pytest.approx(law.beta / (law.alpha + law.beta), abs=0.01)
  assert iso.a + iso.b == pytest.approx(1.0)
  np.testing.assert_allclose(iso.n_opt * iso.d_opt() * 6, iso.budgets)


def test_trials_of_one_budget_share_it():
  # An IsoFLOP sweep's trials stop at whole steps: their FLOPs are near, not equal.
  flops = [1.00e12, 0.98e12, 1.03e12, 2.2e12, 2.25e12, 4.8e12]
  budgets = scaling.group_budgets(flops)
  assert len(set(budgets[:3])) == len(set(budgets[3:5])) == 1
  assert len(set(budgets)) == 3
  assert budgets[0] == pytest.approx(np.exp(np.mean(np.log(flops[:3]))))
  assert budgets[5] == pytest.approx(flops[5])


def test_fit_figures_are_drawn(tmp_path):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  law, k = TRUE, 6.5
  n, d, flops = [], [], []
  for c in (1e17, 1e18, 1e19):
    for size in law.optimal(c, k)[0] * np.geomspace(1 / 4, 4, 5):
      n.append(size)
      d.append(c / (k * size) * (1 + 0.01 * len(n) % 3))  # not quite equal budgets
      flops.append(k * size * d[-1])
  n, d = np.array(n), np.array(d)
  runs = scaling.Runs(tuple(f't{i}' for i in range(n.size)), n, d, law.loss(n, d),
                      np.array(flops))
  assert runs.flops_per_param_token == pytest.approx(k)
  fit = scaling.fit_law(runs.n, runs.d, runs.loss, init=law)  # the figures, not the fit
  iso = scaling.fit_isoflop(runs.n, runs.loss, runs.budgets, flops_per_param_token=k)
  paths = scaling.plot_fits(runs, fit, iso, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['isoflop.png', 'optimum.png', 'law.png']
  for path in paths:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20


@pytest.mark.parametrize('call,message', [
    (lambda: scaling.fit_law([1e8, 1e9], [1e9, 1e10], [3.0, 2.5]),
     'needs at least 5 points'),
    (lambda: scaling.fit_law([1e8] * 5, [1e9] * 5, [3.0, 2.5, 0.0, 2.0, 2.0]),
     'every loss must be finite and > 0'),
    (lambda: scaling.fit_isoflop([1e8, 2e8, 4e8], [3.0, 2.9, 3.0], [1e18] * 3),
     'at least 2 compute budgets'),
    (lambda: scaling.fit_isoflop([1e8, 2e8, 1e8, 2e8, 4e8], [3, 2.9, 3, 2.8, 2.9],
                                 [1e18, 1e18, 1e19, 1e19, 1e19]), 'has 2 model sizes'),
    (lambda: scaling.fit_isoflop([1e8, 2e8, 4e8] * 2, [3, 3.2, 3, 3, 3.2, 3],
                                 [1e18] * 3 + [1e19] * 3), 'opens downwards'),
])
def test_bad_fits_say_what_is_wrong(call, message):
  with pytest.raises(scaling.FitError, match=message) as e:
    call()
  assert '\n' not in str(e.value)


def _sweep_record(root, losses, done=True):
  """A sweep's record as the trainer and sweep write it, one trial per loss."""
  import json  # pylint: disable=g-import-not-at-top
  from t5x_like import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  trials = [{'id': f't{i:03d}', 'bindings': {'TRAIN_STEPS': 10}} for i in range(len(losses))]
  sweep_lib.Sweep(str(root), ['models/llama/tiny.gin'], [], trials).save()
  for i, loss in enumerate(losses):
    d = root / trials[i]['id']
    d.mkdir()
    per_token = 6.6 * 1e4 * (i + 1)
    records = [{'kind': 'model', 'step': 0, 'params': 1e4 * (i + 1), 'flops_per_token': per_token},
               {'kind': 'step', 'step': 10, 'loss': loss + 0.1},
               {'kind': 'train', 'step': 10, 'tokens': 2560, 'flops': 2560 * per_token},
               {'kind': 'eval', 'step': 10, 'loss': loss}]
    (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    if done:
      (d / 'done.json').write_text(json.dumps({'step': 10, 'wall_s': 1.0}))


@pytest.mark.parametrize('case,message', [
    ('no_sweep', 'holds no sweep'),
    ('running', 'no finished trials yet'),
    ('three_trials', 'needs at least 5 points'),
])
def test_fit_scaling_on_a_bad_sweep_says_what_is_wrong_in_one_line(tmp_path, case, message):
  fit_scaling = testing_utils.load_script('fit_scaling')
  root = tmp_path / 'sweep'
  if case == 'running':
    _sweep_record(root, [3.0, 2.9, 2.8], done=False)
  elif case == 'three_trials':
    _sweep_record(root, [3.0, 2.9, 2.8])
  with pytest.raises(SystemExit) as e:
    fit_scaling.main([f'--sweep={root}', '--grid=small', '--bootstrap=0'])
  assert message in str(e.value) and '\n' not in str(e.value)


def test_sweep_runs_read_the_trainer_records(tmp_path):
  _sweep_record(tmp_path / 'sweep', [3.0, 2.9, 2.8, 2.75, 2.7, 2.72])
  runs = scaling.sweep_runs(str(tmp_path / 'sweep'))
  np.testing.assert_allclose(runs.n, 1e4 * np.arange(1, 7))
  np.testing.assert_allclose(runs.d, 2560)
  np.testing.assert_allclose(runs.loss, [3.0, 2.9, 2.8, 2.75, 2.7, 2.72])
  assert runs.flops_per_param_token == pytest.approx(6.6)
