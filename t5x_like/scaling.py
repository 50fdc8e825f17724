"""Scaling laws: fit L(N, D) to runs and say what to train next.

Chinchilla (Hoffmann et al., 2022), as replicated by Epoch AI (Besiroglu et al., 2024):

- Approach 3 (`fit_law`): L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising
  the Huber loss (delta 1e-3) of the log-residuals, log L - LSE(a - alpha log N,
  b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e), by L-BFGS from every point of
  a grid of initialisations, keeping the best.
- Approach 2 (`fit_isoflop`): for each compute budget, a parabola of the loss in log N;
  its minimum is that budget's optimal N (and D = C / (6 N)); power laws N_opt ~ C^a and
  D_opt ~ C^b through the minima.
- `bootstrap`: the law refitted on resampled points; standard errors and intervals.
- `Law.optimal(C)`: the compute-optimal allocation for a FLOP budget C = k N D (k = 6 by
  default; give a model family's exact training FLOPs per parameter and token instead).

N is the parameter count, D the training tokens, L the loss (nats per token). The maths
is plain numpy and scipy (float64), so fits are exact and fast on a CPU.
"""

import dataclasses
import itertools
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

PARAMETERS = ('E', 'A', 'B', 'alpha', 'beta')

# Epoch AI's grid of initialisations (a, b, e, alpha, beta): 6 x 6 x 5 x 5 x 5 starts.
EPOCH_GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
                  alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))


LBFGS_OPTIONS = dict(ftol=1e-15, gtol=1e-12, maxiter=5000, maxfun=20000)


class FitError(ValueError):
  """Data a law cannot be fitted to (too few points, non-positive values)."""


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, n, d):
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return self.E + self.A / n**self.alpha + self.B / d**self.beta

  def optimal(self, flops, flops_per_param_token: float = 6.0) -> Tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising L under N * D * flops_per_param_token = flops (closed form:
    N_opt = G (C / k)^(beta / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta)))."""
    c = np.asarray(flops, np.float64) / flops_per_param_token
    s = self.alpha + self.beta
    g = (self.alpha * self.A / (self.beta * self.B))**(1 / s)
    n = g * c**(self.beta / s)
    return n, c / n

  def as_dict(self) -> Dict[str, float]:
    return dataclasses.asdict(self)


def _check_points(n, d, loss, minimum: int, what: str, why: str):
  n, d, loss = (np.asarray(x, np.float64).reshape(-1) for x in (n, d, loss))
  if not n.shape == d.shape == loss.shape:
    raise FitError(f'{what}: N, D and loss have different lengths ({n.size}, {d.size}, '
                   f'{loss.size})')
  if n.size < minimum:
    raise FitError(f'{what} needs at least {minimum} points ({why}), got {n.size}: add runs')
  for name, x in (('N', n), ('D', d), ('loss', loss)):
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
      raise FitError(f'{what}: every {name} must be finite and > 0, got {x[~(x > 0)][:3]}: '
                     'drop the failed runs')
  return n, d, loss


def _huber(r: np.ndarray, delta: float) -> Tuple[np.ndarray, np.ndarray]:
  """Huber loss of each residual and its derivative."""
  small = np.abs(r) <= delta
  value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
  return value, np.where(small, r, delta * np.sign(r))


def _objective(theta: np.ndarray, log_n, log_d, log_loss, delta: float):
  """Sum of Huber(log L - LSE(a - alpha log N, b - beta log D, e)) and its gradient in
  theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  u = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, points]
  top = u.max(axis=0)
  w = np.exp(u - top)
  total = w.sum(axis=0)
  pred = top + np.log(total)
  w = w / total  # d pred / d u
  value, dh = _huber(log_loss - pred, delta)
  g = -dh  # d objective / d pred
  grad = np.array([np.sum(g * w[0]), np.sum(g * w[1]), np.sum(g * w[2]),
                   np.sum(g * -w[0] * log_n), np.sum(g * -w[1] * log_d)])
  return float(np.sum(value)), grad


