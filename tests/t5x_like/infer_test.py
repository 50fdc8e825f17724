"""`python -m infer` (predict, score) and `python -m eval` on real checkpoints."""

import json
import os
import re

import jax
import numpy as np
import pytest
import seqio

from models import model as model_lib
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import checkpoints
from t5x_like import decoding
from t5x_like import evaluate as eval_lib
from t5x_like import gin_utils
from t5x_like import infer as infer_lib
from t5x_like import optimizers
from t5x_like import train as train_lib
from t5x_like import trainer as trainer_lib
from t5x_like.data import registry

import testing_utils as tu

LLAMA = 'models/llama/tiny.gin'
T5 = 'models/t5_1_1/tiny.gin'
METRIC_TASK = 'infer_test_copy'


def _train_bindings(model_dir, steps):
  return ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
          f'TRAIN_STEPS = {steps}', f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8',
          'WARMUP_STEPS = 1', 'LEARNING_RATE = 3e-3', 'train_lib.train.checkpoint_every = 2',
          'train_lib.train.eval_split = None', 'train_lib.train.peak_flops = 1e11']


@pytest.fixture(scope='module')
def llama_run(tmp_path_factory):
  """A tiny LLaMA trained 4 steps: checkpoints 2 and 4."""
  model_dir = str(tmp_path_factory.mktemp('llama'))
  train_lib.run([LLAMA, 'runs/pretrain.gin'], _train_bindings(model_dir, 4))
  return model_dir


@pytest.fixture(scope='module')
def t5_run(tmp_path_factory):
  """A freshly initialised tiny T5 saved as step 0 (random weights decode fine)."""
  model_dir = str(tmp_path_factory.mktemp('t5'))
  model = gin_utils.model_from_gin([T5])
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 1, 1), jax.devices()[:1]))
  shapes = model.feature_shapes(8, {'inputs': 16, 'targets': 16})
  trainer = trainer_lib.Trainer(model, optimizers.sgd(0.1), part, shapes)
  ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
  ckpt.save(0, trainer.init_state(), {'batches_consumed': 0}, None)
  ckpt.close()
  return model_dir


def _run_infer(model_file, checkpoint, out, *bindings):
  return infer_lib.run([model_file, 'runs/infer.gin'], [
      f"CHECKPOINT_PATH = '{checkpoint}'", f"OUTPUT_FILE = '{out}'", *bindings])


def _restored(model_file, checkpoint):
  model = gin_utils.model_from_gin([model_file])
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 1, 1), jax.devices()[:1]))
  abstract = infer_lib.abstract_params(model, part)
  return model, infer_lib.restore(infer_lib.checked_checkpoint(checkpoint, abstract), abstract)


def _write(path, lines):
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_predict_writes_what_decoding_generates(llama_run, tmp_path):
  prompts = _write(tmp_path / 'p.txt', ['def main(', 'import os', '', 'class Foo:'])
  out = tmp_path / 'sub' / 'pred.jsonl'
  _run_infer(LLAMA, llama_run, out, f"INPUT_FILE = '{prompts}'", 'MAX_DECODE_LENGTH = 6',
             'BATCH_SIZE = 2', "METHOD = 'beam'", 'BEAM_SIZE = 3')
  records = _read(out)
  assert [r['input'] for r in records] == ['def main(', 'import os', 'class Foo:']
  assert records[0]['settings']['step'] == 4
  assert records[0]['settings']['decoding']['method'] == 'beam'
  model, params = _restored(LLAMA, llama_run)
  vocab = registry.DEFAULT_VOCABULARY
  for r in records:
    prompt = [0] + list(vocab.encode(r['input']))
    d = decoding.generate(model, params, {'prompt_tokens': np.array([prompt], np.int32),
                                          'prompt_lengths': np.array([len(prompt)])},
                          decoding.DecodingConfig(method='beam', beam_size=3,
                                                  max_decode_length=6))
    assert r['output_ids'] == [int(t) for t in d.tokens[0, :int(d.lengths[0])]]
    assert r['output'] == vocab.decode(r['output_ids'])
    np.testing.assert_allclose(r['score'], float(d.scores[0]), rtol=1e-5)


