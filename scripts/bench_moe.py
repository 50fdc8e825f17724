"""Mixture-of-experts throughput (the MoE layer alone) and an MoE-vs-dense training comparison.

    python scripts/bench_moe.py [--experts=8,64] [--top_k=1,2] [--batch=8 --length=512]
                                [--embed=512 --mlp=1024] [--capacity_factor=1.25]
                                [--impls=dense,capacity,ragged_dot,dropless] [--dtype=float32]
                                [--warmup=1] [--iters=5] [--budget_s=60] [--max_temp_gib=6]
                                [--interpreted] [--quick] [--append]
    python scripts/bench_moe.py --train_comparison [--moe_model=models/mixtral/small.gin]
                                [--dense_model=models/llama/small.gin] [--train_steps=400]
                                [--train_batch=8 --train_length=256] [--lr=1e-3]
                                [--warmup_steps=40] [--moe_impl=capacity] [--work_dir=DIR]
                                [--model_binding=emb_dim=128 ...] [--append]

Layer benchmark (the default). `models.moe.MoeBlock` built on its own (not a model) with
`--embed`, expert width `--mlp` and `--batch` x `--length` tokens, for every number of
experts x top-k, and every implementation:

  dense       `layers.MlpBlock` of width k * mlp: the same active parameters as the MoE
              block per token (less the router); one per k, the peer of every MoE row;
  capacity    MoeBlock impl='capacity': Switch/GShard einsum dispatch with
              --capacity_factor (overflow dropped; the dropped fraction is reported);
  ragged_dot  MoeBlock impl='ragged_dot': XLA top-k, sort by expert, `jax.lax.ragged_dot`.
              XLA:CPU has no grouped matmul: jax lowers it densely (every expert over every
              row, masked), so on CPU it costs experts x the FLOPs and memory; on GPU it is a
              real kernel;
  dropless    MoeBlock impl='dropless': our Pallas top-k gating, sort by expert, our Pallas
              grouped matmul (`pallas_kernels.moe_routing.routing_ops.moe_dropless`). On GPU
              compiled (Triton); on CPU the kernels only run in the Pallas interpreter, so it
              is skipped unless --interpreted, which runs it at a tiny size
              (--interpreted_size; dense is rerun at that size for its ratio): a
              correctness-of-plumbing number, not a performance one.

Each cell is the forward+backward (gradients of the f32 sum of the output with respect to
the parameters and the input) of one jitted program: tokens/s = batch * length / the median of
--iters runs after --warmup (block_until_ready; fewer runs when one takes longer than
--budget_s / iters), its ratio to the dense peer of the same k, the dropped fraction
(capacity), and the compiled program's temp bytes (`jit(...).lower(...).compile()
.memory_analysis()`). A program whose temp exceeds --max_temp_gib is not run. One failure puts
'OOM' or 'error: ...' in its cell and the run goes on. --append appends the table to
docs/benchmarks.md with the device, date and command.

Training comparison (--train_comparison). Two `python -m train` runs, one after the other, on
the embedded corpus `stdlib_lm` with the same steps, batch, learning rate, warm-up and seed:
the MoE model (--moe_model, its impl forced to --moe_impl: the dropless kernel only
interprets on CPU) and the dense model with the same active parameters (--dense_model with
mlp_dim = k * the expert width; --model_binding KEY=VALUE changes a DecoderConfig field of
both, e.g. a smaller emb_dim, where mlp_dim is the expert width). Parameter counts come from
the models' parameter trees:
active = total - (experts - k) * parameters of one expert per MoE layer. Reads both runs'
MODEL_DIR/metrics.jsonl and reports the final validation loss (cross-entropy over
--eval_steps fixed validation batches), the final train cross-entropy (without the router
losses), tokens and wall time; --append appends the table and the exact commands.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from models import config as cfg  # pylint: disable=wrong-import-position
from models import layers  # pylint: disable=wrong-import-position
from models import moe  # pylint: disable=wrong-import-position

IMPLS = ('dense', 'capacity', 'ragged_dot', 'dropless')
MOE_IMPLS = IMPLS[1:]
DEFAULTS = dict(experts='8,64', top_k='1,2', batch=8, length=512, embed=512, mlp=1024,
                warmup=1, iters=5)
# --quick: the CI smoke test (seconds on CPU).
QUICK = dict(experts='8', top_k='2', batch=2, length=64, embed=64, mlp=128, warmup=1,
             iters=2)
INTERPRETED_SIZE = '1,64,64,128'  # batch, length, embed, mlp of dropless in the interpreter
EXPERT_WEIGHTS = ('wi', 'wi_0', 'wi_1', 'wo')  # MoeBlock's expert parameters


def _ints(text):
  return [int(x) for x in str(text).split(',') if x.strip()]


def platform_name() -> str:
  p = jax.devices()[0].platform
  return 'gpu' if p in ('gpu', 'cuda', 'rocm') else p


def _failure(e: Exception) -> str:
  text = f'{type(e).__name__}: {e}'
  if 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower():
    return 'OOM'
  first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
  return 'error: ' + first[:100].replace('|', '/')


def _mib(n) -> str:
  return f'{n / 2**20:,.1f}' if n < 100 * 2**20 else f'{n / 2**20:,.0f}'


def _count(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e5 else f'{n / 1e3:.1f}k'


# --- layer benchmark -------------------------------------------------------------------------

def build_block(impl: str, experts: int, k: int, mlp: int, dtype, capacity_factor: float):
  if impl == 'dense':
    return layers.MlpBlock(k * mlp, cfg.MlpKind.SWIGLU, dtype=dtype)
  return moe.MoeBlock(num_experts=experts, num_selected=k, mlp_dim=mlp,
                      kind=cfg.MlpKind.SWIGLU, impl=cfg.MoeImpl(impl),
                      capacity_factor=capacity_factor, dtype=dtype)


def layer_params(impl: str, experts: int, k: int, embed: int, mlp: int):
  """(total, active) parameters of one block (SwiGLU, no biases)."""
  expert = 3 * embed * mlp
  if impl == 'dense':
    return k * expert, k * expert
  router = embed * experts
  return experts * expert + router, k * expert + router


def _median_seconds(fn, args, warmup: int, iters: int, budget_s: float):
  """(median seconds, runs): at least one warm-up; fewer runs if one is slow."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
  runs = max(1, min(iters, int(budget_s / max(first, 1e-9))))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), runs, out


