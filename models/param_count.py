"""Closed-form parameter and FLOP counts for the shipped architectures.

`analytic_param_count` is derived from the layer definitions by hand (not by
walking a parameter tree), so a test comparing it with the built model checks
both. `flops_per_token` counts matmul FLOPs for training (forward + backward
= 3x forward), the way PaLM's MFU does: every weight matmul plus attention's
QK^T and AV over the full sequence.
"""

from models import config as cfg


def _norm(c: cfg.DecoderConfig) -> int:
  return c.emb_dim * (2 if c.norm == cfg.NormType.LAYER else 1)


def _attention(c: cfg.DecoderConfig) -> int:
  d, h, kv, hd = c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim
  n = d * h * hd + 2 * d * kv * hd + h * hd * d
  if c.use_bias:
    n += h * hd + 2 * kv * hd + d
  return n


def _mlp(c: cfg.DecoderConfig) -> int:
  branches = 2 if c.mlp.gated else 1
  n = branches * c.emb_dim * c.mlp_dim + c.mlp_dim * c.emb_dim
  if c.use_bias:
    n += branches * c.mlp_dim + c.emb_dim
  return n


def _layer(c: cfg.DecoderConfig, cross: bool) -> int:
  norms = (1 if c.parallel_block else 2) + (1 if cross else 0)
  return _attention(c) * (2 if cross else 1) + _mlp(c) + norms * _norm(c)


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
    n += c.num_encoder_layers * _layer(c, cross=False) + _stack_extras(c)
    n += c.num_layers * _layer(c, cross=True) + _stack_extras(c)
  else:
    n += c.num_layers * _layer(c, cross=False) + _stack_extras(c)
  return n


def _forward_flops_per_token(c: cfg.DecoderConfig, attended: int, cross_attended: int = 0,
                             cross: bool = False, layers: int = 0, logits: bool = True) -> int:
  d, h, kv, hd = c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim
  branches = 2 if c.mlp.gated else 1
  per_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d)  # projections
  per_layer += 2 * 2 * attended * h * hd  # QK^T and AV
  per_layer += 2 * (branches + 1) * d * c.mlp_dim
  if cross:
    # query/out per decoder token; key/value are counted with the encoder tokens.
    per_layer += 2 * 2 * d * h * hd + 2 * 2 * cross_attended * h * hd
  return layers * per_layer + (2 * d * c.vocab_size if logits else 0)


def train_flops_per_example(c: cfg.DecoderConfig, inputs_length: int, targets_length: int) -> int:
  """Training matmul FLOPs for one (unpacked, full-length) example."""
  if isinstance(c, cfg.EncoderDecoderConfig):
    enc = inputs_length * _forward_flops_per_token(c, inputs_length, layers=c.num_encoder_layers,
                                                   logits=False)
    # key/value projections of the encoder output, per decoder layer
    enc += inputs_length * c.num_layers * 2 * 2 * c.emb_dim * c.num_kv_heads * c.head_dim
    dec = targets_length * _forward_flops_per_token(
        c, targets_length, cross_attended=inputs_length, cross=True, layers=c.num_layers)
    return 3 * (enc + dec)
  length = inputs_length + targets_length
  return 3 * length * _forward_flops_per_token(c, length, layers=c.num_layers)