def test_score_equals_the_incremental_decoder_log_likelihood(llama_run, tmp_path):
  """The full forward's per-token log-likelihoods == those of prefill + one step per token."""
  records = _write(tmp_path / 's.jsonl', [
      json.dumps({'input': 'import ', 'target': 'os'}),
      json.dumps({'input_ids': [50, 60, 70], 'target_ids': [80, 90]}),
      json.dumps({'input': 'x', 'target': 'a longer target text'})])
  out = tmp_path / 'score.jsonl'
  _run_infer(LLAMA, llama_run, out, f"INPUT_FILE = '{records}'", "MODE = 'score'",
             'BATCH_SIZE = 2')
  got = _read(out)
  assert got[0]['target_ids'][-1] == 1  # text targets end with EOS, ids are as given
  assert got[1]['target_ids'] == [80, 90]
  model, params = _restored(LLAMA, llama_run)
  for r in got:
    prompt = [0] + r['input_ids']
    targets = r['target_ids']
    state, logits, pos = model.prefill(params, {'prompt_tokens': np.array([prompt], np.int32),
                                                'prompt_lengths': np.array([len(prompt)])},
                                       len(prompt) + len(targets))
    want = []
    for t, tok in enumerate(targets):
      want.append(float(jax.nn.log_softmax(logits[0])[tok]))
      logits, state = model.decode_step(params, state, np.array([tok]), pos + t)
    np.testing.assert_allclose(r['token_log_likelihoods'], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r['log_likelihood'], sum(want), rtol=1e-5)
    assert r['num_tokens'] == len(targets)


def test_predict_from_a_task_split(llama_run, tmp_path):
  out = tmp_path / 'task.jsonl'
  result = _run_infer(LLAMA, llama_run, out, "MIXTURE_OR_TASK_NAME = 'stdlib_lm'",
                      'NUM_EXAMPLES = 3', 'PROMPT_LENGTH = 12', 'MAX_DECODE_LENGTH = 4',
                      'TEMPERATURE = 0.9', 'TOP_K = 20', 'TOP_P = 0.95', 'SEED = 3')
  records = _read(out)
  assert len(records) == 3 and all('target' in r for r in records)
  assert all(len(registry.DEFAULT_VOCABULARY.encode(r['input'])) <= 12 for r in records)
  again = _run_infer(LLAMA, llama_run, tmp_path / 'again.jsonl',
                     "MIXTURE_OR_TASK_NAME = 'stdlib_lm'", 'NUM_EXAMPLES = 3',
                     'PROMPT_LENGTH = 12', 'MAX_DECODE_LENGTH = 4', 'TEMPERATURE = 0.9',
                     'TOP_K = 20', 'TOP_P = 0.95', 'SEED = 3')
  assert [r['output_ids'] for r in result['records']] == [
      r['output_ids'] for r in again['records']]


def test_encoder_decoder_predict_and_score(t5_run, tmp_path):
  records = _write(tmp_path / 'r.jsonl', [json.dumps({'input': 'abc', 'target': 'xy'}),
                                          json.dumps({'input': 'hello there', 'target': 'z'})])
  _run_infer(T5, t5_run, tmp_path / 'p.jsonl', f"INPUT_FILE = '{records}'",
             'MAX_DECODE_LENGTH = 5')
  _run_infer(T5, t5_run, tmp_path / 's.jsonl', f"INPUT_FILE = '{records}'", "MODE = 'score'")
  preds, scores = _read(tmp_path / 'p.jsonl'), _read(tmp_path / 's.jsonl')
  model, params = _restored(T5, t5_run)
  vocab = registry.DEFAULT_VOCABULARY
  for p, s in zip(preds, scores):
    enc = np.array([list(vocab.encode(p['input'])) + [1]], np.int32)
    d = decoding.generate(model, params, {'encoder_input_tokens': enc},
                          decoding.DecodingConfig(max_decode_length=5))
    assert p['output_ids'] == [int(t) for t in d.tokens[0, :int(d.lengths[0])]]
    targets = s['target_ids']
    dec_in = np.array([[0] + targets[:-1]], np.int32)
    logits = model.module.apply({'params': params}, enc, dec_in,
                                decoder_segment_ids=np.ones_like(dec_in))
    logp = np.asarray(jax.nn.log_softmax(logits))[0]
    np.testing.assert_allclose(s['token_log_likelihoods'],
                               [logp[i, t] for i, t in enumerate(targets)], rtol=1e-5,
                               atol=1e-5)