def measure(impl: str, experts: int, k: int, size, args) -> dict:
  """Forward+backward of one block: memory analysis, then timings (unless too big)."""
  batch, length, embed, mlp = size
  dtype = jnp.dtype(args.dtype)
  block = build_block(impl, experts, k, mlp, dtype, args.capacity_factor)
  total, active = layer_params(impl, experts, k, embed, mlp)
  r = {'impl': impl, 'tokens': batch * length, 'params': total, 'active': active}
  kx, kp = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (batch, length, embed), jnp.float32).astype(dtype)
  params = nn.unbox(jax.jit(block.init)(kp, x)['params'])
  built = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert built == total, (impl, built, total)

  def loss(params, x):
    if impl == 'dense':
      out, stats = block.apply({'params': params}, x), {}
    else:
      out, state = block.apply({'params': params}, x, mutable=[moe.MOE_COLLECTION])
      stats = moe.collect_stats(state[moe.MOE_COLLECTION])
    return jnp.sum(out.astype(jnp.float32)), stats

  def fwd_bwd(params, x):
    (_, stats), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return grads, stats

  t = time.perf_counter()
  compiled = jax.jit(fwd_bwd).lower(params, x).compile()
  r['compile_s'] = time.perf_counter() - t
  mem = compiled.memory_analysis()
  if mem is not None:
    r['temp'] = mem.temp_size_in_bytes
    if mem.temp_size_in_bytes > args.max_temp_gib * 2**30:
      r['tok_s'] = f'skipped: temp {mem.temp_size_in_bytes / 2**30:.1f} GiB > --max_temp_gib'
      return r
  seconds, runs, (_, stats) = _median_seconds(compiled, (params, x), args.warmup, args.iters,
                                              args.budget_s)
  r['seconds'], r['runs'] = seconds, runs
  r['tok_s'] = batch * length / seconds
  if 'dropped_fraction' in stats:
    r['dropped'] = float(jnp.mean(stats['dropped_fraction']))
  return r


