"""Input throughput per CPU core: the packed UL2 pipeline and plain span corruption vs `t5`.

    python scripts/bench_data.py [--batch=16] [--seconds=20] [--warmup=3]
                                 [--ul2_mixture=stdlib_ul2] [--span_mixture=stdlib_span_corruption]
                                 [--model=models/t5_1_1/tiny.gin] [--t5_python=PATH] [--only=t5|ours]
                                 [--consumer_tokens_per_s=N | --measure_consumer] [--append_docs]

Each pipeline runs pinned to one CPU core (`--cpu`, default 0): the process's affinity
is set before TensorFlow is imported, TF's intra/inter-op pools have one thread, and
the dataset's options keep tf.data to a private pool of one thread. After `--warmup`
batches (which include filling the shuffle buffers), batches are drawn for `--seconds`;
the tokens counted are the non-padding tokens of the produced model features
(encoder inputs + decoder targets). The per-core rate reported is tokens per CPU
second of the pinned process (tokens/CPU-s), which stays right when other work shares
the core; wall-clock tokens/s and CPU utilisation are shown beside it. Rows, over the same
embedded corpus, byte vocabulary (100 extra ids), seed and seqio feature converter:

  t5           the `t5` library's `t5.data.preprocessors.span_corruption` (T5 defaults:
               noise density 0.15, mean span 3, inputs 512 / targets 114), unpacked;
  ours span    `--span_mixture` through `pipeline.build_dataset`, packed and unpacked;
  ours UL2     `--ul2_mixture` (skipped with a note if it is not registered), packed
               and unpacked.

`t5` is installed only in the benchmark's own virtual environment (it pins
seqio-nightly and tfds-nightly, so its dependencies are installed by hand, keeping the
system's tensorflow, seqio, numpy and jax); the `t5` row runs there as a subprocess
(`--only=t5` under `--t5_python`) and reports one JSON line. Create it with:

    python -m venv --system-site-packages ~/.cache/t5x_like/bench-venv
    ~/.cache/t5x_like/bench-venv/bin/pip install --no-deps t5==0.9.4
    ~/.cache/t5x_like/bench-venv/bin/pip install babel pandas sacrebleu scikit-learn rouge-score

The consumption reference is the README's CPU pretraining job (`gin/runs/pretrain_default.gin`:
`models/llama/small.gin`, 16 x 256 tokens per step): its tokens/s is taken from the newest
`bench_train` section for that model and batch in docs/benchmarks.md, else from
`--consumer_tokens_per_s` (default DEFAULT_CONSUMER_TOKENS_PER_S below), or measured
with `--measure_consumer` (runs scripts/bench_train.py on all cores, about a minute).
The run prints packed UL2 tokens/CPU-s (one core) / consumer tokens/s; the bar is >= 5x.
`--append_docs` appends the table to docs/benchmarks.md.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_T5_PYTHON = os.path.join(os.path.expanduser('~'), '.cache', 't5x_like', 'bench-venv',
                                 'bin', 'python')
VENV_COMMANDS = (
    'python -m venv --system-site-packages ~/.cache/t5x_like/bench-venv && '
    '~/.cache/t5x_like/bench-venv/bin/pip install --no-deps t5==0.9.4 && '
    '~/.cache/t5x_like/bench-venv/bin/pip install babel pandas sacrebleu scikit-learn rouge-score')
CONSUMER_MODEL = 'models/llama/small.gin'
CONSUMER_BATCH, CONSUMER_LENGTH = 16, 256
# `python scripts/bench_train.py --model models/llama/small.gin --no-append` on the 2-core
# x86_64 CPU development machine (2026-11-25): 1511 ms per 16 x 256 step.
DEFAULT_CONSUMER_TOKENS_PER_S = 2711.0
RESULT_PREFIX = 'BENCH_DATA_RESULT '


def _lengths(text: str):
  """'inputs=512,targets=114' -> {'inputs': 512, 'targets': 114}."""
  out = {}
  for part in text.split(','):
    key, _, value = part.partition('=')
    out[key.strip()] = int(value)
  return out


def pin_and_configure(cpu: int):
  """Pins this process to one core and TF to one thread; must run before any TF op."""
  os.sched_setaffinity(0, {cpu})
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  return tf


def single_threaded(ds):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.cpu_budget = 1
  return ds.with_options(options)


def measure(ds, warmup: int, seconds: float, min_batches: int = 3):
  """Draws batches for `seconds` after `warmup` of them; counts non-padding tokens."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  token_keys = ('encoder_input_tokens', 'decoder_target_tokens')
  it = single_threaded(ds).as_numpy_iterator()
  t = time.perf_counter()
  for _ in range(warmup):
    next(it)
  warmup_s = time.perf_counter() - t
  tokens = slots = batches = rows = 0
  cpu0, t0 = time.process_time(), time.perf_counter()
  while batches < min_batches or time.perf_counter() - t0 < seconds:
    batch = next(it)
    for key in token_keys:
      if key in batch:
        tokens += int(np.count_nonzero(batch[key]))
        slots += batch[key].size
    rows += len(batch[token_keys[1]])
    batches += 1
  wall = time.perf_counter() - t0
  cpu = time.process_time() - cpu0
  return {'tokens_per_s': tokens / wall, 'tokens_per_cpu_s': tokens / cpu,
          'rows_per_s': rows / wall, 'fill': tokens / slots,
          'batches': batches, 'seconds': wall, 'cpu_util': cpu / wall, 'warmup_s': warmup_s,
          'shapes': {k: list(v.shape) for k, v in batch.items() if k in token_keys}}