@dataclasses.dataclass(frozen=True)
class LawFit:
  law: Law
  objective: float  # the summed Huber loss at the optimum
  points: int
  starts: int

  def residuals(self, n, d, loss) -> np.ndarray:
    return np.log(np.asarray(loss, np.float64)) - np.log(self.law.loss(n, d))


def _theta_to_law(theta) -> Law:
  a, b, e, alpha, beta = (float(x) for x in theta)
  return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


def _law_to_theta(law: Law) -> np.ndarray:
  return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
            delta: float = 1e-3, grid: Optional[Dict[str, Sequence[float]]] = None,
            init: Optional[Law] = None) -> LawFit:
  """Chinchilla approach 3: the law minimising the Huber loss of the log-residuals.

  Args:
    n, d, loss: parameters, training tokens and final loss of each run.
    delta: the Huber threshold (Hoffmann et al.: 1e-3).
    grid: initial values of a = log A, b = log B, e = log E, alpha, beta; every
      combination is a start (default: Epoch AI's grid, 4500 starts).
    init: start from this law only (a bootstrap's warm start) instead of the grid.
  """
  import scipy.optimize  # pylint: disable=g-import-not-at-top
  n, d, loss = _check_points(n, d, loss, len(PARAMETERS), 'a scaling-law fit',
                             'one per parameter of the law')
  data = (np.log(n), np.log(d), np.log(loss), delta)
  if init is not None:
    starts = [_law_to_theta(init)]
  else:
    g = EPOCH_GRID if grid is None else grid
    starts = [np.array(s, np.float64) for s in itertools.product(
        g['a'], g['b'], g['e'], g['alpha'], g['beta'])]
  best = None
  for start in starts:
    with np.errstate(over='ignore', invalid='ignore', divide='ignore'):
      # The objective is small (about delta times the residuals), so scipy's default
      # tolerances (absolute, made for objectives of order 1) would stop at the start.
      result = scipy.optimize.minimize(_objective, start, args=data, jac=True,
                                       method='L-BFGS-B', options=LBFGS_OPTIONS)
    if np.all(np.isfinite(result.x)) and np.isfinite(result.fun) and (
        best is None or result.fun < best.fun):
      best = result
  if best is None:
    raise FitError('the scaling-law fit diverged from every start: check the data '
                   '(N in parameters, D in tokens, loss in nats)')
  return LawFit(_theta_to_law(best.x), float(best.fun), int(n.size), len(starts))


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """Each parameter's bootstrap standard error and central interval."""
  samples: np.ndarray  # [resamples, 5] in PARAMETERS order
  level: float

  def stderr(self) -> Dict[str, float]:
    return dict(zip(PARAMETERS, np.std(self.samples, axis=0, ddof=1).tolist()))

  def interval(self) -> Dict[str, Tuple[float, float]]:
    q = 100 * (1 - self.level) / 2
    lo, hi = np.percentile(self.samples, [q, 100 - q], axis=0)
    return {p: (float(a), float(b)) for p, a, b in zip(PARAMETERS, lo, hi)}


def bootstrap(n, d, loss, fit: LawFit, *, resamples: int = 200, seed: int = 0,
              delta: float = 1e-3, level: float = 0.9) -> Bootstrap:
  """The law refitted on `resamples` resamplings (with replacement) of the points, each
  from `fit`'s optimum (as Epoch AI did)."""
  n, d, loss = _check_points(n, d, loss, len(PARAMETERS), 'a bootstrap',
                             'one per parameter of the law')
  rng = np.random.RandomState(seed)
  samples = []
  for _ in range(resamples):
    idx = rng.randint(0, n.size, n.size)
    law = fit_law(n[idx], d[idx], loss[idx], delta=delta, init=fit.law).law
    samples.append([getattr(law, p) for p in PARAMETERS])
  return Bootstrap(np.asarray(samples), level)


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  """Chinchilla approach 2: per budget, the parabola's optimum; then power laws in C."""
  budgets: np.ndarray  # [budgets] FLOPs
  n_opt: np.ndarray  # [budgets] the parabola minimum's N
  loss_opt: np.ndarray  # [budgets] the parabola's minimum loss
  parabolas: np.ndarray  # [budgets, 3] loss = p0 x^2 + p1 x + p2, x = log10 N
  a: float  # N_opt ~ C^a
  b: float  # D_opt ~ C^b
  n_coef: float  # N_opt = n_coef * C^a
  flops_per_param_token: float

  def d_opt(self) -> np.ndarray:
    return self.budgets / (self.flops_per_param_token * self.n_opt)

  def optimal(self, flops) -> Tuple[np.ndarray, np.ndarray]:
    n = self.n_coef * np.asarray(flops, np.float64)**self.a
    return n, np.asarray(flops, np.float64) / (self.flops_per_param_token * n)


