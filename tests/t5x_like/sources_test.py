"""Text sources: files, JSONL, TFDS on disk, ArrayRecord through grain, the corpus."""

import functools
import json
import os
import string
import textwrap

import gin
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from t5x_like.data import corpus
from t5x_like.data import sources

tfds.disable_progress_bar()


def _paragraphs(module, n=3):
  """The first `n` blank-line-separated paragraphs of a stdlib module's docstring."""
  paragraphs = [p.strip('\n') for p in module.__doc__.split('\n\n') if p.strip()]
  return [p for p in paragraphs if all(line.strip() for line in p.split('\n'))][:n]


# Documents: stdlib text, plus one with a non-ASCII character so that characters
# and bytes differ.
PARAS_A = _paragraphs(os) + ['Ünïcode paragraph, two lines:\n  indented line']
PARAS_B = _paragraphs(json) + _paragraphs(textwrap)
DOCS = PARAS_A + PARAS_B


def _texts(source, split='train', shuffle=False, seed=None, epochs=1):
  ds = source.get_dataset(split=split, shuffle=shuffle, seed=seed).repeat(epochs)
  return [ex['text'].decode('utf-8') for ex in ds.as_numpy_iterator()]


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(sources.SourceError) as e:
    fn(*args, **kwargs)
  message = str(e.value)
  assert '\n' not in message, message
  return message


def _lines(paragraphs):
  return [line for p in paragraphs for line in p.split('\n')]


@pytest.fixture
def text_dir(tmp_path):
  # a.txt: '\n' endings, extra blank lines; b.txt: '\r\n' endings, no final newline.
  (tmp_path / 'a.txt').write_text('\n\n'.join(PARAS_A) + '\n\n\n', encoding='utf-8')
  (tmp_path / 'b.txt').write_bytes('\n\n'.join(PARAS_B).replace('\n', '\r\n').encode('utf-8'))
  (tmp_path / 'valid.txt').write_text(string.__doc__, encoding='utf-8')
  return tmp_path


@pytest.mark.parametrize('unit', sources.TEXT_UNITS)
def test_text_files_read_each_unit_exactly(text_dir, unit):
  src = sources.text_files({'train': str(text_dir / '[ab].txt'),
                            'validation': str(text_dir / 'valid.txt')}, unit=unit)
  b_text = (text_dir / 'b.txt').read_bytes().decode('utf-8')
  expected = {
      'file': [(text_dir / 'a.txt').read_text(encoding='utf-8'), b_text],
      'line': _lines(PARAS_A) + _lines(PARAS_B),
      'paragraph': PARAS_A + PARAS_B,
  }[unit]
  assert _texts(src) == expected
  assert src.splits == ('train', 'validation')
  assert src.num_input_examples('train') == len(expected)
  assert src.num_characters('train') == sum(len(t) for t in expected)
  assert src.num_characters('train') < sum(len(t.encode('utf-8')) for t in expected)
  assert src.num_input_examples('validation') == len(_texts(src, 'validation'))


def test_text_files_shuffle_is_a_function_of_the_seed(text_dir):
  src = sources.text_files({'train': [str(text_dir / 'b.txt'), str(text_dir / 'a.txt')]},
                           unit='line')
  in_order = _texts(src)
  assert in_order == _lines(PARAS_B) + _lines(PARAS_A)  # pattern order, then sorted
  first = _texts(src, shuffle=True, seed=7, epochs=2)
  assert first == _texts(src, shuffle=True, seed=7, epochs=2)
  epoch1, epoch2 = first[:len(in_order)], first[len(in_order):]
  assert sorted(epoch1) == sorted(epoch2) == sorted(in_order)
  assert len({tuple(in_order), tuple(epoch1), tuple(epoch2)}) == 3  # each epoch its own order
  assert _texts(src, shuffle=True, seed=8) != epoch1


