"""Fit a Chinchilla scaling law to runs and print the compute-optimal allocation.

    # Epoch AI's replication data (vendored), their settings: 5 highest losses left out
    python scripts/fit_scaling.py --epoch_ai [--bootstrap=200]
    # any CSV of runs: parameters, tokens (or training FLOPs) and final loss
    python scripts/fit_scaling.py --csv=runs.csv --n=params --d=tokens --loss=loss \
        [--budget_column=budget] [--budgets=1e21,1e23] [--grid=epoch|small]
    # a sweep's finished trials (python -m t5x_like.sweep), e.g. gin/sweeps/chinchilla_tiny.*
    python scripts/fit_scaling.py --sweep=/tmp/t5x_like/sweeps/chinchilla [--plots=DIR]

Approach 3 (`t5x_like.scaling.fit_law`: Huber loss of log-residuals, delta 1e-3, L-BFGS from
a grid of starts; `--grid=epoch` is Epoch AI's 4500 starts, a few minutes on a CPU), bootstrap
standard errors, and, with `--budget_column` (each run's nominal compute budget), approach 2
(IsoFLOP parabolas). Prints Markdown tables.

With `--sweep`, N is each trial's parameter count (the trainer's 'model' record;
`--n=non_embedding_params` for Kaplan's), D its training tokens, the loss its final
validation loss, and trials of (nearly) equal training FLOPs share a budget for approach 2.
Compute is the exact training FLOP count, so the allocation uses C = k N D with k these runs'
median FLOPs per parameter and token (6 is Kaplan's approximation). Figures (isoflop.png,
optimum.png, law.png) go to `--plots` (default ROOT/plots).
"""

import argparse
import csv
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from t5x_like import scaling  # pylint: disable=g-import-not-at-top,wrong-import-position
from t5x_like import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

EPOCH_AI_CSV = os.path.join(ROOT, 't5x_like', 'data', 'published', 'chinchilla_epoch_ai.csv')
SMALL_GRID = dict(a=[0.0, 10.0, 20.0], b=[0.0, 10.0, 20.0], e=[-1.0, 0.5], alpha=[0.0, 0.5],
                  beta=[0.0, 0.5])


def read_columns(path: str, names) -> dict:
  with open(path) as f:
    rows = list(csv.DictReader(f))
  if not rows:
    sys.exit(f'{path} has no rows: give a CSV with a header and one row per run')
  missing = [n for n in names if n and n not in rows[0]]
  if missing:
    sys.exit(f'{path} has no column {missing[0]!r} (it has {", ".join(rows[0])}): name the '
             'right column')
  return {n: np.array([float(r[n]) for r in rows]) for n in names if n}


def law_table(fit: scaling.LawFit, boot) -> str:
  lines = ['| parameter | fit | bootstrap s.e. | 90% interval |', '|---|---|---|---|']
  stderr = boot.stderr() if boot else {}
  interval = boot.interval() if boot else {}
  for name in scaling.PARAMETERS:
    se = f'{stderr[name]:.4g}' if boot else '-'
    iv = f'{interval[name][0]:.4g} .. {interval[name][1]:.4g}' if boot else '-'
    lines.append(f'| {name} | {getattr(fit.law, name):.4g} | {se} | {iv} |')
  return '\n'.join(lines)


