"""Gin parsing for the entry points, with one-line errors that suggest a fix."""

import difflib
import importlib
import inspect
import logging
import os
import re
import tokenize
from typing import Any, Dict, List, Optional, Sequence

import gin

from t5x_like import flags

GIN_DIR = flags.GIN_DIR


class GinError(ValueError):
  """A gin file or binding that does not fit the code."""


def _imports(paths: Sequence[str], bindings: Sequence[str]) -> Dict[str, str]:
  """alias -> module, from the `from X import Y [as Z]` lines of the gin files."""
  aliases = {}
  texts = list(bindings)
  try:
    texts += list(_gin_texts(paths).values())
  except GinError:
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


def _suggest_selector(selector: str, aliases: Dict[str, str]) -> str:
  """'; did you mean X?' for a misspelled configurable or module in a selector."""
  head, *rest = selector.split('.')
  try:
    importlib.import_module(aliases.get(head, head))
  except Exception:  # pylint: disable=broad-except  (the module part is the typo)
    close = difflib.get_close_matches(head, sorted(aliases), n=1)
    return f'; did you mean {".".join([close[0]] + rest)}?' if close else (
        f'; modules the gin files import: {", ".join(sorted(aliases))}' if aliases else '')
  obj, done = importlib.import_module(aliases.get(head, head)), [head]
  for part in rest:
    if not hasattr(obj, part):
      names = [n for n in dir(obj) if not n.startswith('_')]
      close = difflib.get_close_matches(part, names, n=1)
      return f'; did you mean {".".join(done + [close[0]])}?' if close else ''
    obj, done = getattr(obj, part), done + [part]
  return ''


def explain(error: Exception, paths: Sequence[str], bindings: Sequence[str],
            binding: Optional[str] = None) -> str:
  """Rewrites a gin exception as one line naming the problem and the fix.

  Args:
    error: what gin raised.
    paths: the gin files parsed.
    bindings: the bindings parsed.
    binding: the one binding being parsed when it was raised, if known.
  """
  msg = str(error)
  where = f' in the binding {binding.strip()!r}' if binding else _where(msg)
  aliases = _imports(paths, bindings)
  if isinstance(error, tokenize.TokenError) or re.search(
      r'Unable to parse value|Expected newline|[Mm]alformed|Unexpected|EOF in', msg):
    first = msg.strip().splitlines()[0] if msg.strip() else type(error).__name__
    if binding:
      key, _, value = binding.partition('=')
      if not value.strip():
        return f'the binding {binding.strip()!r} has no value: write --gin.{key.strip()}=VALUE'
      return (f'cannot parse the binding {binding.strip()!r} ({first}): quote strings '
              "(--gin.KEY=\"'text'\") and close brackets")
    return f'cannot parse gin{where}: {first}: fix the syntax there'
  m = re.search(r'Unable to open file: (\S+?)\.? Searched config paths', msg)
  if m:
    return (f'gin include {m.group(1)!r}{where} not found (searched the current directory, '
            f'{GIN_DIR} and the folders of the gin files given): fix the include, or add its '
            'folder with --gin_search_path')
  m = re.search(r"No configurable matching (?:reference )?'@?([\w.]+)(?:\(\))?'", msg)
  if m:
    selector = m.group(1)
    return (f'unknown gin configurable {selector}{where}{_suggest_selector(selector, aliases)}')
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


_INCLUDE = re.compile(r'''^\s*include\s+['"]([^'"]+)['"]''', re.M)
_MACRO_USE = re.compile(r'%([A-Za-z_][\w.]*)')


def _search_paths() -> List[str]:
  return list(gin.config._LOCATION_PREFIXES)  # pylint: disable=protected-access


def _read_gin_file(path: str) -> str:
  if os.path.isdir(path):
    raise GinError(f'gin file {path} is a directory: pass a .gin file')
  try:
    with open(path) as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise GinError(f'cannot read gin file {path} ({e.strerror if isinstance(e, OSError) else e}): '
                   'fix its permissions or pass another file') from None


def _resolve_include(name: str, including: str) -> Optional[str]:
  for prefix in [''] + _search_paths() + [os.path.dirname(including)]:
    candidate = os.path.join(prefix, name) if prefix else name
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return None