def _note(impl: str, plat: str, r: dict, size, main_size, args) -> str:
  notes = []
  if impl == 'ragged_dot' and plat == 'cpu':
    notes.append('XLA:CPU lowers ragged_dot densely (experts x FLOPs)')
  if impl == 'dropless':
    notes.append('Pallas interpreter: not a performance number' if plat == 'cpu'
                 else 'Pallas kernels, compiled')
  if size != main_size:
    notes.append('size {}x{} tokens, embed {}, mlp {}'.format(*size))
  if r.get('runs') is not None and r['runs'] < args.iters:
    notes.append(f'{r["runs"]} timed run{"s" if r["runs"] > 1 else ""}')
  return '; '.join(notes)


def layer_table(results, args, plat, main_size):
  """results: [(experts or None, k, size, r)] -> header, rows. The dense peer of an MoE row
  is the dense row of the same k and size."""
  dense = {(k, size): r for e, k, size, r in results if r['impl'] == 'dense'}
  header = ['experts', 'top-k', 'impl', 'params (active)', 'fwd+bwd tokens/s', 'vs dense',
            'dropped', 'temp MiB', 'note']
  rows = []
  for experts, k, size, r in results:
    tok_s = r.get('tok_s', '-')
    peer = dense.get((k, size), {}).get('tok_s')
    ratio = ''
    if r['impl'] != 'dense':
      ratio = f'{tok_s / peer:.2f}x' if isinstance(tok_s, float) and isinstance(peer, float) \
          else '-'
    rows.append([
        '-' if experts is None else str(experts), str(k), r['impl'],
        f'{_count(r["params"])} ({_count(r["active"])})' if 'params' in r else '-',
        f'{tok_s:,.0f}' if isinstance(tok_s, float) else str(tok_s), ratio,
        f'{100 * r["dropped"]:.1f}%' if 'dropped' in r else '',
        _mib(r['temp']) if 'temp' in r else r.get('mem', '-'),
        _note(r['impl'], plat, r, size, main_size, args)])
  return header, rows