def optimum_table(rows) -> str:
  lines = ['| budget (FLOPs) | method | N_opt (params) | D_opt (tokens) | tokens per param |',
           '|---|---|---|---|---|']
  for budget, method, n, d in rows:
    lines.append(f'| {budget:.3g} | {method} | {n:.3g} | {d:.3g} | {d / n:.1f} |')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--epoch_ai', action='store_true', help='the vendored Chinchilla data')
  p.add_argument('--csv')
  p.add_argument('--sweep', help='a sweep folder (python -m t5x_like.sweep --root=...)')
  p.add_argument('--plots', default=None, help='folder for the figures (default ROOT/plots '
                 'with --sweep; none otherwise)')
  p.add_argument('--n', default='params')
  p.add_argument('--d', default='tokens')
  p.add_argument('--flops', default=None, help='a FLOPs column: D = FLOPs / (6 N)')
  p.add_argument('--loss', default='loss')
  p.add_argument('--budget_column', default=None)
  p.add_argument('--drop_highest', type=int, default=0)
  p.add_argument('--bootstrap', type=int, default=100)
  p.add_argument('--grid', choices=('epoch', 'small'), default='epoch')
  p.add_argument('--budgets', default=None,
                 help='FLOP budgets to allocate (default 1e21,5.76e23; with --sweep its '
                 'budgets and 10x and 100x the largest)')
  args = p.parse_args(argv)
  if args.epoch_ai:
    args.csv, args.n, args.flops, args.loss = (EPOCH_AI_CSV, 'Model Size', 'Training FLOP',
                                              'loss')
    args.drop_highest = args.drop_highest or 5
  if bool(args.csv) == bool(args.sweep):
    p.error('give one of --csv=FILE, --sweep=ROOT or --epoch_ai')
  k, runs, budgets = 6.0, None, None
  try:
    if args.sweep:
      runs = scaling.sweep_runs(args.sweep, params=args.n)
      n, d, loss, budgets = runs.n, runs.d, runs.loss, runs.budgets
      k = runs.flops_per_param_token
      print(f'{args.sweep}: {n.size} finished trials at {np.unique(budgets).size} budgets; '
            f'{k:.3f} training FLOPs per parameter and token\n')
    else:
      cols = read_columns(args.csv, [args.n, args.flops or args.d, args.loss,
                                     args.budget_column])
      n, loss = cols[args.n], cols[args.loss]
      d = cols[args.flops] / (6 * n) if args.flops else cols[args.d]
      budgets = cols[args.budget_column] if args.budget_column else None
    keep = np.ones(n.shape, bool)
    if args.drop_highest:
      keep = loss < np.sort(loss)[-args.drop_highest]
    fit = scaling.fit_law(n[keep], d[keep], loss[keep],
                          grid=None if args.grid == 'epoch' else SMALL_GRID)
    boot = (scaling.bootstrap(n[keep], d[keep], loss[keep], fit, resamples=args.bootstrap)
            if args.bootstrap else None)
    iso = None
    if budgets is not None:
      iso = scaling.fit_isoflop(n[keep], loss[keep], budgets[keep], flops_per_param_token=k)
  except (scaling.FitError, utils.InputError) as e:  # InputError: e.g. no sweep in that folder
    sys.exit(str(e))
  if args.budgets is None:
    args.budgets = ('1e21,5.76e23' if runs is None else ','.join(
        f'{b:.3g}' for b in [*np.unique(budgets), 10 * budgets.max(), 100 * budgets.max()]))
  print(f'Approach 3 on {fit.points} runs ({int((~keep).sum())} highest losses left out; '
        f'{fit.starts} starts; Huber objective {fit.objective:.7f}):\n')
  print(law_table(fit, boot))
  rows = []
  for budget in (float(b) for b in args.budgets.split(',') if b):
    rows.append((budget, 'approach 3', *fit.law.optimal(budget, k)))
    if iso is not None:
      rows.append((budget, 'approach 2', *iso.optimal(budget)))
  s = fit.law.alpha + fit.law.beta
  print(f'\nN_opt ~ C^{fit.law.beta / s:.3f}, D_opt ~ C^{fit.law.alpha / s:.3f} (approach 3)' +
        (f'; N_opt ~ C^{iso.a:.3f}, D_opt ~ C^{iso.b:.3f} (approach 2)' if iso else '') + '\n')
  print(optimum_table(rows))
  plots = args.plots or (os.path.join(args.sweep, 'plots') if args.sweep else None)
  if plots and runs is not None:
    for path in scaling.plot_fits(runs, fit, iso, plots):
      print(f'wrote {path}')
  return fit, boot, iso


if __name__ == '__main__':
  main()