# --- the t5 row (runs under the benchmark venv's python) ------------------------------------


def run_t5(args) -> dict:
  """The t5 library's span_corruption over our corpus source, unpacked."""
  pin_and_configure(args.cpu)
  try:
    import t5  # pylint: disable=g-import-not-at-top
    import t5.data.preprocessors as t5_prep  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'error': f't5 not importable under {sys.executable} ({e}): create the benchmark '
                     f'venv with: {VENV_COMMANDS}'}
  import seqio  # pylint: disable=g-import-not-at-top
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_like.data import corpus  # pylint: disable=g-import-not-at-top
  from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
  from t5x_like.data import registry  # pylint: disable=g-import-not-at-top
  from t5x_like.data import tasks  # pylint: disable=g-import-not-at-top

  # The same source, tokenizer and features as the corpus span-corruption tasks;
  # only the span-corruption preprocessor is t5's.
  _, features = tasks.objective_spec('span_corruption', tasks.DEFAULT_VOCABULARY)
  names = []
  for domain in corpus.DOMAINS:
    name = f'bench_t5_{domain}_span_corruption'
    registry.register_seqio_task(
        name, tasks.corpus_source(domain),
        [registry.TEXT_TO_TARGETS, seqio.preprocessors.tokenize, t5_prep.span_corruption,
         seqio.preprocessors.append_eos_after_trim], features)
    names.append(name)
  seqio.MixtureRegistry.add('bench_t5_span_corruption', [(n, 1.0) for n in names])
  lengths = _lengths(args.span_lengths)
  # Through the same pipeline.build_dataset as our rows (shuffling, caching, feature
  # converter, batching), unpacked.
  config = pipeline.DatasetConfig('bench_t5_span_corruption', lengths, batch_size=args.batch,
                                  seed=args.seed, pack=False)
  ds = pipeline.build_dataset(config, gin_utils.model_from_gin([args.model]))
  result = measure(ds, args.warmup, args.seconds)
  result.update(version=getattr(t5, '__version__', '?'), lengths=lengths, pack=False)
  return result


def t5_row(args) -> dict:
  """Runs the t5 row in a subprocess under `--t5_python`; its JSON result."""
  if not os.path.exists(args.t5_python):
    return {'error': f'{args.t5_python} not found: create the benchmark venv with: '
                     f'{VENV_COMMANDS}'}
  cmd = [args.t5_python, os.path.abspath(__file__), '--only=t5', f'--cpu={args.cpu}',
         f'--batch={args.batch}', f'--seconds={args.seconds}', f'--warmup={args.warmup}',
         f'--seed={args.seed}', f'--span_lengths={args.span_lengths}', f'--model={args.model}']
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        check=False)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = '\n'.join(proc.stderr.strip().splitlines()[-5:])
  return {'error': f'the t5 subprocess exited {proc.returncode} without a result:\n{tail}'}


# --- our rows (main process) ----------------------------------------------------------------


