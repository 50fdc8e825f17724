"""Training throughput and model FLOPs utilisation of a LLaMA-style decoder.

    python scripts/bench_train.py [--model=models/llama/20m.gin] [--batch=16 --length=256]
                                  [--steps=10] [--dtype=float32] [--remat=none]
                                  [--attention=xla|flash] [--synthetic] [--no-append]

Measures, in one run: the train step's tokens/s on batches of the embedded corpus
(fetched before timing, so input work does not share the cores with the step; with
--synthetic, random tokens, for a machine without the data stack),
model FLOPs per token (`models.param_count`), this machine's best f32 (or bf16)
matmul FLOP/s, their ratio (MFU), the compiled step's memory and the process's
peak RSS. Appends a row to docs/benchmarks.md with the machine, date and command.
"""

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from t5x_like import xla_env  # pylint: disable=wrong-import-position

xla_env.apply()  # the XLA options `python -m train` runs with

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from partitioning import mesh as mesh_lib  # pylint: disable=wrong-import-position
from partitioning import partitioner as partitioner_lib  # pylint: disable=wrong-import-position
from t5x_like import gin_utils  # pylint: disable=wrong-import-position
from t5x_like import optimizers  # pylint: disable=wrong-import-position
from t5x_like import trainer as trainer_lib  # pylint: disable=wrong-import-position
from t5x_like import utils  # pylint: disable=wrong-import-position

from record_benchmark import append_section  # pylint: disable=wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='models/llama/20m.gin')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--length', type=int, default=256)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--remat', default=None, help="default: the model file's")
  p.add_argument('--attention', default=None, choices=('xla', 'flash'),
                 help="the attention kernel; default: the model file's")
  p.add_argument('--synthetic', action='store_true', help='random tokens instead of the corpus')
  p.add_argument('--no-append', action='store_true')
  args = p.parse_args()

  bindings = [f"model_config.DecoderConfig.dtype = '{args.dtype}'"]
  if args.remat:
    bindings.append(f"model_config.DecoderConfig.remat_policy = '{args.remat}'")
  if args.attention:
    bindings.append(f"model_config.DecoderConfig.attention_kernel = '{args.attention}'")
  model = gin_utils.model_from_gin([args.model], bindings)
  if args.synthetic:
    rng = np.random.default_rng(0)
    def synthetic():
      t = rng.integers(1, model.config.vocab_size, (args.batch, args.length)).astype(np.int32)
      return {'decoder_input_tokens': np.pad(t[:, :-1], ((0, 0), (1, 0))),
              'decoder_target_tokens': t, 'decoder_loss_weights': np.ones(t.shape, np.float32)}
    batches = [synthetic() for _ in range(args.steps + args.warmup)]
  else:
    from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
    data_cfg = pipeline.DatasetConfig('stdlib_lm', {'targets': args.length},
                                      batch_size=args.batch)
    it = pipeline.InputIterator(data_cfg, model)
    batches = [next(it) for _ in range(args.steps + args.warmup)]
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  shapes = {k: v.shape for k, v in batches[0].items()}
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-3), part, shapes)
  state = trainer.init_state()
  sharded = [trainer.shard_batch(b) for b in batches]

  # The step is compiled once: the timed calls below find it in the compilation cache.
  # A split step's programs run one after the other: its memory is the larger one's.
  mems = [c.memory_analysis() for c in trainer.precompile_train_step(state, sharded[0])]
  step_bytes = None
  if all(m is not None for m in mems):
    step_bytes = max(m.argument_size_in_bytes + m.output_size_in_bytes +
                     m.temp_size_in_bytes - m.alias_size_in_bytes for m in mems)

  for b in sharded[:args.warmup]:
    state, m = trainer.jit_train_step(state, b)
  jax.block_until_ready(state)
  times = []
  for b in sharded[args.warmup:]:
    t = time.perf_counter()
    state, m = trainer.jit_train_step(state, b)
    jax.block_until_ready(m['loss'])
    times.append(time.perf_counter() - t)
  step_time = float(np.median(times))
  tokens = args.batch * args.length
  flops_token = model.flops_per_example({'targets': args.length}) / args.length
  peak = utils.measured_matmul_peak(args.dtype) * jax.device_count()
  tok_s = tokens / step_time
  mfu = tok_s * flops_token / peak
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  rows = [
      ('model', f'{args.model} ({trainer.num_params / 1e6:.1f}M params, {args.dtype}, '
                f'remat {model.config.remat_policy.value}, attention '
                f'{model.config.attention_kernel.value})'),
      ('tokens/step', f'{tokens} ({args.batch} x {args.length})'),
      ('step time (median)', f'{step_time * 1e3:.0f} ms'),
      ('tokens/s', f'{tok_s:,.0f}'),
      ('model FLOPs/token', f'{flops_token / 1e6:.1f} M'),
      ('measured matmul peak', f'{peak / 1e9:.1f} GFLOP/s'),
      ('MFU', f'{100 * mfu:.1f}%'),
      ('compiled step memory', f'{step_bytes / 2**20:.0f} MiB' if step_bytes else 'n/a'),
      ('peak RSS', f'{rss_mib:.0f} MiB'),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f'{k:<{width}}  {v}')

  if not args.no_append:
    cmd = 'python scripts/bench_train.py ' + ' '.join(sys.argv[1:])
    append_section('bench_train', f'Command: `{cmd.strip()}` (jax {jax.__version__})\n\n'
                   '| metric | value |\n|---|---|\n' +
                   ''.join(f'| {k} | {v} |\n' for k, v in rows))


if __name__ == '__main__':
  main()
