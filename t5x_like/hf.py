"""Hugging Face interop: `python -m t5x_like.hf import|export`.

  python -m t5x_like.hf import --hf_dir DIR --model_dir OUT
      reads DIR/config.json and DIR/model.safetensors (or a sharded
      model.safetensors.index.json; never pickle) and writes OUT/config.gin (a
      model gin file binding every architecture choice, for train, infer and
      eval) and OUT/checkpoints/0 (the parameters, for CHECKPOINT_PATH or
      INITIAL_CHECKPOINT).
  python -m t5x_like.hf export --model_dir M --hf_dir OUT
      writes a directory `transformers` loads (config.json, model.safetensors)
      from M's newest checkpoint and M/config.gin.

Families: T5 (v1.0 tied with scaled logits, v1.1, UL2/Flan-T5), LLaMA 1/2/3 and
Mistral (GQA, rope_theta, RoPE scaling), Mixtral, GPT-NeoX (partial rotary,
parallel residual), BLOOM (ALiBi) and GPT-2 (learned positions). Each family is
a table of rules: which of our parameters come from which HF tensors, and the
reshapes both ways. A tensor no rule uses, or a parameter no rule fills, is an
error naming it. Import reads one tensor at a time and places each parameter on
its sharding as it is built.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen
import jax
import numpy as np

from models import config as cfg
from models import peft
from models import model as model_lib
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import adapters
from t5x_like import checkpoints
from t5x_like import gin_utils
from t5x_like import infer as infer_lib
from t5x_like import utils

SUPPORTED = ('bloom', 'gpt2', 'gpt_neox', 'llama', 'mistral', 'mixtral', 't5')
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')


class HfError(utils.InputError):
  """A Hugging Face directory or model this converter cannot take (one line)."""


# --- reading ----------------------------------------------------------------------------
class Tensors:
  """The safetensors of a HF directory, read one tensor at a time."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._open = safe_open
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    single = os.path.join(hf_dir, 'model.safetensors')
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    elif os.path.isfile(single):
      with safe_open(single, framework='numpy') as f:
        self.files = {name: single for name in f.keys()}
    else:
      pickles = sorted(f for f in os.listdir(hf_dir) if f.endswith(PICKLE_SUFFIXES))
      if pickles:
        raise HfError(
            f'{hf_dir} has only pickled weights ({", ".join(pickles)}); safetensors is required '
            '(pickle can run code): convert with transformers: AutoModelForCausalLM (or '
            f'AutoModelForSeq2SeqLM).from_pretrained("{hf_dir}").save_pretrained("{hf_dir}", '
            'safe_serialization=True)')
      raise HfError(f'{hf_dir} has no model.safetensors or model.safetensors.index.json')
    for path in set(self.files.values()):
      if not os.path.isfile(path):
        raise HfError(f'{path} is listed in model.safetensors.index.json but missing')
    self.used = set()

  def names(self) -> List[str]:
    return sorted(self.files)

  def get(self, name: str) -> np.ndarray:
    """The tensor in float32 (bf16/f16 files too, through the flax loader)."""
    if name not in self.files:
      raise HfError(f'the HF checkpoint has no tensor {name!r} that the mapping needs')
    self.used.add(name)
    with self._open(self.files[name], framework='numpy') as f:
      try:
        return f.get_tensor(name).astype(np.float32, copy=False)
      except (TypeError, ValueError):  # bfloat16: numpy has no such dtype
        pass
    with self._open(self.files[name], framework='flax') as f:
      return np.asarray(f.get_tensor(name), np.float32)


def read_config(hf_dir: str) -> Dict[str, Any]:
  if not os.path.isdir(hf_dir):
    raise HfError(f'--hf_dir {hf_dir!r} is not a directory')
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise HfError(f'{hf_dir} has no config.json: point --hf_dir at a Hugging Face model folder')
  with open(path) as f:
    hf = json.load(f)
  kind = hf.get('model_type')
  if kind not in SUPPORTED:
    raise HfError(f'model_type {kind!r} is not supported: supported are '
                  f'{", ".join(SUPPORTED)}')
  return hf


def _rope_params(hf: Mapping[str, Any]) -> Dict[str, Any]:
  """rope_theta and rope_scaling in either layout (transformers 4: top level
  `rope_theta`, `rope_scaling`; 5: `rope_parameters`)."""
  params = dict(hf.get('rope_parameters') or {})
  scaling = dict(hf.get('rope_scaling') or {})
  out = {**scaling, **params}
  if 'rope_theta' not in out:
    out['rope_theta'] = hf.get('rope_theta', hf.get('rotary_emb_base', 10000.0))
  kind = out.get('rope_type', out.get('type', 'default'))
  out['rope_type'] = kind
  return out


def _scaling_fields(hf: Mapping[str, Any]) -> Dict[str, Any]:
  rp = _rope_params(hf)
  fields = {'rope_max_wavelength': float(rp['rope_theta'])}
  kind = rp['rope_type']
  if kind == 'default':
    return fields
  if kind not in ('linear', 'dynamic', 'yarn', 'llama3'):
    raise HfError(f'rope_scaling type {kind!r} is not supported: linear, dynamic, yarn, llama3')
  fields['rope_scaling'] = kind
  fields['rope_scaling_factor'] = float(rp.get('factor', 1.0))
  max_pos = hf.get('max_position_embeddings')
  if kind == 'dynamic':  # transformers grows the base past max_position_embeddings
    fields['rope_original_max_length'] = int(max_pos)
  elif kind in ('yarn', 'llama3'):
    fields['rope_original_max_length'] = int(rp.get('original_max_position_embeddings') or
                                             max_pos)
  if kind == 'llama3':
    fields['rope_low_freq_factor'] = float(rp.get('low_freq_factor', 1.0))
    fields['rope_high_freq_factor'] = float(rp.get('high_freq_factor', 4.0))
  if kind == 'yarn':
    fields['rope_yarn_beta_fast'] = float(rp.get('beta_fast') or 32.0)
    fields['rope_yarn_beta_slow'] = float(rp.get('beta_slow') or 1.0)
    if rp.get('mscale') or rp.get('mscale_all_dim'):
      raise HfError('yarn rope_scaling with mscale is not supported')
    if rp.get('attention_factor') is not None:
      fields['rope_yarn_attention_factor'] = float(rp['attention_factor'])
    if rp.get('truncate') is False:
      raise HfError('yarn rope_scaling with truncate = false is not supported')
  return fields


