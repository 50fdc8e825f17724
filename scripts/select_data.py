"""Data selection over text files: a quality classifier and DSIR importance resampling.

    python scripts/select_data.py train-classifier --positive GOOD.txt --negative BAD.txt \
        --output quality.npz [--holdout 0.1] [--l2 1e-4] [--steps 100] [--num_buckets 65536]
    python scripts/select_data.py filter --model quality.npz --input RAW.txt --output KEPT.txt \
        [--threshold 0.5]
    python scripts/select_data.py dsir --target TARGET.txt --raw RAW.txt --k 1000 \
        --output SELECTED.txt [--save_weights dsir.npz] [--num_buckets 10000] [--seed 0]

Inputs are text files with one example per line (blank lines skipped) or, for
names ending in .jsonl/.json or with --format=jsonl, one JSON object per line
whose --text_key field (default `text`) is the example. Outputs keep the input's
format and its lines unchanged (other JSON fields included), in input order.
`dsir` prints KL(target || raw), KL(target || random k), KL(target || selected)
and the reductions; --save_weights writes what the streaming seqio
`selection.importance_filter` reads. Bad input exits with code 2 and one line.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# TensorFlow's start-up lines would bury the report.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from t5x_like.data import selection  # pylint: disable=wrong-import-position


def _is_jsonl(path: str, fmt: str) -> bool:
  if fmt != 'auto':
    return fmt == 'jsonl'
  return path.endswith(('.jsonl', '.json'))


def read_examples(path: str, fmt: str = 'auto', text_key: str = 'text'):
  """(texts, lines): each example's text and its line as read (without the newline)."""
  if not os.path.exists(path):
    raise selection.SelectionError(f'input file {path} not found: check the path')
  jsonl = _is_jsonl(path, fmt)
  texts, lines = [], []
  with open(path, encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip('\r\n')
      if not line.strip():
        continue
      if jsonl:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise selection.SelectionError(
              f'{path}:{number} is not JSON ({e.msg}): pass --format=lines for plain text') from e
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
          keys = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise selection.SelectionError(f'{path}:{number} has no string field {text_key!r} '
                                         f'(fields: {keys}): set --text_key')
        texts.append(record[text_key])
      else:
        texts.append(line)
      lines.append(line)
  return texts, lines


def write_lines(path: str, lines) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for line in lines:
      f.write(line + '\n')


def train_classifier(args) -> None:
  positive, _ = read_examples(args.positive, args.format, args.text_key)
  negative, _ = read_examples(args.negative, args.format, args.text_key)
  start = time.time()
  clf = selection.train_quality_classifier(
      positive, negative, num_buckets=args.num_buckets, ngram_order=args.ngram_order, l2=args.l2,
      steps=args.steps, holdout_fraction=args.holdout, seed=args.seed)
  clf.save(args.output)
  m = clf.metrics
  print(f'trained on {m["num_positive"]} positive and {m["num_negative"]} negative examples in '
        f'{time.time() - start:.1f}s: loss {m["loss"]:.4f}, '
        f'train accuracy {m["train_accuracy"]:.4f}')
  if 'holdout_accuracy' in m:
    print(f'holdout accuracy {m["holdout_accuracy"]:.4f} on {m["holdout_positive"]} positive and '
          f'{m["holdout_negative"]} negative examples')
  print(f'wrote {args.output}')


def filter_examples(args) -> None:
  if not 0.0 <= args.threshold <= 1.0:
    raise selection.SelectionError(f'--threshold={args.threshold} must be in [0, 1]')
  clf = selection.QualityClassifier.load(args.model)
  texts, lines = read_examples(args.input, args.format, args.text_key)
  scores = clf.score(texts)
  # The same float32 comparison as selection.quality_filter.
  keep = scores >= np.float32(args.threshold)
  write_lines(args.output, [line for line, k in zip(lines, keep) if k])
  share = keep.mean() if len(keep) else 0.0
  print(f'kept {int(keep.sum())} of {len(keep)} examples ({100 * share:.1f}%) with score >= '
        f'{args.threshold}; wrote {args.output}')


def dsir(args) -> None:
  target, _ = read_examples(args.target, args.format, args.text_key)
  raw, lines = read_examples(args.raw, args.format, args.text_key)
  start = time.time()
  result = selection.dsir_select(target, raw, args.k, num_buckets=args.num_buckets,
                                 ngram_order=args.ngram_order, seed=args.seed)
  write_lines(args.output, [lines[i] for i in result.indices])
  print(f'selected {len(result.indices)} of {len(raw)} raw examples toward {len(target)} target '
        f'examples in {time.time() - start:.1f}s; wrote {args.output}')
  print(result.report.table())
  if args.save_weights:
    result.weights.save(args.save_weights)
    print(f'wrote {args.save_weights} (for selection.importance_filter)')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)

  def add_io_args(q):
    q.add_argument('--format', choices=('auto', 'lines', 'jsonl'), default='auto',
                   help='input format; auto: JSONL for .jsonl/.json names, else lines')
    q.add_argument('--text_key', default='text', help='the text field of JSONL records')

  q = sub.add_parser('train-classifier', help='fit a quality classifier')
  q.add_argument('--positive', required=True, help='examples to keep')
  q.add_argument('--negative', required=True, help='examples to drop')
  q.add_argument('--output', required=True, help='model .npz to write')
  q.add_argument('--num_buckets', type=int, default=selection.DEFAULT_CLASSIFIER_BUCKETS)
  q.add_argument('--ngram_order', type=int, default=selection.DEFAULT_NGRAM_ORDER)
  q.add_argument('--l2', type=float, default=1e-4)
  q.add_argument('--steps', type=int, default=100, help='L-BFGS iterations')
  q.add_argument('--holdout', type=float, default=0.1,
                 help='fraction of each class held out to measure accuracy (not trained on)')
  q.add_argument('--seed', type=int, default=0)
  add_io_args(q)
  q.set_defaults(run=train_classifier)

  q = sub.add_parser('filter', help='keep examples a quality classifier scores >= threshold')
  q.add_argument('--model', required=True, help='.npz from train-classifier')
  q.add_argument('--input', required=True)
  q.add_argument('--output', required=True)
  q.add_argument('--threshold', type=float, default=0.5)
  add_io_args(q)
  q.set_defaults(run=filter_examples)

  q = sub.add_parser('dsir', help='importance-resample k raw examples toward a target')
  q.add_argument('--target', required=True, help='examples of the data wanted')
  q.add_argument('--raw', required=True, help='the pool to select from')
  q.add_argument('--k', type=int, required=True, help='how many to select')
  q.add_argument('--output', required=True)
  q.add_argument('--save_weights', default='',
                 help='also write the fitted distributions (.npz) for importance_filter')
  q.add_argument('--num_buckets', type=int, default=selection.DEFAULT_DSIR_BUCKETS)
  q.add_argument('--ngram_order', type=int, default=selection.DEFAULT_NGRAM_ORDER)
  q.add_argument('--seed', type=int, default=0)
  add_io_args(q)
  q.set_defaults(run=dsir)

  args = p.parse_args(argv)
  try:
    args.run(args)
  except selection.SelectionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