def fit_isoflop(n, loss, budgets, *, flops_per_param_token: float = 6.0) -> IsoFlopFit:
  """Approach 2: `budgets[i]` is run i's compute budget (runs of one budget share it); each
  budget needs 3 or more model sizes, and at least 2 budgets are needed for the exponents.
  A budget whose parabola opens downwards (no minimum) is an error: widen its sizes."""
  n, b, loss = _check_points(n, budgets, loss, 3, 'an IsoFLOP fit',
                               'a parabola has 3 parameters')
  levels = np.unique(b)
  if levels.size < 2:
    raise FitError(f'an IsoFLOP fit needs at least 2 compute budgets, got {levels.size}: add '
                   'runs at another budget')
  n_opt, loss_opt, parabolas = [], [], []
  for c in levels:
    sel = b == c
    if np.unique(n[sel]).size < 3:
      raise FitError(f'budget {c:.3g} FLOPs has {np.unique(n[sel]).size} model sizes; a '
                     'parabola needs at least 3')
    x = np.log10(n[sel])
    p = np.polyfit(x, loss[sel], 2)
    if p[0] <= 0:
      raise FitError(f'budget {c:.3g} FLOPs: the loss has no minimum over the model sizes '
                     'run (the parabola opens downwards): add smaller and larger models')
    x_opt = -p[1] / (2 * p[0])
    n_opt.append(10**x_opt)
    loss_opt.append(np.polyval(p, x_opt))
    parabolas.append(p)
  n_opt = np.asarray(n_opt)
  a, log_coef = np.polyfit(np.log(levels), np.log(n_opt), 1)
  return IsoFlopFit(levels, n_opt, np.asarray(loss_opt), np.asarray(parabolas), float(a),
                    float(1 - a), float(np.exp(log_coef)), flops_per_param_token)


def group_budgets(flops, rel_tol: float = 0.05) -> np.ndarray:
  """Each run's nominal compute budget: runs whose FLOPs lie within `rel_tol` of their
  neighbours' (sorted) share one budget, the group's geometric mean. An IsoFLOP sweep's
  trials spend their budget only to the nearest whole step, so their FLOPs differ slightly."""
  f = np.asarray(flops, np.float64).reshape(-1)
  if not np.all(np.isfinite(f)) or np.any(f <= 0):
    raise FitError(f'every run needs a FLOP count > 0, got {f[~(f > 0)][:3]}: drop the runs '
                   'that did not train')
  order = np.argsort(f)
  groups, current = [], [order[0]] if f.size else []
  for i in order[1:]:
    if f[i] <= f[current[-1]] * (1 + rel_tol):
      current.append(i)
    else:
      groups.append(current)
      current = [i]
  if current:
    groups.append(current)
  out = np.empty_like(f)
  for g in groups:
    out[g] = np.exp(np.mean(np.log(f[g])))
  return out


@dataclasses.dataclass(frozen=True)
class Runs:
  """Finished runs as a fit takes them: N parameters, D tokens, final loss, FLOPs."""
  names: Tuple[str, ...]
  n: np.ndarray
  d: np.ndarray
  loss: np.ndarray
  flops: np.ndarray

  @property
  def budgets(self) -> np.ndarray:
    return group_budgets(self.flops)

  @property
  def flops_per_param_token(self) -> float:
    """k in C = k N D for these runs (6 for Kaplan's count; the exact count's median here)."""
    return float(np.median(self.flops / (self.n * self.d)))


