"""Fine-tuning data: pairs and chats from JSONL, templates, loss on responses only, packing,
the embedded instruction set, and one-line errors for bad data."""

import json

import jax
import numpy as np
import pytest
import seqio

from models import model as model_lib
from t5x_like.data import instructions
from t5x_like.data import pipeline
from t5x_like.data import registry

import testing_utils as tu

VOCAB = registry.DEFAULT_VOCABULARY


def _write(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


CHAT = {'messages': [{'role': 'system', 'content': 'Be brief.'},
                     {'role': 'user', 'content': 'Hi'},
                     {'role': 'assistant', 'content': 'Hello.'},
                     {'role': 'user', 'content': 'Name a module'},
                     {'role': 'assistant', 'content': 'os'}]}


def test_pairs_and_chats_render_prompt_and_response():
  tmpl = instructions.ChatTemplate()
  [(p, r)] = instructions.render({'inputs': 'Q?', 'targets': 'A.'}, None, VOCAB, 'x:1')
  assert VOCAB.decode(p) == 'Q?' and VOCAB.decode(r) == 'A.'
  [(p, r)] = instructions.render({'inputs': 'Q?', 'targets': 'A.'},
                                 instructions.ChatTemplate(wrap_pairs=True), VOCAB, 'x:1')
  assert VOCAB.decode(p) == 'User: Q?\nAssistant: ' and VOCAB.decode(r) == 'A.'
  # One example per assistant turn, prompted by everything before it.
  (p1, r1), (p2, r2) = instructions.render(CHAT, tmpl, VOCAB, 'x:1')
  assert VOCAB.decode(p1) == 'System: Be brief.\nUser: Hi\nAssistant: '
  assert VOCAB.decode(r1) == 'Hello.'
  assert VOCAB.decode(p2) == ('System: Be brief.\nUser: Hi\nAssistant: Hello.\n'
                              'User: Name a module\nAssistant: ')
  assert VOCAB.decode(r2) == 'os'
  # Special role tokens: one extra id per role, after the UL2 mode tokens.
  special = instructions.ChatTemplate(special_tokens=True)
  ids = special.role_ids(VOCAB)
  assert len(set(ids.values())) == 3 and min(ids.values()) >= VOCAB.vocab_size - VOCAB.extra_ids + 3
  (p1, _), _ = instructions.render(CHAT, special, VOCAB, 'x:1')
  assert p1[0] == ids['system'] and p1[-1] == ids['assistant']


@pytest.mark.parametrize('record,template,match', [
    ({'inputs': 'q'}, None, r"f.jsonl:1: the record has no text 'targets'"),
    ({'prompt': 'q', 'response': 'a'}, None, r"no text 'inputs' \(keys: prompt, response\)"),
    (CHAT, None, 'a chat record needs a ChatTemplate'),
    ({'messages': [{'role': 'usr', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]},
     instructions.ChatTemplate(), r"message 0 has role 'usr', which the chat template does not "
     r'know \(its roles: system, user, assistant\)'),
    ({'messages': [{'role': 'user', 'content': 'x'}]}, instructions.ChatTemplate(),
     'has no assistant turn'),
    ('{"inputs": "q", ', None, 'f.jsonl:1: not JSON'),
])
def test_bad_records_fail_in_one_line_with_file_and_line(tmp_path, record, template, match):
  path = _write(tmp_path / 'f.jsonl', [record])
  with pytest.raises(instructions.SftDataError, match=match) as e:
    instructions.register_sft_task('bad_sft', {'train': path}, template)
  assert '\n' not in str(e.value)


def test_bad_templates_fail_in_one_line(tmp_path):
  with pytest.raises(instructions.SftDataError, match="unknown role 'assitant'"):
    instructions.ChatTemplate(roles={'user': 'U: ', 'assitant': 'A: '})
  with pytest.raises(instructions.SftDataError, match="no 'assistant' marker"):
    instructions.ChatTemplate(roles={'user': 'U: '})
  path = _write(tmp_path / 'f.jsonl', [CHAT])
  with pytest.raises(instructions.SftDataError, match='needs 3 extra ids'):
    instructions.register_sft_task('bad_sft', {'train': path},
                                   instructions.ChatTemplate(special_tokens=True),
                                   seqio.ByteVocabulary(extra_ids=4))
  with pytest.raises(instructions.SftDataError, match='no file matches'):
    instructions.register_sft_task('bad_sft', {'train': str(tmp_path / 'none*.jsonl')})


def chat_task_records():
  return [CHAT] + [{'inputs': f'Question {i}?', 'targets': 'Answer ' * (i % 4 + 1)}
                   for i in range(13)]


@pytest.fixture(scope='module')
def chat_task(tmp_path_factory):
  d = tmp_path_factory.mktemp('sft')
  path = _write(d / 'train.jsonl', chat_task_records())
  return instructions.register_sft_task('test_chat_sft', {'train': path, 'validation': path},
                                        instructions.ChatTemplate())


def _batches(task, model, pack):
  config = pipeline.DatasetConfig(task, {'inputs': 48, 'targets': 16}, split='validation',
                                  batch_size=4, shuffle=False, pack=pack)
  return list(pipeline.InputIterator(config, model, num_epochs=1, pad_last=True))


def test_loss_only_on_responses_and_packing_keeps_it(chat_task):
  model = model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384),
                                     inputs_bidirectional_attention=False)
  unpacked, packed = _batches(chat_task, model, False), _batches(chat_task, model, True)
  assert len(packed) < len(unpacked)
  for b in unpacked:
    # The loss covers exactly the response tokens (and their EOS), never the prompt.
    for row_w, row_prefix in zip(b['decoder_loss_weights'], b['decoder_causal_attention']):
      # The prefix flags mark the positions that *read* a prompt token: the last of them
      # predicts the response's first token.
      n = int(row_prefix.sum())
      if n:
        assert not np.any(row_w[:n - 1]) and row_w[n - 1] == 1, 'loss on a prompt token'
  weights = lambda bs: sum(int(b['decoder_loss_weights'].sum()) for b in bs)
  responses = [r for rec in chat_task_records() for _, r in instructions.render(
      rec, instructions.ChatTemplate(), VOCAB, '')]
  assert weights(packed) == weights(unpacked) == sum(min(len(r) + 1, 16) for r in responses)
  # A long prompt keeps its end: the assistant marker the response follows.
  assert any(VOCAB.decode(row[:int(row_prefix.sum()) - 1].tolist()).endswith(
      'module\nAssistant: ')
             for b in unpacked for row, row_prefix in
             zip(b['decoder_target_tokens'], b['decoder_causal_attention']))
  # Packed and unpacked batches give the same loss sum: segments stay apart.
  params = tu.init_params(model, unpacked[0])
  loss_sum = jax.jit(lambda p, b: model.loss_fn(p, b)[0])
  total = lambda bs: sum(float(loss_sum(params, b)) for b in bs)
  np.testing.assert_allclose(total(packed), total(unpacked), rtol=1e-5)


