"""Closed-form parameter and FLOP counts for the shipped architectures.

`analytic_param_count` is derived from the layer definitions by hand (not by
walking a parameter tree), so a test comparing it with the built model checks
both. `flops_per_token` counts matmul FLOPs for training (forward + backward
= 3x forward), the way PaLM's MFU does (Chowdhery et al., 2022, appendix B):
every weight matmul plus attention's QK^T and AV, over the query-key pairs the
mask leaves and no others. A causal sequence of T tokens has T (T + 1) / 2 such
pairs, not T^2 (the masked half is no useful work, and the blockwise XLA path
and the flash kernels do not compute it); a prefix-LM example of P input and T
target tokens has P^2 + sum over targets of their visible keys; encoders and
cross-attention see every key. (PaLM's 12 L H Q T writes the unmasked count;
MaxText halves it for causal models, as here.) The console's MFU, the
benchmarks and the sweeps all use this count.

Mixture of experts: every `moe_layer_interval`-th layer of each stack has an
MoE block in place of its MLP: `num_experts` bias-free expert MLPs of width
`moe_mlp_dim`, a router [embed, experts] (none for hash routing) and a dense
shared MLP of width `num_shared_experts * moe_mlp_dim`. FLOPs count the
experts a token actually uses (k; k * capacity_factor for expert choice),
not the padding slots of capacity dispatch.
"""

from typing import Optional

from models import config as cfg


def _norm(c: cfg.DecoderConfig) -> int:
  return c.emb_dim * (2 if c.norm == cfg.NormType.LAYER else 1)


def _attention(c: cfg.DecoderConfig) -> int:
  d, h, kv, hd = c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim
  n = d * h * hd + 2 * d * kv * hd + h * hd * d
  if c.use_bias if c.attention_bias is None else c.attention_bias:
    n += h * hd + 2 * kv * hd + d
  return n


def _mlp(c: cfg.DecoderConfig, mlp_dim: Optional[int] = None) -> int:
  mlp_dim = mlp_dim or c.mlp_dim
  branches = 2 if c.mlp.gated else 1
  n = branches * c.emb_dim * mlp_dim + mlp_dim * c.emb_dim
  if c.use_bias:
    n += branches * mlp_dim + c.emb_dim
  return n


def _moe_mlp_dim(c: cfg.DecoderConfig) -> int:
  return c.moe_mlp_dim or c.mlp_dim


def _moe(c: cfg.DecoderConfig) -> int:
  """One MoE block: experts (no biases), router, shared experts."""
  branches = 2 if c.mlp.gated else 1
  m = _moe_mlp_dim(c)
  n = c.num_experts * (branches + 1) * c.emb_dim * m
  if c.router != cfg.RouterKind.HASH:
    n += c.emb_dim * c.num_experts
  if c.num_shared_experts:
    n += _mlp(c, m * c.num_shared_experts)
  return n


def _layer(c: cfg.DecoderConfig, cross: bool, moe: bool = False) -> int:
  norms = (1 if c.parallel_block and not c.parallel_mlp_norm else 2) + (1 if cross else 0)
  return (_attention(c) * (2 if cross else 1) + (_moe(c) if moe else _mlp(c)) +
          norms * _norm(c))


def _stack_layers(c: cfg.DecoderConfig, num_layers: int, cross: bool) -> int:
  return sum(_layer(c, cross, c.is_moe_layer(i)) for i in range(num_layers))


def _stack_extras(c: cfg.DecoderConfig) -> int:
  n = 0
  if c.norm_position == cfg.NormPosition.PRE or c.parallel_block:
    n += _norm(c)  # final norm
  if c.embed_norm:
    n += _norm(c)
  if c.position_encoding == cfg.PositionEncoding.T5_BIAS:
    n += c.num_heads * c.relative_attention_num_buckets
  if c.position_encoding == cfg.PositionEncoding.LEARNED:
    n += c.max_length * c.emb_dim
  return n


def analytic_param_count(c: cfg.DecoderConfig) -> int:
  """Parameters of a DecoderOnly (DecoderConfig) or EncoderDecoder model."""
  n = c.vocab_size * c.emb_dim  # shared token embedding
  if not c.tie_embeddings:
    n += c.emb_dim * c.vocab_size
  if isinstance(c, cfg.EncoderDecoderConfig):
    n += _stack_layers(c, c.num_encoder_layers, cross=False) + _stack_extras(c)
    n += _stack_layers(c, c.num_layers, cross=True) + _stack_extras(c)
  else:
    n += _stack_layers(c, c.num_layers, cross=False) + _stack_extras(c)
  return n


def _forward_flops_per_token(c: cfg.DecoderConfig, attended: float, cross_attended: int = 0,
                             cross: bool = False, layers: int = 0, logits: bool = True) -> float:
  """Forward matmul FLOPs per token; `attended`: the mean number of keys a token's query
  sees in self-attention."""
  d, h, kv, hd = c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim
  branches = 2 if c.mlp.gated else 1
  per_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d)  # projections
  per_layer += 2 * 2 * attended * h * hd  # QK^T and AV
  per_layer += 2 * (branches + 1) * d * c.mlp_dim
  if cross:
    # query/out per decoder token; key/value are counted with the encoder tokens.
    per_layer += 2 * 2 * d * h * hd + 2 * 2 * cross_attended * h * hd
  n = layers * per_layer + (2 * d * c.vocab_size if logits else 0)
  moe_layers = sum(c.is_moe_layer(i) for i in range(layers))
  if moe_layers:  # their MLP FLOPs are the MoE block's instead
    n += int(round(moe_layers * (_moe_forward_flops(c) - 2 * (branches + 1) * d * c.mlp_dim)))
  return n


