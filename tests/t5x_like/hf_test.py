"""Hugging Face import/export against fixtures made by `transformers`
(scripts/make_hf_fixtures.py): logits and scores equal, exports reproduce the
original tensors exactly, bad directories refused in one line."""

import glob
import json
import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from t5x_like import checkpoints
from t5x_like import gin_utils
from t5x_like import hf
from t5x_like import infer as infer_lib

import testing_utils as tu

FIXTURE_DIR = os.path.join(tu.ROOT, 'tests', 'fixtures', 'hf')
FIXTURES = sorted(os.listdir(FIXTURE_DIR))


def test_every_family_has_a_fixture():
  families = set()
  for name in FIXTURES:
    with open(os.path.join(FIXTURE_DIR, name, 'config.json')) as f:
      config = json.load(f)
    families.add(config['model_type'])
    rope = config.get('rope_parameters') or config.get('rope_scaling') or {}
    families.add('rope_' + rope.get('rope_type', rope.get('type', 'default')))
  assert {'t5', 'llama', 'gpt_neox', 'bloom', 'gpt2', 'mixtral', 'rope_linear', 'rope_dynamic',
          'rope_yarn', 'rope_llama3'} <= families


def _import(name, tmp_path):
  out = str(tmp_path / 'imported')
  hf.import_checkpoint(os.path.join(FIXTURE_DIR, name), out)
  model = gin_utils.model_from_gin([os.path.join(out, 'config.gin')])
  directory, step = checkpoints.resolve(out)
  return out, model, checkpoints.restore_params(directory, step)


def _logits(model, params, expected):
  ids = expected['input_ids'].astype(np.int32)
  if 'decoder_input_ids' in expected:
    dec = expected['decoder_input_ids'].astype(np.int32)
    return np.asarray(jax.jit(model.module.apply)(
        {'params': params}, ids, dec, decoder_segment_ids=np.ones_like(dec),
        encoder_segment_ids=np.ones_like(ids)))
  return np.asarray(jax.jit(model.module.apply)(
      {'params': params}, ids, decoder_segment_ids=np.ones_like(ids)))


@pytest.mark.parametrize('name', FIXTURES)
def test_import_scores_like_transformers_and_export_round_trips(name, tmp_path):
  src = os.path.join(FIXTURE_DIR, name)
  expected = np.load(os.path.join(src, 'expected.npz'))
  out, model, params = _import(name, tmp_path)
  # 1. the logits of the full forward
  np.testing.assert_allclose(_logits(model, params, expected), expected['logits'], rtol=1e-4,
                             atol=1e-4)
  # 2. infer --mode=score: per-token log-likelihoods of targets after a prompt
  logp = np.asarray(jax.nn.log_softmax(expected['logits'].astype(np.float64)))
  ids = expected['input_ids']
  if 'decoder_input_ids' in expected:
    dec = expected['decoder_input_ids']
    records = [{'input_ids': ids[r].tolist(), 'target_ids': dec[r, 1:].tolist()}
               for r in range(2)]
    want = [[logp[r, t, dec[r, t + 1]] for t in range(dec.shape[1] - 1)] for r in range(2)]
  else:
    cut = 9
    records = [{'input_ids': ids[r, :cut].tolist(), 'target_ids': ids[r, cut:].tolist()}
               for r in range(2)]
    want = [[logp[r, t - 1, ids[r, t]] for t in range(cut, ids.shape[1])] for r in range(2)]
  inputs = tmp_path / 'score.jsonl'
  inputs.write_text(''.join(json.dumps(r) + '\n' for r in records))
  result = infer_lib.run([os.path.join(out, 'config.gin'), 'runs/infer.gin'], [
      f"CHECKPOINT_PATH = '{out}'", f"OUTPUT_FILE = '{tmp_path / 'scores.jsonl'}'",
      f"INPUT_FILE = '{inputs}'", "MODE = 'score'"])
  for got, w in zip(result['records'], want):
    np.testing.assert_allclose(got['token_log_likelihoods'], w, rtol=1e-4, atol=1e-4)
  # 3. export writes back exactly the tensors transformers saved
  exported = tmp_path / 'exported'
  hf.export_checkpoint(out, str(exported))
  original = load_file(os.path.join(src, 'model.safetensors'))
  written = load_file(str(exported / 'model.safetensors'))
  assert set(written) == set(original), sorted(set(written) ^ set(original))
  for key, value in original.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  # ... with a config.json that imports as the same model
  again = hf.family_of(json.load(open(exported / 'config.json')))
  assert hf.build_model(again).config == model.config
  hf_python = os.environ.get('T5X_LIKE_HF_PYTHON')
  if hf_python:  # a Python with transformers: load the export there
    done = subprocess.run([hf_python, os.path.join(tu.ROOT, 'scripts', 'make_hf_fixtures.py'),
                           '--check_export', str(exported), name], capture_output=True,
                          text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1])['max_abs_diff'] < 1e-4


