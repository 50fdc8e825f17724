"""Prints every shipped model config's parameter count beside the analytic formula.

    python scripts/param_count.py

Each model is built abstractly (`jax.eval_shape`), so 7B-class configs cost no memory.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from models import param_count  # pylint: disable=wrong-import-position
from t5x_like import gin_utils  # pylint: disable=wrong-import-position


def count(model) -> int:
  lengths = {'inputs': 8, 'targets': 8}
  abstract = jax.eval_shape(lambda: model.init_variables(
      jax.random.PRNGKey(0), model.dummy_batch(1, lengths))['params'])
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))


def main():
  print(f'{"config":<28} {"built":>16} {"analytic":>16}')
  for path in gin_utils.shipped_files('models'):
    model = gin_utils.model_from_gin([path])
    built = count(model)
    analytic = param_count.analytic_param_count(model.config)
    mark = '' if built == analytic else '  MISMATCH'
    print(f'{os.path.relpath(path, gin_utils.GIN_DIR):<28} {built:>16,} {analytic:>16,}{mark}')


if __name__ == '__main__':
  main()
