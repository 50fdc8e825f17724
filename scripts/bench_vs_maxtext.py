"""Side by side with MaxText: tokens/s, CPU time, peak memory and start-up on one shape.

    python scripts/bench_vs_maxtext.py [--lengths 512 2048] [--rounds 3] [--steps 12]
        [--maxtext_python PATH] [--ours_only] [--gin.KEY=value ...] [--no-append]

Both sides train the same 20.5M LLaMA-style decoder (gin/models/llama/maxtext_20m.gin:
vocab 8192, embed 384, 6 layers, 6 heads x 64, SwiGLU 1536, AdamW, f32) through their
own command-line entry points, as a user would start them:
  ours:    python -m train --gin_file=runs/bench_maxtext.gin (the embedded corpus,
           packed, a console line per step; nothing but the run file's defaults)
  MaxText: python -m maxtext.trainers.pre_train.train decoupled_base_test.yml ...
           (synthetic data, remat_policy=minimal, its CPU settings)
at 8 x 512 and 2 x 2048 tokens a step. Rounds alternate which side goes first, so a
noisy window hurts both. Per run it measures, from outside the process:
  tokens/s        tokens per step / the median wall-clock gap between step lines
                  (the first `--skip` gaps are left out: compilation and warm-up);
  CPU s/step      the user+system CPU seconds (/proc) of the process and those it
                  started over those same gaps, per step: more CPU than wall time x
                  cores means contention;
  peak RSS        the maximum resident set size of the process (wait4) plus that of
                  every process it started (ours: the input process, t5x_like/data/
                  service.py; each one's kernel high-water mark VmHWM, read every 0.2 s):
                  an upper bound, since pages they share count twice and the peaks
                  need not coincide;
  peak RSS at     the job's footprint: the largest sum of their RSS at one time (sampled
    once          every 0.2 s), or, if higher, the launched process's own exact peak
                  (wait4) plus the largest RSS each other process held once training
                  had started (the trainer peaks during the steps, the input process
                  at its start, before it hands back its start-up pages): the column
                  the acceptance reads, since pages two processes share still count
                  twice and no peak is missed between samples of the trainer;
  peak PSS        the largest sum, over the same processes, of their proportional set
                  size, sampled every 0.2 s: the memory the job holds, shared pages
                  counted once;
  first step      seconds from launch to the first step's line, cold and warm. Each
                  round starts each side twice: first with an empty persistent
                  compilation cache of its own, stopped at its first step line (cold),
                  then the measured run, which finds the train step compiled by the
                  cold launch (warm).
Each side's cache is its own: ours through JAX_COMPILATION_CACHE_DIR (our entry points
use one by default, xla_env), MaxText through its `jax_cache_dir` option (its base
config's default; the CPU test config turns it off). The table gives each side's median
over the rounds and the ratio of the medians, and is appended to docs/benchmarks.md with
the machine, date, both sides' JAX and Flax versions and the command.

MaxText lives in its own Python 3.12 virtual environment (never a dependency here):
  python3.12 -m venv ~/maxtext-venv && ~/maxtext-venv/bin/pip install --no-deps maxtext==0.2.5 \\
    && ~/maxtext-venv/bin/pip install 'jax[cpu]' flax optax orbax-checkpoint grain omegaconf \\
    pydantic absl-py tensorboardx pathwaysutils jinja2 aqtp qwix tokamax huggingface_hub \\
    transformers drjax pillow tiktoken sentencepiece sympy ml-collections
then pass --maxtext_python ~/maxtext-venv/bin/python (or set MAXTEXT_PYTHON).
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from t5x_like import xla_env  # pylint: disable=wrong-import-position

# This process measures the matmul peak (MFU's denominator) with the XLA options the
# training process runs with, so both find the same cached value.
os.environ.pop('XLA_FLAGS', None)
xla_env.apply()
SHAPES = {512: 8, 2048: 2}  # sequence length -> batch size
MAXTEXT_SHAPE = ('base_emb_dim=384', 'base_num_query_heads=6', 'base_num_kv_heads=6',
                 'base_mlp_dim=1536', 'base_num_decoder_layers=6', 'head_dim=64',
                 'vocab_size=8192', 'dtype=float32', 'remat_policy=minimal')
INSTALL = ('MaxText is not installed: python3.12 -m venv ~/maxtext-venv && '
           '~/maxtext-venv/bin/pip install --no-deps maxtext==0.2.5 && ~/maxtext-venv/bin/pip '
           "install 'jax[cpu]' flax optax orbax-checkpoint grain omegaconf pydantic absl-py "
           'tensorboardx pathwaysutils jinja2 aqtp qwix tokamax huggingface_hub transformers drjax '
           'pillow tiktoken sentencepiece sympy ml-collections; then pass '
           '--maxtext_python ~/maxtext-venv/bin/python')
_OURS_STEP = re.compile(r'^train step\s+(\d+)/')
_OURS_MFU = re.compile(r'\| MFU ([0-9.]+)%')
_MAXTEXT_STEP = re.compile(r'completed step: (\d+)')


def _cpu_seconds(pid: int) -> float:
  """user + system CPU seconds of a live process (all its threads)."""
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _descendants(pid: int) -> List[int]:
  """`pid`'s child processes, theirs, and so on (Linux /proc)."""
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    try:
      for task in os.listdir(f'/proc/{p}/task'):
        with open(f'/proc/{p}/task/{task}/children') as f:
          kids = [int(k) for k in f.read().split()]
        out += kids
        todo += kids
    except OSError:
      pass
  return out