# --- config mapping ---------------------------------------------------------------------
@dataclasses.dataclass
class Family:
  """What one HF model_type is in our terms."""
  name: str
  encoder_decoder: bool
  fields: Dict[str, Any]  # DecoderConfig / EncoderDecoderConfig fields
  model_kwargs: Dict[str, Any]


def family_of(hf: Mapping[str, Any]) -> Family:
  kind = hf['model_type']
  common = dict(dtype='float32', param_dtype='float32', scan_layers=True, remat_policy='none',
                dropout_rate=0.0, vocab_size=int(hf['vocab_size']))
  if kind in ('llama', 'mistral', 'mixtral'):
    heads = int(hf['num_attention_heads'])
    emb = int(hf['hidden_size'])
    act = hf.get('hidden_act', 'silu')
    if act != 'silu':
      raise HfError(f'{kind} with hidden_act={act!r} is not supported (silu only)')
    if hf.get('mlp_bias'):
      raise HfError(f'{kind} with mlp_bias = true is not supported')
    if hf.get('sliding_window') and hf.get('use_sliding_window', True) and int(
        hf['sliding_window']) < int(hf.get('max_position_embeddings', 0)):
      raise HfError(f'{kind} with a sliding window shorter than max_position_embeddings is not '
                    'supported')
    rp = _rope_params(hf)
    fields = dict(
        common, emb_dim=emb, num_heads=heads,
        num_kv_heads=int(hf.get('num_key_value_heads') or heads),
        head_dim=int(hf.get('head_dim') or emb // heads), mlp_dim=int(hf['intermediate_size']),
        num_layers=int(hf['num_hidden_layers']), mlp='swiglu', use_bias=False,
        attention_bias=bool(hf.get('attention_bias', False)), norm='rms', norm_position='pre',
        norm_epsilon=float(hf.get('rms_norm_eps', 1e-6)), embed_norm=False,
        parallel_block=False, parallel_mlp_norm=False, position_encoding='rope',
        rotary_fraction=float(rp.get('partial_rotary_factor', 1.0)),
        # RoPE sets no hard limit (context extension runs past max_position_embeddings).
        max_length=None,
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)), scale_tied_logits=False,
        query_scale=None, gelu_approximate=True, **_scaling_fields(hf))
    if kind == 'mixtral':
      fields.update(num_experts=int(hf['num_local_experts']),
                    num_experts_per_token=int(hf['num_experts_per_tok']), moe_layer_interval=1,
                    moe_mlp_dim=int(hf['intermediate_size']), router='token_choice',
                    moe_impl='ragged_dot', renormalize_gates=True, router_jitter=0.0,
                    num_shared_experts=0)
    return Family(kind, False, fields, dict(z_loss=0.0, decoder_start_token=None))
  if kind == 'gpt_neox':
    heads, emb = int(hf['num_attention_heads']), int(hf['hidden_size'])
    act = hf.get('hidden_act', 'gelu')
    if act not in ('gelu', 'gelu_new', 'gelu_pytorch_tanh'):
      raise HfError(f'gpt_neox with hidden_act={act!r} is not supported')
    rp = _rope_params(hf)
    parallel = bool(hf.get('use_parallel_residual', True))
    fields = dict(
        common, emb_dim=emb, num_heads=heads, num_kv_heads=heads, head_dim=emb // heads,
        mlp_dim=int(hf['intermediate_size']), num_layers=int(hf['num_hidden_layers']),
        mlp='gelu', gelu_approximate=act != 'gelu', use_bias=bool(hf.get('attention_bias', True)),
        norm='layer', norm_position='pre', norm_epsilon=float(hf.get('layer_norm_eps', 1e-5)),
        embed_norm=False, parallel_block=parallel, parallel_mlp_norm=parallel,
        position_encoding='rope',
        rotary_fraction=float(rp.get('partial_rotary_factor', hf.get('rotary_pct', 1.0))),
        max_length=None,
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)), scale_tied_logits=False,
        query_scale=None, **_scaling_fields(hf))
    if not fields['use_bias']:
      raise HfError('gpt_neox with attention_bias = false is not supported')
    return Family(kind, False, fields, dict(z_loss=0.0, decoder_start_token=None))
  if kind == 'bloom':
    emb = int(hf.get('hidden_size', hf.get('n_embed', 0)))
    heads = int(hf.get('n_head', hf.get('num_attention_heads', 0)))
    if hf.get('apply_residual_connection_post_layernorm'):
      raise HfError('bloom with apply_residual_connection_post_layernorm = true is not supported')
    fields = dict(
        common, emb_dim=emb, num_heads=heads, num_kv_heads=heads, head_dim=emb // heads,
        mlp_dim=4 * emb, num_layers=int(hf.get('n_layer', hf.get('num_hidden_layers', 0))),
        mlp='gelu', gelu_approximate=True, use_bias=True, norm='layer', norm_position='pre',
        norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-5)), embed_norm=True,
        parallel_block=False, parallel_mlp_norm=False, position_encoding='alibi',
        max_length=None, tie_embeddings=True, scale_tied_logits=False, query_scale=None)
    return Family(kind, False, fields, dict(z_loss=0.0, decoder_start_token=None))
  if kind == 'gpt2':
    emb, heads = int(hf['n_embd']), int(hf['n_head'])
    act = hf.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu', 'gelu_pytorch_tanh', 'relu'):
      raise HfError(f'gpt2 with activation_function={act!r} is not supported')
    if hf.get('scale_attn_by_inverse_layer_idx') or hf.get('reorder_and_upcast_attn'):
      raise HfError('gpt2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is '
                    'not supported')
    if hf.get('scale_attn_weights') is False:
      raise HfError('gpt2 with scale_attn_weights = false is not supported')
    fields = dict(
        common, emb_dim=emb, num_heads=heads, num_kv_heads=heads, head_dim=emb // heads,
        mlp_dim=int(hf.get('n_inner') or 4 * emb), num_layers=int(hf['n_layer']),
        mlp='relu' if act == 'relu' else 'gelu', gelu_approximate=act != 'gelu',
        use_bias=True, norm='layer', norm_position='pre',
        norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-5)), embed_norm=False,
        parallel_block=False, parallel_mlp_norm=False, position_encoding='learned',
        max_length=int(hf['n_positions']),
        tie_embeddings=bool(hf.get('tie_word_embeddings', True)), scale_tied_logits=False,
        query_scale=None)
    return Family(kind, False, fields, dict(z_loss=0.0, decoder_start_token=None))
  # t5
  proj = hf.get('feed_forward_proj', 'relu')
  gated = proj.startswith('gated-')
  act = proj.split('-')[-1]
  mlp = {('relu', False): 'relu', ('gelu', False): 'gelu', ('gelu', True): 'geglu',
         ('silu', True): 'swiglu'}.get((act, gated))
  if mlp is None:
    raise HfError(f't5 with feed_forward_proj={proj!r} is not supported')
  tied = bool(hf.get('tie_word_embeddings', True))
  # transformers 5 always ties T5's output layer and scales it only for T5 v1.0
  # (`scale_decoder_outputs`); transformers 4 scaled exactly when tied.
  scaled = bool(hf.get('scale_decoder_outputs', tied))
  heads = int(hf['num_heads'])
  fields = dict(
      common, emb_dim=int(hf['d_model']), num_heads=heads, num_kv_heads=heads,
      head_dim=int(hf['d_kv']), mlp_dim=int(hf['d_ff']),
      num_layers=int(hf.get('num_decoder_layers') or hf['num_layers']),
      num_encoder_layers=int(hf['num_layers']), mlp=mlp,
      # T5.1.1 / Flan-T5's gated-gelu is the tanh GELU (gelu_new); a plain 'gelu' is exact.
      gelu_approximate=gated, use_bias=False, norm='rms', norm_position='pre',
      norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-6)), embed_norm=False,
      parallel_block=False, parallel_mlp_norm=False, position_encoding='t5_bias',
      relative_attention_num_buckets=int(hf.get('relative_attention_num_buckets', 32)),
      relative_attention_max_distance=int(hf.get('relative_attention_max_distance', 128)),
      max_length=None, tie_embeddings=tied, scale_tied_logits=scaled and tied, query_scale=1.0)
  return Family(kind, True, fields, dict(
      z_loss=0.0, decoder_start_token=int(hf.get('decoder_start_token_id') or 0)))


