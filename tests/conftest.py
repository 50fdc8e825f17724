"""Test set-up: 8 fake CPU devices, so every sharding test runs on a real mesh."""

import datetime
import os
import sys

import pytest

# Kernel tests run compiled on a GPU or TPU (see the kernel test files).
COMPILED = any(os.environ.get(f'{k}_TEST_COMPILED') == '1' for k in ('FLASH', 'ROUTING', 'GMM'))

# XLA CPU compile options for the tests: test programs are tiny and run a few
# times, so compiling them dominates the suite; without LLVM's optimisations and
# with the elemental fusion emitter, compiles take about half as long (the same
# IEEE operations; the production defaults run in the README job and the
# benchmarks). Subprocesses started by the tests get them too
# (testing_utils.subprocess_env). T5X_LIKE_TEST_XLA_FLAGS replaces them; runs
# compiled on a device keep XLA's defaults.
TEST_XLA_FLAGS = os.environ.get(
    'T5X_LIKE_TEST_XLA_FLAGS',
    '' if COMPILED else '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')

# Must happen before jax is imported anywhere. (pytest-xdist workers inherit
# the controller's flags: each is added once.)
_flags = os.environ.get('XLA_FLAGS', '').split()
os.environ['XLA_FLAGS'] = ' '.join(_flags + [
    f for f in TEST_XLA_FLAGS.split() + ['--xla_force_host_platform_device_count=8']
    if f not in _flags])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
  if p not in sys.path:
    sys.path.insert(0, p)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')


# ------------------------------------------------------------ rotating grids
#
# `@pytest.mark.rotate(period)` on a parametrized test runs one slice of its
# cases per run, so `period` consecutive rotations cover every case once. Case
# i (in collection order) is in slice (i + i // period) % period: each run of
# `period` cases is dealt to all slices, shifted by one from the run before,
# so an innermost parameter with `period` values is not all in one slice. The
# rotation is T5X_LIKE_TEST_ROTATION (an integer, or `all` for every case;
# `all` too when a kernel test runs compiled on a device), else the UTC day
# number: CI covers a test's whole grid every `period` days, and the run's
# last line names the rotation that reproduces it.

ROTATION_ENV = 'T5X_LIKE_TEST_ROTATION'


def _rotation():
  value = os.environ.get(ROTATION_ENV, '').strip().lower()
  if value == 'all':
    return None
  if value:
    try:
      return int(value)
    except ValueError:
      raise pytest.UsageError(f'{ROTATION_ENV}={value!r} must be an integer or "all"') from None
  if COMPILED:
    return None  # compiled on a device, a case costs little: take every one
  return (datetime.datetime.now(datetime.timezone.utc).date() - datetime.date(1970, 1, 1)).days


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'rotate(period): run one of `period` slices of this parametrized test per '
      f'run, chosen by {ROTATION_ENV} (default: the UTC day number; `all` runs every case)')
  config.t5x_like_rotation = _rotation()
  if not hasattr(config, 'workerinput'):  # pytest-xdist workers collect the same slices
    os.environ[ROTATION_ENV] = 'all' if config.t5x_like_rotation is None else str(
        config.t5x_like_rotation)
  config.t5x_like_rotated_out = 0


def _rotation_line(config, left_out=None):
  rotation = config.t5x_like_rotation
  if rotation is None:
    return f'rotating grids: every case ({ROTATION_ENV}=all)'
  left = '' if left_out is None else f', {left_out} cases left to other rotations'
  return (f'rotating grids: rotation {rotation}{left} (repeat with {ROTATION_ENV}={rotation}; '
          f'{ROTATION_ENV}=all runs every case)')


def pytest_report_header(config):
  return _rotation_line(config)


def pytest_terminal_summary(terminalreporter, config):
  # Also under -q, where the header is not shown: a failure names its rotation.
  # (Under pytest-xdist the workers deselect, so the controller has no count.)
  distributed = config.pluginmanager.has_plugin('dsession')
  terminalreporter.write_line(_rotation_line(
      config, None if distributed else config.t5x_like_rotated_out))


def rotation_slices(items):
  """{test function node id: [items in collection order]} for rotating tests."""
  groups = {}
  for item in items:
    marker = item.get_closest_marker('rotate')
    if marker is not None:
      groups.setdefault(item.nodeid.split('[')[0], []).append((item, marker))
  return groups


@pytest.hookimpl(tryfirst=True)  # before -k and -m: the slices do not depend on them
def pytest_collection_modifyitems(config, items):
  rotation = config.t5x_like_rotation
  if rotation is None:
    return
  # A case named on the command line (path::test[id]) always runs.
  named = {a.split('::', 1)[1] for a in config.args if '::' in a and '[' in a}
  deselected = set()
  for name, group in rotation_slices(items).items():
    (period,) = group[0][1].args
    if not isinstance(period, int) or period < 1:
      raise pytest.UsageError(f'{name}: rotate(period={period!r}) needs a positive integer')
    for i, (item, _) in enumerate(group):
      if ((i + i // period) % period != rotation % period and
          item.nodeid.split('::', 1)[1] not in named):
        deselected.add(item)
  config.t5x_like_rotated_out = len(deselected)
  if deselected:
    config.hook.pytest_deselected(items=[i for i in items if i in deselected])
    items[:] = [i for i in items if i not in deselected]