def _status_kib(pid: int, field: str) -> int:
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return 0


def _pss_kib(pid: int) -> int:
  with open(f'/proc/{pid}/smaps_rollup') as f:
    for line in f:
      if line.startswith('Pss:'):
        return int(line.split()[1])
  return 0


class TreeMemory(threading.Thread):
  """Samples a process and its descendants (an input process) every `every` seconds:
  each one's peak RSS (the kernel's VmHWM, exact) and the summed proportional set
  size (PSS: pages shared between them, such as the Python and JAX libraries both
  load, counted once in all)."""

  def __init__(self, pid: int, every: float = 0.2):
    super().__init__(daemon=True)
    self.pid, self.every = pid, every
    self.hwm: Dict[int, int] = {}  # pid -> peak RSS (KiB), of every process seen
    self.peak_pss = 0  # KiB
    self.peak_rss = 0  # KiB: the largest sampled sum of their RSS at one time
    self.steady: Dict[int, int] = {}  # pid -> largest RSS (KiB) sampled once training runs
    self.training = threading.Event()  # (set at the first step line)
    self.done = threading.Event()

  def run(self):
    while not self.done.is_set():
      total, rss = 0, 0
      for pid in [self.pid] + _descendants(self.pid):
        try:
          self.hwm[pid] = max(self.hwm.get(pid, 0), _status_kib(pid, 'VmHWM'))
          now = _status_kib(pid, 'VmRSS')
          rss += now
          if self.training.is_set():
            self.steady[pid] = max(self.steady.get(pid, 0), now)
          total += _pss_kib(pid)
        except (OSError, ValueError):
          pass
      self.peak_pss = max(self.peak_pss, total)
      self.peak_rss = max(self.peak_rss, rss)
      self.done.wait(self.every)


def _kill_tree(proc: subprocess.Popen) -> None:
  for pid in _descendants(proc.pid):
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass
  proc.kill()


def first_step(cmd: List[str], env: Dict[str, str], step_re, log: Optional[str] = None) -> float:
  """Seconds from launching `cmd` to its first step line; the process (and those it
  started) is then killed."""
  start = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if step_re.search(line):
        return time.monotonic() - start
  finally:
    _kill_tree(proc)
    proc.wait()
    proc.stdout.close()
    if log:
      with open(log, 'w') as f:
        f.writelines(lines)
  raise RuntimeError(f'{cmd[:3]} ended before its first step:\n{"".join(lines[-15:])}')