def build_model(family: Family) -> model_lib.BaseModel:
  if family.encoder_decoder:
    return model_lib.EncoderDecoderModel(cfg.EncoderDecoderConfig(**family.fields),
                                         **family.model_kwargs)
  return model_lib.DecoderOnlyModel(cfg.DecoderConfig(**family.fields), **family.model_kwargs)


def config_gin(family: Family, hf_dir: str, vocabulary: Optional[str] = None) -> str:
  """A model gin file binding every architecture choice of `family`."""
  cls = 'EncoderDecoder' if family.encoder_decoder else 'DecoderOnly'
  config_cls = 'EncoderDecoderConfig' if family.encoder_decoder else 'DecoderConfig'
  lines = [f'# Model: imported from Hugging Face {family.name} at {os.path.abspath(hf_dir)} '
           '(python -m t5x_like.hf import); every architecture choice is bound.',
           'from __gin__ import dynamic_registration', '',
           'from models import config as model_config', 'from models import model as model_lib']
  if vocabulary:
    lines.append('from t5x_like import vocabularies')
  lines += ['', f'MODEL = @model_lib.{cls}Model()', f'model_lib.{cls}Model:',
            f'  config = @model_config.{config_cls}()']
  for k, v in family.model_kwargs.items():
    lines.append(f'  {k} = {v!r}')
  lines += ['', f'model_config.{config_cls}:']
  config = build_model(family).config
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    value = value.value if hasattr(value, 'value') and not isinstance(value, (int, float)) else value
    lines.append(f'  {field.name} = {value!r}')
  if vocabulary:
    lines += ['', '# The tokenizer of the HF directory (runs/infer.gin and eval.gin read it).',
              vocabulary]
  return '\n'.join(lines) + '\n'


# --- parameter mapping ------------------------------------------------------------------
Transform = Callable[[List[np.ndarray]], List[np.ndarray]]


@dataclasses.dataclass
class Rule:
  """Our parameters `ours` (unrolled paths) <-> HF tensors `theirs`."""
  ours: Tuple[str, ...]
  theirs: Tuple[str, ...]
  to_ours: Transform
  to_theirs: Transform


def _one(ours: str, theirs: str, to_ours=lambda x: x, to_theirs=lambda x: x) -> Rule:
  return Rule((ours,), (theirs,), lambda xs: [to_ours(xs[0])], lambda xs: [to_theirs(xs[0])])


