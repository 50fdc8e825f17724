"""The embedded default corpus: text that every Python installation has.

Two domains, built once and cached (nothing is downloaded):
  code:  the standard library's `.py` sources (tests and site-packages excluded);
  prose: its documentation text: each module's docstrings, gathered per module,
         and the `pydoc_data` help topics.
Each document goes to `validation` when a hash of its name falls in the lowest
2% and to `train` otherwise, so the split is the same on every run and host.
The cache holds one TFRecord file per domain and split plus a manifest; it is
written to a temporary folder and renamed into place, so concurrent builders
(several processes of one job) never see a half-written cache.
"""

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from typing import Dict, Iterator, List, Tuple

from t5x_like import xla_env

DOMAINS = ('code', 'prose')
SPLITS = ('train', 'validation')
VALIDATION_PERCENT = 2
_VERSION = 1  # bump when the build changes, so stale caches are not reused

_EXCLUDED_DIRS = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
                  '__pycache__', 'lib2to3'}


cache_root = xla_env.cache_root


def corpus_dir() -> str:
  """Where this interpreter's corpus is (or will be) cached."""
  ver = '.'.join(map(str, sys.version_info[:3]))
  return os.path.join(cache_root(), f'corpus-v{_VERSION}-py{ver}')


def _stdlib_files() -> List[str]:
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for name in sorted(filenames):
      if name.endswith('.py'):
        out.append(os.path.join(dirpath, name))
  return out


def _docstrings(source: str) -> str:
  """Module, class and function docstrings of one file, blank-line separated."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return ''
  parts = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc and len(doc) >= 40:
        parts.append(doc.strip())
  return '\n\n'.join(parts)


def iter_documents() -> Iterator[Tuple[str, str, str]]:
  """Yields (domain, name, text) in a fixed order."""
  root = sysconfig.get_paths()['stdlib']
  for path in _stdlib_files():
    try:
      with open(path, encoding='utf-8') as f:
        source = f.read()
    except (UnicodeDecodeError, OSError):
      continue
    name = os.path.relpath(path, root)
    if source.strip():
      yield 'code', name, source
    doc = _docstrings(source)
    if doc:
      yield 'prose', name, doc
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for key in sorted(topics.topics):
    text = topics.topics[key].strip()
    if text:
      yield 'prose', f'pydoc_data/{key}', text


def split_of(name: str) -> str:
  h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100
  return 'validation' if h < VALIDATION_PERCENT else 'train'


def record_path(domain: str, split: str, root: str = None) -> str:
  return os.path.join(root or corpus_dir(), f'{domain}-{split}.tfrecord')


def build(root: str = None) -> Dict[str, Dict[str, Dict[str, int]]]:
  """Builds the cache (if missing) and returns its manifest."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = root or corpus_dir()
  manifest_path = os.path.join(root, 'manifest.json')
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      return json.load(f)
  os.makedirs(os.path.dirname(root), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.building-', dir=os.path.dirname(root))
  try:
    writers = {(d, s): tf.io.TFRecordWriter(record_path(d, s, tmp))
               for d in DOMAINS for s in SPLITS}
    stats = {d: {s: {'documents': 0, 'characters': 0} for s in SPLITS} for d in DOMAINS}
    for domain, name, text in iter_documents():
      split = split_of(f'{domain}:{name}')
      writers[(domain, split)].write(text.encode('utf-8'))
      stats[domain][split]['documents'] += 1
      stats[domain][split]['characters'] += len(text)
    for w in writers.values():
      w.close()
    with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
      json.dump(stats, f, indent=1, sort_keys=True)
    try:
      os.rename(tmp, root)
    except OSError:  # another process finished first; its cache is identical
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  with open(manifest_path) as f:
    return json.load(f)