def test_text_files_errors_are_one_line_at_construction(text_dir):
  (text_dir / 'empty.txt').write_text('')
  (text_dir / 'blank.txt').write_text('  \n\n\t\n')
  message = _one_line_error(sources.text_files, {'validation': str(text_dir / '*.md')})
  assert '*.md' in message and "'validation'" in message
  for name in ('empty.txt', 'blank.txt'):
    for unit in sources.TEXT_UNITS:
      message = _one_line_error(sources.text_files, {'train': str(text_dir / name)}, unit=unit)
      assert name in message and 'empty' in message
  assert 'sentence' in _one_line_error(sources.text_files, {'train': str(text_dir / 'a.txt')},
                                       unit='sentence')
  _one_line_error(sources.text_files, str(text_dir / 'a.txt'))  # not a split mapping
  src = sources.text_files({'train': str(text_dir / 'a.txt')})
  assert 'validation' in _one_line_error(src.num_input_examples, 'validation')


def test_jsonl_files(tmp_path):
  records = [{'body': p, 'id': i} for i, p in enumerate(DOCS)]
  lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(records)]
  (tmp_path / 'part-0.jsonl').write_text('\n'.join(lines[:3]) + '\n\n', encoding='utf-8')
  (tmp_path / 'part-1.jsonl').write_text('\n'.join(lines[3:]), encoding='utf-8')
  src = sources.jsonl_files({'train': str(tmp_path / '*.jsonl')}, text_key='body')
  assert _texts(src) == DOCS
  assert src.num_input_examples('train') == len(DOCS)
  assert src.num_characters('train') == sum(map(len, DOCS))
  shuffled = _texts(src, shuffle=True, seed=3)
  assert shuffled == _texts(src, shuffle=True, seed=3) and sorted(shuffled) == sorted(DOCS)

  message = _one_line_error(sources.jsonl_files, {'train': str(tmp_path / '*.jsonl')})
  assert 'part-0.jsonl:1' in message and "'text'" in message and "'body'" in message
  (tmp_path / 'empty.jsonl').write_text('\n\n')
  assert 'empty' in _one_line_error(sources.jsonl_files, {'train': str(tmp_path / 'empty.jsonl')})

  # A bad line after a good first one: found by the count seqio makes before reading.
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(lines[0] + '\n' + lines[1] + '\n{"body": "cut\n' + lines[2] + '\n')
  src = sources.jsonl_files({'train': str(bad)}, text_key='body')
  message = _one_line_error(src.num_input_examples, 'train')
  assert f'{bad}:3: invalid JSON' in message
  with pytest.raises(tf.errors.OpError, match='bad.jsonl:3'):
    _texts(src)
  bad.write_text(lines[0] + '\n{"body": 3}\n')
  src = sources.jsonl_files({'train': str(bad)}, text_key='body')
  assert 'bad.jsonl:2' in _one_line_error(src.num_characters, 'train')


# --- TFDS ---------------------------------------------------------------------------


