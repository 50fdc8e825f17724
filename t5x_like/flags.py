"""The entry points' flags and `--help`, importing only the standard library.

`python -m train --help` (and infer's, eval's) is answered from here before jax,
gin or TensorFlow is imported, so it takes a fraction of a second. The help
ends with the shipped gin files: model files (what each one is, from its
first comment line) and run files with the macros each requires
(`MACRO = %gin.REQUIRED`).
"""

import argparse
import glob
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin')

ENTRIES = {
    'train': 'Train a model from gin files; --gin.KEY=value overrides a binding.',
    'infer': 'Generate from or score a checkpoint; --gin.KEY=value overrides a binding.',
    'eval': 'Evaluate checkpoints; --gin.KEY=value overrides a binding.',
}
_EXAMPLES = {
    'train': 'python -m train --gin_file=runs/pretrain_default.gin',
    'infer': 'python -m infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH="\'/tmp/run\'"',
    'eval': 'python -m eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH="\'/tmp/run\'"',
}
_REQUIRED = re.compile(r'^([A-Z][A-Z0-9_]*)\s*=\s*%gin\.REQUIRED', re.M)


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The flags every entry point takes (gin overrides are `--gin.KEY=value`)."""
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file (repeatable); shipped files by path relative to gin/')
  parser.add_argument('--gin_search_path', action='append', default=[],
                      help='another folder to look up gin files and includes in (repeatable)')
  parser.add_argument('--coordinator_address', default=None,
                      help='host:port of process 0 (multi-host; see jax.distributed.initialize)')
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--cpu_collectives', default='gloo',
                      help='CPU collectives for multi-process CPU runs')
  return parser


def _first_comment(text: str) -> str:
  for line in text.splitlines():
    if line.startswith('#'):
      return line.lstrip('#').strip()
  return ''


def shipped_paths(kind: str = 'models') -> List[str]:
  """Shipped gin files under gin/<kind>/ (model files exclude the shared common.gin)."""
  files = sorted(glob.glob(os.path.join(GIN_DIR, kind, '**', '*.gin'), recursive=True))
  return [f for f in files if not f.endswith('common.gin')]


def shipped(kind: str) -> List[Tuple[str, str, List[str]]]:
  """(path relative to gin/, first comment line, required macros) of gin/<kind>/**.gin."""
  out = []
  for path in shipped_paths(kind):
    with open(path) as f:
      text = f.read()
    out.append((os.path.relpath(path, GIN_DIR), _first_comment(text), _REQUIRED.findall(text)))
  return out


def epilog(entry: str) -> str:
  """The help's closing part: an example, the shipped run and model files."""
  lines = [f'example:\n  {_EXAMPLES[entry]}', '',
           'run files (gin/runs/; REQUIRED: macros to bind with --gin.NAME=value):']
  for path, about, required in shipped('runs'):
    req = f"  REQUIRED: {', '.join(required)}" if required else ''
    lines.append(f'  {path}{req}')
    if about:
      lines.append(f'      {_shorten(about)}')
  lines += ['', 'model files (gin/models/; give one with --gin_file beside a run file):']
  for path, about, _ in shipped('models'):
    about = re.sub(r'^Model:\s*', '', about)
    lines.append(f'  {path:<34} {_shorten(about, 60)}')
  return '\n'.join(lines)


def _shorten(text: str, width: int = 90) -> str:
  return text if len(text) <= width else text[:width - 3].rstrip() + '...'


def parser_for(entry: str, parser_cls=argparse.ArgumentParser) -> argparse.ArgumentParser:
  return add_flags(parser_cls(prog=f'python -m {entry}', description=ENTRIES[entry],
                              epilog=epilog(entry), allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter))


def wants_help(argv: Optional[Sequence[str]] = None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return any(a in ('-h', '--help') for a in argv)


def start(entry: str, module_name: str) -> None:
  """What `python -m train/infer/eval` does before anything heavy is imported: answers
  --help and exits (when run as the program), restarts the interpreter once with
  glibc's huge-page tunable (when run as the program), pauses Python's garbage
  collector for a training run's start-up (xla_env.pause_gc, when run as the program),
  sets the XLA options and the compilation cache (xla_env) and honours SIGTERM from
  here on (signals). All three modules import only the standard library."""
  from t5x_like import signals  # pylint: disable=g-import-not-at-top
  from t5x_like import xla_env  # pylint: disable=g-import-not-at-top
  if module_name == '__main__':
    if wants_help():
      parser_for(entry).print_help()
      sys.exit(0)
    xla_env.reexec_with_malloc_tunables()
    if entry == 'train':  # (train() turns it back on before it waits for the data's answer)
      xla_env.pause_gc()
  xla_env.apply()
  signals.install()
