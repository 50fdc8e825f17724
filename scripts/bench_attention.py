"""Attention throughput and memory: our Pallas flash attention against XLA, cuDNN and JAX's.

    python scripts/bench_attention.py [--lengths=512,1024,2048,4096,8192,16384]
                                      [--head_dims=64,128] [--heads=16] [--kv_heads=16,4]
                                      [--causal=both|true|false] [--dtype=bfloat16]
                                      [--tokens=16384 | --batch=N]
                                      [--impls=ours,xla,cudnn,jax_pallas]
                                      [--warmup=2] [--iters=10] [--memory_only] [--time_on_cpu]
                                      [--quick] [--append]

For every configuration (length x head_dim x kv_heads x causal; batch = tokens // length
unless --batch is given, so every length sees the same number of tokens) and every
implementation:

  ours        `pallas_kernels.flash_attention.ops.flash_attention`, the default backend of
              the device (Triton kernels on GPU, Mosaic on TPU; on CPU the GPU kernels in the
              Pallas interpreter);
  xla         `jax.nn.dot_product_attention(..., implementation='xla')`;
  cudnn       `jax.nn.dot_product_attention(..., implementation='cudnn')` (GPU only);
  jax_pallas  JAX's shipped Pallas attention with its default block sizes:
              `jax.experimental.pallas.ops.gpu.attention.mha` on GPU,
              `jax.experimental.pallas.ops.tpu.flash_attention.flash_attention` on TPU
              ([batch, heads, length, head_dim]: transposed inside the timed function).
              Neither takes grouped K/V heads, so for GQA K and V are repeated to the query
              heads inside the timed function (noted in the table);
  reference   `pallas_kernels.flash_attention.xla.attention`, the models' XLA path (and the
              kernels' reference)
              (not in the default --impls).

it reports the forward and forward+backward throughput (median of --iters jitted runs after
--warmup, `block_until_ready`; the backward is `jax.grad` of the f32 sum of the output with
respect to q, k and v) and the compiled memory analysis of the forward+backward program
(`jit(...).lower(...).compile().memory_analysis()`: temp bytes, and argument + output bytes),
which needs no run. FLOPs follow FlashAttention-2: forward 4 * batch * heads * q_len * kv_len *
head_dim, halved when causal; forward+backward 3.5x the forward.

On CPU only the memory analysis is done (ours compiles in interpret mode: it shows the
program's memory, not the GPU kernel's), unless --time_on_cpu also times (use tiny lengths:
the interpreter is very slow). cuDNN and JAX's Pallas attention are not run on CPU. One
implementation failing (an out-of-memory XLA path at 16k, say) puts 'OOM' or 'error: ...' in
its cell and the run goes on.

On GPU the run ends with the acceptance check: at length >= 4096, causal, head_dim 128 and
bfloat16, ours' forward+backward TFLOP/s is >= 1.2x jax_pallas's, with the ratio to cudnn
beside it. --append appends the table to docs/benchmarks.md with the device, date and command.
"""

import argparse
import math
import os
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from pallas_kernels import backend as backend_lib  # pylint: disable=wrong-import-position
from pallas_kernels.flash_attention import ops  # pylint: disable=wrong-import-position
from pallas_kernels.flash_attention import xla as xla_attn  # pylint: disable=wrong-import-position

IMPLS = ('ours', 'xla', 'cudnn', 'jax_pallas', 'reference')
DEFAULTS = dict(lengths='512,1024,2048,4096,8192,16384', head_dims='64,128', heads=16,
                kv_heads='16,4', causal='both', tokens=16384, warmup=2, iters=10)
# --quick: a tiny sweep for the CI smoke test (seconds on CPU, memory analysis only).
QUICK = dict(lengths='256,512', head_dims='64', heads=4, kv_heads='4,2', causal='both',
             tokens=1024, warmup=1, iters=3)