def sweep_runs(root: str, loss: str = 'final_val_loss', params: str = 'params') -> Runs:
  """The finished trials of a sweep (`python -m t5x_like.sweep`): N from the trainer's
  'model' record (`params`, or e.g. `non_embedding_params`), D its training tokens, its
  final validation loss and its exact training FLOPs."""
  from t5x_like import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  rows = [r for r in sweep_lib.summary_rows(sweep_lib.Sweep.load(root))
          if r['status'] == 'done']
  if not rows:
    raise FitError(f'{root} has no finished trials yet: wait for the sweep (python -m '
                   't5x_like.sweep report {root} shows its progress)')
  missing = [r['trial'] for r in rows if r.get(params) is None or r.get(loss) is None]
  if missing:
    raise FitError(f'trials {", ".join(missing[:3])} of {root} have no {params!r} or {loss!r}'
                   ' (trained before the trainer recorded them, or without an evaluation): '
                   'rerun them')
  col = lambda k: np.array([float(r[k]) for r in rows])  # pylint: disable=unnecessary-lambda-assignment
  return Runs(tuple(r['trial'] for r in rows), col(params), col('tokens'), col(loss),
              col('flops'))


def plot_fits(runs: Runs, fit: LawFit, iso: Optional[IsoFlopFit], out_dir: str,
              extrapolate: float = 100.0) -> list:
  """PNG figures of a fit: `isoflop.png` (loss against N per budget: the runs, approach 2's
  parabolas and approach 3's law along the same budget), `optimum.png` (N_opt against C for
  both approaches, extrapolated `extrapolate` x past the largest budget) and `law.png`
  (the law's loss against each run's). Returns the paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  k = runs.flops_per_param_token
  budgets = runs.budgets
  levels = np.unique(budgets)
  colours = plt.cm.viridis(np.linspace(0, 0.9, levels.size))
  paths = []

  def save(fig, ax, name, legend=True):
    if legend:
      ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for c, colour in zip(levels, colours):
    sel = budgets == c
    ax.scatter(runs.n[sel], runs.loss[sel], color=colour, zorder=3, label=f'C = {c:.3g}')
    grid = np.geomspace(runs.n[sel].min() / 1.5, runs.n[sel].max() * 1.5, 100)
    ax.plot(grid, fit.law.loss(grid, c / (k * grid)), color=colour, lw=1.5)
    if iso is not None and c in iso.budgets:
      p = iso.parabolas[list(iso.budgets).index(c)]
      ax.plot(grid, np.polyval(p, np.log10(grid)), color=colour, lw=1, ls='--')
  if iso is not None:
    ax.scatter(iso.n_opt, iso.loss_opt, marker='*', s=150, color='red', zorder=4,
               label='approach 2 optima')
  ax.set(xscale='log', xlabel='parameters N', ylabel='final validation loss',
         title='IsoFLOP curves (solid: approach 3 law; dashed: approach 2 parabolas)')
  save(fig, ax, 'isoflop.png')

  fig, ax = plt.subplots(figsize=(7, 4.5))
  cs = np.geomspace(levels.min() / 2, levels.max() * extrapolate, 50)
  ax.plot(cs, fit.law.optimal(cs, k)[0], label='approach 3: N_opt(C)')
  if iso is not None:
    ax.plot(cs, iso.optimal(cs)[0], ls='--', label='approach 2: N_opt(C)')
    ax.scatter(iso.budgets, iso.n_opt, marker='*', s=120, color='red', zorder=3,
               label='approach 2 optima')
  ax.scatter(runs.flops, runs.n, s=12, color='grey', label='runs')
  ax.set(xscale='log', yscale='log', xlabel='training FLOPs C', ylabel='parameters N',
         title='compute-optimal model size')
  save(fig, ax, 'optimum.png')

  fig, ax = plt.subplots(figsize=(5, 5))
  pred = fit.law.loss(runs.n, runs.d)
  ax.scatter(runs.loss, pred, c=np.log10(runs.n), cmap='viridis')
  lo, hi = min(runs.loss.min(), pred.min()), max(runs.loss.max(), pred.max())
  ax.plot([lo, hi], [lo, hi], color='grey', lw=1)
  ax.set(xlabel='run loss', ylabel='law L(N, D)', title='approach 3 fit (colour: log10 N)')
  save(fig, ax, 'law.png', legend=False)
  return paths