def test_imported_decoder_generates_like_its_full_forward(tmp_path):
  """Greedy decoding of an import (a decoder without a start token) follows the
  argmax of the full forward."""
  _, model, params = _import('llama_rope_yarn', tmp_path)
  assert model.decoder_start_token is None
  from t5x_like import decoding  # pylint: disable=g-import-not-at-top
  prompt = np.array([[5, 17, 33, 2]], np.int32)
  out = decoding.generate(model, params, {'prompt_tokens': prompt,
                                          'prompt_lengths': np.array([4])},
                          decoding.DecodingConfig(max_decode_length=20, eos_id=-1))
  tokens = np.concatenate([prompt, np.asarray(out.tokens)], 1)
  logits = model.module.apply({'params': params}, tokens,
                              decoder_segment_ids=np.ones_like(tokens))
  np.testing.assert_array_equal(np.asarray(logits)[0, 3:-1].argmax(-1), tokens[0, 4:])


# --- bad input: one line, exit 2, nothing written --------------------------------------
def _bad_dirs(tmp_path):
  base = os.path.join(FIXTURE_DIR, 'llama_gqa')

  def copy(name):
    d = tmp_path / name
    shutil.copytree(base, d)
    return d

  d = copy('unsupported')
  config = json.load(open(d / 'config.json'))
  (d / 'config.json').write_text(json.dumps({**config, 'model_type': 'falcon'}))
  d = copy('pickle')
  os.remove(d / 'model.safetensors')
  (d / 'pytorch_model.bin').write_bytes(b'not really')
  d = copy('missing_tensor')
  tensors = load_file(str(d / 'model.safetensors'))
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(d / 'model.safetensors'))
  d = copy('extra_tensor')
  tensors = load_file(str(d / 'model.safetensors'))
  tensors['model.layers.0.self_attn.rotary_extra.weight'] = np.zeros(3, np.float32)
  save_file(tensors, str(d / 'model.safetensors'))
  d = copy('shape')
  (d / 'config.json').write_text(json.dumps({**config, 'intermediate_size': 40}))
  d = copy('norm_shape')  # a one-to-one tensor: only the shape check can catch it
  tensors = load_file(str(d / 'model.safetensors'))
  tensors['model.norm.weight'] = tensors['model.norm.weight'][:-1]
  save_file(tensors, str(d / 'model.safetensors'))
  d = copy('nan')
  tensors = load_file(str(d / 'model.safetensors'))
  tensors['model.layers.1.self_attn.v_proj.weight'][3, 2] = np.nan
  save_file(tensors, str(d / 'model.safetensors'))
  d = copy('no_config')
  os.remove(d / 'config.json')
  return tmp_path


