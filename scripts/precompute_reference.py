"""Precomputes a DPO reference's log-likelihoods into preference data, once.

    python scripts/precompute_reference.py --gin_file=models/llama/small.gin \
        --checkpoint=/tmp/t5x_like/sft --output_dir=/tmp/t5x_like/prefs_with_reference \
        [--train=... --validation=...]   # JSONL pairs (default: the embedded stdlib set)
        [--inputs=208 --chosen=64 --rejected=64] [--batch=16]

Reads each split's pairs through the same task, preprocessing and feature conversion a DPO
run uses (so the tokens scored are exactly the ones the policy will see), scores both
responses with the checkpoint, and writes OUTPUT_DIR/<split>.jsonl: every record with
`reference_chosen_log_likelihood` and `reference_rejected_log_likelihood` added. Then:

    python -m train --gin_file=models/llama/small.gin --gin_file=runs/dpo.gin \
        --gin.REFERENCE="'precomputed'" \
        --gin.MIXTURE_OR_TASK_NAME=@preferences.preference_task() \
        --gin.preferences.preference_task.name="'prefs_with_reference'" \
        --gin.preferences.preference_task.split_files="{'train': '.../train.jsonl', 'validation': '.../validation.jsonl'}" ...

and the run holds no reference model at all.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from models import preference  # pylint: disable=wrong-import-position
from partitioning import mesh as mesh_lib  # pylint: disable=wrong-import-position
from partitioning import partitioner as partitioner_lib  # pylint: disable=wrong-import-position
from t5x_like import gin_utils  # pylint: disable=wrong-import-position
from t5x_like import infer as infer_lib  # pylint: disable=wrong-import-position
from t5x_like.data import instructions  # pylint: disable=wrong-import-position
from t5x_like.data import pipeline  # pylint: disable=wrong-import-position
from t5x_like.data import preferences  # pylint: disable=wrong-import-position


def precompute(policy, params, partitioner, split_files, lengths, output_dir, batch_size=16,
               vocabulary=None):
  """(vocabulary: the tokenizer of the pairs; default: bytes, as the embedded set.)"""
  """Writes output_dir/<split>.jsonl: the records of `split_files` with the reference
  log-likelihoods of `params` added. Returns split -> path."""
  vocabulary = vocabulary or preferences.registry.DEFAULT_VOCABULARY
  task = preferences.register_preference_task('_reference_scoring', split_files, vocabulary)
  dpo = preference.DpoModel(policy)  # (its on-the-fly features: the pairs alone)
  score = jax.jit(lambda p, b: [dpo.sequence_scores(policy, p, preference.side_batch(b, s))[0]
                                for s in preference.SIDES])
  os.makedirs(output_dir, exist_ok=True)
  out = {}
  for split, pattern in split_files.items():
    config = pipeline.DatasetConfig(task, lengths, split=split, batch_size=batch_size,
                                    shuffle=False, pack=False)
    scores = []
    for batch in pipeline.InputIterator(config, dpo, num_epochs=1, pad_last=True):
      with partitioner.context():
        chosen, rejected = jax.device_get(score(params, batch))
      scores.extend(zip(np.asarray(chosen).tolist(), np.asarray(rejected).tolist()))
    files = instructions._files({split: pattern})[split]  # pylint: disable=protected-access
    records = [r for f in files for _, r in instructions.read_jsonl(f)]
    path = os.path.join(output_dir, f'{split}.jsonl')
    with open(path + '.tmp', 'w') as f:
      for record, (c, r) in zip(records, scores):  # (padding rows come last: dropped)
        f.write(json.dumps({**record, preferences.REFERENCE_FEATURES[0]: c,
                            preferences.REFERENCE_FEATURES[1]: r}) + '\n')
    os.replace(path + '.tmp', path)
    out[split] = path
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gin_file', required=True, help='the model gin file')
  p.add_argument('--checkpoint', required=True, help='the reference: a MODEL_DIR or checkpoint')
  p.add_argument('--output_dir', required=True)
  p.add_argument('--train', default=None)
  p.add_argument('--validation', default=None)
  p.add_argument('--inputs', type=int, default=208)
  p.add_argument('--chosen', type=int, default=64)
  p.add_argument('--rejected', type=int, default=64)
  p.add_argument('--batch', type=int, default=16)
  args = p.parse_args()
  split_files = {k: v for k, v in (('train', args.train), ('validation', args.validation)) if v}
  if not split_files:
    split_files = preferences.build_preferences()
  model = gin_utils.model_from_gin([args.gin_file])
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  abstract = infer_lib.abstract_params(model, part)
  ckpt = infer_lib.checked_checkpoint(args.checkpoint, abstract, '--checkpoint', model, part)
  params = ckpt.restore(abstract)
  lengths = {'inputs': args.inputs, 'chosen': args.chosen, 'rejected': args.rejected}
  paths = precompute(model, params, part, split_files, lengths, args.output_dir, args.batch)
  for split, path in paths.items():
    print(f'{split}: {path}')


if __name__ == '__main__':
  main()
