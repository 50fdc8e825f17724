"""Writes tiny Hugging Face checkpoints with every parameter random, and the
logits `transformers` computes for them: tests/fixtures/hf/<name>/.

Run it with a Python that has `transformers` and `torch` (a separate virtual
environment; CI does not need them, only the small files this writes):

  python -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers safetensors
  /tmp/hfenv/bin/python scripts/make_hf_fixtures.py

Each fixture folder holds config.json, model.safetensors and expected.npz:
`input_ids` [2, length] (and for T5 `decoder_input_ids`) and `logits`
[2, length, vocab] (float32). tests/t5x_like/hf_test.py imports each, compares
our logits and log-likelihoods, and exports it back.

With --check_export DIR NAME, instead loads an exported folder with
transformers and prints the largest logit difference to NAME's expected.npz.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                   'fixtures', 'hf')
VOCAB, LENGTH = 96, 24


def _llama(**extra):
  return transformers.LlamaConfig(**{
      'vocab_size': VOCAB, 'hidden_size': 32, 'intermediate_size': 48, 'num_hidden_layers': 2,
      'num_attention_heads': 4, 'num_key_value_heads': 2, 'max_position_embeddings': 64,
      'rms_norm_eps': 1e-5, 'rope_theta': 500.0, 'tie_word_embeddings': False, **extra})


FIXTURES = {
    'llama_gqa': lambda: _llama(),
    'llama_tied_bias': lambda: _llama(attention_bias=True, tie_word_embeddings=True),
    'llama_rope_linear': lambda: _llama(rope_scaling={'rope_type': 'linear', 'factor': 4.0}),
    'llama_rope_dynamic': lambda: _llama(
        max_position_embeddings=16, rope_scaling={'rope_type': 'dynamic', 'factor': 2.0}),
    'llama_rope_yarn': lambda: _llama(rope_scaling={
        'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 16}),
    'llama_rope_llama3': lambda: _llama(rope_scaling={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 16}),
    'mixtral': lambda: transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, rope_theta=1e6),
    'gpt_neox': lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, rotary_pct=0.25, rotary_emb_base=10000,
        max_position_embeddings=64, use_parallel_residual=True, hidden_act='gelu',
        layer_norm_eps=1e-5, tie_word_embeddings=False),
    'gpt_neox_sequential': lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=64,
        use_parallel_residual=False, hidden_act='gelu', tie_word_embeddings=False),
    'bloom': lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-5),
    'bloom_6_heads': lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, layer_norm_epsilon=1e-5),
    'gpt2': lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0),
    't5_v1_0': lambda: transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj='relu', tie_word_embeddings=True,
        relative_attention_num_buckets=8, relative_attention_max_distance=16),
    't5_v1_1': lambda: transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
        relative_attention_num_buckets=8, relative_attention_max_distance=16),
}


def _randomize(model, seed):
  """Every parameter random: weights, norm scales (around 1) and biases."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith('bias'):
        p.copy_(0.1 * noise)
      elif 'norm' in name or name.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight')) or \
          'layer_norm' in name or 'layernorm' in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith(('.q.weight', '.k.weight')):
        # T5 does not scale q.k by 1/sqrt(head_dim): smaller queries and keys keep
        # the softmax away from ties, where f32 and f64 disagree.
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.3 * noise)


def _tokenizer(out_dir):
  """A byte-level BPE tokenizer.json of the fixtures' vocabulary size (96 ids:
  <unk> <s> </s>, then bytes and merges), trained on a few lines of text."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  text = ['def main():', '    return 0', 'import os', 'the cat sat on the mat'] * 10
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=['<unk>', '<s>', '</s>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:80])
  tok.train_from_iterator(text, trainer)
  tok.save(os.path.join(out_dir, 'tokenizer.json'))


def _inputs(config, seed):
  rng = np.random.RandomState(seed)
  return rng.randint(0, config.vocab_size, (2, LENGTH)).astype(np.int64)


def _model_class(config):
  if isinstance(config, transformers.T5Config):
    return transformers.T5ForConditionalGeneration
  return transformers.AutoModelForCausalLM


def make(name, seed):
  config = FIXTURES[name]()
  torch.manual_seed(seed)
  cls = _model_class(config)
  model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
  _randomize(model, seed)
  model.eval()
  out_dir = os.path.join(OUT, name)
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir, safe_serialization=True)
  for extra in ('generation_config.json',):
    path = os.path.join(out_dir, extra)
    if os.path.exists(path):
      os.remove(path)
  if name == 'llama_gqa':
    _tokenizer(out_dir)
  arrays = _logits(model, config, seed)
  np.savez_compressed(os.path.join(out_dir, 'expected.npz'), **arrays)
  print(f'{name}: {sum(p.numel() for p in model.parameters())} parameters, logits '
        f'{arrays["logits"].shape}')


def _logits(model, config, seed):
  ids = _inputs(config, seed)
  with torch.no_grad():
    if isinstance(config, transformers.T5Config):
      dec = _inputs(config, seed + 1)[:, :LENGTH // 2]
      dec[:, 0] = 0
      logits = model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits
      return {'input_ids': ids, 'decoder_input_ids': dec, 'logits': logits.float().numpy()}
    logits = model(input_ids=torch.tensor(ids)).logits
  return {'input_ids': ids, 'logits': logits.float().numpy()}


def check_export(folder, name):
  """Loads an exported folder with transformers; prints max |logits - expected|."""
  expected = np.load(os.path.join(OUT, name, 'expected.npz'))
  with open(os.path.join(folder, 'config.json')) as f:
    config = transformers.AutoConfig.for_model(**json.load(f))
  cls = _model_class(config)
  model = cls.from_pretrained(folder)
  model.eval()
  with torch.no_grad():
    if 'decoder_input_ids' in expected:
      logits = model(input_ids=torch.tensor(expected['input_ids']),
                     decoder_input_ids=torch.tensor(expected['decoder_input_ids'])).logits
    else:
      logits = model(input_ids=torch.tensor(expected['input_ids'])).logits
  print(json.dumps({'max_abs_diff': float(np.abs(logits.numpy() - expected['logits']).max())}))


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--only', nargs='*', default=None)
  parser.add_argument('--check_export', nargs=2, metavar=('DIR', 'NAME'))
  args = parser.parse_args(argv)
  if args.check_export:
    check_export(*args.check_export)
    return
  for seed, name in enumerate(sorted(FIXTURES)):
    if args.only is None or name in args.only:
      make(name, seed)


if __name__ == '__main__':
  main(sys.argv[1:])