BAD = [
    ('unsupported', "model_type 'falcon' is not supported: supported are bloom, gpt2, gpt_neox, "
     'llama, mistral, mixtral, t5'),
    ('pickle', r'has only pickled weights \(pytorch_model.bin\); safetensors is required .*'
     'save_pretrained'),
    ('missing_tensor', "lacks 'model.layers.1.mlp.up_proj.weight'"),
    ('extra_tensor', "the HF tensor 'model.layers.0.self_attn.rotary_extra.weight' is not used"),
    ('shape', r"HF tensor 'model.layers.0.mlp.gate_proj.weight' of shape \(48, 32\) does not "
     r"fit our 'decoder/stack/layers/mlp/wi_0/kernel' of shape \(2, 32, 40\)"),
    ('norm_shape', r"HF tensor 'model.norm.weight' gives our 'decoder/decoder_norm/scale' the "
     r'shape \(31,\), but the model expects \(32,\)'),
    ('nan', r'the HF weights hold 1 non-finite values \(NaN or infinity\): not importing them'),
    ('no_config', 'has no config.json'),
    ('nowhere', "--hf_dir '.*nowhere' is not a directory"),
]


@pytest.mark.parametrize('case,pattern', BAD, ids=[b[0] for b in BAD])
def test_bad_hf_directory(case, pattern, tmp_path, capfd):
  root = _bad_dirs(tmp_path)
  out = tmp_path / 'out'
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    hf.console_main(['import', '--hf_dir', str(root / case), '--model_dir', str(out)])
  lines = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert e.value.code == 2 and len(lines) == 1, lines
  assert re.search(pattern, lines[0]), (pattern, lines[0])
  assert not out.exists()


def test_export_refuses_what_the_family_cannot_express(tmp_path, capfd):
  """A PaLM-style model (tied logits scaled by 1/sqrt(emb)) has no HF LLaMA equivalent."""
  out, _, _ = _import('llama_gqa', tmp_path)
  text = open(os.path.join(out, 'config.gin')).read()
  text = text.replace('tie_embeddings = False', 'tie_embeddings = True').replace(
      'scale_tied_logits = False', 'scale_tied_logits = True')
  model_dir = tmp_path / 'palm_like'
  model_dir.mkdir()
  (model_dir / 'config.gin').write_text(text)
  with pytest.raises(SystemExit) as e:
    hf.console_main(['export', '--model_dir', str(model_dir), '--hf_dir', str(tmp_path / 'x')])
  lines = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert e.value.code == 2 and len(lines) == 1, lines
  assert 'cannot be written as HF llama: scale_tied_logits=True' in lines[0]