def _linear(ours: str, theirs: str, in_shape, out_shape, conv1d: bool = False) -> Rule:
  """HF Linear weight [out, in] (Conv1D: [in, out]) <-> our kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  def to_ours(w):
    w = w if conv1d else w.T
    return w.reshape(tuple(in_shape) + tuple(out_shape))
  def to_theirs(k):
    k = k.reshape(n_in, n_out)
    return k if conv1d else k.T
  return _one(ours, theirs, to_ours, to_theirs)


def _bias(ours: str, theirs: str, shape) -> Rule:
  return _one(ours, theirs, lambda b: b.reshape(shape), lambda b: b.reshape(-1))


def _fused_qkv(prefix: str, theirs_w: str, theirs_b: Optional[str], c, layout: str) -> List[Rule]:
  """One HF [3*heads*head_dim, emb] projection <-> our query/key/value.

  layout 'heads_first' (GPT-NeoX, BLOOM): rows ordered [heads, 3, head_dim];
  'conv1d_qkv_first' (GPT-2 Conv1D [emb, 3*emb]): columns ordered [3, heads, head_dim].
  """
  h, d, e = c.num_heads, c.head_dim, c.emb_dim
  names = tuple(f'{prefix}/{n}/kernel' for n in ('query', 'key', 'value'))

  def split_w(xs):
    w = xs[0]
    if layout == 'heads_first':
      w = w.reshape(h, 3, d, e)  # [heads, 3, head_dim, emb]
      return [np.ascontiguousarray(w[:, j].transpose(2, 0, 1)) for j in range(3)]
    w = w.reshape(e, 3, h, d)
    return [np.ascontiguousarray(w[:, j]) for j in range(3)]

  def merge_w(ks):  # each [emb, heads, head_dim]
    if layout == 'heads_first':
      w = np.stack([k.transpose(1, 2, 0) for k in ks], axis=1)  # [heads, 3, head_dim, emb]
      return [w.reshape(h * 3 * d, e)]
    return [np.stack(ks, axis=1).reshape(e, 3 * h * d)]

  rules = [Rule(names, (theirs_w,), split_w, merge_w)]
  if theirs_b:
    bnames = tuple(f'{prefix}/{n}/bias' for n in ('query', 'key', 'value'))

    def split_b(xs):
      b = xs[0]
      b = b.reshape(h, 3, d) if layout == 'heads_first' else b.reshape(3, h, d)
      return [np.ascontiguousarray(b[:, j] if layout == 'heads_first' else b[j])
              for j in range(3)]

    def merge_b(bs):
      if layout == 'heads_first':
        return [np.stack(bs, axis=1).reshape(-1)]
      return [np.stack(bs, axis=0).reshape(-1)]
    rules.append(Rule(bnames, (theirs_b,), split_b, merge_b))
  return rules


def _norm(ours: str, theirs: str, with_bias: bool, weight='weight', bias='bias') -> List[Rule]:
  rules = [_one(f'{ours}/scale', f'{theirs}.{weight}')]
  if with_bias:
    rules.append(_one(f'{ours}/bias', f'{theirs}.{bias}'))
  return rules


def rules_for(family: Family, config) -> List[Rule]:
  """Every rule of a model: our unrolled parameter paths <-> HF tensor names."""
  c = config
  h, kv, d, e, m = c.num_heads, c.num_kv_heads, c.head_dim, c.emb_dim, c.mlp_dim
  kind = family.name
  rules: List[Rule] = []
  if kind in ('llama', 'mistral', 'mixtral'):
    rules.append(_one('token_embedder/embedding', 'model.embed_tokens.weight'))
    for i in range(c.num_layers):
      p, t = f'decoder/stack/layers_{i}', f'model.layers.{i}'
      a = f'{p}/self_attention'
      rules += [_linear(f'{a}/query/kernel', f'{t}.self_attn.q_proj.weight', (e,), (h, d)),
                _linear(f'{a}/key/kernel', f'{t}.self_attn.k_proj.weight', (e,), (kv, d)),
                _linear(f'{a}/value/kernel', f'{t}.self_attn.v_proj.weight', (e,), (kv, d)),
                _linear(f'{a}/out/kernel', f'{t}.self_attn.o_proj.weight', (h, d), (e,))]
      if c.attention_bias:
        rules += [_bias(f'{a}/query/bias', f'{t}.self_attn.q_proj.bias', (h, d)),
                  _bias(f'{a}/key/bias', f'{t}.self_attn.k_proj.bias', (kv, d)),
                  _bias(f'{a}/value/bias', f'{t}.self_attn.v_proj.bias', (kv, d)),
                  _bias(f'{a}/out/bias', f'{t}.self_attn.o_proj.bias', (e,))]
      rules += _norm(f'{p}/pre_self_attention_norm', f'{t}.input_layernorm', False)
      rules += _norm(f'{p}/pre_mlp_norm', f'{t}.post_attention_layernorm', False)
      if kind == 'mixtral':
        x = c.num_experts
        moe = f'{t}.block_sparse_moe'
        rules.append(_one(f'{p}/moe/router', f'{moe}.gate.weight', lambda w: w.T, lambda k: k.T))
        for ours, hf_name, transpose in (('wi_0', 'w1', True), ('wi_1', 'w3', True),
                                         ('wo', 'w2', True)):
          names = tuple(f'{moe}.experts.{j}.{hf_name}.weight' for j in range(x))
          rules.append(Rule((f'{p}/moe/{ours}',), names,
                            lambda ws: [np.stack([w.T for w in ws])],
                            lambda ks, x=x: [k.T for k in ks[0]]))
      else:
        rules += [_linear(f'{p}/mlp/wi_0/kernel', f'{t}.mlp.gate_proj.weight', (e,), (m,)),
                  _linear(f'{p}/mlp/wi_1/kernel', f'{t}.mlp.up_proj.weight', (e,), (m,)),
                  _linear(f'{p}/mlp/wo/kernel', f'{t}.mlp.down_proj.weight', (m,), (e,))]
    rules += _norm('decoder/decoder_norm', 'model.norm', False)
    if not c.tie_embeddings:
      rules.append(_linear('decoder/logits_dense/kernel', 'lm_head.weight', (e,), (c.vocab_size,)))
    return rules
  if kind == 'gpt_neox':
    rules.append(_one('token_embedder/embedding', 'gpt_neox.embed_in.weight'))
    for i in range(c.num_layers):
      p, t = f'decoder/stack/layers_{i}', f'gpt_neox.layers.{i}'
      a = f'{p}/self_attention'
      rules += _fused_qkv(a, f'{t}.attention.query_key_value.weight',
                          f'{t}.attention.query_key_value.bias', c, 'heads_first')
      rules += [_linear(f'{a}/out/kernel', f'{t}.attention.dense.weight', (h, d), (e,)),
                _bias(f'{a}/out/bias', f'{t}.attention.dense.bias', (e,))]
      first = 'pre_norm' if c.parallel_block else 'pre_self_attention_norm'
      rules += _norm(f'{p}/{first}', f'{t}.input_layernorm', True)
      rules += _norm(f'{p}/pre_mlp_norm', f'{t}.post_attention_layernorm', True)
      rules += [_linear(f'{p}/mlp/wi/kernel', f'{t}.mlp.dense_h_to_4h.weight', (e,), (m,)),
                _bias(f'{p}/mlp/wi/bias', f'{t}.mlp.dense_h_to_4h.bias', (m,)),
                _linear(f'{p}/mlp/wo/kernel', f'{t}.mlp.dense_4h_to_h.weight', (m,), (e,)),
                _bias(f'{p}/mlp/wo/bias', f'{t}.mlp.dense_4h_to_h.bias', (e,))]
    rules += _norm('decoder/decoder_norm', 'gpt_neox.final_layer_norm', True)
    if not c.tie_embeddings:
      rules.append(_linear('decoder/logits_dense/kernel', 'embed_out.weight', (e,),
                           (c.vocab_size,)))
    return rules
  if kind == 'bloom':
    rules.append(_one('token_embedder/embedding', 'transformer.word_embeddings.weight'))
    rules += _norm('decoder/embed_norm', 'transformer.word_embeddings_layernorm', True)
    for i in range(c.num_layers):
      p, t = f'decoder/stack/layers_{i}', f'transformer.h.{i}'
      a = f'{p}/self_attention'
      rules += _fused_qkv(a, f'{t}.self_attention.query_key_value.weight',
                          f'{t}.self_attention.query_key_value.bias', c, 'heads_first')
      rules += [_linear(f'{a}/out/kernel', f'{t}.self_attention.dense.weight', (h, d), (e,)),
                _bias(f'{a}/out/bias', f'{t}.self_attention.dense.bias', (e,))]
      rules += _norm(f'{p}/pre_self_attention_norm', f'{t}.input_layernorm', True)
      rules += _norm(f'{p}/pre_mlp_norm', f'{t}.post_attention_layernorm', True)
      rules += [_linear(f'{p}/mlp/wi/kernel', f'{t}.mlp.dense_h_to_4h.weight', (e,), (m,)),
                _bias(f'{p}/mlp/wi/bias', f'{t}.mlp.dense_h_to_4h.bias', (m,)),
                _linear(f'{p}/mlp/wo/kernel', f'{t}.mlp.dense_4h_to_h.weight', (m,), (e,)),
                _bias(f'{p}/mlp/wo/bias', f'{t}.mlp.dense_4h_to_h.bias', (e,))]
    rules += _norm('decoder/decoder_norm', 'transformer.ln_f', True)
    return rules
  if kind == 'gpt2':
    rules.append(_one('token_embedder/embedding', 'transformer.wte.weight'))
    rules.append(_one('decoder/pos_embedder', 'transformer.wpe.weight'))
    for i in range(c.num_layers):
      p, t = f'decoder/stack/layers_{i}', f'transformer.h.{i}'
      a = f'{p}/self_attention'
      rules += _fused_qkv(a, f'{t}.attn.c_attn.weight', f'{t}.attn.c_attn.bias', c,
                          'conv1d_qkv_first')
      rules += [_linear(f'{a}/out/kernel', f'{t}.attn.c_proj.weight', (h, d), (e,), conv1d=True),
                _bias(f'{a}/out/bias', f'{t}.attn.c_proj.bias', (e,))]
      rules += _norm(f'{p}/pre_self_attention_norm', f'{t}.ln_1', True)
      rules += _norm(f'{p}/pre_mlp_norm', f'{t}.ln_2', True)
      rules += [_linear(f'{p}/mlp/wi/kernel', f'{t}.mlp.c_fc.weight', (e,), (m,), conv1d=True),
                _bias(f'{p}/mlp/wi/bias', f'{t}.mlp.c_fc.bias', (m,)),
                _linear(f'{p}/mlp/wo/kernel', f'{t}.mlp.c_proj.weight', (m,), (e,), conv1d=True),
                _bias(f'{p}/mlp/wo/bias', f'{t}.mlp.c_proj.bias', (e,))]
    rules += _norm('decoder/decoder_norm', 'transformer.ln_f', True)
    if not c.tie_embeddings:
      rules.append(_linear('decoder/logits_dense/kernel', 'lm_head.weight', (e,), (c.vocab_size,)))
    return rules
  # t5
  rules.append(_one('token_embedder/embedding', 'shared.weight'))
  gated = c.mlp.gated

  def attention(ours, theirs):
    return [_linear(f'{ours}/query/kernel', f'{theirs}.q.weight', (e,), (h, d)),
            _linear(f'{ours}/key/kernel', f'{theirs}.k.weight', (e,), (h, d)),
            _linear(f'{ours}/value/kernel', f'{theirs}.v.weight', (e,), (h, d)),
            _linear(f'{ours}/out/kernel', f'{theirs}.o.weight', (h, d), (e,))]

  def mlp(ours, theirs):
    if gated:
      return [_linear(f'{ours}/wi_0/kernel', f'{theirs}.wi_0.weight', (e,), (m,)),
              _linear(f'{ours}/wi_1/kernel', f'{theirs}.wi_1.weight', (e,), (m,)),
              _linear(f'{ours}/wo/kernel', f'{theirs}.wo.weight', (m,), (e,))]
    return [_linear(f'{ours}/wi/kernel', f'{theirs}.wi.weight', (e,), (m,)),
            _linear(f'{ours}/wo/kernel', f'{theirs}.wo.weight', (m,), (e,))]

  for side, n, our_side in (('encoder', c.num_encoder_layers, 'encoder'),
                            ('decoder', c.num_layers, 'decoder')):
    rules.append(_one(f'{our_side}/relpos_bias',
                      f'{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                      lambda w: w.T, lambda t: t.T))
    for i in range(n):
      p, t = f'{our_side}/stack/layers_{i}', f'{side}.block.{i}.layer'
      rules += attention(f'{p}/self_attention', f'{t}.0.SelfAttention')
      rules += _norm(f'{p}/pre_self_attention_norm', f'{t}.0.layer_norm', False)
      ff = 1
      if side == 'decoder':
        rules += attention(f'{p}/cross_attention', f'{t}.1.EncDecAttention')
        rules += _norm(f'{p}/pre_cross_attention_norm', f'{t}.1.layer_norm', False)
        ff = 2
      rules += mlp(f'{p}/mlp', f'{t}.{ff}.DenseReluDense')
      rules += _norm(f'{p}/pre_mlp_norm', f'{t}.{ff}.layer_norm', False)
    rules += _norm(f'{our_side}/{our_side}_norm', f'{side}.final_layer_norm', False)
  if not c.tie_embeddings:
    rules.append(_linear('decoder/logits_dense/kernel', 'lm_head.weight', (e,), (c.vocab_size,)))
  return rules


# Tensors HF writes that carry nothing (buffers, or copies of tied weights).
def _ignorable(family: Family, config, name: str) -> bool:
  if name.endswith(('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq',
                    '.attention.bias', '.attention.masked_bias')):
    return True
  if family.name == 't5' and name in ('encoder.embed_tokens.weight',
                                      'decoder.embed_tokens.weight'):
    return True
  return bool(config.tie_embeddings and name in ('lm_head.weight', 'embed_out.weight'))


def _flat(tree, prefix='') -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else k
    if isinstance(v, Mapping):
      out.update(_flat(v, path))
    else:
      out[path] = v
  return out


def _unflat(flat: Mapping[str, Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    parts = path.split('/')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def _scanned(path: str) -> Tuple[str, Optional[int]]:
  """An unrolled path -> (its scanned path, layer index) (None: not in a stack)."""
  parts = path.split('/')
  for j, p in enumerate(parts):
    if p.startswith('layers_') and p[7:].isdigit():
      return '/'.join(parts[:j] + ['layers'] + parts[j + 1:]), int(p[7:])
  return path, None


_PIECE_BYTES = 64 << 20  # the largest piece written at once (a scanned layer may be more)


def import_checkpoint(hf_dir: str, model_dir: str) -> Dict[str, Any]:
  """Converts a HF directory into MODEL_DIR/config.gin + MODEL_DIR/checkpoints/0."""
  hf = read_config(hf_dir)
  family = family_of(hf)
  tensors = Tensors(hf_dir)
  try:
    model = build_model(family)
  except cfg.ConfigError as e:
    raise HfError(f'{hf_dir}: {e}') from None
  c = model.config
  # A committed checkpoint is never overwritten; what an interrupted import left
  # (orbax's temporary folder) is cleared when the new one is written.
  if os.path.isfile(checkpoints.checkpoint_dir(model_dir)) or checkpoints.all_steps(model_dir):
    raise HfError(f'{model_dir} already holds checkpoints: import into a new directory')
  # Shapes and dtypes only: the parameters go to disk, not onto devices.
  abstract = infer_lib.abstract_params(
      model, partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1))))
  flat_abstract = _flat(abstract)
  rules = rules_for(family, c)
  # Which rule fills which parameter (scanned paths: one per layer).
  by_param: Dict[str, Dict[Optional[int], Tuple[Rule, int]]] = {}
  for rule in rules:
    for j, ours in enumerate(rule.ours):
      scanned, layer = _scanned(ours) if c.scan_layers else (ours, None)
      by_param.setdefault(scanned, {})[layer] = (rule, j)
  missing = sorted(set(flat_abstract) - set(by_param))
  if missing:
    raise HfError(f'no HF tensor fills our parameter {missing[0]!r} (and {len(missing) - 1} '
                  'more)' if len(missing) > 1 else f'no HF tensor fills our parameter '
                  f'{missing[0]!r}')
  needed = {name for rule in rules for name in rule.theirs}
  unused = [n for n in tensors.names() if n not in needed and not _ignorable(family, c, n)]
  if unused:
    raise HfError(f'the HF tensor {unused[0]!r} is not used by the {family.name} mapping '
                  f'({len(unused)} unused): is config.json the one these weights belong to?')
  absent = sorted(needed - set(tensors.names()))
  if absent:
    raise HfError(f'the HF checkpoint lacks {absent[0]!r} ({len(absent)} missing tensors)')
  cache: Dict[int, List[np.ndarray]] = {}

  def converted(rule: Rule, j: int, path: str, want, scanned: bool) -> np.ndarray:
    if id(rule) not in cache:
      cache.clear()  # one rule's outputs at a time (fused q/k/v give three)
      inputs = [tensors.get(n) for n in rule.theirs]
      try:
        cache[id(rule)] = rule.to_ours(inputs)
      except ValueError:
        raise HfError(f'HF tensor {rule.theirs[0]!r} of shape {tuple(inputs[0].shape)} does '
                      f'not fit our {path!r} of shape {tuple(want.shape)}: config.json and the '
                      'weights disagree') from None
    value = cache[id(rule)][j]
    expected = tuple(want.shape[1:]) if scanned else tuple(want.shape)
    if tuple(value.shape) != expected:
      raise HfError(f'HF tensor {rule.theirs[0]!r} gives our {path!r} the shape '
                    f'{tuple(value.shape)}, but the model expects {expected}'
                    f'{" per layer" if scanned else ""}: config.json and the weights disagree')
    return value.astype(want.dtype, copy=False)

  def parameter(path: str, want) -> checkpoints.StreamedArray:
    """Our parameter, made when written: whole, or (scanned) one layer per piece."""
    layers = by_param[path]
    if None in layers:  # written in row blocks of at most _PIECE_BYTES
      row_bytes = int(np.prod(want.shape[1:])) * np.dtype(want.dtype).itemsize
      rows = max(1, min(want.shape[0] if want.shape else 1, _PIECE_BYTES // max(row_bytes, 1)))

      def blocks():
        value = converted(*layers[None], path, want, False)
        if not value.shape:
          yield value
          return
        for i in range(0, value.shape[0], rows):
          yield value[i:i + rows]
      return checkpoints.StreamedArray(path, tuple(want.shape), want.dtype, rows, blocks)
    if len(layers) != want.shape[0]:
      raise HfError(f'the HF checkpoint fills {len(layers)} layers of our {path!r}, the model has '
                    f'{want.shape[0]}: config.json and the weights disagree')
    return checkpoints.StreamedArray(
        path, tuple(want.shape), want.dtype, 1,
        lambda: (converted(*layers[i], path, want, True)[None] for i in range(len(layers))))

  params = _unflat({path: parameter(path, want) for path, want in flat_abstract.items()})
  state = {'params': params}
  # Every tensor is converted once to digest and check it (an HfError before
  # anything is written), and again as it is written.
  digests = checkpoints.state_digests(state)
  cache.clear()
  if digests[1]:
    raise HfError(f'the HF weights hold {digests[1]} non-finite values (NaN or infinity): '
                  'not importing them')
  vocab = _vocabulary_binding(hf_dir)
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
    f.write(config_gin(family, hf_dir, vocab))
  ckpt = checkpoints.Checkpointer(model_dir, streamed=True)
  try:
    ckpt.save(0, state, {'imported_from': os.path.abspath(hf_dir)}, digests=digests)
  finally:
    ckpt.close()
  cache.clear()
  return {'model_dir': model_dir, 'family': family.name,
          'num_params': int(sum(np.prod(x.shape) for x in flat_abstract.values()))}


def _vocabulary_binding(hf_dir: str) -> Optional[str]:
  """The gin VOCABULARY of a HF directory's tokenizer, if it has one."""
  if os.path.isfile(os.path.join(hf_dir, 'tokenizer.json')):
    path = os.path.abspath(os.path.join(hf_dir, 'tokenizer.json'))
    return f"vocabularies.model_vocabulary:\n  kind = 'hf_tokenizer'\n  path = {path!r}"
  for name in ('tokenizer.model', 'spiece.model'):
    if os.path.isfile(os.path.join(hf_dir, name)):
      path = os.path.abspath(os.path.join(hf_dir, name))
      return f"vocabularies.model_vocabulary:\n  kind = 'sentencepiece'\n  path = {path!r}"
  return None