def _moe_forward_flops(c: cfg.DecoderConfig) -> float:
  """Forward matmul FLOPs of one MoE block per token: the experts it uses,
  the router and the shared experts."""
  branches = 2 if c.mlp.gated else 1
  d, m = c.emb_dim, _moe_mlp_dim(c)
  if c.router == cfg.RouterKind.EXPERT_CHOICE:
    # experts * capacity slots per sequence = k * capacity_factor per token
    used = c.num_experts_per_token * c.capacity_factor
  elif c.router == cfg.RouterKind.HASH:
    used = 1
  else:
    used = c.num_experts_per_token
  router = 0 if c.router == cfg.RouterKind.HASH else 2 * d * c.num_experts
  shared = 2 * (branches + 1) * d * m * c.num_shared_experts
  return used * 2 * (branches + 1) * d * m + router + shared


def causal_pairs(length: int, prefix: int = 0) -> int:
  """Query-key pairs a causal mask leaves over `length` tokens whose first `prefix`
  tokens see each other bidirectionally (prefix LM): prefix^2 + sum_{t >= prefix} (t + 1)."""
  return prefix * prefix + (length * (length + 1) - prefix * (prefix + 1)) // 2


def train_flops_per_example(c: cfg.DecoderConfig, inputs_length: int, targets_length: int,
                            prefix_lm: bool = True) -> int:
  """Training matmul FLOPs for one (unpacked, full-length) example (see the module
  docstring for the attention convention). A decoder-only model's inputs are a
  bidirectional prefix unless `prefix_lm` is False (causal throughout)."""
  if isinstance(c, cfg.EncoderDecoderConfig):
    enc = inputs_length * _forward_flops_per_token(c, inputs_length, layers=c.num_encoder_layers,
                                                   logits=False)
    # key/value projections of the encoder output, per decoder layer
    enc += inputs_length * c.num_layers * 2 * 2 * c.emb_dim * c.num_kv_heads * c.head_dim
    dec = targets_length * _forward_flops_per_token(
        c, causal_pairs(targets_length) / targets_length, cross_attended=inputs_length,
        cross=True, layers=c.num_layers)
    return int(round(3 * (enc + dec)))
  length = inputs_length + targets_length
  attended = causal_pairs(length, prefix=inputs_length if prefix_lm else 0) / length
  return int(round(3 * length * _forward_flops_per_token(c, attended, layers=c.num_layers)))


# --- accounting for sweeps, scaling laws and MFU ---------------------------------------
def embedding_param_count(c: cfg.DecoderConfig) -> int:
  """The token embedding, an untied output layer and learned positions (Kaplan et al.
  leave these out of N)."""
  n = c.vocab_size * c.emb_dim * (1 if c.tie_embeddings else 2)
  if c.position_encoding == cfg.PositionEncoding.LEARNED:
    stacks = 2 if isinstance(c, cfg.EncoderDecoderConfig) else 1
    n += stacks * c.max_length * c.emb_dim
  return n


def _experts_used(c: cfg.DecoderConfig) -> float:
  if c.router == cfg.RouterKind.EXPERT_CHOICE:
    return c.num_experts_per_token * c.capacity_factor
  return 1 if c.router == cfg.RouterKind.HASH else c.num_experts_per_token


def active_param_count(c: cfg.DecoderConfig) -> int:
  """Parameters one token uses: all but the experts it is not routed to (a dense model:
  all of them)."""
  n = analytic_param_count(c)
  if not c.num_experts:
    return n
  branches = 2 if c.mlp.gated else 1
  expert = (branches + 1) * c.emb_dim * _moe_mlp_dim(c)
  stacks = [c.num_layers] + ([c.num_encoder_layers] if isinstance(
      c, cfg.EncoderDecoderConfig) else [])
  moe_layers = sum(c.is_moe_layer(i) for layers in stacks for i in range(layers))
  unused = max(c.num_experts - _experts_used(c), 0)
  return int(round(n - moe_layers * unused * expert))


def attention_flops_per_token(c: cfg.DecoderConfig, length: int) -> float:
  """Training FLOPs of the attention scores and their weighted sum (QK^T and AV) per token
  of a causal decoder-only model over `length` tokens: 3 * 2 * 2 * layers * heads *
  head_dim * (length + 1) / 2 (PaLM's 12 L H Q T over the pairs the causal mask leaves,
  T (T + 1) / 2 of them, instead of all T^2)."""
  return 12 * c.num_layers * c.num_heads * c.head_dim * causal_pairs(length) / length


def param_counts(c: cfg.DecoderConfig) -> dict:
  """Parameters: total, embedding, non-embedding, active per token (MoE), and Kaplan's 6 N
  training FLOPs per token with N the active non-embedding parameters."""
  total = analytic_param_count(c)
  embedding = embedding_param_count(c)
  active = active_param_count(c)
  return dict(params=total, embedding_params=embedding, non_embedding_params=total - embedding,
              active_params=active, active_non_embedding_params=active - embedding,
              flops_per_token_6n=6 * (active - embedding))


def accounting(c: cfg.DecoderConfig, inputs_length: int, targets_length: int) -> dict:
  """A model's parameters and training FLOPs per token, for sweeps and scaling laws.

  `flops_per_token` is the exact matmul count (every projection, the output layer and
  attention's QK^T and AV, forward and backward; `train_flops_per_example` divided by the
  example's tokens). `flops_per_token_6n` is the usual approximation 6 N with N the active
  non-embedding parameters (Kaplan et al.); for a decoder-only model the two differ by the
  attention term `attention_flops_per_token`, the output layer (6 d V) and the parameters
  that are no matmul (norms, biases).
  """
  exact = train_flops_per_example(c, inputs_length, targets_length) / (
      inputs_length + targets_length)
  return {**param_counts(c), 'flops_per_token': exact}