def our_rows(args, model):
  import seqio  # pylint: disable=g-import-not-at-top
  from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top

  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  specs = [('ours span corruption', args.span_mixture, _lengths(args.span_lengths)),
           ('ours UL2', args.ul2_mixture, _lengths(args.ul2_lengths))]
  rows = []
  for label, name, lengths in specs:
    if name not in known:
      note = (f'{name!r} is not registered (import order or not written yet): row skipped; '
              f'pass --ul2_mixture / --span_mixture to name another')
      print(f'NOTE: {label}: {note}', flush=True)
      rows.append({'label': label, 'mixture': name, 'pack': None, 'error': note})
      continue
    for pack in (True, False):
      config = pipeline.DatasetConfig(name, lengths, batch_size=args.batch, seed=args.seed,
                                      pack=pack)
      try:
        pipeline.validate(config, model)
        result = measure(pipeline.build_dataset(config, model), args.warmup, args.seconds)
      except Exception as e:  # pylint: disable=broad-except
        if label != 'ours UL2':
          raise
        print(f'NOTE: {label} ({name}, pack={pack}) failed: {type(e).__name__}: {e}', flush=True)
        result = {'error': f'{type(e).__name__}: {e}'}
      result.update(label=label, mixture=name, pack=pack, lengths=lengths)
      rows.append(result)
      print(f'  {label} pack={pack}: ' + (f'{result["tokens_per_cpu_s"]:,.0f} tokens/CPU-s'
                                           if 'error' not in result else 'failed'), flush=True)
  return rows


def consumer_rate(args):
  """(tokens/s, where it came from) of the README's CPU pretraining job."""
  if args.consumer_tokens_per_s is not None:
    return args.consumer_tokens_per_s, '--consumer_tokens_per_s'
  if args.measure_consumer:
    cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'bench_train.py'),
           f'--model={CONSUMER_MODEL}', f'--batch={CONSUMER_BATCH}',
           f'--length={CONSUMER_LENGTH}', '--no-append']
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         check=True).stdout
    m = re.search(r'^tokens/s\s+([\d,.]+)', out, re.M)
    if m:
      return (float(m.group(1).replace(',', '')),
              'measured now: python scripts/bench_train.py ' + ' '.join(cmd[2:]))
  path = os.path.join(ROOT, 'docs', 'benchmarks.md')
  if os.path.exists(path):
    with open(path) as f:
      sections = f.read().split('\n## ')
    for section in reversed(sections):
      if (section.startswith('bench_train') and f'| model | {CONSUMER_MODEL} ' in section and
          f'({CONSUMER_BATCH} x {CONSUMER_LENGTH})' in section):
        m = re.search(r'^\| tokens/s \| ([\d,.]+) \|', section, re.M)
        if m:
          return (float(m.group(1).replace(',', '')),
                  f'docs/benchmarks.md, {section.splitlines()[0]}')
  return DEFAULT_CONSUMER_TOKENS_PER_S, (
      f'default (bench_train.py --model {CONSUMER_MODEL}, {CONSUMER_BATCH} x {CONSUMER_LENGTH}, '
      'measured on the 2-core dev CPU; pass --measure_consumer to measure here)')


