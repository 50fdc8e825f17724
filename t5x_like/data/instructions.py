"""Supervised fine-tuning data: prompt/response pairs and chats from JSONL, rendered by a
chat template, and the embedded instruction set.

  register_sft_task(name, split_files, template, vocabulary)
      a seqio Task over JSONL files of {"inputs": ..., "targets": ...} pairs or chats
      {"messages": [{"role": ..., "content": ...}, ...]}; its features are `inputs`
      (the prompt) and `targets` (the response), so a decoder-only model reads the
      prompt as a prefix with loss weight 0 (seqio's PrefixLMFeatureConverter, packing
      included) and an encoder-decoder reads it in the encoder.
  ChatTemplate
      how a chat becomes a prompt and a response: text role markers, or one special
      token per role taken from the vocabulary's extra ids.
  stdlib_instructions()
      registers the embedded instruction set, built (once, then cached) from the
      standard library's sources.

Every record is read and checked when the task is registered, so a missing field,
an unknown role or a chat without an assistant turn is one line naming the file and
line before anything trains. A chat with several assistant turns gives one example
per assistant turn, each prompted by the conversation before it, so the loss covers
every assistant turn and nothing else.
"""

import ast
import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio
import tensorflow as tf

from t5x_like.data import corpus
from t5x_like.data import preprocessors as prep
from t5x_like.data import registry
from t5x_like.data import errors

ROLES = ('system', 'user', 'assistant', 'tool')