def run(cmd: List[str], env: Dict[str, str], step_re, tokens: int, skip: int,
        log: Optional[str] = None) -> Dict[str, float]:
  """Runs one training process; -> its measurements (see the module docstring)."""
  start = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
  memory = TreeMemory(proc.pid)
  memory.start()
  marks, lines, mfus = [], [], []  # (wall seconds since launch, CPU seconds) at each step line
  for line in proc.stdout:
    lines.append(line)
    if _OURS_MFU.search(line):
      mfus.append(float(_OURS_MFU.search(line).group(1)) / 100)
    if step_re.search(line):
      try:  # (the input process's CPU time counts too)
        cpu = _cpu_seconds(proc.pid)
        for pid in _descendants(proc.pid):
          try:
            cpu += _cpu_seconds(pid)
          except OSError:
            pass
      except OSError:
        cpu = float('nan')
      marks.append((time.monotonic() - start, cpu))
      memory.training.set()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)  # (reaped here: Popen must not wait)
  proc.stdout.close()
  memory.done.set()
  memory.join()
  # The launched process's own peak is wait4's (exact); the others' are their last VmHWM.
  others = [kib for pid, kib in memory.hwm.items() if pid != proc.pid]
  if log:
    with open(log, 'w') as f:
      f.writelines(lines)
  if proc.returncode != 0 or len(marks) < skip + 2:
    tail = ''.join(lines[-15:])
    raise RuntimeError(f'{cmd[:3]} failed or logged too few steps ({len(marks)}):\n{tail}')
  gaps = [b[0] - a[0] for a, b in zip(marks, marks[1:])][skip:]
  cpu = [(b[1] - a[1]) for a, b in zip(marks, marks[1:])][skip:]
  return {'tokens_per_s': tokens / statistics.median(gaps),
          'cpu_per_step': statistics.median(cpu),
          'step_s': statistics.median(gaps),
          'rss_gib': (usage.ru_maxrss + sum(others)) / 2**20,
          'pss_gib': memory.peak_pss / 2**20,
          # At one time: the largest sampled sum, or the launched process's own exact
          # peak plus the most the others held while it trained, if higher.
          'rss_at_once_gib': max(memory.peak_rss, usage.ru_maxrss + sum(
              kib for pid, kib in memory.steady.items() if pid != proc.pid)) / 2**20,
          'processes': 1 + len(others),
          'first_step_s': marks[0][0],
          'console_mfu': statistics.median(mfus[skip + 1:]) if len(mfus) > skip + 1 else None}


def ours_cmd(length: int, batch: int, steps: int, model_dir: str, extra: List[str]):
  return [sys.executable, '-m', 'train', '--gin_file=runs/bench_maxtext.gin',
          f"--gin.TASK_FEATURE_LENGTHS={{'targets': {length}}}", f'--gin.BATCH_SIZE={batch}',
          f'--gin.TRAIN_STEPS={steps}', f"--gin.MODEL_DIR='{model_dir}'"] + extra


def maxtext_cmd(python: str, config: str, length: int, batch: int, steps: int, out: str,
                cache: str):
  return [python, '-m', 'maxtext.trainers.pre_train.train', config, 'run_name=bench',
          'hardware=cpu', 'dataset_type=synthetic', 'skip_jax_distributed_system=True',
          'enable_checkpointing=False', f'per_device_batch_size={batch}',
          f'max_target_length={length}', f'steps={steps}', f'base_output_directory={out}',
          f'jax_cache_dir={cache}', *MAXTEXT_SHAPE]


def _flops_per_token(length: int, extra: List[str]) -> float:
  from t5x_like import gin_utils  # pylint: disable=g-import-not-at-top
  model = gin_utils.model_from_gin(['runs/bench_maxtext.gin'], gin_utils.split_argv(extra))
  return model.flops_per_example({'targets': length}) / length


def _peak() -> float:
  import jax  # pylint: disable=g-import-not-at-top
  from t5x_like import utils  # pylint: disable=g-import-not-at-top
  return utils.measured_matmul_peak('float32') * jax.device_count()


