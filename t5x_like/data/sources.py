"""Text sources for seqio Tasks: files, TFDS, ArrayRecord and the embedded corpus.

Each function returns a `seqio.DataSource` (a `TextSource`) whose examples are
{'text': tf.string}, so a Task's preprocessors (rekey targets<-text, tokenize,
...) apply unchanged. They are plain functions, so gin can build them:
`SOURCE = @sources.text_files()` (see docs/data_sources.md).
  text_files(split_patterns, unit)          one example per file, line or paragraph
  jsonl_files(split_patterns, text_key)     one example per JSON line
  tfds_dataset(name, data_dir, text_key)    a TFDS dataset already prepared on disk
  array_record_files(split_patterns, ...)   ArrayRecord records, read through grain
  embedded_corpus(domain)                   the stdlib corpus of `corpus.py`
`split_patterns` maps a split name to a glob pattern or a list of them; files are
read in sorted order per pattern, patterns in the order given.

Order and seeds. With `shuffle_files=False` a source yields its examples in
file order. With `shuffle_files=True` the order is a function of the seed seqio
passes (the pipeline's seed), and each epoch (each pass the pipeline repeats)
gets its own permutation, so a resumed run that replays N batches sees the same
stream. Text and JSONL files: the file order is permuted, then each file's
examples (a file is read whole when shuffling); ArrayRecord: grain's global
record shuffle; TFDS: TFDS's own shard shuffle (`shuffle_seed`), examples within
a shard keep their order. A seed of None shuffles differently every run.

Counting. Every source has `num_input_examples(split)` (seqio's API) and
`num_characters(split)` (Unicode code points, as `corpus.build()` counts them),
for mixing rates by examples or by characters. What needs a pass over the data
is computed on the first call and cached in memory. seqio's Task asks for
`num_input_examples` whenever it builds a dataset, so for line-, paragraph- and
JSONL-unit files that pass happens once before the first batch, and a malformed
line deep inside a file fails there, naming file:line, not hours into training.

Errors. Bad input raises `SourceError`, one line naming what and where, when the
source is built: a pattern with no file, an empty file or split, a TFDS dataset
that is not on disk (nothing is ever downloaded), a text_key the data lacks.
"""

import functools
import itertools
import json
import os
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio
import tensorflow as tf

from t5x_like.data import corpus
from t5x_like.data import errors

Patterns = Union[str, Sequence[str]]
SplitPatterns = Mapping[str, Patterns]
TEXT_UNITS = ('file', 'line', 'paragraph')
_OUTPUT_SIGNATURE = {'text': tf.TensorSpec((), tf.string)}
_CHUNK = 1 << 16


SourceError = errors.SourceError  # (defined apart, importable without TensorFlow)


class TextSource(seqio.FunctionDataSource):
  """A seqio source of {'text': tf.string} that can count examples and characters.

  Built by the functions of this module; not meant to be constructed directly.
  """

  def __init__(self, dataset_fn: Callable[..., tf.data.Dataset], splits: Sequence[str],
               count_fn: Callable[[str], Tuple[int, int]],
               num_examples_fn: Optional[Callable[[str], int]] = None, description: str = ''):
    """Initializes the source.

    Args:
      dataset_fn: `dataset_fn(split, shuffle_files, seed=None)`, as seqio expects.
      splits: the split names.
      count_fn: split -> (examples, characters), by a pass over the data.
      num_examples_fn: split -> examples, where that is cheaper than `count_fn`.
      description: what the source reads, for logs and errors.
    """
    super().__init__(dataset_fn, splits=splits)
    self._count_fn = count_fn
    self._num_examples_fn = num_examples_fn
    self._description = description
    self._examples: Dict[str, int] = {}
    self._counts: Dict[str, Tuple[int, int]] = {}

  def __repr__(self):
    return f'{type(self).__name__}({self._description})'

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise SourceError(f'{self._description} has no split {split!r} (it has {list(self.splits)})')

  def _count(self, split: str) -> Tuple[int, int]:
    self._check_split(split)
    if split not in self._counts:
      self._counts[split] = self._count_fn(split)
      self._examples[split] = self._counts[split][0]
    return self._counts[split]

  def num_input_examples(self, split: str) -> int:
    """The number of examples in `split` (before any preprocessing)."""
    self._check_split(split)
    if split not in self._examples:
      if self._num_examples_fn is not None:
        self._examples[split] = self._num_examples_fn(split)
      else:
        self._count(split)
    return self._examples[split]

  def num_characters(self, split: str) -> int:
    """The number of Unicode characters of the `text` of all examples in `split`."""
    return self._count(split)[1]


