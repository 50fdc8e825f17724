"""Peak memory and speed of full fine-tuning vs LoRA vs QLoRA on one decoder, in one run.

    python scripts/bench_finetune.py [--model=models/llama/300m.gin] [--batch=2 --length=128]
                                     [--steps=3] [--rank=8] [--no-append]

Each method trains in its own process (so each peak is its own) with AdamW on the same
random batches: `full` (every parameter), `lora` (rank `--rank` on every dense layer, the
output layer too, the base frozen) and `qlora` (the same over an NF4 base). Reported per
method: trained parameters, optimizer-state bytes, XLA's compiled step memory (arguments
+ outputs + temporaries - donated), the process's peak RSS, the median step time and
tokens/s; and each method's peak as a share of full fine-tuning's. Appends the table to
docs/benchmarks.md with the machine, date and command.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ('full', 'lora', 'qlora')


def child(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from models import peft  # pylint: disable=g-import-not-at-top
  from partitioning import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from partitioning import partitioner as partitioner_lib  # pylint: disable=g-import-not-at-top
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_like import optimizers  # pylint: disable=g-import-not-at-top
  from t5x_like import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  bindings = []
  files = [args.model]
  if args.child != 'full':
    files.append('peft/qlora.gin' if args.child == 'qlora' else 'peft/lora.gin')
    bindings += ["LORA_TARGETS = '.'", f'LORA_RANK = {args.rank}']
  model = gin_utils.model_from_gin(files, bindings)
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(args.steps + 1):
    b = model.dummy_batch(args.batch, {'targets': args.length})
    b['decoder_target_tokens'] = rng.randint(2, 384, b['decoder_target_tokens'].shape).astype(
        np.int32)
    b['decoder_input_tokens'] = np.roll(b['decoder_target_tokens'], 1, axis=1)
    b['decoder_loss_weights'] = np.ones_like(b['decoder_loss_weights'])
    b = {k: v for k, v in b.items() if k in model.FEATURES}
    batches.append(b)
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-4), part,
                                {k: v.shape for k, v in batches[0].items()})
  state = trainer.init_state()
  sharded = [trainer.shard_batch(b) for b in batches]
  compiled = jax.jit(trainer.train_step, donate_argnums=(0,)).lower(state, sharded[0]).compile()
  mem = compiled.memory_analysis()
  step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
                mem.alias_size_in_bytes) if mem is not None else None
  state, m = trainer.jit_train_step(state, sharded[0])  # compile + warm up
  jax.block_until_ready(state)
  times, losses = [], []
  for b in sharded[1:]:
    t = time.perf_counter()
    state, m = trainer.jit_train_step(state, b)
    losses.append(float(m['loss'].compute()))
    times.append(time.perf_counter() - t)
  nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  frozen = trainer.frozen(state.params)
  # The base model's parameter count (a quantized base stores fewer, smaller elements).
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  base = model.without_peft()
  base_params = sum(x.size for x in jax.tree.leaves(nn.unbox(jax.eval_shape(
      lambda: base.init_variables(jax.random.PRNGKey(0), batches[0])['params']))))
  return {'method': args.child, 'params': base_params + trainer.num_trainable_params * (
              args.child != 'full'),
          'trainable': trainer.num_trainable_params, 'param_bytes': nbytes(state.params),
          'frozen_bytes': nbytes(frozen), 'base_params': base_params,
          'opt_bytes': nbytes(state.opt_state), 'step_bytes': step_bytes,
          'rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          'step_s': float(np.median(times)), 'tokens': args.batch * args.length,
          'losses': losses}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='models/llama/300m.gin')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--length', type=int, default=128)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--child', choices=METHODS)
  p.add_argument('--no-append', action='store_true')
  args = p.parse_args()
  if args.child:
    print('RESULT ' + json.dumps(child(args)), flush=True)
    return

  results = {}
  for method in args.methods.split(','):
    cmd = [sys.executable, os.path.abspath(__file__), f'--child={method}',
           f'--model={args.model}', f'--batch={args.batch}', f'--length={args.length}',
           f'--steps={args.steps}', f'--rank={args.rank}']
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
    if out.returncode or not line:
      sys.exit(f'{method} failed:\n{out.stderr[-3000:]}')
    results[method] = json.loads(line[0][len('RESULT '):])
    print(f'{method}: {results[method]["step_s"]:.2f} s/step, losses '
          f'{[round(x, 3) for x in results[method]["losses"]]}', flush=True)

  mib = lambda b: f'{b / 2**20:,.0f} MiB'
  full = results.get('full')
  header = ('| method | trained params | optimizer state | frozen base bytes/param | compiled '
            'step | peak RSS | peak vs full | tokens/s |\n|---|---|---|---|---|---|---|---|\n')
  rows = []
  for method, r in results.items():
    per = r['frozen_bytes'] / r['base_params'] if method != 'full' else r['param_bytes'] / r[
        'params']
    share = (f'{100 * r["rss_bytes"] / full["rss_bytes"]:.0f}% RSS, '
             f'{100 * r["step_bytes"] / full["step_bytes"]:.0f}% compiled' if full else 'n/a')
    rows.append(f'| {method} | {r["trainable"]:,} of {r["params"]:,} | {mib(r["opt_bytes"])} | '
                f'{per:.3f} | {mib(r["step_bytes"])} | {mib(r["rss_bytes"])} | {share} | '
                f'{r["tokens"] / r["step_s"]:,.0f} |')
  table = header + '\n'.join(rows) + '\n'
  print(table)
  if not args.no_append:
    import jax  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import record_benchmark  # pylint: disable=g-import-not-at-top
    cmd = 'python scripts/bench_finetune.py ' + ' '.join(sys.argv[1:])
    record_benchmark.append_section(
        'bench_finetune', f'Command: `{cmd.strip()}` (jax {jax.__version__}; f32, AdamW, batch '
        f'{args.batch} x {args.length}, LoRA rank {args.rank} on every dense layer (the '
        f'output layer too); one process per method)\n\n' + table)


if __name__ == '__main__':
  main()
