"""Data selection: hashed n-gram features, the quality classifier, DSIR, the CLI.

Two clearly different domains, from this interpreter's standard library
(nothing is downloaded): prose (docstring paragraphs) and code (function
bodies with their docstrings removed, four lines at a time).
"""

import ast
import functools
import importlib
import inspect
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_like.data import selection as sel

import testing_utils as tu

_MODULES = ('argparse', 'textwrap', 'json.decoder', 'csv', 'logging', 'subprocess', 'inspect',
            'typing', 'collections', 'pathlib', 'email.message', 'http.client', 'calendar',
            'fractions', 'decimal', 'difflib', 'shutil', 'tarfile', 'zipfile', 'unittest.case',
            'dataclasses', 'functools')


@functools.lru_cache(maxsize=None)
def _corpus():
  """(prose, code): lists of one-line examples, each over 60 characters, in a fixed order."""
  prose, code = [], []
  for name in _MODULES:
    tree = ast.parse(inspect.getsource(importlib.import_module(name)))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
        for para in (ast.get_docstring(node) or '').split('\n\n'):
          para = ' '.join(para.split())
          if len(para) >= 60 and '>>>' not in para:
            prose.append(para)
      if isinstance(node, ast.FunctionDef):
        body = [s for s in node.body
                if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        lines = ast.unparse(body).splitlines() if body else []
        for i in range(0, len(lines), 4):
          chunk = ' '.join(line.strip() for line in lines[i:i + 4])
          if len(chunk) >= 60:
            code.append(chunk)
  # Spread each domain's modules over train/test slices.
  prose = [prose[i] for i in np.random.RandomState(0).permutation(len(prose))]
  code = [code[i] for i in np.random.RandomState(1).permutation(len(code))]
  return prose, code


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  prose, code = _corpus()
  clf = sel.train_quality_classifier(prose[:500], code[:500], steps=60, holdout_fraction=0.2)
  path = str(tmp_path_factory.mktemp('quality') / 'prose_vs_code.npz')
  clf.save(path)
  return clf, path


def _dataset(texts):
  return tf.data.Dataset.from_tensor_slices({'text': tf.constant(texts, tf.string),
                                             'id': tf.range(len(texts))})


# ----------------------------------------------------------------------------------------------
# Features.

_ODD_TEXTS = ['Hello, World!  x = f(a_b) + 1', '', 'one', 'Café déjà-vu: naïve ÜBER',
              'def f(x):\n    return x ** 2  # square', b'invalid \xff\xfe utf-8']


def test_graph_featurizer_equals_eager():
  texts = _ODD_TEXTS + _corpus()[0][:20] + _corpus()[1][:20]
  buckets, order = sel.DEFAULT_CLASSIFIER_BUCKETS, 3
  eager = sel.hash_ngrams(texts, buckets, order, batch_size=7)  # batches cross rows
  graph = _dataset(texts).map(lambda ex: sel.ngram_ids(ex['text'], buckets, order))
  for i, ids in enumerate(graph.as_numpy_iterator()):
    np.testing.assert_array_equal(ids, eager.row(i))
    assert ids.dtype == np.int64 and np.all((ids >= 0) & (ids < buckets))
  assert len(eager.row(0)) == 3 * 12 - 3  # 12 tokens: 12 unigrams, 11 bigrams, 10 trigrams


def test_features_are_stable_and_lowercased():
  f = sel.hash_ngrams(['Hello, world', 'HELLO ,WORLD', ''], 10_000, 2)
  # FarmHash values, fixed across processes and machines: a change here silently
  # invalidates every saved model.
  np.testing.assert_array_equal(f.row(0), [296, 3796, 1598, 8237, 5091])
  np.testing.assert_array_equal(f.row(1), f.row(0))
  assert len(f.row(2)) == 0 and len(f) == 3
  assert f.counts().sum() == 10 and f.counts([1]).sum() == 5
  np.testing.assert_allclose(f.row_sums(np.ones(10_000)), [5, 5, 0])


def test_ngram_distribution_is_smoothed():
  d = sel.fit_ngram_distribution(['a b c', 'a a'], num_buckets=16, ngram_order=1)
  assert d.shape == (16,) and np.all(d > 0) and abs(d.sum() - 1) < 1e-12
  # 5 unigrams + 16 pseudo-counts; 'a' occurs 3 times.
  a = sel.hash_ngrams(['a'], 16, 1).row(0)[0]
  assert abs(d[a] - 4 / 21) < 1e-12
  np.testing.assert_allclose(sel.fit_ngram_distribution([''], 8, 1), np.full(8, 1 / 8))


# ----------------------------------------------------------------------------------------------
# Quality classifier.


def test_classifier_separates_prose_from_code(classifier):
  clf, _ = classifier
  prose, code = _corpus()
  assert clf.metrics['holdout_accuracy'] > 0.9
  scores_prose, scores_code = clf.score(prose[600:900]), clf.score(code[600:900])
  accuracy = (np.sum(scores_prose >= 0.5) + np.sum(scores_code < 0.5)) / 600
  assert accuracy > 0.9, accuracy
  assert scores_prose.dtype == np.float32 and np.all((scores_prose >= 0) & (scores_prose <= 1))


def test_save_load_round_trip(classifier, tmp_path):
  clf, path = classifier
  loaded = sel.QualityClassifier.load(path)
  np.testing.assert_array_equal(loaded.weights, clf.weights)
  assert (loaded.bias, loaded.num_buckets, loaded.ngram_order) == (
      clf.bias, clf.num_buckets, clf.ngram_order)
  assert loaded.metrics == pytest.approx(clf.metrics)
  texts = _corpus()[0][900:950] + _corpus()[1][900:950]
  np.testing.assert_array_equal(loaded.score(texts), clf.score(texts))
  exact = str(tmp_path / 'model.bin')  # kept as named: np.savez alone would add .npz
  loaded.save(exact)
  assert os.listdir(tmp_path) == ['model.bin']


def test_quality_filter_keeps_exactly_scores_at_or_above_threshold(classifier):
  clf, path = classifier
  prose, code = _corpus()
  texts = prose[1000:1100] + code[1000:1100] + _ODD_TEXTS
  scores = clf.score(texts)
  # A threshold equal to one example's score: that example must be kept.
  for threshold in (0.5, float(np.sort(scores)[len(scores) // 2])):
    ds = sel.quality_filter(_dataset(texts), path, threshold=threshold)
    kept = [int(ex['id']) for ex in ds.as_numpy_iterator()]
    assert kept == np.flatnonzero(scores >= np.float32(threshold)).tolist()
    assert 0 < len(kept) < len(texts)


# ----------------------------------------------------------------------------------------------
# DSIR.


def _pool():
  """A pool of 300 prose + 300 code examples, and 400 other prose examples as the target."""
  prose, code = _corpus()
  return prose[:300] + code[:300], prose[300:700]


def test_dsir_selects_target_like_examples_and_reduces_kl():
  raw, target = _pool()
  result = sel.dsir_select(target, raw, k=150, seed=0)
  assert len(result.indices) == 150 and np.all(np.diff(result.indices) > 0)
  assert np.mean(result.indices < 300) > 0.9  # prose is first in the pool
  report = result.report
  assert report.reduction_vs_random > 0.05 and report.reduction_vs_raw > 0.05
  assert report.kl_selected < report.kl_random
  assert (report.num_raw, report.num_selected) == (600, 150)
  assert 'KL(target || random-k)' in report.table()
  # The same with the pieces, and the same seed gives the same selection.
  weights = sel.fit_importance_weights(target, raw)
  lw = sel.importance_log_weights(raw, weights.target_dist, weights.raw_dist)
  np.testing.assert_allclose(lw, result.log_weights)
  np.testing.assert_array_equal(sel.resample(lw, 150, seed=0), result.indices)
  assert not np.array_equal(sel.resample(lw, 150, seed=1), result.indices)
  again = sel.dsir_select(target, raw, k=150, seed=0)
  np.testing.assert_array_equal(again.indices, result.indices)


def test_gumbel_top_k_samples_in_proportion_to_weights():
  lw = np.array([0.0, np.log(3.0), -np.inf, np.log(4.0)])
  firsts = np.array([sel.resample(lw, 1, seed=s)[0] for s in range(4000)])
  np.testing.assert_allclose(np.bincount(firsts, minlength=4) / 4000, [0.125, 0.375, 0, 0.5],
                             atol=0.03)
  assert sorted(sel.resample(lw, 3, seed=0)) == [0, 1, 3]  # zero weight comes last


def test_importance_weights_round_trip_and_streaming_filter(tmp_path):
  raw, target = _pool()
  weights = sel.fit_importance_weights(target, raw)
  path = str(tmp_path / 'dsir.npz')
  weights.save(path)
  loaded = sel.ImportanceWeights.load(path)
  for name in ('target_dist', 'raw_dist', 'raw_log_weights'):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(weights, name))
  assert loaded.ngram_order == weights.ngram_order

  def kept(ds, **kwargs):
    ds = sel.importance_filter(ds, path, **kwargs)
    return sorted(int(ex['id']) for ex in ds.as_numpy_iterator())

  first = kept(_dataset(raw), keep_fraction=0.25, seed=3)
  assert kept(_dataset(raw), keep_fraction=0.25, seed=3) == first
  # Keyed on the text, not the position: order does not change the choice.
  assert kept(_dataset(raw).shuffle(600, seed=1), keep_fraction=0.25, seed=3) == first
  assert kept(_dataset(raw), keep_fraction=0.25, seed=4) != first
  assert 100 <= len(first) <= 200  # 150 expected
  assert np.mean(np.array(first) < 300) > 0.9
  everything = kept(_dataset(raw), log_cap=-np.inf)
  assert everything == list(range(600))


# ----------------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_fix(classifier, tmp_path):
  _, path = classifier
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(sel.SelectionError,
                     match='make it with python scripts/select_data.py train-classifier'):
    sel.quality_filter(_dataset(['x']), missing)
  with pytest.raises(sel.SelectionError, match='not found: make it with .* dsir .* --save_weights'):
    sel.importance_filter(_dataset(['x']), missing)
  with pytest.raises(sel.SelectionError, match='no positive examples.*non-empty --positive'):
    sel.train_quality_classifier([], ['bad'])
  with pytest.raises(sel.SelectionError, match='no negative examples'):
    sel.train_quality_classifier(['good'], [])
  for threshold in (-0.1, 1.5):
    with pytest.raises(sel.SelectionError, match=r'threshold=.* must be a probability in \[0, 1\]'):
      sel.quality_filter(_dataset(['x']), path, threshold=threshold)
  with pytest.raises(sel.SelectionError, match="reads the string feature 'text'.*set text_key"):
    sel.quality_filter(tf.data.Dataset.from_tensor_slices({'body': ['x']}), path)
  with pytest.raises(sel.SelectionError, match='cannot select k=5 of 3'):
    sel.resample(np.zeros(3), 5)
  with pytest.raises(sel.SelectionError, match="holds 'quality_classifier', not 'dsir"):
    sel.ImportanceWeights.load(path)
  with pytest.raises(sel.SelectionError, match='same num_buckets'):
    sel.importance_log_weights(['x'], np.full(4, 0.25), np.full(8, 0.125))
  with pytest.raises(sel.SelectionError, match='keep_fraction=0 must be in'):
    sel.ImportanceWeights(np.full(4, 0.25), np.full(4, 0.25), 1, np.zeros(3)).log_cap(0)


# ----------------------------------------------------------------------------------------------
# seqio and gin.


def test_register_filtered_task_from_gin(classifier):
  _, path = classifier
  prose, code = _corpus()
  texts = prose[950:980] + code[1200:1230]
  vocab = seqio.ByteVocabulary()
  source = seqio.FunctionDataSource(
      lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices({'text': texts}),
      splits=['train'])
  seqio.TaskRegistry.add(
      'selection_test_task', source=source, output_features={'targets': seqio.Feature(vocab)},
      preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'}),
                     seqio.preprocessors.tokenize], metric_fns=[])
  gin.clear_config()
  try:
    gin.parse_config(f"""
        from __gin__ import dynamic_registration
        from t5x_like.data import selection
        selection.register_filtered.mixture_or_task_name = 'selection_test_task'
        selection.register_filtered.filters = [@selection.quality_filter]
        selection.quality_filter.model_path = '{path}'
        selection.quality_filter.threshold = 0.5
    """)
    name = gin.get_configurable(sel.register_filtered)()
    assert name == 'selection_test_task_selected'
    ds = seqio.get_mixture_or_task(name).get_dataset(None, split='train', shuffle=False)
    got = [vocab.decode(ex['targets'].tolist()) for ex in ds.as_numpy_iterator()]
  finally:
    gin.clear_config()
    for registry, n in ((seqio.TaskRegistry, 'selection_test_task'),
                        (seqio.TaskRegistry, 'selection_test_task_selected')):
      if n in registry.names():
        registry.remove(n)
  scores = classifier[0].score(texts)
  assert got == [t for t, s in zip(texts, scores) if s >= np.float32(0.5)]
  assert 20 < len(got) < 40


# ----------------------------------------------------------------------------------------------
# Command line.


def test_cli_end_to_end(tmp_path, capsys):
  prose, code = _corpus()
  files = {'good.txt': prose[:200], 'bad.txt': code[:200], 'target.txt': prose[300:600]}
  for name, texts in files.items():
    # The trailing blank line is skipped.
    (tmp_path / name).write_text('\n'.join(texts) + '\n\n', encoding='utf-8')
  raw = prose[:100] + code[:100]
  with open(tmp_path / 'raw.jsonl', 'w', encoding='utf-8') as f:
    for i, text in enumerate(raw):
      f.write(json.dumps({'id': i, 'text': text}) + '\n')

  # One real process (TensorFlow's start-up costs seconds); the rest in this one.
  done = subprocess.run(
      [sys.executable, os.path.join(tu.ROOT, 'scripts', 'select_data.py'), 'dsir',
       '--target', str(tmp_path / 'target.txt'), '--raw', str(tmp_path / 'raw.jsonl'), '--k', '50',
       '--output', str(tmp_path / 'selected.jsonl'), '--save_weights', str(tmp_path / 'dsir.npz')],
      cwd=tu.ROOT, env=tu.subprocess_env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  for row in ('KL(target || raw)', 'KL(target || random-k)', 'KL(target || selected)',
              'KL reduction vs random'):
    assert row in done.stdout, done.stdout
  assert float(done.stdout.split('KL reduction vs random')[1].split()[0]) > 0
  selected = [json.loads(line) for line in (tmp_path / 'selected.jsonl').read_text().splitlines()]
  assert len(selected) == 50 and np.mean([r['id'] < 100 for r in selected]) > 0.9
  assert all(raw[r['id']] == r['text'] for r in selected)
  assert sel.ImportanceWeights.load(str(tmp_path / 'dsir.npz')).num_buckets == 10_000

  cli = tu.load_script('select_data')
  assert cli.main(['train-classifier', '--positive', str(tmp_path / 'good.txt'), '--negative',
                   str(tmp_path / 'bad.txt'), '--output', str(tmp_path / 'q.npz'),
                   '--steps', '30']) == 0
  assert 'holdout accuracy' in capsys.readouterr().out
  assert cli.main(['filter', '--model', str(tmp_path / 'q.npz'), '--input',
                   str(tmp_path / 'raw.jsonl'), '--output', str(tmp_path / 'kept.jsonl')]) == 0
  assert 'kept ' in capsys.readouterr().out
  kept = [json.loads(line)['id'] for line in (tmp_path / 'kept.jsonl').read_text().splitlines()]
  scores = sel.QualityClassifier.load(str(tmp_path / 'q.npz')).score(raw)
  assert kept == np.flatnonzero(scores >= np.float32(0.5)).tolist()
  assert np.mean(np.array(kept) < 100) > 0.9

  assert cli.main(['filter', '--model', str(tmp_path / 'missing.npz'), '--input',
                   str(tmp_path / 'raw.jsonl'), '--output', str(tmp_path / 'x.jsonl')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: quality classifier file') and 'train-classifier' in err
  assert len(err.strip().splitlines()) == 1