# --- shared helpers ---------------------------------------------------------------


def _resolve_seed(seed: Any) -> int:
  """seqio's seed (int, numpy int, eager tensor or None) as an int in [0, 2**32)."""
  if seed is None:
    # No seed: shuffle differently on every run, as tf.data's shuffle(seed=None) does.
    return int(np.random.SeedSequence().entropy % (1 << 32))
  if tf.is_tensor(seed):
    seed = seed.numpy()
  return int(seed) % (1 << 32)


def _generator_dataset(examples: Callable[[int], Iterator[Union[str, bytes]]]) -> tf.data.Dataset:
  """A dataset whose n-th pass yields {'text': t} for t in examples(n)."""
  next_epoch = itertools.count().__next__

  def gen():
    for text in examples(next_epoch()):
      yield {'text': text}

  return tf.data.Dataset.from_generator(gen, output_signature=_OUTPUT_SIGNATURE)


def _is_local(path: str) -> bool:
  return '://' not in path


def _split_files(split_patterns: SplitPatterns, kind: str) -> Dict[str, List[str]]:
  """split -> files matched by its patterns (sorted per pattern, without repeats)."""
  example = "{'train': '/data/train-*.txt', 'validation': '/data/valid.txt'}"
  if not isinstance(split_patterns, Mapping) or not split_patterns:
    raise SourceError(f'{kind}: split_patterns must map split names to file patterns, e.g. '
                      f'{example}; got {split_patterns!r}')
  out = {}
  for split, patterns in split_patterns.items():
    if isinstance(patterns, (str, os.PathLike)):
      patterns = [patterns]
    if not patterns:
      raise SourceError(f'{kind}: split {split!r} has no file pattern')
    files, seen = [], set()
    for pattern in patterns:
      pattern = os.fspath(pattern)
      matches = sorted(tf.io.gfile.glob(pattern))
      if _is_local(pattern):
        matches = [m for m in matches if not os.path.isdir(m)]
      if not matches:
        hint = ' (it is a folder: add /*)' if _is_local(pattern) and os.path.isdir(pattern) else ''
        raise SourceError(f'{kind}: pattern {pattern!r} of split {split!r} matches no file{hint}')
      files.extend(m for m in matches if m not in seen)
      seen.update(matches)
    out[split] = files
  return out


def _open(path: str):
  return open(path, 'rb') if _is_local(path) else tf.io.gfile.GFile(path, 'rb')


def _lines(path: str) -> Iterator[Tuple[int, bytes]]:
  """(1-based line number, line without its '\\n' or '\\r\\n') for each line."""
  with _open(path) as f:
    for number, line in enumerate(f, 1):
      if line.endswith(b'\n'):
        line = line[:-1]
        if line.endswith(b'\r'):
          line = line[:-1]
      yield number, line


def _decode(raw: bytes, where: Optional[str] = None) -> str:
  """`raw` as UTF-8 text; the SourceError names `where` (when given) and the bad byte."""
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    prefix = f'{where}: ' if where else ''
    raise SourceError(f'{prefix}not UTF-8 text ({e.reason} at byte {e.start})') from None