# --- export -------------------------------------------------------------------------------
def family_for_export(model: model_lib.BaseModel) -> str:
  """The HF model_type our model can be written as."""
  c = model.config
  if isinstance(model, model_lib.EncoderDecoderModel):
    if c.position_encoding == cfg.PositionEncoding.T5_BIAS and c.norm == cfg.NormType.RMS:
      return 't5'
  elif c.position_encoding == cfg.PositionEncoding.ROPE and c.norm == cfg.NormType.RMS:
    return 'mixtral' if c.num_experts else 'llama'
  elif c.position_encoding == cfg.PositionEncoding.ROPE and c.norm == cfg.NormType.LAYER:
    return 'gpt_neox'
  elif c.position_encoding == cfg.PositionEncoding.ALIBI:
    return 'bloom'
  elif c.position_encoding == cfg.PositionEncoding.LEARNED:
    return 'gpt2'
  raise HfError(f'{type(c).__name__} with {c.position_encoding.value} positions and {c.norm.value} '
                'norms matches no Hugging Face family this exporter writes')


def hf_config(kind: str, model: model_lib.BaseModel) -> Dict[str, Any]:
  """config.json for our model as HF `kind`; refuses what the family cannot express."""
  c = model.config
  fam = family_of_our(kind, c)
  check = family_of({**fam, 'model_type': kind})
  want = build_model(check).config
  ours, theirs = _effective(c), _effective(want)
  diffs = [k for k in ours if ours[k] != theirs.get(k)]
  if diffs:
    raise HfError(f'the model cannot be written as HF {kind}: {diffs[0]}='
                  f'{ours[diffs[0]]!r} has no {kind} equivalent (it would be '
                  f'{theirs[diffs[0]]!r})')
  return fam