def test_import_binds_the_tokenizer_and_infer_reads_text_with_it(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  out, model, params = _import('llama_gqa', tmp_path)
  text = open(os.path.join(out, 'config.gin')).read()
  assert "kind = 'hf_tokenizer'" in text and 'tokenizer.json' in text
  tok = tokenizers.Tokenizer.from_file(os.path.join(FIXTURE_DIR, 'llama_gqa', 'tokenizer.json'))
  prompts = tmp_path / 'p.txt'
  prompts.write_text('def main():\nimport os\n')
  result = infer_lib.run([os.path.join(out, 'config.gin'), 'runs/infer.gin'], [
      f"CHECKPOINT_PATH = '{out}'", f"OUTPUT_FILE = '{tmp_path / 'o.jsonl'}'",
      f"INPUT_FILE = '{prompts}'", 'MAX_DECODE_LENGTH = 6', 'EOS_ID = 2'])
  from t5x_like import decoding  # pylint: disable=g-import-not-at-top
  for record, line in zip(result['records'], ['def main():', 'import os']):
    ids = tok.encode(line, add_special_tokens=False).ids
    d = decoding.generate(model, params, {'prompt_tokens': np.array([ids], np.int32),
                                          'prompt_lengths': np.array([len(ids)])},
                          decoding.DecodingConfig(max_decode_length=6, eos_id=2))
    assert record['output_ids'] == [int(t) for t in d.tokens[0, :int(d.lengths[0])]]
    assert record['output'] == tok.decode(record['output_ids'], skip_special_tokens=True)


def test_bfloat16_weights_import_as_their_float32_values(tmp_path):
  """bf16 safetensors (most published checkpoints) go through the flax reader."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  d = tmp_path / 'bf16'
  shutil.copytree(os.path.join(FIXTURE_DIR, 'llama_gqa'), d)
  tensors = load_file(str(d / 'model.safetensors'))
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
            str(d / 'model.safetensors'))
  hf.import_checkpoint(str(d), str(tmp_path / 'out'))
  directory, step = checkpoints.resolve(str(tmp_path / 'out'))
  params = hf._flat(jax.device_get(checkpoints.restore_params(directory, step)))
  np.testing.assert_array_equal(params['decoder/decoder_norm/scale'],
                                tensors['model.norm.weight'].astype(ml_dtypes.bfloat16)
                                .astype(np.float32))


def test_an_import_fine_tunes_as_initial_checkpoint(tmp_path):
  """OUT/config.gin + OUT as INITIAL_CHECKPOINT: `train` starts from the imported
  weights (two small steps away from them) with the imported tokenizer's data."""
  from t5x_like import train as train_lib  # pylint: disable=g-import-not-at-top
  from t5x_like import vocabularies  # pylint: disable=g-import-not-at-top
  from t5x_like.data import tasks  # pylint: disable=g-import-not-at-top
  out, _, imported = _import('llama_gqa', tmp_path)
  tasks.register_corpus_tasks(
      vocabularies.hf_tokenizer(os.path.join(FIXTURE_DIR, 'llama_gqa')), prefix='hf_gqa_test')
  run_dir = tmp_path / 'finetuned'
  result = train_lib.run([os.path.join(out, 'config.gin'), 'runs/pretrain.gin'], [
      "MIXTURE_OR_TASK_NAME = 'hf_gqa_test_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
      'TRAIN_STEPS = 2', 'BATCH_SIZE = 8', 'WARMUP_STEPS = 1', 'LEARNING_RATE = 1e-3',
      f"MODEL_DIR = '{run_dir}'", f"train_lib.train.initial_checkpoint = '{out}'"])
  assert result['step'] == 2
  directory, step = checkpoints.resolve(str(run_dir))
  tuned = hf._flat(jax.device_get(checkpoints.restore_params(directory, step)))
  imported = hf._flat(jax.device_get(imported))
  assert tuned.keys() == imported.keys()
  for path, value in imported.items():  # an AdamW step moves each weight by about lr
    np.testing.assert_allclose(tuned[path], value, atol=2.5e-3, err_msg=path)
  assert any(not np.array_equal(tuned[p], imported[p]) for p in imported)


def test_hf_tokenizer_tf_ops_equal_its_python_ones():
  """seqio tasks tokenize in tf.data: the HF tokenizer's TF path (tf.py_function)
  gives what its Python path gives, for one string or a vector of them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from t5x_like import vocabularies  # pylint: disable=g-import-not-at-top
  vocab = vocabularies.hf_tokenizer(os.path.join(FIXTURE_DIR, 'llama_gqa'))
  texts = ['def f(x): return x', 'import os\n', '']
  want = [vocab.encode(t) for t in texts]
  assert [vocab.encode_tf(tf.constant(t)).numpy().tolist() for t in texts] == want
  assert vocab.encode_tf(tf.constant(texts)).to_list() == want
  ids = tf.constant(want[0], tf.int32)
  assert vocab.decode_tf(ids).numpy().decode() == vocab.decode(want[0])
  ds = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
  assert [x.numpy().tolist() for x in ds] == want


def test_import_never_overwrites_a_checkpoint_and_reruns_after_an_interruption(tmp_path, capfd):
  out = tmp_path / 'imported'
  # What a killed import leaves: orbax's temporary folder, no committed checkpoint.
  os.makedirs(out / 'checkpoints' / '0.orbax-checkpoint-tmp-1234' / 'state')
  hf.import_checkpoint(os.path.join(FIXTURE_DIR, 'llama_gqa'), str(out))
  assert checkpoints.all_steps(str(out)) == [0]
  assert os.listdir(out / 'checkpoints') == ['0']
  before = {p: os.path.getmtime(p) for p in glob.glob(str(out / '**'), recursive=True)}
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    hf.console_main(['import', '--hf_dir', os.path.join(FIXTURE_DIR, 'gpt2'),
                     '--model_dir', str(out)])
  lines = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert e.value.code == 2 and len(lines) == 1 and 'already holds checkpoints' in lines[0]
  assert before == {p: os.path.getmtime(p) for p in glob.glob(str(out / '**'), recursive=True)}
