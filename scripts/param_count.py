"""Parameters and training FLOPs of gin models: every shipped config, or the one you give.

    python scripts/param_count.py                      # every shipped model: built vs analytic
    python scripts/param_count.py --gin_file=models/llama/300m.gin [--gin.num_layers=12 ...] \
        [--length=1024] [--tokens=6e9]

For one model: parameters (total, embedding, non-embedding, active per token for MoE),
training FLOPs per token (exact: every matmul and attention's QK^T and AV; and the 6N
approximation), and the compute of training on `--tokens` tokens. Each model is built
abstractly (`jax.eval_shape`), so 7B-class configs cost no memory.
"""

import argparse
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


def all_shipped():
  print(f'{"config":<28} {"built":>16} {"analytic":>16}')
  for path in gin_utils.shipped_files('models'):
    model = gin_utils.model_from_gin([path])
    built = count(model)
    analytic = param_count.analytic_param_count(model.config)
    mark = '' if built == analytic else '  MISMATCH'
    print(f'{os.path.relpath(path, gin_utils.GIN_DIR):<28} {built:>16,} {analytic:>16,}{mark}')


def one(files, bindings, length: int, inputs_length: int, tokens: float) -> dict:
  model = gin_utils.model_from_gin(files, bindings)
  acc = param_count.accounting(model.config, inputs_length, length)
  rows = [('parameters', f'{acc["params"]:,}'),
          ('  embedding (token, output, positions)', f'{acc["embedding_params"]:,}'),
          ('  non-embedding', f'{acc["non_embedding_params"]:,}'),
          ('  active per token (MoE)', f'{acc["active_params"]:,}'),
          (f'training FLOPs per token, exact (length {inputs_length + length})',
           f'{acc["flops_per_token"]:.4g}'),
          ('training FLOPs per token, 6N (N active non-embedding)',
           f'{acc["flops_per_token_6n"]:.4g}'),
          (f'compute for {tokens:.3g} tokens, exact', f'{acc["flops_per_token"] * tokens:.4g}'),
          (f'compute for {tokens:.3g} tokens, 6N', f'{acc["flops_per_token_6n"] * tokens:.4g}')]
  print('| quantity | value |\n|---|---|')
  for name, value in rows:
    print(f'| {name} | {value} |')
  return acc


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gin_file', action='append', default=[])
  p.add_argument('--length', type=int, default=1024, help='target (decoder) length')
  p.add_argument('--inputs_length', type=int, default=0, help='encoder length (enc-dec)')
  p.add_argument('--tokens', type=float, default=20 * 1e9, help='training tokens')
  args, rest = p.parse_known_args(argv)
  unknown = [r for r in rest if not r.startswith('--gin.')]
  if unknown:
    p.error(f'unknown argument {unknown[0]!r}: use --gin.KEY=VALUE for a gin binding')
  bindings = gin_utils.split_argv(rest)
  if not args.gin_file:
    if bindings:
      p.error('--gin.KEY=VALUE needs a --gin_file')
    return all_shipped()
  return one(args.gin_file, bindings, args.length, args.inputs_length, args.tokens)


if __name__ == '__main__':
  main()