def _has_text(path: str) -> bool:
  """Whether the file holds anything but whitespace, reading only as far as needed."""
  with _open(path) as f:
    while True:
      chunk = f.read(_CHUNK)
      if not chunk:
        return False
      if chunk.strip():
        return True


# Per-file (examples, characters), shared by every source reading the same file the
# same way; keyed by size and mtime so a rewritten file is counted again.
_FILE_COUNTS: Dict[Tuple[str, int, int, str], Tuple[int, int]] = {}


def _file_counts(path: str, parse: Callable[[str], Iterator[Tuple[int, str]]],
                 parse_key: str) -> Tuple[int, int]:
  stat = tf.io.gfile.stat(path)
  key = (path, stat.length, stat.mtime_nsec, parse_key)
  if key not in _FILE_COUNTS:
    examples = characters = 0
    for _, text in parse(path):
      examples += 1
      characters += len(text)
    _FILE_COUNTS[key] = (examples, characters)
  return _FILE_COUNTS[key]


def _files_source(kind: str, split_files: Dict[str, List[str]],
                  parse: Callable[[str], Iterator[Tuple[int, str]]], parse_key: str,
                  what: str, has_example: Callable[[str], bool],
                  num_examples_fn: Optional[Callable[[str], int]] = None) -> TextSource:
  """A TextSource over files, each parsed into (location, text) examples by `parse`."""
  for split, files in split_files.items():
    for path in files:
      if not has_example(path):
        raise SourceError(f'{kind}: {path} (split {split!r}) is empty: it has no {what}')

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    files = split_files[split]
    run_seed = _resolve_seed(seed) if shuffle_files else None

    def examples(epoch: int) -> Iterator[str]:
      if not shuffle_files:
        for path in files:
          for _, text in parse(path):
            yield text
        return
      rng = np.random.default_rng([run_seed, epoch])
      for i in rng.permutation(len(files)):
        texts = [text for _, text in parse(files[i])]
        for j in rng.permutation(len(texts)):
          yield texts[j]

    return _generator_dataset(examples)

  def count_fn(split: str) -> Tuple[int, int]:
    totals = [_file_counts(path, parse, parse_key) for path in split_files[split]]
    examples, characters = (sum(t[i] for t in totals) for i in (0, 1))
    if not examples:
      raise SourceError(f'{kind}: split {split!r} has no {what}')
    return examples, characters

  summary = ', '.join(f'{s}: {len(f)} files' for s, f in split_files.items())
  return TextSource(dataset_fn, splits=list(split_files), count_fn=count_fn,
                    num_examples_fn=num_examples_fn, description=f'{kind}({summary})')


# --- plain text -------------------------------------------------------------------


def _parse_text(path: str, unit: str) -> Iterator[Tuple[int, str]]:
  """(line number where the example starts, text) for each example of a text file."""
  if unit == 'file':
    with _open(path) as f:
      data = f.read()
    if data.strip():
      yield 1, _decode(data, f'text_files: {path}')
    return
  paragraph, start = [], 0
  for number, line in _lines(path):
    if not line.strip():
      if paragraph:
        yield start, '\n'.join(paragraph)
        paragraph = []
      continue
    text = _decode(line, f'text_files: {path}:{number}')
    if unit == 'line':
      yield number, text
    else:
      start = start if paragraph else number
      paragraph.append(text)
  if paragraph:
    yield start, '\n'.join(paragraph)