FWD_BWD_FACTOR = 3.5  # FlashAttention-2: backward = 2.5x forward
ACCEPT_MIN_LENGTH, ACCEPT_HEAD_DIM, ACCEPT_RATIO = 4096, 128, 1.2


class Unavailable(Exception):
  """The implementation does not exist on this platform (not a failure)."""


def _ints(text):
  return [int(x) for x in str(text).split(',') if x.strip()]


def platform_name() -> str:
  p = jax.devices()[0].platform
  return 'gpu' if p in ('gpu', 'cuda', 'rocm') else p


def _repeat_kv(k, v, heads):
  groups = heads // k.shape[2]
  if groups == 1:
    return k, v
  return jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)


def attention_fn(impl: str, causal: bool, heads: int, kv_heads: int, head_dim: int):
  """(fn(q, k, v) -> out in [batch, length, heads, head_dim], note) or raises Unavailable."""
  plat = platform_name()
  scale = 1.0 / math.sqrt(head_dim)
  gqa_note = f'K/V repeated {heads // kv_heads}x (no GQA)' if heads != kv_heads else ''
  if impl == 'ours':
    backend, interpret = backend_lib.resolve_backend(None, None)
    note = f'{backend} kernels' + (', Pallas interpreter' if interpret else '')
    return lambda q, k, v: ops.flash_attention(q, k, v, causal=causal), note
  if impl == 'xla':
    return (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation='xla')), ''
  if impl == 'reference':
    return lambda q, k, v: xla_attn.attention(q, k, v, causal=causal), 'models\' XLA path'
  if impl == 'cudnn':
    if plat != 'gpu':
      raise Unavailable('GPU only')
    return (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation='cudnn')), ''
  if impl == 'jax_pallas':
    if plat == 'gpu':
      # pylint: disable-next=g-import-not-at-top
      from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention

      def fn(q, k, v):
        k, v = _repeat_kv(k, v, heads)
        return jax_gpu_attention.mha(q, k, v, None, sm_scale=scale, causal=causal)
      return fn, '; '.join(filter(None, ['ops.gpu.attention.mha, default blocks', gqa_note]))
    if plat == 'tpu':
      # pylint: disable-next=g-import-not-at-top
      from jax.experimental.pallas.ops.tpu import flash_attention as jax_tpu_attention

      def fn(q, k, v):  # pylint: disable=function-redefined
        k, v = _repeat_kv(k, v, heads)
        t = lambda x: jnp.swapaxes(x, 1, 2)  # [batch, heads, length, head_dim]
        return t(jax_tpu_attention.flash_attention(t(q), t(k), t(v), causal=causal,
                                                   sm_scale=scale))
      return fn, '; '.join(filter(None, ['ops.tpu.flash_attention, transposed', gqa_note]))
    raise Unavailable('GPU/TPU only; its interpret mode is not benchmarked')
  raise ValueError(f'unknown implementation {impl!r}; choose from {IMPLS}')


def fwd_flops(batch, heads, q_len, kv_len, head_dim, causal) -> float:
  flops = 4.0 * batch * heads * q_len * kv_len * head_dim
  return flops / 2 if causal else flops


def _failure(e: Exception) -> str:
  text = f'{type(e).__name__}: {e}'
  if 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower():
    return 'OOM'
  first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
  return 'error: ' + first[:100]


