"""Trains a SentencePiece model on the embedded corpus (train split, both domains).

    python scripts/train_sentencepiece.py --output=/tmp/stdlib_sp.model [--vocab_size=8000]

Use it from gin (100 sentinel extra ids are added on top of the pieces):
    MIXTURE_OR_TASK_NAME = @tasks.sentencepiece_mixture()
    tasks.sentencepiece_mixture.model_path = '/tmp/stdlib_sp.model'
    tasks.sentencepiece_mixture.objective = 'lm'   # or 'prefix_lm', 'span_corruption'
and set the model's vocab_size to at least the vocabulary size it prints.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from t5x_like.data import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--output', required=True, help='path of the .model file to write')
  p.add_argument('--vocab_size', type=int, default=8000)
  p.add_argument('--max_sentences', type=int, default=300_000,
                 help='lines sampled for training (deterministically)')
  args = p.parse_args()
  vocab = tasks.train_sentencepiece(args.output, args.vocab_size, args.max_sentences)
  print(f'wrote {args.output}: {vocab.vocab_size} ids ({args.vocab_size} pieces + '
        f'{tasks.EXTRA_IDS} sentinels); set the model vocab_size >= {vocab.vocab_size}')


if __name__ == '__main__':
  main()