# Fields that do not change what a model computes from given weights.
_NOT_ARCHITECTURE = ('scan_layers', 'remat_policy', 'dtype', 'param_dtype', 'attention_kernel',
                     'attention_block_size', 'attention_max_blocks', 'loss_chunk_length', 'dropout_rate', 'moe_impl', 'max_length', 'load_balance_loss_weight',
                     'router_z_loss_weight', 'capacity_factor', 'router_jitter')


def _effective(c) -> Dict[str, Any]:
  """A config's architecture, defaults resolved and unused fields dropped, so two
  configs that compute the same function compare equal."""
  out = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
         if f.name not in _NOT_ARCHITECTURE}
  if out['attention_bias'] is None:
    out['attention_bias'] = c.use_bias
  if not c.tie_embeddings:
    out.pop('scale_tied_logits')
  if c.position_encoding != cfg.PositionEncoding.ROPE:
    for k in [k for k in out if k.startswith('rope_') or k == 'rotary_fraction']:
      out.pop(k)
  elif c.rope_scaling == cfg.RopeScaling.NONE:
    for k in [k for k in out if k.startswith('rope_') and k != 'rope_max_wavelength']:
      out.pop(k)
  if c.position_encoding != cfg.PositionEncoding.T5_BIAS:
    out.pop('relative_attention_num_buckets')
    out.pop('relative_attention_max_distance')
  if c.mlp not in (cfg.MlpKind.GELU, cfg.MlpKind.GEGLU):
    out.pop('gelu_approximate')
  if not c.parallel_block:
    out.pop('parallel_mlp_norm')
  if not c.num_experts:
    for k in ('num_experts_per_token', 'moe_layer_interval', 'moe_mlp_dim', 'router',
              'renormalize_gates', 'num_shared_experts'):
      out.pop(k)
  elif out['moe_mlp_dim'] is None:
    out['moe_mlp_dim'] = c.mlp_dim
  if out.get('query_scale') == 1.0 / math.sqrt(c.head_dim):
    out['query_scale'] = None
  return out