def _median_seconds(fn, args, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(1, iters)):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def measure(impl, cfg, args, run: bool) -> dict:
  """One implementation on one configuration: memory analysis, and timings if `run`."""
  batch, length, heads, kv_heads, head_dim, causal = (
      cfg['batch'], cfg['length'], cfg['heads'], cfg['kv_heads'], cfg['head_dim'], cfg['causal'])
  result = {'impl': impl}
  fn, result['note'] = attention_fn(impl, causal, heads, kv_heads, head_dim)
  dtype = jnp.dtype(args.dtype)
  shapes = (jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype))
  loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  t = time.perf_counter()
  fwd_bwd = None
  try:
    fwd_bwd = grad.lower(*shapes).compile()
    mem = fwd_bwd.memory_analysis()
    if mem is None:
      result['mem'] = 'n/a'
    else:
      result['temp'] = mem.temp_size_in_bytes
      result['io'] = mem.argument_size_in_bytes + mem.output_size_in_bytes
  except Exception as e:  # pylint: disable=broad-except
    result['mem'] = _failure(e)
  result['compile_s'] = time.perf_counter() - t
  if not run:
    return result

  flops = fwd_flops(batch, heads, length, length, head_dim, causal)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  try:
    qkv = [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys, shapes)]
  except Exception as e:  # pylint: disable=broad-except
    result['fwd'] = result['fwd_bwd'] = _failure(e)
    return result
  try:
    fwd = jax.jit(fn).lower(*shapes).compile()
    result['fwd'] = flops / _median_seconds(fwd, qkv, args.warmup, args.iters) / 1e12
    del fwd
  except Exception as e:  # pylint: disable=broad-except
    result['fwd'] = _failure(e)
  if fwd_bwd is None:
    result['fwd_bwd'] = result['mem']
  else:
    try:
      seconds = _median_seconds(fwd_bwd, qkv, args.warmup, args.iters)
      result['fwd_bwd'] = FWD_BWD_FACTOR * flops / seconds / 1e12
    except Exception as e:  # pylint: disable=broad-except
      result['fwd_bwd'] = _failure(e)
  del qkv
  return result