def _register_metric_task():
  """inputs -> targets (a copy) with an exact-match metric_fn and a score metric."""
  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    texts = ['abc', 'hello', 'xyz', 'copy me', 'ab', 'q']
    return tf.data.Dataset.from_tensor_slices({'inputs': texts, 'targets': texts})

  def exact_match(targets, predictions):
    return {'exact_match': float(np.mean([t == p for t, p in zip(targets, predictions)]))}

  def mean_score(targets, scores):
    del targets
    return {'mean_log_likelihood': float(np.mean(scores))}

  if METRIC_TASK in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(METRIC_TASK)
  vocab = registry.DEFAULT_VOCABULARY
  seqio.TaskRegistry.add(
      METRIC_TASK, source=seqio.FunctionDataSource(dataset_fn, splits=['validation']),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={'inputs': seqio.Feature(vocab, add_eos=True),
                       'targets': seqio.Feature(vocab, add_eos=True)},
      metric_fns=[exact_match, mean_score])


def test_eval_every_checkpoint_loss_and_task_metrics(llama_run, tmp_path):
  out_dir = tmp_path / 'evals'
  result = eval_lib.run([LLAMA, 'runs/eval.gin'], [
      f"CHECKPOINT_PATH = '{llama_run}'", "MIXTURE_OR_TASK_NAME = 'stdlib_lm'",
      "TASK_FEATURE_LENGTHS = {'targets': 32}", 'NUM_BATCHES = 2', 'BATCH_SIZE = 8',
      'EVERY_CHECKPOINT = True', f"EVAL_OUTPUT_DIR = '{out_dir}'"])
  steps = [r['step'] for r in result['results']]
  assert steps == [2, 4]
  records = _read(out_dir / 'metrics.jsonl')
  assert [r['step'] for r in records] == [2, 4]
  for r in records:
    assert np.isclose(r['perplexity'], np.exp(r['loss']), rtol=1e-4)
    assert 0.0 <= r['accuracy'] <= 1.0
  assert any(f.startswith('events.out') for f in os.listdir(out_dir / 'eval'))
  # the loss is the trainer's evaluation of the same batches
  model, params = _restored(LLAMA, os.path.join(llama_run, 'checkpoints', '4'))
  from t5x_like.data import pipeline  # pylint: disable=g-import-not-at-top
  config = pipeline.DatasetConfig('stdlib_lm', {'targets': 32}, split='validation',
                                  batch_size=8, shuffle=False, pack=False)
  it = pipeline.InputIterator(config, model, num_epochs=1)
  from models import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  total = None
  for _ in range(2):
    m = trainer_lib.eval_metrics(model, params, next(it))
    total = m if total is None else metrics_lib.merge(total, m)
  np.testing.assert_allclose(records[1]['loss'], float(total['loss'].compute()), rtol=1e-5)

  _register_metric_task()
  result = eval_lib.run([LLAMA, 'runs/eval.gin'], [
      f"CHECKPOINT_PATH = '{llama_run}'", f"MIXTURE_OR_TASK_NAME = '{METRIC_TASK}'",
      "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 16}", 'BATCH_SIZE = 8',
      'MAX_DECODE_LENGTH = 8'])
  r = result['results'][0]
  assert r['step'] == 4
  assert f'{METRIC_TASK}/exact_match' in r and 0.0 <= r[f'{METRIC_TASK}/exact_match'] <= 1.0
  # the score metric is the mean target log-likelihood that infer's score mode gives
  texts = ['abc', 'hello', 'xyz', 'copy me', 'ab', 'q']
  inputs = _write(tmp_path / 'copy.jsonl', [json.dumps({'input': t + '\u0001', 'target': t})
                                            for t in texts])
  del inputs  # (the byte vocabulary has no text for EOS: build the ids directly)
  vocab = registry.DEFAULT_VOCABULARY
  ids = _write(tmp_path / 'copy_ids.jsonl', [json.dumps({
      'input_ids': list(vocab.encode(t)) + [1], 'target_ids': list(vocab.encode(t)) + [1]})
      for t in texts])
  scored = _run_infer(LLAMA, llama_run, tmp_path / 'copy_scores.jsonl',
                      f"INPUT_FILE = '{ids}'", "MODE = 'score'")
  np.testing.assert_allclose(r[f'{METRIC_TASK}/mean_log_likelihood'],
                             np.mean([x['log_likelihood'] for x in scored['records']]),
                             rtol=1e-5)