def _gin_texts(paths: Sequence[str]) -> Dict[str, str]:
  """path -> text of every gin file the given ones include, transitively.

  Raises:
    GinError: an include loop, or a file that cannot be read.
  """
  texts: Dict[str, str] = {}

  def visit(path: str, chain: List[str]) -> None:
    path = os.path.abspath(path)
    if path in chain:
      loop = ' -> '.join(os.path.basename(p) for p in chain[chain.index(path):] + [path])
      raise GinError(f'gin include loop: {loop}: remove one of these includes')
    if path in texts:
      return
    texts[path] = _read_gin_file(path)
    for name in _INCLUDE.findall(texts[path]):
      found = _resolve_include(name, path)
      if found is not None:  # a missing include is reported by gin itself
        visit(found, chain + [path])

  for p in paths:
    visit(p, [])
  return texts


def _macros_defined() -> List[str]:
  return [name for (name, kind) in gin.config._CONFIG  # pylint: disable=protected-access
          if kind == 'gin.macro']


def _binding_key(binding: str) -> str:
  return binding.split('=', 1)[0].strip()


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files (shipped ones by relative name too) and bindings.

  Besides gin's own checks: include loops and unreadable files are one line,
  and a binding of a macro that no parsed file defines or uses (a typo such as
  BATCH_SIZ, which gin would accept and ignore) is an error with a did-you-mean.

  Raises:
    GinError: with a one-line explanation.
  """
  paths = [find_gin_file(f) for f in gin_files]
  gin.add_config_file_search_path(GIN_DIR)
  for p in paths:
    gin.add_config_file_search_path(os.path.dirname(os.path.abspath(p)))
  texts = _gin_texts(paths)
  root = logging.getLogger()
  level = root.level
  # gin logs an error for every search path an include is not under; the real
  # failure, if any, is raised below.
  root.setLevel(logging.CRITICAL)
  try:
    try:
      gin.parse_config_files_and_bindings(paths, [], finalize_config=False)
    except (ValueError, AttributeError, ImportError, TypeError, SyntaxError, IOError,
            tokenize.TokenError) as e:
      raise GinError(explain(e, paths, bindings)) from None
    known = set(_macros_defined())
    used = set(_MACRO_USE.findall('\n'.join(list(texts.values()) + list(bindings))))
    for binding in bindings:
      key = _binding_key(binding)
      if key and '.' not in key and '/' not in key and key not in known | used:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6) or [
            m for m in sorted(known) if m.lower() == key.lower()]
        hint = f'did you mean {close[0]}?' if close else (
            f'macros these files define: {", ".join(sorted(known))}')
        raise GinError(f'unknown gin macro {key} in the binding {binding.strip()!r}: no gin file '
                       f'defines or uses it; {hint}')
      try:
        gin.parse_config(binding)
      except (ValueError, AttributeError, ImportError, TypeError, SyntaxError, IOError,
              tokenize.TokenError) as e:
        raise GinError(explain(e, paths, [binding], binding=binding)) from None
  finally:
    root.setLevel(level)
  defined = set(_macros_defined())
  for name in sorted(used):
    if not name.startswith('gin.') and name not in defined:
      close = difflib.get_close_matches(name, sorted(defined), n=1)
      raise GinError(f'gin macro {name} is used (%{name}) but never bound: ' +
                     (f'did you mean %{close[0]}? ' if close else '') +
                     f'or bind it with --gin.{name}=...')
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


shipped_files = flags.shipped_paths


def model_from_gin(gin_files: Sequence[str], bindings: Sequence[str] = ()):
  """Parses gin files afresh and builds the `MODEL` macro they define."""
  gin.clear_config()
  parse(gin_files, bindings)
  return gin.query_parameter('%MODEL').scoped_configurable_fn()


_ANY = object()


def bound_macro(selector_suffix: str, param: str, value: Any = _ANY) -> Optional[str]:
  """The macro the parsed gin config binds `<...selector_suffix>.param` to, if
  any, so a range error can name the setting the user wrote (e.g. TRAIN_STEPS).

  With `value`, only a macro that currently holds that value counts: a function
  called directly from Python after some gin file was parsed is not blamed on
  a macro of that older config.
  """
  config = gin.config._CONFIG  # pylint: disable=protected-access
  for (_, selector), values in config.items():
    if selector.endswith(selector_suffix) and param in values:
      text = str(values[param])
      if not text.startswith('%') or text.startswith('%gin.'):
        continue
      macro = text[1:]
      bound = config.get((macro, 'gin.macro'), {}).get('value', _ANY)
      if value is not _ANY and not isinstance(bound, gin.config.ConfigurableReference):
        try:
          if not bool(bound == value):
            continue
        except Exception:  # pylint: disable=broad-except  (values that do not compare)
          continue
      return macro
  return None


def setting(selector: str, param: str, value: Any = _ANY) -> str:
  """How a user sets `selector.param`: its macro if gin binds one (holding
  `value`, when given), else the binding."""
  return bound_macro(selector, param, value) or f'{selector}.{param}'