def configs(args):
  out = []
  causals = {'both': (True, False), 'true': (True,), 'false': (False,)}[args.causal]
  for head_dim in _ints(args.head_dims):
    for kv_heads in _ints(args.kv_heads):
      for causal in causals:
        for length in _ints(args.lengths):
          batch = args.batch or max(1, args.tokens // length)
          out.append(dict(length=length, batch=batch, heads=args.heads, kv_heads=kv_heads,
                          head_dim=head_dim, causal=causal))
  return out


def _mib(nbytes) -> str:
  mib = nbytes / 2**20
  return f'{mib:,.1f}' if mib < 100 else f'{mib:,.0f}'


def _tflops(value) -> str:
  if not isinstance(value, float):
    return str(value)
  return f'{value:.1f}' if value >= 10 else f'{value:.2f}' if value >= 1 else f'{value:.3g}'


def _ratio(ours, other) -> str:
  if isinstance(ours, float) and isinstance(other, float) and other > 0:
    return f'{ours / other:.2f}x'
  return '-'


def table(results, timed: bool):
  """Header and rows: one row per configuration and implementation."""
  header = ['length', 'batch', 'head_dim', 'heads / kv', 'causal', 'impl']
  if timed:
    header += ['fwd TFLOP/s', 'fwd+bwd TFLOP/s (FLOPs = 3.5x fwd)', 'ours / this fwd',
               'ours / this fwd+bwd']
  header += ['fwd+bwd temp MiB', 'this / ours temp', 'fwd+bwd args+out MiB', 'note']
  rows = []
  for cfg, by_impl in results:
    ours = by_impl.get('ours', {})
    for impl, r in by_impl.items():
      row = [cfg['length'], cfg['batch'], cfg['head_dim'],
             f'{cfg["heads"]} / {cfg["kv_heads"]}' + (' GQA' if cfg['heads'] != cfg['kv_heads']
                                                      else ' MHA'),
             'yes' if cfg['causal'] else 'no', impl]
      if timed:
        row += [_tflops(r.get('fwd', '-')), _tflops(r.get('fwd_bwd', '-'))]
        if impl == 'ours':
          row += ['', '']
        else:
          row += [_ratio(ours.get('fwd'), r.get('fwd')),
                  _ratio(ours.get('fwd_bwd'), r.get('fwd_bwd'))]
      if 'temp' in r:
        row += [_mib(r['temp']),
                f'{r["temp"] / ours["temp"]:.1f}x' if ours.get('temp') and impl != 'ours'
                else '', _mib(r['io'])]
      else:
        row += [r.get('mem', '-'), '', '']
      row.append(r.get('note', ''))
      rows.append([str(c).replace('|', '/').replace('\n', ' ') for c in row])
  return header, rows


def acceptance(results, dtype: str):
  """The GPU acceptance lines: ours / jax_pallas and ours / cudnn, forward+backward."""
  lines = []
  ok = True
  for cfg, by_impl in results:
    if not (cfg['length'] >= ACCEPT_MIN_LENGTH and cfg['causal'] and
            cfg['head_dim'] == ACCEPT_HEAD_DIM and dtype == 'bfloat16'):
      continue
    ours = by_impl.get('ours', {}).get('fwd_bwd')
    pallas = by_impl.get('jax_pallas', {}).get('fwd_bwd')
    cudnn = by_impl.get('cudnn', {}).get('fwd_bwd')
    if isinstance(ours, float) and isinstance(pallas, float):
      ratio = ours / pallas
      ok &= ratio >= ACCEPT_RATIO
      verdict = f'{ratio:.2f}x ({"ok" if ratio >= ACCEPT_RATIO else "BELOW"})'
    else:
      ok = False
      verdict = f'not measured (ours {_tflops(ours)}, jax_pallas {_tflops(pallas)})'
    lines.append(f'length {cfg["length"]}, heads {cfg["heads"]}/{cfg["kv_heads"]}: '
                 f'ours / jax_pallas {verdict}; ours / cudnn {_ratio(ours, cudnn)}')
  if not lines:
    return []
  head = (f'Acceptance (length >= {ACCEPT_MIN_LENGTH}, causal, head_dim {ACCEPT_HEAD_DIM}, '
          f'bfloat16, forward+backward, ours >= {ACCEPT_RATIO}x jax_pallas): '
          f'{"PASS" if ok else "FAIL"}')
  return [head] + ['- ' + line for line in lines]


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--lengths', default=None, help=f'default {DEFAULTS["lengths"]}')
  p.add_argument('--head_dims', default=None, help=f'default {DEFAULTS["head_dims"]}')
  p.add_argument('--heads', type=int, default=None, help=f'default {DEFAULTS["heads"]}')
  p.add_argument('--kv_heads', default=None,
                 help=f'K/V head counts, = heads for MHA (default {DEFAULTS["kv_heads"]})')
  p.add_argument('--causal', choices=('both', 'true', 'false'), default=None)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--tokens', type=int, default=None,
                 help=f'batch = tokens // length (default {DEFAULTS["tokens"]})')
  p.add_argument('--batch', type=int, default=None, help='a fixed batch (overrides --tokens)')
  p.add_argument('--impls', default='ours,xla,cudnn,jax_pallas',
                 help=f'comma-separated, from {",".join(IMPLS)}')
  p.add_argument('--warmup', type=int, default=None)
  p.add_argument('--iters', type=int, default=None)
  p.add_argument('--memory_only', action='store_true',
                 help='compile and report the memory analysis; run nothing')
  p.add_argument('--time_on_cpu', action='store_true',
                 help='on CPU also time (ours runs in the Pallas interpreter: tiny lengths)')
  p.add_argument('--quick', action='store_true', help='a tiny sweep (CI smoke test)')
  p.add_argument('--append', action='store_true', help='append to docs/benchmarks.md')
  args = p.parse_args(argv)
  for key, value in (QUICK if args.quick else DEFAULTS).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  impls = [i.strip() for i in args.impls.split(',') if i.strip()]
  for impl in impls:
    if impl not in IMPLS:
      p.error(f'--impls: unknown implementation {impl!r}; choose from {",".join(IMPLS)}')
  if 'ours' not in impls:
    impls.insert(0, 'ours')  # every ratio is against ours
  args.impls = impls
  for heads in _ints(args.kv_heads):
    if args.heads % heads:
      p.error(f'--kv_heads {heads} does not divide --heads {args.heads}')
  return args


