"""The inference entry: `python -m infer --gin_file=... --gin.CHECKPOINT_PATH=...`.

Modes (T5X's `infer` and `score`):
  predict  generates a continuation of every prompt (`t5x_like/decoding.py`:
           greedy, sampling, beam search) and writes one JSONL record per
           example: input, output, its score, the target when known, settings.
  score    writes the log-likelihood of every given target, per token and
           summed: the interface evaluation, reward models and DPO build on.
Examples come from a text file (one prompt per line), a JSONL file (`input`
and `target` as text, or `input_ids`/`target_ids` as token ids), or a seqio
task's split (a language-modelling task's sequences are cut after
`prompt_length` tokens into prompt and reference).

Everything that can fail (settings, checkpoint, examples, lengths) is checked
before the output file is written; the file appears whole (written, then renamed).
"""

if __name__ == '__main__':  # run as `python -m t5x_like.infer`: what `python -m infer` does first
  from t5x_like import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.start('infer', __name__)

import dataclasses
import functools
import json
import math
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np

from models import model as model_lib
from models import preference
from partitioning import partitioner as partitioner_lib
from t5x_like import adapters
from t5x_like import checkpoints
from t5x_like import cli
from t5x_like import decoding
from t5x_like import gin_utils
from t5x_like import loop
from t5x_like import utils
from t5x_like import vocabularies
from t5x_like.data import pipeline

MODES = ('predict', 'score')
DEFAULT_LENGTHS = {'inputs': 512, 'targets': 512}


@dataclasses.dataclass
class Example:
  """One prompt (and target): token ids, and the text they came from."""
  input_ids: List[int]
  target_ids: Optional[List[int]] = None
  input_text: Optional[str] = None
  target_text: Optional[str] = None


def _setting(param: str, value: Any = None) -> str:
  """The name a user sets infer()'s `param` by (its macro if gin binds one)."""
  return gin_utils.bound_macro('.infer', param, value) or f'infer_lib.infer.{param}'


# --- examples ----------------------------------------------------------------------
def read_input_file(path: str, vocabulary: vocabularies.Vocabulary, *, encoder_inputs: bool,
                    setting: str = 'INPUT_FILE', prompt_prefix: Sequence[int] = ()
                    ) -> List[Example]:
  """Examples from a text file (one prompt per non-blank line) or a JSONL file.

  JSONL records hold `input` (or `inputs`/`prompt`) text or `input_ids`, and
  optionally `target` (or `targets`) text or `target_ids`. Target text gets
  the vocabulary's EOS appended (as seqio tasks' targets do); so does input
  text for an encoder-decoder (`encoder_inputs`); input text starts with
  `prompt_prefix` (a tokenizer's BOS). Token ids are used as given.
  """
  if not os.path.isfile(path):
    what = 'is a directory' if os.path.isdir(path) else 'does not exist'
    raise utils.InputError(f'{setting}={path!r} {what}: point it at a .txt (one prompt per '
                           'line) or .jsonl file')
  eos = [vocabulary.eos_id]
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  out = []
  if not path.endswith(('.jsonl', '.json')):
    for line in lines:
      if line.strip():
        ids = list(prompt_prefix) + list(vocabulary.encode(line)) + (
            eos if encoder_inputs else [])
        out.append(Example(ids, input_text=line))
  else:
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise utils.InputError(f'{path} line {n} is not JSON ({e.msg}): write one JSON object '
                               'per line') from None
      if not isinstance(record, dict):
        raise utils.InputError(f'{path} line {n} is not a JSON object: write records like '
                               '{"input": "...", "target": "..."}')
      out.append(_example_from_record(record, vocabulary, encoder_inputs, f'{path} line {n}',
                                      prompt_prefix))
  if not out:
    raise utils.InputError(f'{setting}={path!r} holds no examples')
  return out