def family_of_our(kind: str, c) -> Dict[str, Any]:
  """The HF config.json fields of our config as `kind`."""
  arch = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
          'mixtral': 'MixtralForCausalLM', 'gpt_neox': 'GPTNeoXForCausalLM',
          'bloom': 'BloomForCausalLM', 'gpt2': 'GPT2LMHeadModel',
          't5': 'T5ForConditionalGeneration'}[kind]
  out: Dict[str, Any] = {'architectures': [arch], 'model_type': kind,
                         'vocab_size': c.vocab_size, 'torch_dtype': 'float32',
                         'tie_word_embeddings': c.tie_embeddings}
  rope = {'rope_theta': c.rope_max_wavelength}
  if c.rope_scaling != cfg.RopeScaling.NONE:
    rope.update(rope_type=c.rope_scaling.value, factor=c.rope_scaling_factor)
    if c.rope_scaling != cfg.RopeScaling.DYNAMIC and c.rope_scaling != cfg.RopeScaling.LINEAR:
      rope['original_max_position_embeddings'] = c.rope_original_max_length
    if c.rope_scaling == cfg.RopeScaling.LLAMA3:
      rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
    if c.rope_scaling == cfg.RopeScaling.YARN:
      rope.update(beta_fast=c.rope_yarn_beta_fast, beta_slow=c.rope_yarn_beta_slow)
      if c.rope_yarn_attention_factor is not None:
        rope['attention_factor'] = c.rope_yarn_attention_factor
  max_pos = c.max_length or 2048
  if c.rope_scaling == cfg.RopeScaling.DYNAMIC:
    max_pos = c.rope_original_max_length  # where transformers starts growing the base
  if kind in ('llama', 'mistral', 'mixtral'):
    out.update(hidden_size=c.emb_dim, num_attention_heads=c.num_heads,
               num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
               intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers, hidden_act='silu',
               rms_norm_eps=c.norm_epsilon, max_position_embeddings=max_pos,
               attention_bias=bool(c.attention_bias), mlp_bias=False,
               rope_theta=c.rope_max_wavelength,
               rope_scaling=None if c.rope_scaling == cfg.RopeScaling.NONE else rope,
               bos_token_id=1, eos_token_id=2)
    if kind == 'mixtral':
      out.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_token,
                 intermediate_size=c.moe_mlp_dim or c.mlp_dim, router_jitter_noise=0.0,
                 sliding_window=None)
  elif kind == 'gpt_neox':
    out.update(hidden_size=c.emb_dim, num_attention_heads=c.num_heads,
               intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
               hidden_act='gelu' if not c.gelu_approximate else 'gelu_new',
               rotary_pct=c.rotary_fraction, partial_rotary_factor=c.rotary_fraction,
               rotary_emb_base=c.rope_max_wavelength, rope_theta=c.rope_max_wavelength,
               rope_scaling=None if c.rope_scaling == cfg.RopeScaling.NONE else rope,
               layer_norm_eps=c.norm_epsilon, max_position_embeddings=max_pos,
               use_parallel_residual=c.parallel_block, attention_bias=True,
               bos_token_id=0, eos_token_id=0)
  elif kind == 'bloom':
    out.update(hidden_size=c.emb_dim, n_head=c.num_heads, n_layer=c.num_layers,
               layer_norm_epsilon=c.norm_epsilon,
               apply_residual_connection_post_layernorm=False, bos_token_id=1, eos_token_id=2)
  elif kind == 'gpt2':
    out.update(n_embd=c.emb_dim, n_head=c.num_heads, n_layer=c.num_layers,
               n_inner=c.mlp_dim, n_positions=c.max_length,
               activation_function='relu' if c.mlp == cfg.MlpKind.RELU else (
                   'gelu_new' if c.gelu_approximate else 'gelu'),
               layer_norm_epsilon=c.norm_epsilon, bos_token_id=0, eos_token_id=0)
  else:  # t5
    gated = c.mlp.gated
    act = {cfg.MlpKind.RELU: 'relu', cfg.MlpKind.GELU: 'gelu', cfg.MlpKind.GEGLU: 'gelu',
           cfg.MlpKind.SWIGLU: 'silu'}[c.mlp]
    out.update(d_model=c.emb_dim, d_kv=c.head_dim, num_heads=c.num_heads, d_ff=c.mlp_dim,
               num_layers=c.num_encoder_layers, num_decoder_layers=c.num_layers,
               feed_forward_proj=('gated-' if gated else '') + act,
               relative_attention_num_buckets=c.relative_attention_num_buckets,
               relative_attention_max_distance=c.relative_attention_max_distance,
               layer_norm_epsilon=c.norm_epsilon, is_encoder_decoder=True,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
               scale_decoder_outputs=bool(c.tie_embeddings and c.scale_tied_logits),
               dense_act_fn='gelu_new' if act == 'gelu' and gated else act)
  return out