SftDataError = errors.SftDataError  # (defined apart, importable without TensorFlow)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How chats (and, when `wrap_pairs`, prompt/response pairs) are rendered.

  The prompt of an assistant turn is every earlier turn, each as
  marker(role) + content + `turn_end`, then marker('assistant'); the
  response is that turn's content (the feature adds EOS, so the model learns
  to stop).

  Attributes:
    roles: role -> its text marker. Roles must be among `ROLES`; a chat may
      use only the roles listed here.
    turn_end: text after each earlier turn's content.
    special_tokens: True: each role's marker is one token, an extra id of the
      vocabulary (after the UL2 mode tokens) in the order of `roles`, instead
      of its text.
    wrap_pairs: render {"inputs", "targets"} records as a user turn and an
      assistant turn too (False: the pair's text as it is).
  """
  roles: Mapping[str, str] = dataclasses.field(default_factory=lambda: {
      'system': 'System: ', 'user': 'User: ', 'assistant': 'Assistant: '})
  turn_end: str = '\n'
  special_tokens: bool = False
  wrap_pairs: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'roles', dict(self.roles))
    unknown = [r for r in self.roles if r not in ROLES]
    if unknown:
      raise SftDataError(f'ChatTemplate.roles names unknown role {unknown[0]!r}: roles are '
                         f'{", ".join(ROLES)}')
    for needed in ('user', 'assistant'):
      if needed not in self.roles:
        raise SftDataError(f'ChatTemplate.roles has no {needed!r} marker: add one, e.g. '
                           f"roles = {{'user': 'User: ', 'assistant': 'Assistant: '}}")

  def role_ids(self, vocabulary: seqio.Vocabulary) -> Dict[str, int]:
    """The special token of each role (`special_tokens`)."""
    extra = int(getattr(vocabulary, 'extra_ids', 0) or 0)
    first = len(prep.MODE_TOKENS)
    if extra < first + len(self.roles):
      raise SftDataError(
          f'ChatTemplate.special_tokens needs {len(self.roles)} extra ids after the '
          f'{first} mode tokens but the vocabulary has {extra}: use text markers '
          '(special_tokens = False) or a vocabulary with more extra_ids')
    base = vocabulary.vocab_size - extra + first
    return {role: base + i for i, role in enumerate(self.roles)}

  def marker(self, role: str, vocabulary: seqio.Vocabulary) -> List[int]:
    if self.special_tokens:
      return [self.role_ids(vocabulary)[role]]
    return list(vocabulary.encode(self.roles[role]))


PLAIN = None  # no template: pairs as they are; chats need one


def _encode(vocabulary, text: str) -> List[int]:
  return [int(i) for i in vocabulary.encode(text)]


def render(record: Mapping[str, Any], template: Optional[ChatTemplate],
           vocabulary: seqio.Vocabulary, where: str) -> List[Tuple[List[int], List[int]]]:
  """(prompt ids, response ids) of each example a record gives.

  Raises:
    SftDataError: one line naming `where` (file:line) and the fix.
  """
  if not isinstance(record, Mapping):
    raise SftDataError(f'{where}: a record must be a JSON object with "inputs" and "targets", '
                       'or "messages"')
  if 'messages' in record:
    if template is None:
      raise SftDataError(f'{where}: a chat record needs a ChatTemplate: set the task\'s '
                         'template (e.g. instructions.ChatTemplate())')
    messages = record['messages']
    if not isinstance(messages, list) or not messages:
      raise SftDataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
    prompt: List[int] = []
    out = []
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or not isinstance(m.get('content'), str) or 'role' not in m:
        raise SftDataError(f'{where}: message {i} must be {{"role": ..., "content": "text"}}')
      role = m['role']
      if role not in template.roles:
        raise SftDataError(f'{where}: message {i} has role {role!r}, which the chat template '
                           f'does not know (its roles: {", ".join(template.roles)}): add it to '
                           'ChatTemplate.roles or fix the data')
      content = _encode(vocabulary, m['content'])
      if role == 'assistant':
        out.append((prompt + template.marker('assistant', vocabulary), content))
      prompt = prompt + template.marker(role, vocabulary) + content + _encode(
          vocabulary, template.turn_end)
    if not out:
      raise SftDataError(f'{where}: the chat has no assistant turn to learn')
    return out
  missing = [k for k in ('inputs', 'targets') if not isinstance(record.get(k), str)]
  if missing:
    raise SftDataError(f'{where}: the record has no text {missing[0]!r} (keys: '
                       f'{", ".join(sorted(record)) or "none"}): give "inputs" and "targets", '
                       'or "messages"')
  if template is not None and template.wrap_pairs:
    return render({'messages': [{'role': 'user', 'content': record['inputs']},
                                {'role': 'assistant', 'content': record['targets']}]},
                  template, vocabulary, where)
  return [(_encode(vocabulary, record['inputs']), _encode(vocabulary, record['targets']))]


def read_jsonl(path: str) -> Iterator[Tuple[str, Any]]:
  """(file:line, record) of every non-blank line."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f'{path}:{n}'
      try:
        yield where, json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SftDataError(f'{where}: not JSON ({e.msg if hasattr(e, "msg") else e}): write one '
                           'JSON object per line') from None


SplitFiles = Mapping[str, Union[str, Sequence[str]]]


def _files(split_files: SplitFiles) -> Dict[str, List[str]]:
  out = {}
  for split, patterns in split_files.items():
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted(f for p in patterns for f in tf.io.gfile.glob(p))
    if not files:
      raise SftDataError(f'no file matches {patterns} for split {split!r}: check the path')
    out[split] = files
  return out


def _examples(files: Sequence[str], template, vocabulary) -> List[Tuple[List[int], List[int]]]:
  out = []
  for path in files:
    for where, record in read_jsonl(path):
      out.extend(render(record, template, vocabulary, where))
  return out


def _source(examples: Mapping[str, List[Tuple[List[int], List[int]]]],
            vocabulary: seqio.Vocabulary) -> seqio.DataSource:
  """The rendered examples of each split, in file order (the Task shuffles them), with
  their text as `*_pretokenized` (what seqio's evaluator hands metric functions)."""

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed
    rows = examples[split]
    return tf.data.Dataset.from_generator(
        lambda: ({'inputs': np.asarray(p, np.int32), 'targets': np.asarray(r, np.int32),
                  'inputs_pretokenized': vocabulary.decode(p),
                  'targets_pretokenized': vocabulary.decode(r)} for p, r in rows),
        output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                          'targets': tf.TensorSpec([None], tf.int32),
                          'inputs_pretokenized': tf.TensorSpec([], tf.string),
                          'targets_pretokenized': tf.TensorSpec([], tf.string)})

  return seqio.FunctionDataSource(
      dataset_fn, splits=list(examples),
      num_input_examples={s: len(v) for s, v in examples.items()})