def table(rows, t5_result):
  base = t5_result.get('tokens_per_cpu_s')
  header = ('pipeline', 'mixture / preprocessor', 'pack', 'lengths', 'tokens/CPU-s',
            'tokens/s (wall)', 'cpu util', 'fill', 'rows/s', 'vs t5')
  lines = []
  for r in rows:
    lengths = '/'.join(str(v) for v in r.get('lengths', {}).values()) or '-'
    pack = '-' if r.get('pack') is None else ('yes' if r['pack'] else 'no')
    if 'error' in r:
      lines.append((r['label'], r['mixture'], pack, lengths, 'skipped', '', '', '', '', ''))
      continue
    ratio = f'{r["tokens_per_cpu_s"] / base:.2f}x' if base else 'n/a'
    lines.append((r['label'], r['mixture'], pack, lengths, f'{r["tokens_per_cpu_s"]:,.0f}',
                  f'{r["tokens_per_s"]:,.0f}', f'{r["cpu_util"]:.2f}',
                  f'{100 * r["fill"]:.0f}%', f'{r["rows_per_s"]:,.0f}', ratio))
  return header, lines


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--seconds', type=float, default=20.0, help='timed seconds per row')
  p.add_argument('--warmup', type=int, default=3, help='untimed batches per row')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--cpu', type=int, default=0, help='the core every row is pinned to')
  p.add_argument('--span_mixture', default='stdlib_span_corruption')
  p.add_argument('--span_lengths', default='inputs=512,targets=114')
  p.add_argument('--ul2_mixture', default='stdlib_ul2')
  p.add_argument('--ul2_lengths', default='inputs=512,targets=512')
  p.add_argument('--model', default='models/t5_1_1/tiny.gin',
                 help='gin model file: picks the feature converter (not run)')
  p.add_argument('--t5_python', default=DEFAULT_T5_PYTHON,
                 help='python of the benchmark venv that has `t5`')
  p.add_argument('--only', choices=('t5', 'ours'), default=None,
                 help='t5: run the t5 row here and print a JSON line; ours: skip the t5 row')
  p.add_argument('--consumer_tokens_per_s', type=float, default=None,
                 help='tokens/s the training job consumes (default: docs/benchmarks.md, '
                      f'else {DEFAULT_CONSUMER_TOKENS_PER_S:.0f})')
  p.add_argument('--measure_consumer', action='store_true',
                 help=f'time {CONSUMER_MODEL} train steps now (bench_train.py, all cores)')
  p.add_argument('--append_docs', action='store_true', help='append to docs/benchmarks.md')
  args = p.parse_args()

  if args.only == 't5':
    print(RESULT_PREFIX + json.dumps(run_t5(args)), flush=True)
    return

  consumer, consumer_src = consumer_rate(args)  # before pinning: it may use all cores
  tf = pin_and_configure(args.cpu)
  import seqio  # pylint: disable=g-import-not-at-top
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import record_benchmark  # pylint: disable=g-import-not-at-top

  t5_result = {'error': 'skipped (--only=ours)'}
  if args.only != 'ours':
    print('t5 span_corruption (subprocess under the benchmark venv)...', flush=True)
    t5_result = t5_row(args)
    if 'error' in t5_result:
      print(f'NOTE: t5 row: {t5_result["error"]}', flush=True)
    else:
      print(f'  t5: {t5_result["tokens_per_cpu_s"]:,.0f} tokens/CPU-s', flush=True)
  t5_entry = dict(t5_result, label='t5', mixture='t5.data.preprocessors.span_corruption',
                  pack=False, lengths=_lengths(args.span_lengths))
  model = gin_utils.model_from_gin([args.model])
  rows = [t5_entry] + our_rows(args, model)

  header, lines = table(rows, t5_result)
  widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
  print()
  for line in [header] + lines:
    print('  '.join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
  ul2 = [r for r in rows if r['label'] == 'ours UL2' and r.get('pack') and 'error' not in r]
  consumer_line = (f'Consumer: the README pretraining job ({CONSUMER_MODEL}, '
                   f'{CONSUMER_BATCH} x {CONSUMER_LENGTH} tokens/step) takes {consumer:,.0f} '
                   f'tokens/s ({consumer_src}).')
  if ul2:
    ratio = ul2[0]['tokens_per_cpu_s'] / consumer
    verdict = 'meets' if ratio >= 5 else 'BELOW'
    consumer_line += (f' Packed UL2 on one core / consumer = {ratio:.1f}x ({verdict} the 5x '
                      'bar).')
  else:
    consumer_line += ' No packed UL2 row, so no UL2 / consumer ratio.'
  print('\n' + consumer_line)

  if args.append_docs:
    versions = f'tensorflow {tf.__version__}, seqio {getattr(seqio, "__version__", "?")}'
    if 'version' in t5_result:
      versions += f', t5 {t5_result["version"]}'
    cmd = 'python scripts/bench_data.py ' + ' '.join(sys.argv[1:])
    path = record_benchmark.append_section(
        'bench_data',
        f'Command: `{cmd.strip()}` ({versions}). Each row is pinned to one core with one '
        f'tf.data thread; batch {args.batch}, {args.warmup} warm-up batches, '
        f'{args.seconds:g} s timed; tokens = non-padding encoder input + decoder target '
        'tokens; tokens/CPU-s = tokens / the process\'s CPU seconds (the per-core rate, '
        'robust to other load on the core; cpu util < 1 means the core was shared); '
        '"vs t5" compares tokens/CPU-s.\n\n'
        '| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n' +
        ''.join('| ' + ' | '.join(str(c) for c in line) + ' |\n' for line in lines) +
        f'\n{consumer_line}\n')
    print(f'appended to {path}')


if __name__ == '__main__':
  main()
