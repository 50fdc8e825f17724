"""Tiny configs and helpers shared by the tests."""

import flax.linen as nn
import jax
import numpy as np

from models import config as cfg
from models import model as model_lib

TINY = dict(vocab_size=256, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=2)


def tiny_decoder(**overrides) -> cfg.DecoderConfig:
  return cfg.DecoderConfig(**{**TINY, **overrides})


def tiny_encdec(**overrides) -> cfg.EncoderDecoderConfig:
  return cfg.EncoderDecoderConfig(**{**TINY, 'num_encoder_layers': 2, **overrides})


def random_batch(model: model_lib.BaseModel, batch_size: int, lengths, seed: int = 0,
                 packed: bool = False):
  """A batch of random tokens with every model feature filled consistently."""
  rng = np.random.RandomState(seed)
  b = model.dummy_batch(batch_size, lengths)
  vocab = model.config.vocab_size
  for k in b:
    if k.endswith('tokens'):
      b[k] = rng.randint(2, vocab, size=b[k].shape).astype(np.int32)
  for side, prefix in (('decoder', 'decoder_'), ('encoder', 'encoder_')):
    if f'{prefix}segment_ids' not in b:
      continue
    shape = b[f'{prefix}segment_ids'].shape
    if packed:
      seg = np.zeros(shape, np.int32)
      pos = np.zeros(shape, np.int32)
      for r in range(shape[0]):
        cut = rng.randint(2, shape[1] - 2)
        seg[r, :cut], seg[r, cut:] = 1, 2
        pos[r, :cut] = np.arange(cut)
        pos[r, cut:] = np.arange(shape[1] - cut)
    else:
      seg = np.ones(shape, np.int32)
      pos = np.broadcast_to(np.arange(shape[1]), shape).astype(np.int32)
    b[f'{prefix}segment_ids'] = seg
    b[f'{prefix}positions'] = pos
  if 'decoder_loss_weights' in b:
    b['decoder_loss_weights'] = np.ones_like(b['decoder_loss_weights'])
  if 'decoder_causal_attention' in b:
    b['decoder_causal_attention'] = np.zeros_like(b['decoder_causal_attention'])
  return b


def init_params(model: model_lib.BaseModel, batch, seed: int = 0):
  """Unboxed parameters (initialised under jit: eager init is several times slower)."""
  init = jax.jit(lambda rng, b: nn.unbox(model.init_variables(rng, b)['params']))
  return init(jax.random.PRNGKey(seed), batch)
