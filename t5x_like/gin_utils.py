"""Gin parsing for the entry points, with one-line errors that suggest a fix."""

import difflib
import glob
import importlib
import inspect
import logging
import os
import re
from typing import Dict, List, Sequence

import gin

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin')


class GinError(ValueError):
  """A gin file or binding that does not fit the code."""


def _imports(paths: Sequence[str], bindings: Sequence[str]) -> Dict[str, str]:
  """alias -> module, from the `from X import Y [as Z]` lines of the gin files."""
  aliases = {}
  texts = list(bindings)
  for p in paths:
    try:
      with open(p) as f:
        texts.append(f.read())
    except OSError:
      pass
  pattern = re.compile(r'^\s*from\s+([\w.]+)\s+import\s+(\w+)(?:\s+as\s+(\w+))?', re.M)
  for text in texts:
    for pkg, name, alias in pattern.findall(text):
      if pkg != '__gin__':
        aliases[alias or name] = f'{pkg}.{name}'
    for mod, alias in re.findall(r'^\s*import\s+([\w.]+)(?:\s+as\s+(\w+))?', text, re.M):
      aliases[alias or mod] = mod
  return aliases


def _resolve(selector: str, aliases: Dict[str, str]):
  head, *rest = selector.split('.')
  obj = importlib.import_module(aliases.get(head, head))
  for part in rest:
    obj = getattr(obj, part)
  return obj


def _where(message: str) -> str:
  m = re.search(r'In (file "[^"]+", line \d+|bindings string, line \d+)', message)
  return f' ({m.group(1)})' if m else ''


def explain(error: Exception, paths: Sequence[str], bindings: Sequence[str]) -> str:
  """Rewrites a gin exception as one line naming the problem and the fix."""
  msg = str(error)
  where = _where(msg)
  aliases = _imports(paths, bindings)
  m = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", msg)
  if m:
    selector, param = m.groups()
    if not where and any(param in b for b in bindings):
      where = ' (in a --gin. override)'
    hint = ''
    try:
      params = list(inspect.signature(_resolve(selector, aliases)).parameters)
      close = difflib.get_close_matches(param, params, n=1)
      hint = f'; did you mean {selector}.{close[0]}?' if close else f'; valid: {", ".join(params)}'
    except Exception:  # pylint: disable=broad-except
      pass
    return f'unknown gin binding {selector}.{param}{where}{hint}'
  m = re.search(r"Couldn't resolve selector ([\w.]+); .* has no attribute (\w+)", msg)
  if m:
    selector, attr = m.groups()
    hint = ''
    try:
      owner = _resolve(selector.rsplit('.', 1)[0], aliases)
      close = difflib.get_close_matches(attr, [n for n in dir(owner) if not n.startswith('_')], n=1)
      if close:
        hint = f'; did you mean {selector.rsplit(".", 1)[0]}.{close[0]}?'
    except Exception:  # pylint: disable=broad-except
      pass
    return f'unknown gin name {selector}{where}{hint}'
  m = re.search(r'(\w+)/macro.value set to `%gin.REQUIRED`', msg)
  if m:
    return (f'required gin macro {m.group(1)} is not set: pass --gin.{m.group(1)}=... '
            'or bind it in a gin file')
  m = re.search(r"Required bindings for `(\w+)` not provided in config: \[(.*)\]", msg)
  if m:
    return f'{m.group(1)} needs gin bindings for {m.group(2)}: add them to a gin file or --gin.'
  first = msg.strip().splitlines()[0] if msg.strip() else type(error).__name__
  return f'gin error{where}: {first}'


def find_gin_file(path: str) -> str:
  """Resolves a gin file given as a path or relative to the shipped gin/ folder."""
  if os.path.exists(path):
    return path
  shipped = os.path.join(GIN_DIR, path)
  if os.path.exists(shipped):
    return shipped
  raise GinError(f'gin file {path!r} not found (looked in the current directory and {GIN_DIR})')


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files (shipped ones by relative name too) and bindings.

  Raises:
    GinError: with a one-line explanation.
  """
  paths = [find_gin_file(f) for f in gin_files]
  gin.add_config_file_search_path(GIN_DIR)
  for p in paths:
    gin.add_config_file_search_path(os.path.dirname(os.path.abspath(p)))
  root = logging.getLogger()
  level = root.level
  # gin logs an error for every search path an include is not under; the real
  # failure, if any, is raised below.
  root.setLevel(logging.CRITICAL)
  try:
    gin.parse_config_files_and_bindings(paths, list(bindings), finalize_config=False)
  except (ValueError, AttributeError, ImportError, TypeError, SyntaxError, IOError) as e:
    raise GinError(explain(e, paths, bindings)) from None
  finally:
    root.setLevel(level)
  missing = unset_required_macros()
  if missing:
    flags = ' '.join(f'--gin.{m}=...' for m in missing)
    raise GinError(f'required gin macro{"s" if len(missing) > 1 else ""} {", ".join(missing)} '
                   f'{"are" if len(missing) > 1 else "is"} not set: pass {flags} or bind '
                   f'{"them" if len(missing) > 1 else "it"} in a gin file')


def unset_required_macros() -> List[str]:
  """Macros still bound to %gin.REQUIRED (gin itself only notices when one is used)."""
  out = []
  for (name, kind), values in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if kind == 'gin.macro' and str(values.get('value')) == '%gin.REQUIRED':
      out.append(name)
  return out


def split_argv(argv: Sequence[str]) -> List[str]:
  """`--gin.KEY=value` flags -> gin binding strings."""
  out = []
  for a in argv:
    key, _, value = a[len('--gin.'):].partition('=')
    if not value and '=' not in a:
      raise GinError(f'{a}: write gin overrides as --gin.KEY=value')
    out.append(f'{key} = {value}')
  return out


def shipped_files(kind: str = 'models') -> List[str]:
  """Shipped gin files under gin/<kind>/ (model files exclude the shared common.gin)."""
  files = sorted(glob.glob(os.path.join(GIN_DIR, kind, '**', '*.gin'), recursive=True))
  return [f for f in files if not f.endswith('common.gin')]


def model_from_gin(gin_files: Sequence[str], bindings: Sequence[str] = ()):
  """Parses gin files afresh and builds the `MODEL` macro they define."""
  gin.clear_config()
  parse(gin_files, bindings)
  return gin.query_parameter('%MODEL').scoped_configurable_fn()