def main(argv=None):
  args = parse(argv)
  plat = platform_name()
  timed = not args.memory_only and (plat != 'cpu' or args.time_on_cpu)
  device_kind = jax.devices()[0].device_kind
  print(f'device: {device_kind} ({plat}), jax {jax.__version__}, '
        f'{"timing + memory analysis" if timed else "memory analysis only (nothing run)"}',
        flush=True)

  unavailable = {}
  results = []
  t0 = time.perf_counter()
  for cfg in configs(args):
    by_impl = {}
    for impl in args.impls:
      if impl in unavailable:
        continue
      try:
        r = measure(impl, cfg, args, run=timed)
      except Unavailable as e:
        unavailable[impl] = str(e)
        continue
      except Exception as e:  # pylint: disable=broad-except
        r = {'impl': impl, 'mem': _failure(e), 'fwd': _failure(e), 'fwd_bwd': _failure(e)}
      by_impl[impl] = r
      timing = (f' fwd {_tflops(r.get("fwd", "-"))} fwd+bwd {_tflops(r.get("fwd_bwd", "-"))} '
                'TFLOP/s' if timed else '')
      memory = (f'temp {_mib(r["temp"])} MiB' if 'temp' in r else r.get('mem', '-'))
      print(f'  L={cfg["length"]} b={cfg["batch"]} d={cfg["head_dim"]} '
            f'h={cfg["heads"]}/{cfg["kv_heads"]} causal={cfg["causal"]} {impl}: {memory}'
            f'{timing} (compile {r.get("compile_s", 0):.1f} s)', flush=True)
    results.append((cfg, by_impl))
  elapsed = time.perf_counter() - t0

  header, rows = table(results, timed)
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  print()
  for line in [header] + rows:
    print('  '.join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
  notes = [f'Not run on {plat}: ' + '; '.join(f'{k} ({v})' for k, v in unavailable.items())
           ] if unavailable else []
  accept = acceptance(results, args.dtype) if timed else []
  print()
  for line in notes + accept:
    print(line)
  print(f'({elapsed:.0f} s)')

  if args.append:
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import record_benchmark  # pylint: disable=g-import-not-at-top
    cmd = shlex.join(['python', 'scripts/bench_attention.py'] +
                     list(sys.argv[1:] if argv is None else argv))
    title = ''
    if plat == 'cpu':
      title = ('**CPU compile-time memory analysis (ours in the Pallas interpreter); GPU '
               'timings owed.** ' if not timed else
               '**CPU (ours in the Pallas interpreter: its timings say nothing about the '
               'GPU kernels).** ')
    what = ('Forward and forward+backward TFLOP/s (median of '
            f'{args.iters} runs after {args.warmup} warm-up; FlashAttention-2 FLOPs: forward '
            '4·batch·heads·q_len·kv_len·head_dim, halved when causal; forward+backward = 3.5x '
            'forward) and the compiled memory analysis of the forward+backward program. '
            '"ours / this": ours\' TFLOP/s over this row\'s. '
            if timed else
            'Compile-time memory analysis only (nothing run): the forward+backward program\'s '
            'temp and argument+output bytes from `compile().memory_analysis()`. ')
    if plat == 'cpu':
      what += ('On CPU "ours" is the GPU kernels compiled through the Pallas interpreter, so '
               'its memory is the interpreted program\'s, not the Triton kernels\'. ')
    body = (f'{title}Command: `{cmd}` (jax {jax.__version__}, device_kind `{device_kind}`, '
            f'{args.dtype}, {elapsed:.0f} s). {what}"this / ours temp": this row\'s temp '
            'bytes over ours\'.\n\n'
            '| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n' +
            ''.join('| ' + ' | '.join(row) + ' |\n' for row in rows) +
            ''.join(f'\n{line}\n' if not line.startswith('- ') else f'{line}\n'
                    for line in notes + accept))
    path = record_benchmark.append_section('bench_attention', body)
    print(f'appended to {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