def text_files(split_patterns: SplitPatterns, unit: str = 'file') -> TextSource:
  """Plain UTF-8 text files.

  Args:
    split_patterns: split -> glob pattern(s), e.g. {'train': '/data/train/*.txt'}.
    unit: 'file': one example per file, its whole text; 'line': one per line
      that is not blank (without its line break); 'paragraph': one per run of
      non-blank lines, joined by '\\n' (blank lines separate paragraphs).

  Returns:
    A TextSource of {'text': tf.string}.

  Raises:
    SourceError: an unknown unit, a pattern that matches no file, or a file
      without text.
  """
  if unit not in TEXT_UNITS:
    raise SourceError(f'text_files: unit {unit!r} is not one of {", ".join(TEXT_UNITS)}')
  split_files = _split_files(split_patterns, 'text_files')
  parse = functools.partial(_parse_text, unit=unit)
  if unit == 'file':
    has_example = _has_text
    num_examples_fn = lambda split: len(split_files[split])  # every file is one (checked)
  else:
    has_example = lambda path: next(parse(path), None) is not None
    num_examples_fn = None
  what = {'file': 'text', 'line': 'non-blank lines', 'paragraph': 'paragraphs'}[unit]
  return _files_source('text_files', split_files, parse, f'text:{unit}', what, has_example,
                       num_examples_fn)


# --- JSON lines -------------------------------------------------------------------


def _json_text(record: Any, text_key: str) -> str:
  """The `text_key` string of a parsed JSON record; SourceError(reason) if it has none."""
  if not isinstance(record, dict):
    raise SourceError(f'a JSON {type(record).__name__}, not an object with {text_key!r}')
  if text_key not in record:
    keys = ', '.join(map(repr, list(record)[:10])) or 'none'
    raise SourceError(f'no key {text_key!r} (keys: {keys}); set text_key')
  text = record[text_key]
  if not isinstance(text, str):
    raise SourceError(f'{text_key!r} is a JSON {type(text).__name__}, not a string')
  return text


def _json_record(raw: bytes, text_key: str) -> str:
  """The text of one JSON record; SourceError(reason) when it is not valid."""
  try:
    record = json.loads(raw)
  except UnicodeDecodeError as e:
    raise SourceError(f'not UTF-8 text ({e.reason} at byte {e.start})') from None
  except ValueError as e:
    raise SourceError(f'invalid JSON ({getattr(e, "msg", e)} at column '
                      f'{getattr(e, "colno", "?")})') from None
  return _json_text(record, text_key)


def _parse_jsonl(path: str, text_key: str) -> Iterator[Tuple[int, str]]:
  for number, line in _lines(path):
    if not line.strip():
      continue
    try:
      text = _json_record(line, text_key)
    except SourceError as e:
      raise SourceError(f'jsonl_files: {path}:{number}: {e}') from None
    yield number, text


def jsonl_files(split_patterns: SplitPatterns, text_key: str = 'text') -> TextSource:
  """JSON-lines files: one example per non-blank line, its `text_key` string.

  Args:
    split_patterns: split -> glob pattern(s), e.g. {'train': '/data/*.jsonl'}.
    text_key: the key of each JSON object that holds the text.

  Returns:
    A TextSource of {'text': tf.string}.

  Raises:
    SourceError: a pattern that matches no file, a file without records, or a
      first record without `text_key`. A malformed line later in a file raises
      when the source is counted or read, naming file:line.
  """
  if not isinstance(text_key, str) or not text_key:
    raise SourceError(f'jsonl_files: text_key must be a non-empty string, got {text_key!r}')
  split_files = _split_files(split_patterns, 'jsonl_files')
  parse = functools.partial(_parse_jsonl, text_key=text_key)
  return _files_source('jsonl_files', split_files, parse, f'jsonl:{text_key}', 'JSON lines',
                       lambda path: next(parse(path), None) is not None)


# --- TFDS -------------------------------------------------------------------------


def _utf8_characters(ds: tf.data.Dataset) -> int:
  """Sum of the UTF-8 character counts of `text` over a dataset of {'text': ...}."""
  lengths = ds.batch(1024).map(
      lambda ex: tf.reduce_sum(tf.cast(tf.strings.length(ex['text'], unit='UTF8_CHAR'), tf.int64)))
  return int(lengths.reduce(tf.constant(0, tf.int64), lambda a, b: a + b).numpy())