# --- bad input: one line, exit 2, nothing written ---------------------------------------
BAD = [
    ('mode', ["MODE = 'generate'"], r"MODE='generate' must be one of 'predict', 'score'"),
    ('both_inputs', ["MIXTURE_OR_TASK_NAME = 'stdlib_lm'"],
     'set exactly one of INPUT_FILE .* not both'),
    ('no_input', ['INPUT_FILE = None'], 'set exactly one of INPUT_FILE .* not neither'),
    ('missing_input', ["INPUT_FILE = '{tmp}/nope.txt'"], r"INPUT_FILE='.*nope.txt' does not exist"),
    ('missing_checkpoint', ["CHECKPOINT_PATH = '{tmp}/nothing'"],
     'no checkpoint found at .*nothing: set CHECKPOINT_PATH to a MODEL_DIR'),
    ('other_model', ["CHECKPOINT_PATH = '{t5}'"],
     r'checkpoint step 0 in .* has .* the model expects .* use the same model config'),
    ('prompt_too_long', ['model_config.DecoderConfig.max_length = 40',
                         "INPUT_FILE = '{tmp}/long.txt'"],
     "example 1: a prompt of 34 tokens plus max_decode_length=8 new tokens is longer than the "
     "model's max_length=40"),
    ('beam_zero', ["METHOD = 'beam'", 'BEAM_SIZE = 0'], 'beam_size=0 must be at least 1'),
    ('top_p', ['TOP_P = 2.0'], r'top_p=2.0 must be in \(0, 1\]'),
    ('batch', ['BATCH_SIZE = 0'], 'BATCH_SIZE=0 must be'),
    ('output_is_dir', ["OUTPUT_FILE = '{tmp}'"], 'OUTPUT_FILE=.* is a directory'),
    ('score_without_target', ["MODE = 'score'"], 'example 0 has no target to score'),
    ('bad_jsonl', ["INPUT_FILE = '{tmp}/bad.jsonl'"], r'bad.jsonl line 2 is not JSON'),
    ('jsonl_no_input', ["INPUT_FILE = '{tmp}/noinput.jsonl'"],
     r'noinput.jsonl line 1 has no "input"'),
    ('mesh', ['MESH_SHAPE = (3, 1, 1)'], 'mesh'),
]


@pytest.mark.parametrize('case_id,bindings,pattern', BAD, ids=[b[0] for b in BAD])
def test_bad_infer_input(case_id, bindings, pattern, llama_run, t5_run, tmp_path, capfd):
  del case_id
  tmp = str(tmp_path)
  _write(tmp_path / 'p.txt', ['hello'])
  _write(tmp_path / 'long.txt', ['short', 'x' * 33])
  _write(tmp_path / 'bad.jsonl', ['{"input": "a"}', '{oops'])
  _write(tmp_path / 'noinput.jsonl', ['{"text": "a"}'])
  out = os.path.join(tmp, 'out', 'o.jsonl')
  argv = ['--gin_file=' + LLAMA, '--gin_file=runs/infer.gin',
          f"--gin.CHECKPOINT_PATH='{llama_run}'", f"--gin.OUTPUT_FILE='{out}'",
          f"--gin.INPUT_FILE='{tmp}/p.txt'", '--gin.MAX_DECODE_LENGTH=8']
  argv += ['--gin.' + b.format(tmp=tmp, t5=t5_run) for b in bindings]
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    infer_lib.console_main(argv)
  err = capfd.readouterr().err
  lines = [l for l in err.splitlines() if l.strip()]
  assert e.value.code == 2, err
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert re.search(pattern, lines[0]), (pattern, lines[0])
  assert not os.path.exists(os.path.join(tmp, 'out'))


def test_bad_eval_input(llama_run, tmp_path, capfd):
  for bindings, pattern in (
      (["CHECKPOINT_PATH = '/nonexistent/run'"], 'no checkpoint found at /nonexistent/run'),
      (['NUM_BATCHES = 0'], 'NUM_BATCHES=0 must be'),
      (['BATCH_SIZE = 6'], 'batch size 6 is not divisible by the data-parallel size 8 .* change '
       'BATCH_SIZE'),
      ([f"EVAL_OUTPUT_DIR = '{llama_run}'"], 'holds checkpoints: evaluation writes beside'),
      (["MIXTURE_OR_TASK_NAME = 'stdlib_lmm'"], "unknown mixture or task 'stdlib_lmm'")):
    argv = ['--gin_file=' + LLAMA, '--gin_file=runs/eval.gin',
            f"--gin.CHECKPOINT_PATH='{llama_run}'", "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'",
            "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
            f"--gin.EVAL_OUTPUT_DIR='{tmp_path}/e'"] + ['--gin.' + b for b in bindings]
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
      eval_lib.console_main(argv)
    lines = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not os.path.exists(tmp_path / 'e')
