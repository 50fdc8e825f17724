"""Parameter and FLOP accounting against hand counts and built models."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from models import config as cfg
from models import model as model_lib
from models import param_count

# A GQA SwiGLU decoder with an untied output layer, small enough to count by hand.
HAND = dict(vocab_size=256, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            num_layers=2, mlp='swiglu', tie_embeddings=False)


def test_exact_flops_equal_a_hand_count():
  c = cfg.DecoderConfig(**HAND)
  length = 16
  # Forward FLOPs per token: 2 * (multiply-adds) of every matmul, listed.
  per_layer = {
      'query [32 -> 4 x 8]': 2 * 32 * 32,
      'key [32 -> 2 x 8]': 2 * 32 * 16,
      'value [32 -> 2 x 8]': 2 * 32 * 16,
      'out [4 x 8 -> 32]': 2 * 32 * 32,
      'wi_0 [32 -> 64]': 2 * 32 * 64,
      'wi_1 [32 -> 64]': 2 * 32 * 64,
      'wo [64 -> 32]': 2 * 64 * 32,
      # causal: the mean query sees (16 + 1) / 2 keys (16 * 17 / 2 pairs over 16 tokens)
      'QK^T (8.5 keys, 4 heads of 8)': 2 * 8.5 * 4 * 8,
      'AV (8.5 values, 4 heads of 8)': 2 * 8.5 * 4 * 8,
  }
  forward = 2 * sum(per_layer.values()) + 2 * 32 * 256  # + logits_dense [32 -> 256]
  assert forward == 57344 - 2 * 2 * 2 * 7.5 * 4 * 8  # 7.5 masked keys per token fewer
  acc = param_count.accounting(c, 0, length)
  assert acc['flops_per_token'] == 3 * forward  # backward = 2 x forward
  # The 6N approximation: N = the non-embedding parameters (the layers and the final norm).
  norms = 2 * 2 * 32 + 32
  n = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64) + norms
  assert acc['non_embedding_params'] == acc['active_non_embedding_params'] == n
  assert acc['flops_per_token_6n'] == 6 * n
  # What 6N leaves out: attention (PaLM's 12 L H Q T), the output layer's 6 d V, and it
  # counts the norms, which are no matmul.
  attention = param_count.attention_flops_per_token(c, length)
  assert attention == 12 * 2 * 4 * 8 * (length + 1) / 2
  assert acc['flops_per_token'] == 6 * n + attention + 6 * 32 * 256 - 6 * norms


@pytest.mark.parametrize('overrides', [
    dict(num_experts=4, num_experts_per_token=2),
    dict(num_experts=8, num_experts_per_token=1, moe_layer_interval=2, num_shared_experts=1),
    dict(tie_embeddings=True, position_encoding='learned', max_length=64),
])
def test_parameter_counts_agree_with_the_built_model(overrides):
  c = cfg.DecoderConfig(**{**HAND, **overrides})
  model = model_lib.DecoderOnlyModel(c)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init_variables(
      jax.random.PRNGKey(0), model.dummy_batch(1, {'targets': 8}))['params']))
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(abstract)}
  size = lambda x: int(np.prod(x.shape))
  total = sum(size(x) for x in flat.values())
  acc = param_count.accounting(c, 0, 8)
  assert acc['params'] == total
  embedding = sum(size(x) for k, x in flat.items()
                  if 'token_embedder' in k or 'logits_dense' in k or 'pos_embedder' in k)
  assert acc['embedding_params'] == embedding
  # Active: each MoE layer's experts a token is not routed to are left out.
  experts = [x for k, x in flat.items() if '/moe/' in k and k.split('/')[-1] in (
      'wi_0', 'wi_1', 'wi', 'wo') and 'shared_mlp' not in k]
  unused = 0
  for x in experts:  # [(layers,) experts, in, out]
    e = x.shape[-3]
    unused += size(x) // e * (e - c.num_experts_per_token)
  assert acc['active_params'] == total - unused


def test_attention_counts_only_the_pairs_the_mask_leaves():
  """Causal: T (T + 1) / 2 pairs; prefix LM: P^2 + the targets' visible keys; an
  encoder-decoder's encoder and cross-attention see every key."""
  assert param_count.causal_pairs(4) == 1 + 2 + 3 + 4
  assert param_count.causal_pairs(5, prefix=2) == 4 + 3 + 4 + 5
  c = cfg.DecoderConfig(**HAND)
  per_pair = 3 * 2 * 2 * c.num_layers * c.num_heads * c.head_dim  # QK^T + AV, train
  base = param_count.train_flops_per_example(c, 0, 16) - per_pair * 136
  # The same 24 tokens as a causal LM, and as a prefix LM of 8 inputs: only attention differs.
  causal = param_count.train_flops_per_example(c, 8, 16, prefix_lm=False)
  prefix = param_count.train_flops_per_example(c, 8, 16)
  assert causal - prefix == per_pair * (param_count.causal_pairs(24) -
                                        param_count.causal_pairs(24, prefix=8))
  assert prefix - causal == per_pair * (64 - 36)
  assert base == param_count.train_flops_per_example(c, 0, 16) - per_pair * 16 * 17 // 2
  lm = model_lib.DecoderOnlyModel(c, inputs_bidirectional_attention=False)
  assert lm.flops_per_example({'inputs': 8, 'targets': 16}) == causal
  assert model_lib.DecoderOnlyModel(c).flops_per_example({'inputs': 8, 'targets': 16}) == prefix