def _example_from_record(record, vocabulary, encoder_inputs, where, prompt_prefix=()
                         ) -> Example:
  eos = [vocabulary.eos_id]

  def ids(field_text, field_ids, add_eos, prefix=()):
    names = [f for f in field_text if f in record]
    if field_ids in record:
      value = record[field_ids]
      if not (isinstance(value, list) and all(isinstance(i, int) and i >= 0 for i in value)):
        raise utils.InputError(f'{where}: {field_ids} must be a list of token ids (ints >= 0)')
      return list(value), None
    if names:
      text = record[names[0]]
      if not isinstance(text, str):
        raise utils.InputError(f'{where}: {names[0]} must be a string')
      return list(prefix) + list(vocabulary.encode(text)) + (eos if add_eos else []), text
    return None, None

  input_ids, input_text = ids(('input', 'inputs', 'prompt'), 'input_ids', encoder_inputs,
                              prompt_prefix)
  if input_ids is None:
    raise utils.InputError(f'{where} has no "input" (or "inputs", "prompt", "input_ids"): '
                           f'found {sorted(record)}')
  target_ids, target_text = ids(('target', 'targets'), 'target_ids', True)
  return Example(input_ids, target_ids, input_text, target_text)


def task_examples(name: str, split: str, vocabulary: vocabularies.Vocabulary,
                  feature_lengths: Mapping[str, int], prompt_length: int,
                  num_examples: Optional[int]) -> List[Example]:
  """Examples of a registered task or mixture's split, in order (no shuffling).

  A task with `inputs` gives (inputs, targets); a language-modelling task
  (targets only) gives its sequences cut after `prompt_length` tokens.
  """
  task = pipeline.get_mixture_or_task(name)
  try:
    ds = task.get_dataset(sequence_length=dict(feature_lengths), split=split, shuffle=False,
                          num_epochs=1)
  except (ValueError, KeyError) as e:
    raise utils.InputError(f'{name} has no usable split {split!r} ({str(e).splitlines()[0]}): '
                           'set SPLIT') from None
  out = []
  for ex in ds.as_numpy_iterator():
    if num_examples is not None and len(out) >= num_examples:
      break
    if 'inputs' in ex:
      inputs, targets = [int(i) for i in ex['inputs']], [int(i) for i in ex['targets']]
    else:
      seq = [int(i) for i in ex['targets']]
      if len(seq) <= prompt_length:
        continue
      inputs, targets = seq[:prompt_length], seq[prompt_length:]
    out.append(Example(inputs, targets, vocabulary.decode(inputs), vocabulary.decode(targets)))
  if not out:
    raise utils.InputError(f'{name} split {split!r} gave no examples (sequences longer than '
                           f'prompt_length={prompt_length} are needed for a targets-only task)')
  return out


# --- batches -----------------------------------------------------------------------
def _round_up(n: int, multiple: int = 8) -> int:
  return max(multiple, int(math.ceil(n / multiple)) * multiple)


