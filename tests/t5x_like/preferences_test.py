"""Preference data: pairs from JSONL, one pair per row with chosen and rejected aligned,
the embedded set, and one-line errors for bad data."""

import json

import jax
import numpy as np
import pytest

from models import model as model_lib
from models import preference
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like.data import pipeline
from t5x_like.data import preferences
from t5x_like.data import registry

import testing_utils as tu

VOCAB = registry.DEFAULT_VOCABULARY


def _write(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  return str(path)


@pytest.mark.parametrize('record,match', [
    ({'prompt': 'p', 'chosen': 'c'}, r"f.jsonl:2: the record has no text 'rejected' \(keys: "
     r'chosen, prompt\)'),
    ({'prompt': 'p', 'rejected': 'r'}, "no text 'chosen'"),
    ({'chosen': 'c', 'rejected': 'r'}, "no text 'prompt'"),
])
def test_pairs_missing_a_field_fail_in_one_line(tmp_path, record, match):
  path = _write(tmp_path / 'f.jsonl', [{'prompt': 'p', 'chosen': 'c', 'rejected': 'r'}, record])
  with pytest.raises(preferences.PreferenceDataError, match=match) as e:
    preferences.register_preference_task('bad_prefs', {'train': path})
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('encdec', [False, True], ids=['decoder', 'encdec'])
def test_each_row_holds_one_pair_aligned(tmp_path, encdec):
  records = [{'prompt': f'Prompt {i}: ', 'chosen': f'good {i}', 'rejected': f'bad answer {i}'}
             for i in range(6)]
  path = _write(tmp_path / 'p.jsonl', records)
  task = preferences.register_preference_task('test_prefs', {'validation': path})
  policy = (model_lib.EncoderDecoderModel(tu.tiny_encdec(vocab_size=384)) if encdec else
            model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384)))
  dpo = preference.DpoModel(policy)
  lengths = {'inputs': 16, 'chosen': 12, 'rejected': 16}
  config = pipeline.DatasetConfig(task, lengths, split='validation', batch_size=2,
                                  shuffle=False, pack=False)
  pipeline.validate(config, dpo)
  shapes, expected = pipeline.batch_shapes(config, dpo), dpo.feature_shapes(2, lengths)
  assert shapes and all(expected[k] == v for k, v in shapes.items())
  rows = [b for batch in pipeline.InputIterator(config, dpo, num_epochs=1) for b in zip(
      *[batch[k] for k in ('chosen_decoder_target_tokens', 'chosen_decoder_loss_weights',
                           'rejected_decoder_target_tokens', 'rejected_decoder_loss_weights')])]
  assert len(rows) == 6
  for r, (ct, cw, rt, rw) in zip(records, rows):
    assert VOCAB.decode(ct[cw > 0].tolist()) == r['chosen']
    assert VOCAB.decode(rt[rw > 0].tolist()) == r['rejected']
    if not encdec:  # the prompt precedes each response, with loss weight 0
      assert VOCAB.decode(ct[:np.argmax(cw > 0)].tolist()) == r['prompt']
  with pytest.raises(preferences.PreferenceDataError, match='pack = False'):
    pipeline.batch_shapes(dataclasses_replace(config, pack=True), dpo)


def dataclasses_replace(config, **kw):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(config, **kw)


def test_embedded_preference_set():
  paths = preferences.build_preferences()
  rows = {s: [json.loads(l) for l in open(p)] for s, p in paths.items()}
  assert len(rows['train']) > 1000 and len(rows['validation']) > 50
  for rs in rows.values():
    for r in rs:
      # rejected: the chosen line's words, shuffled
      assert r['chosen'] != r['rejected'] and sorted(r['chosen'].split()) == sorted(
          r['rejected'].split())
  assert {r['prompt'] for r in rows['train']}.isdisjoint({r['prompt'] for r in rows['validation']})
  assert pipeline.get_mixture_or_task('stdlib_preferences').output_features.keys() == {
      'inputs', 'chosen', 'rejected'}