def tfds_dataset(name: str, data_dir: str, text_key: str = 'text',
                 splits: Optional[Union[Sequence[str], Mapping[str, str]]] = None) -> TextSource:
  """A TFDS dataset already prepared under `data_dir`; never downloads.

  Args:
    name: the TFDS name, e.g. 'wiki40b/en' or 'my_dataset:1.0.0'.
    data_dir: the TFDS data_dir that holds it (`<data_dir>/<name>/<version>`).
    text_key: the string feature that holds the text.
    splits: the splits to expose: None for all, a list of TFDS split names, or
      a mapping from our split names to TFDS split specs, e.g.
      {'train': 'train[:95%]', 'validation': 'train[95%:]'}.

  Returns:
    A TextSource of {'text': tf.string}.

  Raises:
    SourceError: the dataset is not on disk, a split is unknown or empty, or
      `text_key` is not a scalar string feature.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  not_there = (f'tfds_dataset: {name!r} is not prepared under data_dir {data_dir}: run '
               f'`tfds build {name.split(":")[0]} --data_dir={data_dir}` (or its '
               'download_and_prepare) where it can download; this source never downloads')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise SourceError(not_there) from None
  except Exception as e:  # pylint: disable=broad-except
    raise SourceError(f'tfds_dataset: {name!r} in {data_dir}: {str(e).splitlines()[0]}') from None
  if not builder.is_prepared():
    raise SourceError(not_there)

  features = builder.info.features
  feature = features[text_key] if text_key in features else None
  if feature is None or feature.dtype != tf.string or tuple(feature.shape) != ():
    strings = [k for k, f in features.items() if f.dtype == tf.string and tuple(f.shape) == ()]
    problem = 'has no feature' if feature is None else 'has no scalar string feature'
    raise SourceError(f'tfds_dataset: {name!r} {problem} {text_key!r} (string features: '
                      f'{", ".join(strings) or "none"}); set text_key')

  available = list(builder.info.splits)
  if splits is None:
    split_specs = {s: s for s in available}
  elif isinstance(splits, Mapping):
    split_specs = dict(splits)
  else:
    split_specs = {s: s for s in ([splits] if isinstance(splits, str) else splits)}
  if not split_specs:
    raise SourceError(f'tfds_dataset: {name!r}: no splits given')
  num_examples = {}
  for split, spec in split_specs.items():
    try:
      num_examples[split] = builder.info.splits[spec].num_examples
    except Exception as e:  # pylint: disable=broad-except
      raise SourceError(f'tfds_dataset: {name!r} has no split {spec!r} (splits: '
                        f'{", ".join(available)}): {str(e).splitlines()[0]}') from None
    if not num_examples[split]:
      raise SourceError(f'tfds_dataset: split {spec!r} of {name!r} in {data_dir} is empty')

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    read_config = tfds.ReadConfig(shuffle_seed=_resolve_seed(seed) if shuffle_files else None)
    ds = builder.as_dataset(split=split_specs[split], shuffle_files=shuffle_files,
                            read_config=read_config)
    return ds.map(lambda ex: {'text': ex[text_key]}, num_parallel_calls=tf.data.AUTOTUNE)

  def count_fn(split: str) -> Tuple[int, int]:
    return num_examples[split], _utf8_characters(dataset_fn(split, shuffle_files=False))

  summary = ', '.join(f'{s}: {n} examples' for s, n in num_examples.items())
  return TextSource(dataset_fn, splits=list(split_specs), count_fn=count_fn,
                    num_examples_fn=num_examples.__getitem__,
                    description=f'tfds_dataset({name!r}, {summary})')


# --- ArrayRecord through grain -----------------------------------------------------


def _record_text(record: bytes, text_key: Optional[str], record_format: str) -> str:
  """The text of one record: raw UTF-8, a JSON object or a tf.train.Example.

  Raises SourceError(reason); the caller adds where the record is.
  """
  if record_format == 'text':
    return _decode(record)
  if record_format == 'json':
    return _json_record(record, text_key)
  try:
    example = tf.train.Example.FromString(record)
  except Exception:  # pylint: disable=broad-except
    raise SourceError('not a serialized tf.train.Example') from None
  feature = example.features.feature
  if text_key not in feature or feature[text_key].WhichOneof('kind') != 'bytes_list':
    keys = ', '.join(map(repr, sorted(feature)[:10])) or 'none'
    raise SourceError(f'no bytes feature {text_key!r} (features: {keys}); set text_key')
  values = feature[text_key].bytes_list.value
  if len(values) != 1:
    raise SourceError(f'feature {text_key!r} has {len(values)} values, not 1')
  return _decode(values[0])


def _record_format(record: bytes, text_key: Optional[str]) -> str:
  """'text', 'json' or 'example', guessed from a first record."""
  if text_key is None:
    # Serialized protos are often valid UTF-8 too; don't read them as text.
    try:
      if tf.train.Example.FromString(record).features.feature:
        raise SourceError('a serialized tf.train.Example, not text')
    except SourceError:
      raise
    except Exception:  # pylint: disable=broad-except
      pass
    return 'text'
  if record.lstrip()[:1] == b'{':
    try:
      json.loads(record)
      return 'json'
    except ValueError:
      pass
  return 'example'


def array_record_files(split_patterns: SplitPatterns, text_key: Optional[str] = None,
                       read_threads: int = 4) -> TextSource:
  """ArrayRecord files, read through grain's ArrayRecordDataSource.

  Args:
    split_patterns: split -> glob pattern(s), e.g. {'train': '/data/train-*.array_record'}.
    text_key: None when each record is UTF-8 text; else the key of a JSON object
      record or the bytes feature of a serialized tf.train.Example record (the
      format is taken from the first record).
    read_threads: grain's reader threads; the order does not depend on them.

  Returns:
    A TextSource of {'text': tf.string}.

  Raises:
    SourceError: a pattern that matches no file, a file that is not ArrayRecord
      or has no records, or a first record without the text.
  """
  import grain  # pylint: disable=g-import-not-at-top
  split_files = _split_files(split_patterns, 'array_record_files')
  record_format = None
  sizes: Dict[str, List[int]] = {}
  for split, files in split_files.items():
    sizes[split] = []
    for path in files:
      try:
        records = grain.sources.ArrayRecordDataSource([path])
      except (RuntimeError, ValueError) as e:
        raise SourceError(f'array_record_files: {path} (split {split!r}) is not an ArrayRecord '
                          f'file: {str(e).splitlines()[0]}') from None
      if not len(records):  # pylint: disable=g-explicit-length-test
        raise SourceError(f'array_record_files: {path} (split {split!r}) is empty: '
                          'it has no records')
      try:
        if record_format is None:
          record_format = _record_format(records[0], text_key)
        _record_text(records[0], text_key, record_format)
      except SourceError as e:
        hint = ('; set text_key for JSON or tf.train.Example records' if text_key is None else '')
        raise SourceError(f'array_record_files: {path} record 0: {e}{hint}') from None
      sizes[split].append(len(records))
  sources = {split: grain.sources.ArrayRecordDataSource(files)
             for split, files in split_files.items()}

  def where(split: str, index: int) -> str:
    file_index = int(np.searchsorted(np.cumsum(sizes[split]), index, side='right'))
    position = index - sum(sizes[split][:file_index])
    return f'array_record_files: {split_files[split][file_index]} record {position}'

  def read(split: str, shuffle_files: bool, seed: Optional[int],
           epoch: int) -> Iterator[str]:
    records = sources[split]
    n = len(records)
    indices = grain.MapDataset.range(n)
    if shuffle_files:
      # grain's shuffle is global and lazy (no index in memory); repeated, it gives
      # each epoch its own permutation of the same seed, and we read epoch `epoch`.
      indices = indices.shuffle(seed=seed).repeat().slice(slice(epoch * n, (epoch + 1) * n))
    pairs = indices.map(lambda i: (i, records[i])).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=256))
    for index, record in pairs:
      try:
        yield _record_text(record, text_key, record_format)
      except SourceError as e:
        raise SourceError(f'{where(split, index)}: {e}') from None

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    run_seed = _resolve_seed(seed) if shuffle_files else None
    return _generator_dataset(functools.partial(read, split, shuffle_files, run_seed))

  def count_fn(split: str) -> Tuple[int, int]:
    characters = sum(len(text) for text in read(split, False, None, 0))
    return len(sources[split]), characters

  summary = ', '.join(f'{s}: {len(f)} files' for s, f in split_files.items())
  return TextSource(dataset_fn, splits=list(split_files), count_fn=count_fn,
                    num_examples_fn=lambda split: len(sources[split]),
                    description=f'array_record_files({summary})')


# --- the embedded corpus ----------------------------------------------------------


def corpus_stats(domain: str, split: str) -> Dict[str, int]:
  """{'documents': n, 'characters': n} of one domain and split of the embedded corpus."""
  manifest = corpus.build()
  if domain not in manifest or split not in manifest[domain]:
    raise SourceError(f'the embedded corpus has domains {list(corpus.DOMAINS)} and splits '
                      f'{list(corpus.SPLITS)}, not {domain!r}/{split!r}')
  return dict(manifest[domain][split])


def embedded_corpus(domain: str) -> TextSource:
  """The embedded stdlib corpus (`corpus.py`), with counts from its manifest.

  Reads what `tasks.corpus_source(domain)` reads, in the same order for a seed:
  whole documents, shuffled with the seed (a new permutation each epoch).
  """
  if domain not in corpus.DOMAINS:
    raise SourceError(f'the embedded corpus has domains {list(corpus.DOMAINS)}, not {domain!r}')

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    documents = corpus_stats(domain, split)['documents']
    ds = tf.data.TFRecordDataset(corpus.record_path(domain, split))
    if shuffle_files:
      ds = ds.shuffle(documents, seed=seed, reshuffle_each_iteration=True)
    return ds.map(lambda text: {'text': text}, num_parallel_calls=tf.data.AUTOTUNE)

  def count_fn(split: str) -> Tuple[int, int]:
    stats = corpus_stats(domain, split)
    return stats['documents'], stats['characters']

  return TextSource(dataset_fn, splits=corpus.SPLITS, count_fn=count_fn,
                    description=f'embedded_corpus({domain!r})')


# --- counting any source ----------------------------------------------------------

_COUNTS = weakref.WeakKeyDictionary()


def _counts(source: seqio.DataSource, split: str) -> Tuple[int, int]:
  """(examples, characters) of any source of {'text': ...}, by one pass; cached."""
  per_source = _COUNTS.setdefault(source, {})
  if split not in per_source:
    ds = source.get_dataset(split=split, shuffle=False)
    if 'text' not in ds.element_spec:
      raise SourceError(f'{source!r} has no text feature to count (it has {list(ds.element_spec)})')
    ds = ds.map(lambda ex: {'text': ex['text']})
    examples = int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())
    per_source[split] = (examples, _utf8_characters(ds))
  return per_source[split]


def num_examples(source: seqio.DataSource, split: str) -> int:
  """Examples in `split` of any source of {'text': ...}: as reported, else by one pass."""
  known = source.num_input_examples(split)
  return known if known is not None else _counts(source, split)[0]


def num_characters(source: seqio.DataSource, split: str) -> int:
  """Characters of the `text` in `split` of any source: as reported, else by one pass."""
  report = getattr(source, 'num_characters', None)
  return report(split) if callable(report) else _counts(source, split)[1]
