"""Where every benchmark's results go: a dated section of docs/benchmarks.md naming the machine.

Light on purpose (jax alone): a benchmark run on a machine without the data stack
(tensorflow, seqio) can still record its table.
"""

import datetime
import os
import platform

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def append_section(script: str, body: str) -> str:
  """Appends `## <script>: <date> on <machine>` and `body` to docs/benchmarks.md
  (created with its header if missing); returns the file's path."""
  path = os.path.join(ROOT, 'docs', 'benchmarks.md')
  new = not os.path.exists(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    if new:
      f.write('# Benchmarks\n\nAppended by `scripts/bench_*.py`; newest last.\n')
    f.write(f'\n## {script}: {datetime.date.today()} on {machine()}\n\n{body}')
  return path


def _cpu_model() -> str:
  """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return f'{line.split(":", 1)[1].strip()} ({platform.machine()})'
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> str:
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return f'{_cpu_model()} CPU, {os.cpu_count()} cores'
  return f'{dev.device_kind} x{jax.device_count()}'