def test_precomputed_reference_equals_on_the_fly(tmp_path):
  """Scores precomputed once into the data give the loss the on-the-fly reference gives."""
  records = [{'prompt': f'Prompt {i}: ', 'chosen': f'good {i}', 'rejected': f'bad answer {i}'}
             for i in range(5)]
  path = _write(tmp_path / 'p.jsonl', records)
  policy = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384))
  lengths = {'inputs': 16, 'chosen': 12, 'rejected': 16}
  script = tu.load_script('precompute_reference')
  part = partitioner_lib.Partitioner(mesh_lib.create_mesh((1, 1, 1), devices=jax.devices()[:1]))
  on_the_fly = preference.DpoModel(policy, beta=0.3)
  dummy = on_the_fly.dummy_batch(1, lengths)
  reference = tu.init_params(policy, preference.side_batch(dummy, 'chosen'), seed=1)
  trained = tu.init_params(policy, preference.side_batch(dummy, 'chosen'), seed=2)
  out = script.precompute(policy, reference, part, {'validation': path}, lengths,
                          str(tmp_path / 'scored'))
  scored = [json.loads(l) for l in open(out['validation'])]
  assert [{k: r[k] for k in ('prompt', 'chosen', 'rejected')} for r in scored] == records
  precomputed = preference.DpoModel(policy, beta=0.3, reference='precomputed')
  losses = {}
  for name, model, files in (('fly', on_the_fly, {'validation': path}),
                             ('pre', precomputed, out)):
    task = preferences.register_preference_task(f'test_ref_{name}', files)
    config = pipeline.DatasetConfig(task, lengths, split='validation', batch_size=5,
                                    shuffle=False, pack=False)
    pipeline.validate(config, model)
    [batch] = list(pipeline.InputIterator(config, model, num_epochs=1))
    params = dict(trained, reference=reference) if name == 'fly' else trained
    losses[name] = float(jax.jit(model.loss_fn)(params, batch)[0])
  np.testing.assert_allclose(losses['pre'], losses['fly'], rtol=1e-5)
  # Without the scores in the data, the precomputed mode fails before training.
  task = preferences.register_preference_task('test_ref_none', {'validation': path})
  with pytest.raises(pipeline.DataError, match='needs .reference_chosen_log_likelihood.'):
    pipeline.validate(pipeline.DatasetConfig(task, lengths, split='validation', batch_size=5,
                                             shuffle=False, pack=False), precomputed)


@pytest.mark.parametrize('encdec', [False, True], ids=['decoder', 'encdec'])
def test_each_half_is_what_seqios_converter_makes(encdec):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  pairs = [([5, 6, 7], [8, 9, 1], [10, 1]), ([5] * 20, [3] * 30 + [1], [4, 1]),
           ([2], [6] * 7 + [1], [7] * 9 + [1])]
  ds = tf.data.Dataset.from_generator(
      lambda: ({'inputs': p, 'chosen': c, 'rejected': r} for p, c, r in pairs),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in ('inputs', 'chosen',
                                                                       'rejected')})
  lengths = {'inputs': 12, 'chosen': 10, 'rejected': 6}
  got = list(preferences.PairedFeatureConverter(encdec)(ds, lengths).as_numpy_iterator())
  conv = seqio.EncDecFeatureConverter(pack=False) if encdec else seqio.PrefixLMFeatureConverter(
      pack=False)
  for side in ('chosen', 'rejected'):
    half = ds.map(lambda ex, s=side: {'inputs': ex['inputs'][:12], 'targets': ex[s][:10]})
    want = list(conv(half, {'inputs': 12, 'targets': 10}).as_numpy_iterator())
    for g, w in zip(got, want):
      assert {k[len(side) + 1:] for k in g if k.startswith(side)} == set(w)
      for k, v in w.items():
        np.testing.assert_array_equal(g[f'{side}_{k}'], v, err_msg=f'{side}_{k}')


def test_reward_model_run_and_infer_scores_rewards(tmp_path):
  from t5x_like import infer as infer_lib  # pylint: disable=g-import-not-at-top
  from t5x_like import train as train_lib  # pylint: disable=g-import-not-at-top
  base_dir, rm_dir = str(tmp_path / 'base'), str(tmp_path / 'rm')
  common = ['BATCH_SIZE = 8', 'WARMUP_STEPS = 1', 'train_lib.train.peak_flops = 1e11',
            'train_lib.train.checkpoint_every = 100']
  train_lib.run(['models/llama/tiny.gin', 'runs/pretrain.gin'], [
      "MIXTURE_OR_TASK_NAME = 'stdlib_lm'", "TASK_FEATURE_LENGTHS = {'targets': 32}",
      'TRAIN_STEPS = 2', f"MODEL_DIR = '{base_dir}'", 'train_lib.train.eval_split = None',
      *common])
  result = train_lib.run(['models/llama/tiny.gin', 'runs/reward_model.gin'], [
      f"INITIAL_CHECKPOINT = '{base_dir}'", f"MODEL_DIR = '{rm_dir}'", 'TRAIN_STEPS = 3',
      "TASK_FEATURE_LENGTHS = {'inputs': 48, 'chosen': 24, 'rejected': 24}",
      'LEARNING_RATE = 1e-2', 'train_lib.train.eval_steps = 1', *common])
  assert result['first_eval']['rewards/accuracy'] == 0.5  # every reward starts at 0
  data = tmp_path / 'in.jsonl'
  data.write_text('{"input": "    def f(self):\\n", "target": "        return self.x"}\n')
  out = infer_lib.run(['models/llama/tiny.gin', 'runs/infer.gin'], [
      f"CHECKPOINT_PATH = '{rm_dir}'", f"OUTPUT_FILE = '{tmp_path / 'out.jsonl'}'",
      "MODE = 'score'", f"INPUT_FILE = '{data}'",
      'infer_lib.infer.model = @preference.RewardModel()'])
  [record] = out['records']
  assert isinstance(record['reward'], float) and record['reward'] != 0.0