def clean_env(**extra) -> Dict[str, str]:
  """This environment without the settings either side makes for itself."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_PLATFORMS', 'GLIBC_TUNABLES') and
         not k.startswith('JAX_COMPILATION_CACHE')}
  env.update(PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu', **extra)
  return env


def maxtext_install(flag: Optional[str]) -> Optional[Tuple[str, str]]:
  """(MaxText's python, its CPU test config) when that python imports maxtext, else None."""
  python = flag or os.environ.get('MAXTEXT_PYTHON')
  if not (python and os.path.exists(python)):
    return None
  found = subprocess.run([python, '-c', 'import maxtext, os; print(os.path.dirname('
                          'maxtext.__file__))'], capture_output=True, text=True)
  if found.returncode != 0:
    return None
  return python, os.path.join(found.stdout.strip(), 'configs', 'decoupled_base_test.yml')


def versions(maxtext: Optional[Tuple[str, str]]) -> str:
  """Both sides' JAX and Flax versions (and MaxText's own), as a sentence."""
  code = ('import importlib.metadata as m, sys; print(sys.version.split()[0], *(m.version(p) '
          'for p in ("jax", "jaxlib", "flax")), m.version("maxtext") if len(sys.argv) > 1 '
          'else "")')
  def of(python, *flag):
    try:
      out = subprocess.run([python, '-c', code, *flag], capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
      return None
    return out.stdout.split() if out.returncode == 0 else None
  text = []
  for name, python, flag in (('ours', sys.executable, ()),
                             ('MaxText', maxtext and maxtext[0], ('maxtext',))):
    v = python and of(python, *flag)
    if v:
      own = f'MaxText {v[4]} on ' if len(v) > 4 else ''
      text.append(f'{name}: {own}Python {v[0]}, jax {v[1]}, jaxlib {v[2]}, flax {v[3]}')
  return 'Versions: ' + '; '.join(text) + '.'


def _rounds(args, extra, maxtext, results):
  """Runs the rounds, alternating which side goes first, into `results`: for each side,
  a cold launch (an empty compilation cache, stopped at its first step), then the
  measured run with the cache it filled."""
  for r in range(args.rounds):
    for length in args.lengths:
      batch = SHAPES[length]
      sides = ['ours'] + ([] if args.ours_only else ['maxtext'])
      for side in (sides if r % 2 == 0 else sides[::-1]):
        cache = tempfile.mkdtemp(prefix=f'bench_{side}_compilation_cache_')
        try:
          def launch(measure):
            tmp = tempfile.mkdtemp(prefix=f'bench_{side}_')
            try:
              log = args.logs and os.path.join(
                  args.logs, f'{side}_{length}_r{r}{"" if measure else "_cold"}.log')
              if side == 'ours':
                cmd, env, step_re = (ours_cmd(length, batch, args.steps, tmp, extra),
                                     clean_env(JAX_COMPILATION_CACHE_DIR=cache), _OURS_STEP)
              else:
                cmd, env, step_re = (
                    maxtext_cmd(*maxtext, length, batch, args.steps, tmp, cache),
                    clean_env(DECOUPLE_GCLOUD='TRUE'), _MAXTEXT_STEP)
              if not measure:
                return first_step(cmd, env, step_re, log)
              return run(cmd, env, step_re, batch * length, args.skip, log)
            finally:
              shutil.rmtree(tmp, ignore_errors=True)
          cold = launch(measure=False)
          m = launch(measure=True)
          m['cold_first_step_s'] = cold
        finally:
          shutil.rmtree(cache, ignore_errors=True)
        results[(side, length)].append(m)
        print(f'round {r + 1} {side:<7} {batch} x {length}: {m["tokens_per_s"]:7.0f} tok/s  '
              f'{m["cpu_per_step"]:5.1f} CPU s/step  RSS at once {m["rss_at_once_gib"]:.2f}, '
              f'summed peaks {m["rss_gib"]:.2f} GiB '
              f'({m["processes"]} process{"es" if m["processes"] > 1 else ""})  PSS '
              f'{m["pss_gib"]:.2f} GiB  first step {m["cold_first_step_s"]:.1f} s cold, '
              f'{m["first_step_s"]:.1f} s warm', flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--lengths', type=int, nargs='+', default=[512, 2048], choices=sorted(SHAPES))
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--steps', type=int, default=12)
  p.add_argument('--skip', type=int, default=2, help='step gaps left out at the start')
  p.add_argument('--maxtext_python', default=None)
  p.add_argument('--ours_only', action='store_true', help='measure ours without MaxText')
  p.add_argument('--logs', default=None, help='keep every run\'s output in this folder')
  p.add_argument('--no-append', action='store_true')
  args, rest = p.parse_known_args(argv)
  extra = [a for a in rest if a.startswith('--gin.')]
  if len(extra) != len(rest):
    p.error(f'unrecognised arguments: {[a for a in rest if not a.startswith("--gin.")]}')
  maxtext = None if args.ours_only else maxtext_install(args.maxtext_python)
  if maxtext is None and not args.ours_only:
    print(INSTALL, file=sys.stderr)
    sys.exit(2)
  if args.logs:
    os.makedirs(args.logs, exist_ok=True)

  results = {(side, length): [] for side in ('ours', 'maxtext') for length in args.lengths}
  _rounds(args, extra, maxtext, results)

  # MFU of both sides by one count (ours: models/param_count.py, only the query-key pairs
  # the causal mask leaves) and one peak (utils.measured_matmul_peak, as the console).
  flops_token = {length: _flops_per_token(length, extra) for length in args.lengths}
  peak = _peak()
  for (side, length), ms in results.items():
    for m in ms:
      m['mfu'] = m['tokens_per_s'] * flops_token[length] / peak
  rows = []
  for length in args.lengths:
    med = {}
    for side in ('ours', 'maxtext'):
      ms = results[(side, length)]
      if ms:
        med[side] = {k: statistics.median(m[k] for m in ms)
                     for k in ('tokens_per_s', 'cpu_per_step', 'rss_gib', 'rss_at_once_gib',
                               'pss_gib', 'mfu')}
        med[side]['cold'] = statistics.median(m['cold_first_step_s'] for m in ms)
        med[side]['warm'] = statistics.median(m['first_step_s'] for m in ms)
    consoles = [m['console_mfu'] for m in results[('ours', length)] if m['console_mfu']]
    shape = f'{SHAPES[length]} x {length}'
    for side, m in med.items():
      console = (f' (console {100 * statistics.median(consoles):.1f}%)'
                 if side == 'ours' and consoles else '')
      rows.append(f'| {shape} | {side} | {m["tokens_per_s"]:,.0f} | {100 * m["mfu"]:.1f}%'
                  f'{console} | {m["cpu_per_step"]:.1f} | {m["rss_gib"]:.2f} | '
                  f'{m["rss_at_once_gib"]:.2f} | {m["pss_gib"]:.2f} | {m["cold"]:.1f} | '
                  f'{m["warm"]:.1f} |')
    if len(med) == 2:
      o, t = med['ours'], med['maxtext']
      rows.append(f'| {shape} | **ours / MaxText** | **{o["tokens_per_s"] / t["tokens_per_s"]:.2f}x**'
                  f' | | {o["cpu_per_step"] / t["cpu_per_step"]:.2f}x | '
                  f'{o["rss_gib"] / t["rss_gib"]:.2f}x | '
                  f'**{o["rss_at_once_gib"] / t["rss_at_once_gib"]:.2f}x** | '
                  f'{o["pss_gib"] / t["pss_gib"]:.2f}x | '
                  f'{o["cold"] / t["cold"]:.2f}x | {o["warm"] / t["warm"]:.2f}x |')
  table = (f'MFU: model FLOPs ({", ".join(f"{flops_token[n] / 1e6:.1f} M/token at {n}" for n in args.lengths)}; '
           'causal attention counted over the pairs the mask leaves) over this machine\'s '
           f'measured f32 matmul peak, {peak / 1e9:.1f} GFLOP/s (utils.measured_matmul_peak, '
           'the console\'s denominator). Launch to first step: cold with an empty '
           'compilation cache, warm with the one the cold launch filled (one of each per '
           f'side and round).\n\n{versions(maxtext)}\n\n'
           'Peak memory is the job\'s: "peak RSS at once" (the column the comparison reads) '
           'is the largest sampled sum of the processes\' RSS (ours: trainer and input process) '
           'or, if higher, the launched process\'s own exact peak plus the most the others held '
           'while it trained. "Summed peaks" adds each process\'s own peak (an upper bound: the '
           'input process peaks at its start, the trainer during the steps); peak PSS is the '
           'largest sampled sum of their proportional set sizes (shared pages counted once).\n\n'
           '| tokens/step | side | tokens/s | MFU | CPU s/step | peak RSS, summed peaks (GiB) | '
           'peak RSS at once (GiB) | peak PSS (GiB) | launch to first step, cold (s) | warm (s) '
           '|\n|---|---|---|---|---|---|---|---|---|---|\n'
           + '\n'.join(rows) + '\n')
  print()
  print(table)
  if not args.no_append:
    from record_benchmark import append_section  # pylint: disable=g-import-not-at-top  (scripts/)
    cmd = 'python scripts/bench_vs_maxtext.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    append_section('bench_vs_maxtext', f'Command: `{cmd.strip()}`; medians of {args.rounds} '
                   f'rounds, {args.steps} steps a run, the first {args.skip} gaps left out.\n\n'
                   + table)


if __name__ == '__main__':
  main()