class SourcesTestTinyText(tfds.core.GeneratorBasedBuilder):
  """A dataset made in the test: nothing to download."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'body': tfds.features.Text(), 'n': tf.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(DOCS[:-2]),
            'validation': self._generate_examples(DOCS[-2:])}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {'body': doc, 'n': i}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  builder = SourcesTestTinyText(data_dir=str(root / 'data'))
  # Several shards, so that shuffle_files has shards to shuffle.
  builder.download_and_prepare(download_dir=str(root / 'downloads'),
                               download_config=tfds.download.DownloadConfig(num_shards=2))
  return str(root / 'data')


def test_tfds_dataset_reads_the_prepared_dataset(tfds_dir):
  src = sources.tfds_dataset('sources_test_tiny_text', tfds_dir, text_key='body')
  assert set(src.splits) == {'train', 'validation'}
  train = _texts(src)
  assert sorted(train) == sorted(DOCS[:-2]) and _texts(src) == train
  assert sorted(_texts(src, 'validation')) == sorted(DOCS[-2:])
  assert src.num_input_examples('train') == len(DOCS) - 2
  assert src.num_characters('train') == sum(map(len, DOCS[:-2]))
  shuffled = _texts(src, shuffle=True, seed=5)
  assert shuffled == _texts(src, shuffle=True, seed=5) and sorted(shuffled) == sorted(train)

  halves = sources.tfds_dataset('sources_test_tiny_text:1.0.0', tfds_dir, text_key='body',
                                splits={'train': 'train[:50%]', 'validation': 'train[50%:]'})
  assert sorted(_texts(halves) + _texts(halves, 'validation')) == sorted(train)
  assert halves.num_input_examples('train') == len(_texts(halves))


def test_tfds_dataset_errors(tfds_dir, tmp_path):
  for name in ('sources_test_tiny_text', 'no_such_dataset_anywhere'):
    message = _one_line_error(sources.tfds_dataset, name, str(tmp_path))
    assert str(tmp_path) in message and 'download_and_prepare' in message
  message = _one_line_error(sources.tfds_dataset, 'sources_test_tiny_text', tfds_dir)
  assert "'text'" in message and 'body' in message  # the default key is absent
  assert 'body' in _one_line_error(sources.tfds_dataset, 'sources_test_tiny_text', tfds_dir,
                                   text_key='n')
  assert 'test' in _one_line_error(sources.tfds_dataset, 'sources_test_tiny_text', tfds_dir,
                                   text_key='body', splits=['test'])


def test_task_on_a_source_tokenizes_end_to_end(tfds_dir):
  name = 'sources_test_tfds_bytes_lm'
  vocab = seqio.ByteVocabulary()
  seqio.TaskRegistry.add(
      name, source=sources.tfds_dataset('sources_test_tiny_text', tfds_dir, text_key='body'),
      preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'}),
                     seqio.preprocessors.tokenize],
      output_features={'targets': seqio.Feature(vocab, add_eos=False)}, metric_fns=[])
  try:
    ds = seqio.get_mixture_or_task(name).get_dataset(
        sequence_length=None, split='validation', shuffle=False)
    got = [vocab.decode(ex['targets'].tolist()) for ex in ds.as_numpy_iterator()]
    assert sorted(got) == sorted(DOCS[-2:])
    # seqio passes its seed down to the source: the same seed, the same stream.
    shuffled = [[ex['targets'].tolist() for ex in seqio.get_mixture_or_task(name).get_dataset(
        sequence_length=None, split='train', shuffle=True, seed=9).as_numpy_iterator()]
                for _ in range(2)]
    assert shuffled[0] == shuffled[1] and len(shuffled[0]) == len(DOCS) - 2
  finally:
    seqio.TaskRegistry.remove(name)


# --- ArrayRecord --------------------------------------------------------------------


def _write_records(path, records):
  writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
  for r in records:
    writer.write(r)
  writer.close()


def test_array_record_files_text_records(tmp_path):
  lines = _lines(DOCS)
  _write_records(tmp_path / 'train-0.array_record', [s.encode() for s in lines[:10]])
  _write_records(tmp_path / 'train-1.array_record', [s.encode() for s in lines[10:]])
  src = sources.array_record_files({'train': str(tmp_path / 'train-*.array_record')})
  assert _texts(src) == lines
  assert src.num_input_examples('train') == len(lines)
  assert src.num_characters('train') == sum(map(len, lines))
  both = _texts(src, shuffle=True, seed=11, epochs=2)
  assert both == _texts(src, shuffle=True, seed=11, epochs=2)
  epoch1, epoch2 = both[:len(lines)], both[len(lines):]
  assert sorted(epoch1) == sorted(epoch2) == sorted(lines)
  assert len({tuple(lines), tuple(epoch1), tuple(epoch2)}) == 3
  assert _texts(src, shuffle=True, seed=12) != epoch1


def test_array_record_files_json_and_tf_example_records(tmp_path):
  _write_records(tmp_path / 'docs.json.array_record',
                 [json.dumps({'content': d}).encode() for d in DOCS])
  examples = [tf.train.Example(features=tf.train.Features(feature={
      'content': tf.train.Feature(bytes_list=tf.train.BytesList(value=[d.encode()])),
      'n': tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))})).SerializeToString()
              for i, d in enumerate(DOCS)]
  _write_records(tmp_path / 'docs.example.array_record', examples)
  for kind in ('json', 'example'):
    src = sources.array_record_files({'train': str(tmp_path / f'docs.{kind}.array_record')},
                                      text_key='content')
    assert _texts(src) == DOCS, kind
    assert src.num_characters('train') == sum(map(len, DOCS))
    message = _one_line_error(sources.array_record_files,
                              {'train': str(tmp_path / f'docs.{kind}.array_record')},
                              text_key='text')
    assert 'record 0' in message and "'text'" in message and "'content'" in message
  message = _one_line_error(sources.array_record_files,
                            {'train': str(tmp_path / 'docs.example.array_record')})
  assert 'set text_key' in message
  # A bad record after a good first one: named by file and position when counted.
  _write_records(tmp_path / 'bad.array_record',
                 [json.dumps({'content': d}).encode() for d in DOCS[:2]] + [b'{"content": '])
  src = sources.array_record_files({'train': str(tmp_path / 'bad.array_record')},
                                    text_key='content')
  assert 'bad.array_record record 2: invalid JSON' in _one_line_error(src.num_characters, 'train')


def test_array_record_files_errors(tmp_path):
  _write_records(tmp_path / 'empty.array_record', [])
  (tmp_path / 'not.array_record').write_text(os.__doc__)
  message = _one_line_error(sources.array_record_files, {'train': str(tmp_path / '*.ar')})
  assert '*.ar' in message and "'train'" in message
  assert 'empty' in _one_line_error(sources.array_record_files,
                                    {'train': str(tmp_path / 'empty.array_record')})
  assert 'not an ArrayRecord' in _one_line_error(
      sources.array_record_files, {'train': str(tmp_path / 'not.array_record')})


# --- the embedded corpus, counting any source, gin -----------------------------------


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
  """A two-document-per-split stand-in for the embedded corpus (no stdlib scan)."""
  manifest = {}
  for domain in corpus.DOMAINS:
    manifest[domain] = {}
    for i, split in enumerate(corpus.SPLITS):
      docs = DOCS[2 * i:2 * i + 2] if domain == 'prose' else PARAS_B[i:i + 1]
      with tf.io.TFRecordWriter(str(tmp_path / f'{domain}-{split}.tfrecord')) as w:
        for d in docs:
          w.write(d.encode())
      manifest[domain][split] = {'documents': len(docs), 'characters': sum(map(len, docs))}
  monkeypatch.setattr(corpus, 'build', lambda root=None: manifest)
  monkeypatch.setattr(corpus, 'record_path',
                      lambda domain, split, root=None: str(tmp_path / f'{domain}-{split}.tfrecord'))
  return manifest


def test_embedded_corpus_counts_come_from_the_manifest(tiny_corpus):
  assert sources.corpus_stats('prose', 'train') == tiny_corpus['prose']['train']
  src = sources.embedded_corpus('prose')
  assert _texts(src, 'validation') == DOCS[2:4]
  assert src.num_input_examples('validation') == 2
  assert src.num_characters('validation') == len(DOCS[2]) + len(DOCS[3])
  assert sorted(_texts(src, shuffle=True, seed=1)) == sorted(DOCS[:2])
  _one_line_error(sources.embedded_corpus, 'poetry')
  _one_line_error(sources.corpus_stats, 'prose', 'test')


def test_counting_any_source(text_dir):
  src = sources.text_files({'train': str(text_dir / 'a.txt')}, unit='paragraph')
  assert sources.num_examples(src, 'train') == len(PARAS_A)
  assert sources.num_characters(src, 'train') == sum(map(len, PARAS_A))
  # A plain seqio source of text, counted by one pass.
  plain = seqio.FunctionDataSource(
      lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({'text': PARAS_B}),
      splits=['train'])
  assert sources.num_examples(plain, 'train') == len(PARAS_B)
  assert sources.num_characters(plain, 'train') == sum(map(len, PARAS_B))


def test_sources_from_gin(text_dir, tmp_path):
  (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in DOCS))
  gin.clear_config()
  try:
    # Two sources in one config: scopes keep their bindings apart.
    gin.parse_config(f"""
        from __gin__ import dynamic_registration
        import seqio
        from t5x_like.data import sources

        prose/sources.text_files.split_patterns = {{'train': '{text_dir}/[ab].txt'}}
        prose/sources.text_files.unit = 'paragraph'
        sources.jsonl_files.split_patterns = {{'train': ['{tmp_path}/*.jsonl']}}
        PROSE = @prose/sources.text_files()
        seqio.Task.source = %PROSE
        TEXTS = @sources.jsonl_files()
    """)
    task = gin.get_configurable(seqio.Task)(name='sources_test_gin', preprocessors=[],
                                            output_features={})
    assert _texts(task.source) == DOCS
    assert _texts(gin.query_parameter('%TEXTS').scoped_configurable_fn()) == DOCS
  finally:
    gin.clear_config()