def export_checkpoint(model_dir: str, hf_dir: str, step: Optional[int] = None) -> Dict[str, Any]:
  """Writes MODEL_DIR's newest (or `step`) checkpoint as a HF directory."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(model_dir, 'config.gin')
  if not os.path.isfile(config_path):
    raise HfError(f'{model_dir} has no config.gin: export a MODEL_DIR written by train or '
                  'hf import')
  model = gin_utils.model_from_gin([config_path])
  peft_config = model.config.peft
  if peft_config is not None:  # exported as the plain model it equals (LoRA, IA3 folded in)
    model = model.without_peft()
  kind = family_for_export(model)
  hf = hf_config(kind, model)
  path = model_dir if step is None else os.path.join(model_dir, 'checkpoints', str(step))
  if adapters.read_record(model_dir) is not None:  # trained parameters over a recorded base
    tuned = gin_utils.model_from_gin([config_path])
    part = partitioner_lib.Partitioner(mesh_lib.create_mesh((-1, 1, 1)))
    abstract = infer_lib.abstract_params(tuned, part)
    ckpt = infer_lib.checked_checkpoint(path, abstract, '--model_dir', tuned, part)
    params, found = ckpt.restore(abstract), ckpt.step
  else:
    directory, found = checkpoints.resolve(path, '--model_dir')
    params = checkpoints.restore_params(directory, found)
  if peft_config is not None:
    plain = jax.eval_shape(lambda: flax.linen.unbox(model.init_variables(
        jax.random.PRNGKey(0), model.dummy_batch(1, {'inputs': 8, 'targets': 8}))['params']))
    params = peft.merge_into_base(params, peft_config, plain)
  flat = {k: np.asarray(v) for k, v in _flat(jax.device_get(params)).items()}
  c = model.config
  family = Family(kind, kind == 't5', {}, {})
  rules = rules_for(family, c)
  out: Dict[str, np.ndarray] = {}
  for rule in rules:
    values = []
    for ours in rule.ours:
      scanned, layer = _scanned(ours) if c.scan_layers else (ours, None)
      if scanned not in flat:
        raise HfError(f'the checkpoint has no {scanned!r} for HF {kind}')
      values.append(flat[scanned] if layer is None else flat[scanned][layer])
    for name, value in zip(rule.theirs, rule.to_theirs(values)):
      out[name] = np.ascontiguousarray(value, np.float32)
  os.makedirs(hf_dir, exist_ok=True)
  save_file(out, os.path.join(hf_dir, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  return {'hf_dir': hf_dir, 'family': kind, 'step': found, 'tensors': len(out)}


# --- command line --------------------------------------------------------------------------
def main(argv: Sequence[str]) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(prog='python -m t5x_like.hf',
                                   description='Hugging Face import and export.')
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='a HF model directory -> MODEL_DIR')
  imp.add_argument('--hf_dir', required=True)
  imp.add_argument('--model_dir', required=True)
  exp = sub.add_parser('export', help='MODEL_DIR -> a HF model directory')
  exp.add_argument('--model_dir', required=True)
  exp.add_argument('--hf_dir', required=True)
  exp.add_argument('--step', type=int, default=None)
  args = parser.parse_args(argv)
  if args.command == 'import':
    return import_checkpoint(args.hf_dir, args.model_dir)
  return export_checkpoint(args.model_dir, args.hf_dir, args.step)


def console_main(argv: Optional[Sequence[str]] = None) -> None:
  from t5x_like import cli  # pylint: disable=g-import-not-at-top
  def report(result):
    print(' '.join(f'{k}={v}' for k, v in result.items()))
  cli.console(main, sys.argv[1:] if argv is None else argv, report)


if __name__ == '__main__':
  console_main()
