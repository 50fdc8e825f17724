"""Corpus, preprocessors, the resumable input pipeline and the package's import graph."""

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf

from models import model as model_lib
from t5x_like.data import corpus
from t5x_like.data import pipeline
from t5x_like.data import preprocessors as prep
from t5x_like.data import tasks

import testing_utils as tu

VOCAB = tasks.DEFAULT_VOCABULARY
FEATURES = {'inputs': seqio.Feature(VOCAB), 'targets': seqio.Feature(VOCAB)}


def _docs(n=200, seed=0):
  r = np.random.RandomState(seed)
  docs = [r.randint(3, 259, size=r.randint(1, 700)).astype(np.int32) for _ in range(n)]
  ds = tf.data.Dataset.from_generator(lambda: ({'targets': d} for d in docs),
                                      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  return docs, ds


def test_split_tokens_round_trip():
  docs, ds = _docs()
  pieces = [ex['targets'] for ex in prep.split_tokens(ds, 64).as_numpy_iterator()]
  assert max(len(p) for p in pieces) == 64
  np.testing.assert_array_equal(np.concatenate(pieces), np.concatenate(docs))


def test_prefix_lm_splits_within_lengths():
  docs, ds = _docs(n=50)
  with seqio.utils.map_seed_manager(0):
    out = list(prep.prefix_lm(ds, {'inputs': 20, 'targets': 30}).as_numpy_iterator())
  for ex in out:
    assert 1 <= len(ex['inputs']) <= 20 and 1 <= len(ex['targets']) <= 29
  joined = np.concatenate([np.concatenate([e['inputs'], e['targets']]) for e in out])
  # Every token of every multi-token chunk appears, in order.
  assert len(joined) <= sum(len(d) for d in docs)


def test_corpus_split_is_deterministic_and_disjoint():
  manifest = corpus.build()
  for domain in corpus.DOMAINS:
    assert manifest[domain]['train']['documents'] > manifest[domain]['validation']['documents'] > 0
  assert corpus.split_of('code:os.py') == corpus.split_of('code:os.py')
  train = set(tf.data.TFRecordDataset(corpus.record_path('prose', 'train')).as_numpy_iterator())
  val = set(tf.data.TFRecordDataset(corpus.record_path('prose', 'validation')).as_numpy_iterator())
  assert not train & val


def _model():
  return model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384))


def _config(**kw):
  return pipeline.DatasetConfig('stdlib_lm', {'targets': 32}, **{'batch_size': 4, 'seed': 7, **kw})


def test_same_seed_same_batches_and_exact_resume():
  model = _model()
  a = pipeline.InputIterator(_config(), model)
  first = [next(a) for _ in range(5)]
  b = pipeline.InputIterator(_config(), model)
  assert [pipeline.batch_hash(x) for x in first] == [pipeline.batch_hash(next(b)) for _ in range(5)]
  resumed = pipeline.InputIterator(_config(), model)
  resumed.restore({**a.state(), 'batches_consumed': 3})
  assert pipeline.batch_hash(next(resumed)) == pipeline.batch_hash(first[3])
  other = pipeline.InputIterator(_config(seed=8), model)
  assert pipeline.batch_hash(next(other)) != pipeline.batch_hash(first[0])


def test_host_rows_partition_the_global_batch():
  model = _model()
  full = next(pipeline.InputIterator(_config(), model))
  halves = [next(pipeline.InputIterator(_config(), model, slice(i * 2, i * 2 + 2))) for i in range(2)]
  for k in full:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k])


def test_restore_into_another_pipeline_is_an_error():
  model = _model()
  it = pipeline.InputIterator(_config(), model)
  state = {**it.state(), 'seed': 1, 'batches_consumed': 2}
  with pytest.raises(pipeline.DataError, match='seed: checkpoint 1 vs now 7'):
    pipeline.InputIterator(_config(), model).restore(state)
  fresh = pipeline.InputIterator(_config(), model)
  fresh.restore(state, allow_changes=True)
  assert fresh.batches_consumed == 0


def test_bad_dataset_configs():
  model = _model()
  with pytest.raises(pipeline.DataError, match="unknown mixture or task 'stdlib_lmm': did you mean stdlib_lm"):
    pipeline.validate(pipeline.DatasetConfig('stdlib_lmm', {'targets': 32}), model)
  with pytest.raises(pipeline.DataError, match="needs a length for feature 'inputs'"):
    pipeline.validate(pipeline.DatasetConfig('stdlib_prefix_lm', {'targets': 32}), model)
  small = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=256))
  with pytest.raises(pipeline.DataError, match='359 ids but the model vocab_size is 256'):
    pipeline.validate(_config(), small)
  learned = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384, position_encoding='learned',
                                                       max_length=16))
  with pytest.raises(Exception, match='longer than DecoderConfig.max_length=16'):
    pipeline.validate(_config(), learned)


