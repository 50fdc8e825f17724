"""Peak host memory of `python -m t5x_like.hf import` on a ~1B LLaMA-layout checkpoint.

    python scripts/bench_hf_import.py [--layers 22] [--record]

Writes a random checkpoint of TinyLlama-1.1B's shape (hidden 2048, 22 layers,
32 heads / 4 K/V heads, MLP 5632, vocabulary 32000; f32) as sharded
safetensors (model.safetensors.index.json, about 1 GB per shard, written one
shard at a time with numpy), imports it in a child process, and reports the
child's peak resident memory beside the checkpoint's size and its largest
tensor. The child samples its anonymous resident memory (RssAnon: the heap,
without mapped library code) before the import and at its peak; the
difference is what the import itself holds. --record appends the table to
docs/benchmarks.md.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(folder, layers, shard_bytes=1 << 30):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  e, m, h, kv, d, v = 2048, 5632, 32, 4, 64, 32000
  config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': v,
            'hidden_size': e, 'intermediate_size': m, 'num_hidden_layers': layers,
            'num_attention_heads': h, 'num_key_value_heads': kv, 'rms_norm_eps': 1e-5,
            'rope_theta': 10000.0, 'max_position_embeddings': 2048,
            'tie_word_embeddings': False, 'torch_dtype': 'float32'}
  shapes = [('model.embed_tokens.weight', (v, e))]
  for i in range(layers):
    p = f'model.layers.{i}'
    shapes += [(f'{p}.self_attn.q_proj.weight', (h * d, e)),
               (f'{p}.self_attn.k_proj.weight', (kv * d, e)),
               (f'{p}.self_attn.v_proj.weight', (kv * d, e)),
               (f'{p}.self_attn.o_proj.weight', (e, h * d)),
               (f'{p}.mlp.gate_proj.weight', (m, e)), (f'{p}.mlp.up_proj.weight', (m, e)),
               (f'{p}.mlp.down_proj.weight', (e, m)),
               (f'{p}.input_layernorm.weight', (e,)),
               (f'{p}.post_attention_layernorm.weight', (e,))]
  shapes += [('model.norm.weight', (e,)), ('lm_head.weight', (v, e))]
  rng = np.random.default_rng(0)
  weight_map, shard, size, n = {}, {}, 0, 0

  def flush():
    nonlocal shard, size, n
    if shard:
      name = f'model-{n:05d}.safetensors'
      save_file(shard, os.path.join(folder, name), metadata={'format': 'pt'})
      weight_map.update({k: name for k in shard})
      shard, size, n = {}, 0, n + 1

  for name, shape in shapes:
    shard[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    size += shard[name].nbytes
    if size >= shard_bytes:
      flush()
  flush()
  total = sum(int(np.prod(s)) * 4 for _, s in shapes)
  largest = max(int(np.prod(s)) * 4 for _, s in shapes)
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  return total, largest, sum(int(np.prod(s)) for _, s in shapes)


# The import in a child process, with its anonymous resident memory (the heap:
# arrays, buffers; not the mapped library code) sampled every 10 ms from
# /proc/self/status, before the import (modules loaded) and at its peak.
CHILD = '''
import json, sys, threading, time
import jax.numpy as jnp
from t5x_like import hf
jnp.zeros(1)
def anon():
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith('RssAnon'))
before, peak = anon(), [0]
def sample():
  while True:
    peak[0] = max(peak[0], anon())
    time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
hf.import_checkpoint(sys.argv[1], sys.argv[2])
peak[0] = max(peak[0], anon())
print(json.dumps({'before': before, 'peak': peak[0]}))
'''


def ours_largest(model_dir):
  """Bytes of the largest array in the imported checkpoint (a scanned stack)."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top  (only here: the parent stays light)
  from t5x_like import checkpoints  # pylint: disable=g-import-not-at-top
  directory, step = checkpoints.resolve(model_dir)
  saved = checkpoints.saved_params(directory, step)
  return max(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(saved))


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=22)
  parser.add_argument('--record', action='store_true')
  args = parser.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix='bench_hf_import_')
  hf_dir, model_dir = os.path.join(tmp, 'hf'), os.path.join(tmp, 'imported')
  os.makedirs(hf_dir)
  total, largest, params = write_checkpoint(hf_dir, args.layers)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  t = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', CHILD, hf_dir, model_dir], check=True, cwd=ROOT,
                       env=env, stdout=subprocess.PIPE, text=True).stdout
  seconds = time.perf_counter() - t
  anon = json.loads(out.strip().splitlines()[-1])
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB -> bytes
  gib = lambda b: b / 2 ** 30
  table = '\n'.join([
      '| checkpoint | parameters | size (f32) | largest HF tensor | largest of ours | '
      'heap before | heap peak during import | peak - before | process peak RSS | time |',
      '|---|---|---|---|---|---|---|---|---|---|',
      f'| LLaMA layout, {args.layers} layers (TinyLlama-1.1B shape), sharded safetensors | '
      f'{params:,} | {gib(total):.2f} GiB | {gib(largest):.3f} GiB | '
      f'{gib(ours_largest(model_dir)):.3f} GiB | {gib(anon["before"]):.2f} GiB | '
      f'{gib(anon["peak"]):.2f} GiB | {gib(anon["peak"] - anon["before"]):.2f} GiB | '
      f'{gib(peak):.2f} GiB | {seconds:.0f} s |'])
  print(table)
  if args.record:
    with open(os.path.join(ROOT, 'docs', 'benchmarks.md'), 'a') as f:
      f.write(f'\n## Hugging Face import: peak host memory ({datetime.date.today()}, '
              f'{platform.node()}, {os.cpu_count()} CPUs, cpu)\n\n'
              f'`python scripts/bench_hf_import.py --record`\n\n{table}\n')
  shutil.rmtree(tmp)


if __name__ == '__main__':
  main(sys.argv[1:])