def test_embedded_instruction_set_is_deterministic_and_split():
  paths = instructions.build_instructions()
  rows = {s: [json.loads(l) for l in open(p)] for s, p in paths.items()}
  assert len(rows['train']) > 1000 and len(rows['validation']) > 50
  prompts = {s: {r['inputs'] for r in rs} for s, rs in rows.items()}
  assert not prompts['train'] & prompts['validation']
  for s, rs in rows.items():
    assert {r['kind'] for r in rs} == set(instructions.KINDS)
    assert all(r['split'] == s for r in rs)
  again = list(instructions.instruction_records())
  assert [r for r in again if r['split'] == 'validation'] == rows['validation']
  # Registered on first use, by name.
  task = pipeline.get_mixture_or_task('stdlib_instructions')
  assert set(task.output_features) == {'inputs', 'targets'}


def test_answer_format_and_metrics():
  assert [instructions.answer_format(t) for t in (
      'urllib.parse', 'literal_eval(node_or_string)', 'Decode bytes encoded with Base64.',
      'two\nlines', '', 'OK!')] == ['module', 'signature', 'sentence', 'other', 'other', 'other']
  metrics = instructions.instruction_metrics(
      ['abc', 'f(x)', 'Return the sum.', 'os.path'],
      ['abc ', 'g(y, z)', 'no', 'Some words here'])
  assert metrics == {'exact_match': 25.0, 'format_match': 50.0}
  task = pipeline.get_mixture_or_task('stdlib_instructions')
  assert task.metric_objs  # `python -m eval` computes them on greedy predictions