def test_sentencepiece_vocabulary_trained_on_the_corpus(tmp_path):
  path = str(tmp_path / 'sp.model')
  vocab = tasks.train_sentencepiece(path, vocab_size=1000, max_sentences=20_000)
  text = 'def main():\n    return os.path.join(a, b)  # ok'
  assert vocab.decode(vocab.encode(text)) == text
  assert vocab.vocab_size == 1000 + tasks.EXTRA_IDS
  name = tasks.sentencepiece_mixture(path, objective='span_corruption', prefix='sp_test')
  model = model_lib.EncoderDecoderModel(tu.tiny_encdec(vocab_size=1152))
  cfg = pipeline.DatasetConfig(name, {'inputs': 64, 'targets': 16}, batch_size=2)
  pipeline.validate(cfg, model)
  batch = next(pipeline.InputIterator(cfg, model))
  assert batch['encoder_input_tokens'].max() < vocab.vocab_size
  with pytest.raises(FileNotFoundError, match='train_sentencepiece.py'):
    tasks.sentencepiece_mixture(str(tmp_path / 'missing.model'))
  # the same .model as inference's vocabulary (runs/infer.gin's VOCABULARY)
  from t5x_like import vocabularies  # pylint: disable=g-import-not-at-top
  infer_vocab = vocabularies.model_vocabulary('sentencepiece', path, extra_ids=tasks.EXTRA_IDS)
  assert list(infer_vocab.encode(text)) == list(vocab.encode(text))
  assert infer_vocab.decode(infer_vocab.encode(text)) == text
  with pytest.raises(Exception, match='does not exist'):
    vocabularies.model_vocabulary('sentencepiece', str(tmp_path / 'missing.model'))


def _data_package_imports():
  """Module -> the t5x_like.data modules it imports anywhere (also inside functions)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(corpus.__file__)))  # t5x_like/
  modules = {}
  for folder, _, files in os.walk(os.path.join(root, 'data')):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, '.')
        modules[name.removesuffix('.__init__')] = path
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg.
        deps |= {f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
                 else node.module for a in node.names}
    graph[name] = sorted(deps & set(modules) - {name})
  return graph


def test_data_package_has_no_import_cycles():
  graph = _data_package_imports()
  assert 't5x_like.data.selection.features' in graph
  done, path = set(), []

  def visit(module):
    assert module not in path, 'import cycle: ' + ' -> '.join(path[path.index(module):] + [module])
    if module not in done:
      path.append(module)
      for dep in graph[module]:
        visit(dep)
      path.pop()
      done.add(module)

  for module in sorted(graph):
    visit(module)


def test_tensorflow_import_skips_keras_optional_extras():
  """Importing TensorFlow (tf_setup; TensorFlow imports keras) leaves IPython and
  matplotlib unimported, and both import as usual afterwards; one imported before
  (a notebook's IPython) is the same module after."""
  code = '\n'.join([
      'import sys',
      'before = None',
      'if sys.argv[1] == "ipython_first":',
      '  import IPython; before = IPython',
      'import t5x_like.data.tf_setup, keras',
      'print(sorted(m for m in ("IPython", "matplotlib") if m in sys.modules))',
      'import IPython, matplotlib.pyplot',
      'assert before is None or IPython is before',
      'print("ok")'])
  for mode, expected in (('plain', '[]'), ('ipython_first', "['IPython']")):
    out = subprocess.run([sys.executable, '-c', code, mode], cwd=tu.ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines() == [expected, 'ok'], out.stdout


_AUTOGRAPH_CASES = r'''
import hashlib
import numpy as np
import testing_utils as tu
from models import model as model_lib, preference
from t5x_like.data import pipeline
dec = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384))
encdec = model_lib.EncoderDecoderModel(tu.tiny_encdec(vocab_size=384))
cases = [('stdlib_lm', dec, {'targets': 64}, True), ('stdlib_lm', dec, {'targets': 64}, False),
         ('stdlib_prefix_lm', dec, {'inputs': 32, 'targets': 32}, True),
         ('stdlib_span_corruption', encdec, {'inputs': 64, 'targets': 16}, True),
         ('stdlib_instructions', dec, {'inputs': 32, 'targets': 32}, True),
         ('stdlib_preferences', preference.DpoModel(dec),
          {'inputs': 32, 'chosen': 32, 'rejected': 32}, False)]
out = {}
for name, model, lengths, pack in cases:
  it = pipeline.InputIterator(pipeline.DatasetConfig(name, lengths, batch_size=2, seed=3,
                                                     pack=pack), model)
  h = hashlib.sha256()
  for _ in range(2):
    batch = next(it)
    for k in sorted(batch):
      h.update(k.encode()); h.update(np.ascontiguousarray(batch[k]).tobytes())
  out[f'{name} {pack}'] = h.hexdigest()
from tensorflow.python.autograph.core import config
skipping = [r._prefix for r in config.CONVERSION_RULES if r._prefix.startswith('seqio')]
'''


def test_autograph_skip_changes_no_batch():
  """The seqio modules traced without AutoGraph (tf_setup.AUTOGRAPH_SKIPPED, as in this
  process) give the same batches as a process that converts everything, for every feature
  converter and kind of task shipped: decoder (packed and not), prefix LM, encoder-decoder
  (span corruption), instructions, preference pairs. (UL2's denoisers use the same seqio
  functions as span corruption.)"""
  from t5x_like.data import tf_setup  # pylint: disable=g-import-not-at-top
  assert os.environ.get('T5X_LIKE_AUTOGRAPH_ALL') != '1' and tf_setup.AUTOGRAPH_SKIPPED
  tests = os.path.join(tu.ROOT, 'tests')
  here = {}
  exec(_AUTOGRAPH_CASES, here)  # pylint: disable=exec-used
  code = ('import json, os, sys\n' f'sys.path.insert(0, {tests!r})\n' + _AUTOGRAPH_CASES +
          'print(json.dumps({"out": out, "skipping": skipping}), flush=True)\n'
          'os._exit(0)  # (TF generator datasets can hang the interpreter at exit)\n')
  env = {**os.environ, 'T5X_LIKE_AUTOGRAPH_ALL': '1'}
  out = subprocess.run([sys.executable, '-c', code], cwd=tu.ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  converted = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(here['out']) == 6 and here['out'] == converted['out']
  assert here['skipping'] == list(tf_setup.AUTOGRAPH_SKIPPED) and converted['skipping'] == []