def keep_prompt_end(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features=None) -> tf.data.Dataset:
  """Cuts a prompt longer than `sequence_length['inputs']` from the left: the end of a
  prompt (the question, the assistant marker) is what the response follows."""
  del output_features
  length = (sequence_length or {}).get('inputs')
  if not length:
    return dataset
  return dataset.map(lambda ex: {**ex, 'inputs': ex['inputs'][-length:]},
                     num_parallel_calls=tf.data.AUTOTUNE)


def register_sft_task(name: str, split_files: SplitFiles,
                      template: Optional[ChatTemplate] = PLAIN,
                      vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY,
                      metric_fns: Sequence = ()) -> str:
  """Registers a fine-tuning task over JSONL files; returns its name (for gin).

  Args:
    name: the task name.
    split_files: split -> a file pattern or patterns, e.g. {'train':
      'sft/train-*.jsonl', 'validation': 'sft/dev.jsonl'}.
    template: how chats (and, with `wrap_pairs`, pairs) are rendered; None:
      pairs as they are (chat records are then an error).
    vocabulary: the tokenizer.
    metric_fns: seqio metric functions (targets, predictions) that `python -m eval`
      computes on greedy predictions.
  """
  if template is not None and not isinstance(template, ChatTemplate):
    raise SftDataError(f'template={template!r} must be an instructions.ChatTemplate or None')
  files = _files(split_files)
  if template is not None and template.special_tokens:
    template.role_ids(vocabulary)  # fails now if the vocabulary has no room
  examples = {split: _examples(fs, template, vocabulary) for split, fs in files.items()}
  for split, rows in examples.items():
    if not rows:
      raise SftDataError(f'split {split!r} of {name} has no examples ({files[split][0]} ...)')
  registry.register_seqio_task(name, _source(examples, vocabulary), [
      keep_prompt_end, seqio.preprocessors.append_eos_after_trim,
  ], {'inputs': seqio.Feature(vocabulary, add_eos=False),
      'targets': seqio.Feature(vocabulary, add_eos=True)}, metric_fns=metric_fns)
  return name


# --- the embedded instruction set --------------------------------------------------
_VERSION = 1
VALIDATION_PERCENT = 5
KINDS = ('docstring', 'signature', 'module')


def _module_name(path: str, root: str) -> Optional[str]:
  parts = os.path.relpath(path, root)[:-len('.py')].split(os.sep)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  if not parts or any(p.startswith('_') for p in parts):
    return None
  return '.'.join(parts)


def _summary(doc: str) -> Optional[str]:
  first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ''
  if 12 <= len(first) <= 90 and first.isascii():
    return first
  return None


def _signature(node: ast.FunctionDef) -> Optional[str]:
  args = ast.unparse(node.args)
  sig = f'{node.name}({args})'
  return sig if len(sig) <= 80 and sig.isascii() else None


def instruction_records() -> Iterator[Dict[str, str]]:
  """The embedded set's records in a fixed order: {'inputs', 'targets', 'kind', 'split'}.

  From the public top-level functions of the public standard-library modules
  that have a one-line summary: three kinds of instruction,
    docstring: the summary line of a function given its module and signature;
    signature: the signature of a module's function given its summary line;
    module:    which module defines a function (names defined in one module only).
  An instruction goes to `validation` when a hash of its prompt falls in the
  lowest VALIDATION_PERCENT (the same split on every machine with this Python).
  """
  root = sysconfig.get_paths()['stdlib']
  functions = []  # (module, name, signature, summary)
  for path in corpus._stdlib_files():  # pylint: disable=protected-access
    module = _module_name(path, root)
    if module is None:
      continue
    try:
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
      continue
    for node in tree.body:
      if isinstance(node, ast.FunctionDef) and not node.name.startswith('_'):
        summary, sig = _summary(ast.get_docstring(node) or ''), _signature(node)
        if summary and sig:
          functions.append((module, node.name, sig, summary))
  defined_in: Dict[str, set] = {}
  for module, name, _, _ in functions:
    defined_in.setdefault(name, set()).add(module)
  seen = set()
  for module, name, sig, summary in functions:
    items = [('docstring', f'Write the summary line of the docstring of {module}.{sig}', summary),
             ('signature', f'Give the signature of the {module} function described as: '
                           f'{summary}', sig)]
    if len(defined_in[name]) == 1:
      items.append(('module', f'Which standard-library module defines the function {name}?',
                    module))
    for kind, prompt, answer in items:
      if prompt in seen:
        continue
      seen.add(prompt)
      h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100
      yield {'inputs': prompt + '\n', 'targets': answer, 'kind': kind,
             'split': 'validation' if h < VALIDATION_PERCENT else 'train'}


