"""Decoding speed: tokens/s of t5x_like's KV-cache decoding beside Hugging Face
`transformers` `generate` on the same architecture and weights, in one run.

    python scripts/bench_decode.py --hf_python /path/to/venv/bin/python [--record]

For each model (models/llama/20m.gin, models/llama/300m.gin; f32, random
weights) it exports the weights with `python -m t5x_like.hf export`, then times
greedy decoding of 256 new tokens after 128-token prompts at batch 1 and 8:
ours with `decoding.generate` jitted (compile excluded: one warm-up call),
transformers with `model.generate(do_sample=False)` in the given Python (a
separate virtual environment with torch and transformers; same number of
threads). Both decode every new token (no early stop). The greedy outputs are
compared as a sanity check. --record appends the table to docs/benchmarks.md.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from t5x_like import checkpoints  # pylint: disable=wrong-import-position
from t5x_like import decoding  # pylint: disable=wrong-import-position
from t5x_like import gin_utils  # pylint: disable=wrong-import-position
from t5x_like import hf  # pylint: disable=wrong-import-position

PROMPT, NEW = 128, 256

HF_SIDE = r'''
import json, sys, time
import numpy as np, torch, transformers
folder, prompts_file, new, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
prompts = np.load(prompts_file)
out = {}
for b in (1, 8):
  ids = torch.tensor(prompts[:b])
  kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            attention_mask=torch.ones_like(ids))
  with torch.no_grad():
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    best = float('inf')
    for _ in range(repeats):
      t = time.perf_counter()
      tokens = model.generate(ids, **kw)
      best = min(best, time.perf_counter() - t)
  out[b] = {'seconds': best, 'tokens': tokens[:, ids.shape[1]:].tolist()}
print(json.dumps(out))
'''


def _ours(model, params, prompts, repeats):
  config = decoding.DecodingConfig(max_decode_length=NEW, eos_id=-1)
  gen = jax.jit(lambda p, b: decoding.generate(model, p, b, config))
  out = {}
  for b in (1, 8):
    batch = {'prompt_tokens': prompts[:b].astype(np.int32),
             'prompt_lengths': np.full((b,), PROMPT, np.int32)}
    jax.block_until_ready(gen(params, batch))  # compile
    best = float('inf')
    for _ in range(repeats):
      t = time.perf_counter()
      d = jax.block_until_ready(gen(params, batch))
      best = min(best, time.perf_counter() - t)
    out[b] = {'seconds': best, 'tokens': np.asarray(d.tokens).tolist()}
  return out


def measure(model_file, hf_python, repeats, threads):
  model = gin_utils.model_from_gin([model_file])
  model = type(model)(model.config, z_loss=model.z_loss, decoder_start_token=None)
  batch = model.dummy_batch(1, {'targets': 8})
  params = jax.jit(lambda r: jax.tree.map(lambda x: x * 0.5, __import__('flax').linen.unbox(
      model.init_variables(r, batch)['params'])))(jax.random.PRNGKey(0))
  tmp = tempfile.mkdtemp(prefix='bench_decode_')
  model_dir, hf_dir = os.path.join(tmp, 'ours'), os.path.join(tmp, 'hf')
  os.makedirs(model_dir)
  with open(os.path.join(ROOT, 'gin', model_file)) as f:
    gin_text = f.read().replace("include '", f"include '{os.path.join(ROOT, 'gin')}/")
  with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
    f.write(gin_text)
  ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
  ckpt.save(0, {'params': params}, {})
  ckpt.close()
  hf.export_checkpoint(model_dir, hf_dir)
  prompts = np.random.RandomState(0).randint(3, model.config.vocab_size, (8, PROMPT))
  np.save(os.path.join(tmp, 'prompts.npy'), prompts)
  ours = _ours(model, params, prompts, repeats)
  done = subprocess.run([hf_python, '-c', HF_SIDE, hf_dir, os.path.join(tmp, 'prompts.npy'),
                         str(NEW), str(repeats), str(threads)], capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(done.stderr[-3000:])
  theirs = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
  n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  rows = []
  for b in (1, 8):
    same = np.mean(np.asarray(ours[b]['tokens'])[:, :16] == np.asarray(theirs[b]['tokens'])[:, :16])
    rows.append((model_file, n, b, b * NEW / ours[b]['seconds'], b * NEW / theirs[b]['seconds'],
                 same))
  return rows


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--hf_python', required=True,
                      help='a Python with torch and transformers (a separate venv)')
  parser.add_argument('--models', nargs='*', default=['models/llama/20m.gin',
                                                      'models/llama/300m.gin'])
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--record', action='store_true')
  args = parser.parse_args(argv)
  threads = os.cpu_count() or 1
  rows = []
  for m in args.models:
    rows += measure(m, args.hf_python, args.repeats, threads)
  lines = ['| model | parameters | batch | t5x_like tokens/s | transformers tokens/s | ratio | '
           'first 16 greedy tokens equal |', '|---|---|---|---|---|---|---|']
  for m, n, b, ours, theirs, same in rows:
    lines.append(f'| {m} | {n:,} | {b} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | '
                 f'{same:.0%} |')
  table = '\n'.join(lines)
  print(table)
  if args.record:
    device = jax.devices()[0]
    with open(os.path.join(ROOT, 'docs', 'benchmarks.md'), 'a') as f:
      f.write(f'\n## Decoding: KV cache vs transformers generate ({datetime.date.today()}, '
              f'{platform.node()}, {os.cpu_count()} CPUs, {device.platform})\n\n'
              f'`python scripts/bench_decode.py --hf_python HF_VENV/bin/python --record`\n\n'
              f'Greedy, f32, {PROMPT}-token prompts, {NEW} new tokens, best of {args.repeats}; '
              f'random weights exported with `python -m t5x_like.hf export`.\n\n{table}\n')


if __name__ == '__main__':
  main(sys.argv[1:])