def run_layers(args):
  plat = platform_name()
  device_kind = jax.devices()[0].device_kind
  main_size = (args.batch, args.length, args.embed, args.mlp)
  tiny = tuple(_ints(args.interpreted_size))
  print(f'device: {device_kind} ({plat}), jax {jax.__version__}, {args.dtype}; '
        'size {}x{} tokens, embed {}, expert mlp {}'.format(*main_size), flush=True)
  skipped = []
  if 'dropless' in args.impls and plat == 'cpu' and not args.interpreted:
    skipped.append('dropless (the Pallas kernels only run in the interpreter on CPU: pass '
                   '--interpreted to run them at a tiny size)')

  results = []
  t0 = time.perf_counter()

  def one(impl, experts, k, size):
    try:
      r = measure(impl, experts or 1, k, size, args)
    except Exception as e:  # pylint: disable=broad-except
      r = {'impl': impl, 'tok_s': _failure(e), 'mem': '-'}
      r['params'], r['active'] = layer_params(impl, experts or 1, k, size[2], size[3])
    results.append((experts, k, size, r))
    tok_s = r.get('tok_s', '-')
    parts = [f'{tok_s:,.0f} tokens/s' if isinstance(tok_s, float) else str(tok_s)]
    if 'dropped' in r:
      parts.append(f'dropped {100 * r["dropped"]:.1f}%')
    if 'temp' in r:
      parts.append(f'temp {_mib(r["temp"])} MiB')
    print(f'  experts={experts or "-"} k={k} {impl}: {", ".join(parts)} '
          f'(compile {r.get("compile_s", 0):.1f} s)', flush=True)

  for k in args.top_k:
    if 'dense' in args.impls:
      one('dense', None, k, main_size)
    for experts in args.experts:
      if k > experts:
        continue
      for impl in args.impls:
        if impl == 'dense':
          continue
        if impl == 'dropless' and plat == 'cpu':
          if not args.interpreted:
            continue
          if not any(e is None and kk == k and s == tiny for e, kk, s, _ in results):
            one('dense', None, k, tiny)
          one(impl, experts, k, tiny)
          continue
        one(impl, experts, k, main_size)
  elapsed = time.perf_counter() - t0

  header, rows = layer_table(results, args, plat, main_size)
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  print()
  for line in [header] + rows:
    print('  '.join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
  notes = [f'Not run on {plat}: ' + '; '.join(skipped)] if skipped else []
  print()
  for line in notes:
    print(line)
  print(f'({elapsed:.0f} s)')

  if args.append:
    title = ''
    if plat == 'cpu':
      title = ('**CPU: ragged_dot is XLA:CPU\'s dense fallback and dropless (if present) the '
               'Pallas interpreter; GPU timings owed.** ')
    body = (f'{title}Command: `{args.command}` (jax {jax.__version__}, device_kind '
            f'`{device_kind}`, {args.dtype}, {elapsed:.0f} s). One MoE layer (SwiGLU experts, '
            'token-choice router) built on its own at {}x{} tokens, embed {}, expert mlp {}; '
            .format(*main_size) +
            f'capacity factor {args.capacity_factor}. Forward+backward (gradients of the sum '
            'of the output w.r.t. parameters and input) tokens/s: median of '
            f'{args.iters} jitted runs after {args.warmup} warm-up. "vs dense": over the dense '
            '`MlpBlock` of width k * mlp (the same active parameters) at the same size; '
            '"dropped": capacity\'s dropped fraction of token choices (random router at '
            'init); "temp": the compiled forward+backward program\'s temp bytes.\n\n' +
            '| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n' +
            ''.join('| ' + ' | '.join(row) + ' |\n' for row in rows) +
            ''.join(f'\n{line}\n' for line in notes))
    path = _append(body)
    print(f'appended to {path}')
  return results


def _append(body: str) -> str:
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import record_benchmark  # pylint: disable=g-import-not-at-top
  return record_benchmark.append_section('bench_moe', body)


# --- training comparison ---------------------------------------------------------------------

def param_counts(params, num_experts: int, k: int):
  """(total, active) of a parameter tree (boxed or not): active removes, per MoE block,
  (num_experts - k) experts' worth of every expert weight (`moe`/wi*|wo: one expert is
  1/num_experts of the leaf, whatever the leading scan axis)."""
  total = expert = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    n = int(np.prod(leaf.shape))
    total += n
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    if num_experts and 'moe' in names and names[-1] in EXPERT_WEIGHTS:
      expert += n
  inactive = 0
  if num_experts:
    inactive = expert * (num_experts - k) // num_experts
  return total, total - inactive


def model_params(gin_file: str, bindings=()):
  """(config, total params, active params) of a shipped model file with bindings."""
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  model = gin_utils.model_from_gin([gin_file], list(bindings))
  abstract = jax.eval_shape(lambda: model.init_variables(
      jax.random.PRNGKey(0), model.dummy_batch(1, {'inputs': 8, 'targets': 8}))['params'])
  c = model.config
  total, active = param_counts(abstract, c.num_experts, c.num_experts_per_token)
  return c, total, active


def read_metrics(model_dir: str, tail: int = 5) -> dict:
  """The summary of MODEL_DIR/metrics.jsonl (lines `{"kind": "step"|"train"|"eval", "step",
  ...}`; a resumed run repeats steps, the last record of a step wins; broken lines skipped):
  steps, final validation loss/accuracy (the last eval record) and the first, the final train
  cross-entropy (the last `train` record's; `loss` for older logs) and the mean over the last
  `tail` train records, the median logged tokens/s, and the last MoE dropped fraction."""
  by_kind = {'step': {}, 'train': {}, 'eval': {}}
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if r.get('kind') in by_kind:
        by_kind[r['kind']][r['step']] = r
  out = {'steps': max(by_kind['step'], default=0)}
  evals = [by_kind['eval'][s] for s in sorted(by_kind['eval'])]
  if evals:
    out['eval_loss'], out['eval_step'] = evals[-1]['loss'], evals[-1]['step']
    out['eval_accuracy'] = evals[-1].get('accuracy')
    out['first_eval_loss'] = evals[0]['loss']
    out['eval_curve'] = [(e['step'], e['loss']) for e in evals]
  trains = [by_kind['train'][s] for s in sorted(by_kind['train'])]
  if trains:
    ce = [t.get('cross_entropy', t['loss']) for t in trains]
    out['train_ce'] = ce[-1]
    out['train_ce_tail'] = float(np.mean(ce[-tail:]))
    rates = [t['tokens_per_second'] for t in trains if 'tokens_per_second' in t]
    if rates:
      out['tokens_per_second'] = float(np.median(rates))
    dropped = [v for key, v in trains[-1].items() if key.startswith('moe/dropped_fraction')]
    if dropped:
      out['dropped'] = float(np.mean(dropped))
  return out


def train_commands(args, moe_dir: str, dense_dir: str, dense_mlp: int):
  common = ['--gin_file=runs/pretrain.gin', "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'",
            f"--gin.TASK_FEATURE_LENGTHS={{'targets': {args.train_length}}}",
            f'--gin.TRAIN_STEPS={args.train_steps}', f'--gin.BATCH_SIZE={args.train_batch}',
            f'--gin.LEARNING_RATE={args.lr}', f'--gin.WARMUP_STEPS={args.warmup_steps}',
            f'--gin.train_lib.train.seed={args.seed}',
            f'--gin.train_lib.train.eval_steps={args.eval_steps}',
            f'--gin.train_lib.train.eval_every={args.eval_every}',
            f'--gin.train_lib.train.checkpoint_every={args.train_steps}',
            '--gin.train_lib.train.tensorboard=False', '--gin.train_lib.train.peak_flops=1e11',
            *(f'--gin.model_config.DecoderConfig.{b}' for b in args.model_binding)]
  moe_cmd = ['python', '-m', 'train', f'--gin_file={args.moe_model}', *common,
             f"--gin.MODEL_DIR='{moe_dir}'",
             f'--gin.model_config.DecoderConfig.num_experts={args.num_experts}',
             f'--gin.model_config.DecoderConfig.num_experts_per_token={args.top_k_train}',
             f"--gin.model_config.DecoderConfig.moe_impl='{args.moe_impl}'",
             f'--gin.model_config.DecoderConfig.capacity_factor={args.capacity_factor}']
  dense_cmd = ['python', '-m', 'train', f'--gin_file={args.dense_model}', *common,
               f"--gin.MODEL_DIR='{dense_dir}'",
               f'--gin.model_config.DecoderConfig.mlp_dim={dense_mlp}']
  return moe_cmd, dense_cmd


def command_line(cmd) -> str:
  """A shell line for `cmd`, double-quoting the gin flags that hold single quotes."""
  def quote(a):
    if a == shlex.quote(a):
      return a
    if not any(ch in a for ch in '"$`\\!'):
      return f'"{a}"'
    return shlex.quote(a)
  return ' '.join(quote(a) for a in cmd)


def _run_training(cmd, model_dir: str) -> float:
  """Runs one `python -m train` (streaming its lines, also to MODEL_DIR/../<name>.log)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  argv = [sys.executable] + cmd[1:]
  log_path = model_dir.rstrip('/') + '.log'
  print('$ ' + command_line(cmd), flush=True)
  t = time.perf_counter()
  with open(log_path, 'w') as log, subprocess.Popen(
      argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) as proc:
    for line in proc.stdout:
      log.write(line)
      if not line.startswith(('WARNING', 'I0', 'W0')):
        print('    ' + line.rstrip(), flush=True)
  seconds = time.perf_counter() - t
  if proc.returncode:
    raise RuntimeError(f'training exited with {proc.returncode}; see {log_path}')
  return seconds


def train_table(runs, tokens_per_step: int):
  """runs: [(name, total, active, metrics, wall seconds)] -> header, rows."""
  header = ['run', 'params', 'active params', 'steps', 'tokens', 'train CE (last / mean last 5 '
            'logs)', 'validation loss (step 0 -> final)', 'validation accuracy',
            'dropped (last log)', 'tokens/s (median log)', 'wall time']
  rows = []
  for name, total, active, m, seconds in runs:
    rows.append([
        name, f'{total:,}', f'{active:,}', str(m.get('steps', '-')),
        f'{m.get("steps", 0) * tokens_per_step:,}',
        f'{m["train_ce"]:.4f} / {m["train_ce_tail"]:.4f}' if 'train_ce' in m else '-',
        f'{m["first_eval_loss"]:.4f} -> **{m["eval_loss"]:.4f}**' if 'eval_loss' in m else '-',
        f'{m["eval_accuracy"]:.4f}' if m.get('eval_accuracy') is not None else '-',
        f'{100 * m["dropped"]:.1f}%' if 'dropped' in m else '-',
        f'{m["tokens_per_second"]:,.0f}' if 'tokens_per_second' in m else '-',
        f'{seconds / 60:.1f} min' if seconds else '-'])
  return header, rows


def run_train_comparison(args):
  sizes = [f'model_config.DecoderConfig.{b}' for b in args.model_binding]
  moe_cfg, moe_total, moe_active = model_params(args.moe_model, sizes + [
      f'model_config.DecoderConfig.num_experts = {args.num_experts}',
      f'model_config.DecoderConfig.num_experts_per_token = {args.top_k_train}'])
  k, expert_mlp = moe_cfg.num_experts_per_token, moe_cfg.moe_mlp_dim or moe_cfg.mlp_dim
  dense_mlp = k * expert_mlp
  dense_cfg, dense_total, dense_active = model_params(
      args.dense_model, sizes + [f'model_config.DecoderConfig.mlp_dim = {dense_mlp}'])
  for field in ('vocab_size', 'emb_dim', 'num_heads', 'num_kv_heads', 'head_dim', 'num_layers',
                'mlp', 'tie_embeddings'):
    if getattr(moe_cfg, field) != getattr(dense_cfg, field):
      raise SystemExit(f'--moe_model and --dense_model differ in {field}: '
                       f'{getattr(moe_cfg, field)} vs {getattr(dense_cfg, field)}')
  print(f'MoE: {moe_total:,} params, {moe_active:,} active ({moe_cfg.num_experts} experts of '
        f'width {expert_mlp}, top-{k}); dense: {dense_total:,} params (mlp_dim {dense_mlp})',
        flush=True)

  if args.report and not args.work_dir:
    raise SystemExit('--report reads the runs of --work_dir: pass it')
  work = args.work_dir or tempfile.mkdtemp(prefix='bench_moe_')
  os.makedirs(work, exist_ok=True)
  moe_dir, dense_dir = os.path.join(work, 'moe'), os.path.join(work, 'dense')
  moe_cmd, dense_cmd = train_commands(args, moe_dir, dense_dir, dense_mlp)
  summary_path = os.path.join(work, 'summary.json')
  if args.report:
    walls = {}
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        walls = json.load(f).get('wall_seconds', {})
  else:
    for d in (moe_dir, dense_dir):
      if os.path.exists(d):
        raise SystemExit(f'{d} exists (a second run would resume it): pick a fresh '
                         '--work_dir, or pass --report to tabulate it')
    walls = {}
    for name, cmd, d in (('moe', moe_cmd, moe_dir), ('dense', dense_cmd, dense_dir)):
      walls[name] = _run_training(cmd, d)
      with open(summary_path, 'w') as f:
        json.dump({'wall_seconds': walls, 'commands': {'moe': moe_cmd, 'dense': dense_cmd}}, f)
  moe_m, dense_m = read_metrics(moe_dir), read_metrics(dense_dir)
  tokens_per_step = args.train_batch * args.train_length
  moe_name = (f'MoE {args.moe_model} ({moe_cfg.num_experts} x mlp {expert_mlp}, top-{k}, '
              f'{args.moe_impl}' + (f' cf {args.capacity_factor}' if args.moe_impl ==
                                    'capacity' else '') + ')')
  runs = [(moe_name, moe_total, moe_active, moe_m, walls.get('moe')),
          (f'dense {args.dense_model} (mlp_dim {dense_mlp})', dense_total, dense_active,
           dense_m, walls.get('dense'))]
  header, rows = train_table(runs, tokens_per_step)
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  print()
  for line in [header] + rows:
    print('  '.join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
  verdict = _verdict(moe_m, dense_m)
  print(verdict)
  curves = _curves(moe_m, dense_m)
  if curves:
    print(curves)

  if args.append:
    command = f'`{args.command}`'
    if args.report:  # the runs were made by the same command without --report
      runs_cmd = ' '.join(a for a in shlex.split(args.command) if a != '--report')
      command = f'`{runs_cmd}` (this table from the same flags with --report)'
    body = (f'Training comparison. Command: {command} (jax {jax.__version__}). Two '
            '`python -m train` runs on the embedded corpus `stdlib_lm`, the same '
            f'{args.train_steps} steps of {args.train_batch} x {args.train_length} tokens, '
            f'peak lr {args.lr} (warm-up {args.warmup_steps}, cosine), seed {args.seed}: the '
            'MoE model and the dense model with the same active parameters (mlp_dim = k x the '
            'expert width)' + (', both with ' + ', '.join(f'`{b}`' for b in args.model_binding)
                               if args.model_binding else '') + '. Params from the parameter trees; active = total - (experts - k) x '
            'one expert per MoE layer (the MoE\'s extra active parameters are its routers). '
            f'Validation loss: cross-entropy over {args.eval_steps} fixed validation batches; '
            'train CE excludes the router losses. Runs one after the other on this machine, '
            'which other jobs share (tokens/s and wall time are noisy).\n\n' +
            '| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n' +
            ''.join('| ' + ' | '.join(row) + ' |\n' for row in rows) +
            f'\n{verdict}\n' + (f'\n{curves}\n' if curves else '') +
            '\nCommands (from the repository root):\n\n```\n' + command_line(moe_cmd) + '\n' +
            command_line(dense_cmd) + '\n```\n')
    path = _append(body)
    print(f'appended to {path}')
  return runs


def _verdict(moe_m, dense_m) -> str:
  if 'eval_loss' not in moe_m or 'eval_loss' not in dense_m:
    return 'Result: no final validation loss in one of the runs.'
  a, b = moe_m['eval_loss'], dense_m['eval_loss']
  word = 'lower' if a < b else 'NOT lower'
  return (f'Result: the MoE final validation loss {a:.4f} is {word} than the dense {b:.4f} '
          f'(difference {a - b:+.4f}, {100 * (a - b) / b:+.2f}%).')


def _curves(moe_m, dense_m) -> str:
  """Validation loss at each evaluation of both runs, as one line."""
  a, b = dict(moe_m.get('eval_curve', [])), dict(dense_m.get('eval_curve', []))
  steps = sorted(set(a) & set(b))
  if len(steps) < 3:
    return ''
  return 'Validation loss by step (MoE / dense): ' + ', '.join(
      f'{s}: {a[s]:.3f} / {b[s]:.3f}' for s in steps) + '.'


# --- flags -----------------------------------------------------------------------------------

def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--experts', default=None, help=f'default {DEFAULTS["experts"]}')
  p.add_argument('--top_k', default=None, help=f'default {DEFAULTS["top_k"]}')
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--length', type=int, default=None)
  p.add_argument('--embed', type=int, default=None)
  p.add_argument('--mlp', type=int, default=None, help='expert width')
  p.add_argument('--capacity_factor', type=float, default=1.25)
  p.add_argument('--impls', default='dense,capacity,ragged_dot,dropless')
  p.add_argument('--dtype', default=None, help='default float32 on CPU, bfloat16 on GPU/TPU')
  p.add_argument('--warmup', type=int, default=None)
  p.add_argument('--iters', type=int, default=None)
  p.add_argument('--budget_s', type=float, default=60.0,
                 help='time for one cell\'s timed runs: fewer than --iters when one is slow')
  p.add_argument('--max_temp_gib', type=float, default=6.0,
                 help='do not run a program whose compiled temp memory exceeds this')
  p.add_argument('--interpreted', action='store_true',
                 help='on CPU run dropless in the Pallas interpreter at --interpreted_size')
  p.add_argument('--interpreted_size', default=INTERPRETED_SIZE,
                 help='batch,length,embed,mlp of the interpreted dropless rows')
  p.add_argument('--quick', action='store_true', help='a tiny sweep (CI smoke test)')
  p.add_argument('--append', action='store_true', help='append to docs/benchmarks.md')
  t = p.add_argument_group('training comparison')
  t.add_argument('--train_comparison', action='store_true')
  t.add_argument('--moe_model', default='models/mixtral/small.gin')
  t.add_argument('--dense_model', default='models/llama/small.gin')
  t.add_argument('--model_binding', action='append', default=[], metavar='KEY=VALUE',
                 help='a DecoderConfig binding for both models, e.g. emb_dim=128 (repeatable; '
                      'mlp_dim is the expert width, the dense model gets k times it)')
  t.add_argument('--num_experts', type=int, default=8)
  t.add_argument('--top_k_train', type=int, default=2)
  t.add_argument('--moe_impl', default='capacity', choices=MOE_IMPLS)
  t.add_argument('--train_steps', type=int, default=400)
  t.add_argument('--train_batch', type=int, default=8)
  t.add_argument('--train_length', type=int, default=256)
  t.add_argument('--lr', type=float, default=1e-3)
  t.add_argument('--warmup_steps', type=int, default=40)
  t.add_argument('--seed', type=int, default=0)
  t.add_argument('--eval_steps', type=int, default=16)
  t.add_argument('--eval_every', type=int, default=100)
  t.add_argument('--work_dir', default=None, help='MODEL_DIRs go under it (default: a temp dir)')
  t.add_argument('--report', action='store_true',
                 help='train nothing: tabulate (and --append) the runs already in --work_dir, '
                      'given the flags they were run with')
  args = p.parse_args(argv)
  args.command = shlex.join(['python', 'scripts/bench_moe.py'] +
                            list(sys.argv[1:] if argv is None else argv))
  for key, value in (QUICK if args.quick else DEFAULTS).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.dtype is None:
    args.dtype = 'float32' if platform_name() == 'cpu' else 'bfloat16'
  args.experts, args.top_k = _ints(args.experts), _ints(args.top_k)
  args.impls = [i.strip() for i in args.impls.split(',') if i.strip()]
  for impl in args.impls:
    if impl not in IMPLS:
      p.error(f'--impls: unknown implementation {impl!r}; choose from {",".join(IMPLS)}')
  if len(_ints(args.interpreted_size)) != 4:
    p.error('--interpreted_size is batch,length,embed,mlp')
  return args


def main(argv=None):
  args = parse(argv)
  if args.train_comparison:
    run_train_comparison(args)
  else:
    run_layers(args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