def _pad(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for r, row in enumerate(rows):
    out[r, :len(row)] = row
  return out


def _decoder_prompt(model, example: Example) -> List[int]:
  start = [] if model.decoder_start_token is None else [model.decoder_start_token]
  return start + list(example.input_ids)


def predict_batch(model: model_lib.BaseModel, examples: Sequence[Example],
                  length: int) -> Dict[str, np.ndarray]:
  """The batch `decoding.generate` reads, padded to `length` tokens."""
  if isinstance(model, model_lib.EncoderDecoderModel):
    return {'encoder_input_tokens': _pad([e.input_ids for e in examples], length)}
  prompts = [_decoder_prompt(model, e) for e in examples]
  return {'prompt_tokens': _pad(prompts, length),
          'prompt_lengths': np.array([len(p) for p in prompts], np.int32)}


def prompt_length(model: model_lib.BaseModel, example: Example) -> int:
  if isinstance(model, model_lib.EncoderDecoderModel):
    return len(example.input_ids)
  return len(_decoder_prompt(model, example))


def score_batch(model: model_lib.BaseModel, examples: Sequence[Example],
                lengths: Tuple[int, int]) -> Dict[str, np.ndarray]:
  """Model features whose loss weights cover exactly the target tokens.

  Decoder-only: the model reads [start] + input + target[:-1] and predicts
  input + target (a prefix-LM attends bidirectionally over [start] + input, as
  seqio's PrefixLMFeatureConverter marks it). Encoder-decoder: the encoder
  reads the input, the decoder [start] + target[:-1].
  """
  n = len(examples)
  if isinstance(model, model_lib.EncoderDecoderModel):
    enc_len, dec_len = lengths
    targets = [e.target_ids for e in examples]
    start = model.decoder_start_token or 0
    batch = {'encoder_input_tokens': _pad([e.input_ids for e in examples], enc_len),
             'decoder_input_tokens': _pad([[start] + t[:-1] for t in targets], dec_len),
             'decoder_target_tokens': _pad(targets, dec_len),
             'decoder_loss_weights': _pad([[1] * len(t) for t in targets], dec_len)}
    seg = _pad([[1] * len(t) for t in targets], dec_len)
    batch['decoder_segment_ids'] = seg
    batch['decoder_positions'] = np.broadcast_to(np.arange(dec_len, dtype=np.int32),
                                                 (n, dec_len)).copy()
    batch['encoder_segment_ids'] = _pad([[1] * len(e.input_ids) for e in examples], enc_len)
    batch['encoder_positions'] = np.broadcast_to(np.arange(enc_len, dtype=np.int32),
                                                 (n, enc_len)).copy()
    return batch
  length = lengths[1]
  inputs, targets, weights, prefix = [], [], [], []
  for e in examples:
    full = list(e.input_ids) + list(e.target_ids)
    if model.decoder_start_token is None:  # the input's own first token starts it
      inputs.append(full[:-1])
      targets.append(full[1:])
      weights.append([0] * (len(e.input_ids) - 1) + [1] * len(e.target_ids))
      prefix.append([1] * len(e.input_ids))
    else:
      inputs.append([model.decoder_start_token] + full[:-1])
      targets.append(full)
      weights.append([0] * len(e.input_ids) + [1] * len(e.target_ids))
      prefix.append([1] * (len(e.input_ids) + 1))
  batch = {'decoder_input_tokens': _pad(inputs, length),
           'decoder_target_tokens': _pad(targets, length),
           'decoder_loss_weights': _pad(weights, length),
           'decoder_segment_ids': _pad([[1] * len(t) for t in inputs], length),
           'decoder_positions': np.broadcast_to(np.arange(length, dtype=np.int32),
                                                (n, length)).copy()}
  if model.inputs_bidirectional_attention:
    batch['decoder_causal_attention'] = _pad(prefix, length)
  return batch


def score_lengths(model: model_lib.BaseModel, examples: Sequence[Example]) -> Tuple[int, int]:
  """(encoder length, decoder length) each example needs, before padding."""
  if isinstance(model, model_lib.EncoderDecoderModel):
    return (max(len(e.input_ids) for e in examples), max(len(e.target_ids) for e in examples))
  extra = 0 if model.decoder_start_token is None else 1
  return 0, max(len(e.input_ids) + len(e.target_ids) - 1 + extra for e in examples)


def batches(examples: Sequence[Example], batch_size: int) -> Iterator[Tuple[List[Example], int]]:
  """Full batches (the last padded with copies of its first example) and the real count."""
  for i in range(0, len(examples), batch_size):
    chunk = list(examples[i:i + batch_size])
    n = len(chunk)
    yield chunk + [chunk[0]] * (batch_size - n), n


# --- parameters ----------------------------------------------------------------------
def abstract_params(model: model_lib.BaseModel, partitioner: partitioner_lib.Partitioner):
  """The model's parameters as ShapeDtypeStructs on their shardings."""
  lengths = {'inputs': 8, 'targets': 8}
  with partitioner.context():
    boxed = jax.eval_shape(lambda: model.init_variables(
        jax.random.PRNGKey(0), model.dummy_batch(1, lengths))['params'])
  shardings = partitioner.boxed_shardings(boxed)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def checked_checkpoint(path: Any, abstract: Any, setting: str = 'CHECKPOINT_PATH',
                       model=None, partitioner=None, base: Optional[str] = None,
                       base_setting: str = 'BASE_CHECKPOINT') -> checkpoints.InitialCheckpoint:
  """The checkpoint at `path`, checked (read-only) to fit `abstract` parameters; a run
  that saved only its trained parameters is read over its frozen base (`base`, or the one
  it records: t5x_like/adapters.py)."""
  if not isinstance(path, str) or not path.strip():
    raise utils.InputError(f'{setting}={path!r} must name a MODEL_DIR or one of its '
                           'checkpoints/<step> folders')
  if model is None:
    ckpt = checkpoints.ParamsCheckpoint(path, setting)
  else:
    ckpt = adapters.params_checkpoint(path, model, {'inputs': 8, 'targets': 8}, base, setting,
                                      base_setting, partitioner)
  ckpt.check(abstract)
  return ckpt


def restore(ckpt: checkpoints.InitialCheckpoint, abstract: Any) -> Any:
  """The checkpoint's parameters (verified) on `abstract`'s shardings."""
  return ckpt.restore(abstract)


def check_output_file(path: Any, setting: str) -> str:
  """An output file path that can be written (its folder is created later)."""
  if not isinstance(path, str) or not path.strip():
    raise utils.InputError(f'{setting}={path!r} must name the output file')
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise utils.InputError(f'{setting}={path!r} is a directory: name a file, e.g. '
                           f'{os.path.join(path, "predictions.jsonl")}')
  existing = utils.nearest_existing(os.path.dirname(path))
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise utils.InputError(f'{setting}={path!r} cannot be written ({existing} is not a '
                           'writable directory): point it elsewhere')
  return path


def write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """Writes the records whole: to a temporary file, then renamed over `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  os.replace(tmp, path)


# --- the entry point -------------------------------------------------------------------
def infer(*,
          model: model_lib.BaseModel,
          checkpoint_path: str,
          partitioner: partitioner_lib.Partitioner,
          vocabulary: vocabularies.Vocabulary,
          output_file: str,
          mode: str = 'predict',
          input_file: Optional[str] = None,
          mixture_or_task_name: Optional[str] = None,
          split: str = 'validation',
          task_feature_lengths: Optional[Mapping[str, int]] = None,
          num_examples: Optional[int] = None,
          prompt_length: int = 64,
          batch_size: int = 8,
          decoding_config: Optional[decoding.DecodingConfig] = None,
          base_checkpoint: Optional[str] = None,
          config_str: Optional[str] = None) -> Dict[str, Any]:
  """Predicts or scores examples with a checkpoint; writes JSONL to `output_file`.

  Args:
    model: the model the checkpoint was trained as (its gin file).
    checkpoint_path: a MODEL_DIR (its newest checkpoint) or a checkpoints/<step> folder.
    partitioner: mesh and rules to run on (the training mesh works).
    vocabulary: what the model was trained with (`t5x_like/vocabularies.py`).
    output_file: the JSONL file to write.
    mode: 'predict' or 'score'.
    input_file: prompts (.txt) or records (.jsonl); or instead:
    mixture_or_task_name: a registered task or mixture, read from `split`.
    split: the task split.
    task_feature_lengths: sequence lengths for the task's preprocessors.
    num_examples: at most this many examples (None: all).
    prompt_length: where a targets-only task's sequences are cut into prompt and target.
    batch_size: examples per compiled call (rounded up to a multiple of the
      data-parallel size; the last batch is padded).
    decoding_config: how to generate (mode 'predict').
    base_checkpoint: for a run that saved only its trained parameters (PEFT):
      another copy of its frozen base (default: the one it records); its digest
      must match.
    config_str: the operative gin config (unused; passed by the CLI).

  Returns:
    {'records': the written records, 'output_file', 'step', 'checkpoint'}.
  """
  del config_str
  decoding_config = decoding_config or decoding.DecodingConfig()
  _check_settings(locals())
  output_file = check_output_file(output_file, _setting('output_file', output_file))
  if mode == 'predict':
    if isinstance(model, preference.RewardModel):
      raise utils.InputError(f"a RewardModel scores, it does not generate: set "
                             f"{_setting('mode', mode)} = 'score'")
    model.check_decodable()
  batch_size = call_batch_size(partitioner, batch_size)
  partitioner.check_experts(model.config.num_experts)
  abstract = abstract_params(model, partitioner)
  ckpt = checked_checkpoint(checkpoint_path, abstract, _setting('checkpoint_path',
                                                                 checkpoint_path),
                            model, partitioner, base_checkpoint,
                            _setting('base_checkpoint', base_checkpoint))
  # (A reward model reads examples as its decoder does.)
  io_model = model.policy if isinstance(model, preference.RewardModel) else model
  examples = _examples(io_model, vocabulary, mode, input_file, mixture_or_task_name, split,
                       task_feature_lengths, num_examples, prompt_length)
  if any(e.input_text is not None or e.target_text is not None for e in examples):
    vocabularies.check_fits(vocabulary, model.config.vocab_size)  # text was encoded with it
  _check_lengths(io_model, examples, mode, decoding_config)

  params = restore(ckpt, abstract)
  settings = {'checkpoint': ckpt.directory, 'step': ckpt.step, 'mode': mode}
  if mode == 'predict':
    settings['decoding'] = dataclasses.asdict(decoding_config)
    records = _predict(model, params, partitioner, vocabulary, examples, batch_size,
                       decoding_config)
  else:
    records = _score(model, params, partitioner, examples, batch_size)
  for r in records:
    r['settings'] = settings
  if jax.process_index() == 0:
    write_jsonl(output_file, records)
  result = {'records': records, 'output_file': output_file, 'step': ckpt.step,
            'checkpoint': ckpt.directory}
  if mode == 'predict' and exact_match(records) is not None:
    result['exact_match'] = exact_match(records)
  return result


def _check_settings(args: Mapping[str, Any]) -> None:
  if args['mode'] not in MODES:
    raise utils.InputError(f'{_setting("mode", args["mode"])}={args["mode"]!r} must be one of '
                           f'{", ".join(map(repr, MODES))}')
  for param, low in (('batch_size', 1), ('prompt_length', 1)):
    utils.check_int(_setting(param, args[param]), args[param], low)
  if args['num_examples'] is not None:
    utils.check_int(_setting('num_examples', args['num_examples']), args['num_examples'], 1,
                    fix='set it >= 1, or None for every example')
  if (args['input_file'] is None) == (args['mixture_or_task_name'] is None):
    raise utils.InputError(
        'set exactly one of INPUT_FILE (a .txt or .jsonl file) and MIXTURE_OR_TASK_NAME (a '
        'registered task), not ' + ('both' if args['input_file'] is not None else 'neither'))
  utils.check_types(args, (('model', (model_lib.BaseModel, preference.RewardModel)),
                           ('partitioner', partitioner_lib.Partitioner),
                           ('vocabulary', vocabularies.Vocabulary),
                           ('decoding_config', decoding.DecodingConfig)),
                    _setting, 'bind it as gin/runs/infer.gin does')


def _examples(model, vocabulary, mode, input_file, task, split, lengths, num_examples,
              prompt_len) -> List[Example]:
  encdec = isinstance(model, model_lib.EncoderDecoderModel)
  if input_file is not None:
    prefix = []
    if not encdec and model.decoder_start_token is None:
      prefix = list(getattr(vocabulary, 'prompt_prefix', []))
    examples = read_input_file(input_file, vocabulary, encoder_inputs=encdec,
                               setting=_setting('input_file', input_file), prompt_prefix=prefix)
    if num_examples is not None:
      examples = examples[:num_examples]
  else:
    examples = task_examples(task, split, vocabulary, lengths or DEFAULT_LENGTHS, prompt_len,
                             num_examples)
  for i, e in enumerate(examples):
    if mode == 'score' and not e.target_ids:
      raise utils.InputError(f'example {i} has no target to score: give each record a '
                             '"target" (or "target_ids"), or use mode \'predict\'')
    if not e.input_ids and (encdec or model.decoder_start_token is None):
      raise utils.InputError(f'example {i} has an empty input: give every example an input')
  return examples


def _check_lengths(model, examples, mode, config) -> None:
  limit = model.config.max_length
  for i, e in enumerate(examples):
    if mode == 'predict':
      n = prompt_length(model, e)
      if limit and n + config.max_decode_length > limit:
        raise decoding.DecodingError(
            f'example {i}: a prompt of {n} tokens plus max_decode_length='
            f'{config.max_decode_length} new tokens is longer than the model\'s max_length='
            f'{limit}: shorten the prompt or lower DecodingConfig.max_decode_length')
    elif limit:
      enc, dec = score_lengths(model, [e])
      if max(enc, dec) > limit:
        raise decoding.DecodingError(
            f'example {i}: {max(enc, dec)} tokens are longer than the model\'s max_length='
            f'{limit}: shorten the example')


def call_batch_size(partitioner: partitioner_lib.Partitioner, batch_size: int) -> int:
  """`batch_size` rounded up to split evenly over the data-parallel devices and
  the processes (the extra rows are padding)."""
  unit = math.lcm(partitioner.data_parallel_size, jax.process_count())
  return -(-batch_size // unit) * unit


def _shard(partitioner, batch, batch_size):
  local = partitioner.host_slice(batch_size)
  return partitioner.shard_batch({k: v[local] for k, v in batch.items()}, batch_size)


@functools.lru_cache(maxsize=16)
def _generate_fn(model, config, partitioner):
  # Parameters arrive on their shardings and batches on the batch sharding.
  return jax.jit(lambda p, b, rng: decoding.generate(model, p, b, config, rng),
                 out_shardings=partitioner.replicated())


@functools.lru_cache(maxsize=16)
def _score_fn(model, partitioner):
  return jax.jit(model.token_log_likelihoods, out_shardings=partitioner.replicated())


def generate_tokens(model, params, partitioner, examples: Sequence[Example], batch_size: int,
                    config: decoding.DecodingConfig) -> List[Tuple[List[int], float]]:
  """(generated ids, score) per example, in order."""
  length = _round_up(max(prompt_length(model, e) for e in examples))
  generate = _generate_fn(model, config, partitioner)
  key = jax.random.PRNGKey(config.seed)
  out = []
  for i, (chunk, n) in enumerate(batches(examples, batch_size)):
    batch = _shard(partitioner, predict_batch(model, chunk, length), batch_size)
    with partitioner.context():
      d = jax.device_get(generate(params, batch, jax.random.fold_in(key, i)))
    out.extend(([int(t) for t in tokens[:count]], float(score))
               for tokens, count, score in zip(d.tokens[:n], d.lengths[:n], d.scores[:n]))
  return out


def score_tokens(model, params, partitioner, examples: Sequence[Example],
                 batch_size: int) -> List[List[float]]:
  """The log-likelihood of every target token, per example, in order."""
  enc, dec = score_lengths(model, examples)
  lengths = (_round_up(enc), _round_up(dec))
  score = _score_fn(model, partitioner)
  out = []
  for chunk, n in batches(examples, batch_size):
    batch = score_batch(model, chunk, lengths)
    weights = batch['decoder_loss_weights']
    with partitioner.context():
      logp = np.asarray(jax.device_get(score(params, _shard(partitioner, batch, batch_size))))
    out.extend([float(x) for x in logp[r][weights[r] > 0]] for r in range(n))
  return out


def _predict(model, params, partitioner, vocabulary, examples, batch_size, config):
  records = []
  for e, (ids, score) in zip(examples, generate_tokens(model, params, partitioner, examples,
                                                        batch_size, config)):
    record = {'input': e.input_text if e.input_text is not None else
              vocabulary.decode(e.input_ids),
              'output': vocabulary.decode(ids), 'output_ids': ids, 'score': score}
    if e.target_ids is not None:
      record['target'] = (e.target_text if e.target_text is not None else
                          vocabulary.decode(e.target_ids))
    records.append(record)
  loop.chief_print(f'predict: {len(records)} examples')
  return records


def exact_match(records: Sequence[Mapping[str, Any]]) -> Optional[float]:
  """The share of predictions equal to their target (surrounding space ignored); None
  without targets."""
  known = [r for r in records if 'target' in r and 'output' in r]
  if not known:
    return None
  return sum(r['output'].strip() == r['target'].strip() for r in known) / len(known)


def _rewards(model, params, partitioner, examples, batch_size) -> List[float]:
  """A reward model's r(input, target) per example, in order."""
  enc, dec = score_lengths(model.policy, examples)
  fn = _reward_fn(model, partitioner)
  out = []
  for chunk, n in batches(examples, batch_size):
    batch = score_batch(model.policy, chunk, (_round_up(enc), _round_up(dec)))
    with partitioner.context():
      r = np.asarray(jax.device_get(fn(params, _shard(partitioner, batch, batch_size))))
    out.extend(float(x) for x in r[:n])
  return out


@functools.lru_cache(maxsize=4)
def _reward_fn(model, partitioner):
  return jax.jit(model.rewards, out_shardings=partitioner.replicated())


def _scored_record(e: Example, **values) -> Dict[str, Any]:
  record = {'input_ids': list(map(int, e.input_ids)),
            'target_ids': list(map(int, e.target_ids)), **values}
  if e.input_text is not None:
    record['input'] = e.input_text
  if e.target_text is not None:
    record['target'] = e.target_text
  return record


def _score(model, params, partitioner, examples, batch_size):
  if isinstance(model, preference.RewardModel):
    records = [_scored_record(e, reward=r) for e, r in zip(
        examples, _rewards(model, params, partitioner, examples, batch_size))]
    loop.chief_print(f'score: rewards of {len(records)} examples')
    return records
  records = [_scored_record(e, log_likelihood=float(np.sum(per_token, dtype=np.float64)),
                            token_log_likelihoods=per_token, num_tokens=len(per_token))
             for e, per_token in zip(examples, score_tokens(model, params, partitioner,
                                                            examples, batch_size))]
  loop.chief_print(f'score: {len(records)} examples')
  return records


# --- command line ------------------------------------------------------------------------
def run(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> Dict[str, Any]:
  """Parses gin files and bindings afresh and calls infer(): the Python/Colab entry."""
  return cli.run_gin(infer, gin_files, bindings, 'runs/infer.gin')


def main(argv: Sequence[str]) -> Dict[str, Any]:
  args, bindings = cli.parse_args('infer', argv)
  cli.join_job(args)
  return run(args.gin_file, bindings)


def _report(result: Dict[str, Any]) -> None:
  records = result['records']
  loop.chief_print(f'wrote {len(records)} records to {result["output_file"]} (checkpoint '
                   f'{result["checkpoint"]} step {result["step"]})')
  if 'exact_match' in result:
    loop.chief_print(f'exact match with the targets: {result["exact_match"]:.3f}')
  for r in records[:3]:
    if 'output' in r:
      loop.chief_print(f'  {r["input"]!r} -> {r["output"]!r}')
    elif 'reward' in r:
      loop.chief_print(f'  reward {r["reward"]:.4f}')
    else:
      loop.chief_print(f'  log-likelihood {r["log_likelihood"]:.4f} over {r["num_tokens"]} '
                       'tokens')


def console_main(argv: Optional[Sequence[str]] = None) -> None:
  cli.console(main, argv, _report)


if __name__ == '__main__':
  from t5x_like import infer as _infer_module  # pylint: disable=g-import-self
  _infer_module.console_main()