def cache_dir(name: str, version: int) -> str:
  """Where an embedded set built from this interpreter's standard library is cached."""
  ver = '.'.join(map(str, sys.version_info[:3]))
  return os.path.join(corpus.cache_root(), f'{name}-v{version}-py{ver}')


def build_split_files(root: str, records: Callable[[], Iterator[Dict[str, Any]]]
                      ) -> Dict[str, str]:
  """Writes `records()` (each naming its 'split') once as root/{split}.jsonl, through a
  temporary folder renamed into place (concurrent builders never see half a set);
  returns split -> path."""
  paths = {s: os.path.join(root, f'{s}.jsonl') for s in corpus.SPLITS}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  os.makedirs(os.path.dirname(root), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.building-', dir=os.path.dirname(root))
  try:
    files = {s: open(os.path.join(tmp, f'{s}.jsonl'), 'w') for s in corpus.SPLITS}
    for r in records():
      files[r['split']].write(json.dumps(r) + '\n')
    for f in files.values():
      f.close()
    try:
      os.rename(tmp, root)
    except OSError:  # another process finished first; its files are identical
      pass
  finally:
    if os.path.isdir(tmp):
      for f in glob.glob(os.path.join(tmp, '*')):
        os.remove(f)
      os.rmdir(tmp)
  return paths


def build_instructions(root: Optional[str] = None) -> Dict[str, str]:
  """Writes the embedded set (once) as {split}.jsonl; returns split -> path."""
  return build_split_files(root or cache_dir('instructions', _VERSION), instruction_records)


STDLIB_INSTRUCTIONS = 'stdlib_instructions'


def answer_format(text: str) -> str:
  """The shape of an answer: 'module' (a dotted lowercase name), 'signature'
  (`name(...)`), 'sentence' (one line of at least 8 characters) or 'other'."""
  t = text.strip()
  if not t or '\n' in t:
    return 'other'
  if re.fullmatch(r'[A-Za-z_]\w*\(.*\)', t):
    return 'signature'
  if re.fullmatch(r'[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*', t):
    return 'module'
  return 'sentence' if len(t) >= 8 else 'other'


def instruction_metrics(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  """seqio metric_fn of the instruction set: `exact_match` (surrounding space ignored) and
  `format_match`, the share of answers shaped like their target (`answer_format`), in %."""
  n = max(len(targets), 1)
  exact = sum(p.strip() == t.strip() for t, p in zip(targets, predictions))
  shaped = sum(answer_format(p) == answer_format(t) for t, p in zip(targets, predictions))
  return {'exact_match': 100.0 * exact / n, 'format_match': 100.0 * shaped / n}


def register_stdlib_instructions(vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY,
                                 name: str = STDLIB_INSTRUCTIONS,
                                 template: Optional[ChatTemplate] = None) -> str:
  """Registers the embedded instruction set (built on first use); returns its name."""
  paths = build_instructions()
  return register_sft_task(name, paths, template, vocabulary, metric_fns=[instruction_metrics])


registry.register_lazy(STDLIB_INSTRUCTIONS, register_stdlib_instructions)


def stdlib_instructions(vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY,
                        name: str = STDLIB_INSTRUCTIONS,
                        template: Optional[ChatTemplate] = None) -> str:
  """For gin: `MIXTURE_OR_TASK_NAME = @instructions.stdlib_instructions()`."""
  return register_stdlib_instructions(vocabulary, name, template)


def sft_task(name: str, split_files: SplitFiles, template: Optional[ChatTemplate] = PLAIN,
             vocabulary: seqio.Vocabulary = registry.DEFAULT_VOCABULARY) -> str:
  """For gin: `MIXTURE_OR_TASK_NAME = @instructions.sft_task()` with its files bound."""
  return register_sft_task(name, split_files, template, vocabulary)
