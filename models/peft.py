"""Parameter-efficient fine-tuning: which parameters train, and LoRA merging.

The methods themselves live where the parameters are used: LoRA and IA3 in
`layers.DenseGeneral` (the one dense constructor), adapters in
`transformer.TransformerLayer`; `config.PeftConfig` chooses them. This module
works on parameter trees (nested dicts), by '/'-joined paths such as
'decoder/stack/layers/self_attention/query/lora_a':

  trainable_pattern(peft)       the parameters a PEFT method trains
  split(params, pattern)        -> (trainable, frozen) sub-trees; `combine` joins them
  check(peft, params)           one-line errors for targets that match nothing, ...
  merge_lora / unmerge_lora     fold B A into the base kernels (and back)
"""

import difflib
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax.numpy as jnp
from flax import traverse_util

from models import config as cfg

Params = Mapping[str, Any]

# The parameters each method adds and trains (searched in the parameter path).
_TRAINABLE = {
    cfg.PeftMethod.LORA: r'(^|/)lora_[ab]$',
    cfg.PeftMethod.IA3: r'(^|/)ia3_scale$',
    cfg.PeftMethod.ADAPTERS: r'(^|/)adapter_(attention|mlp)/',
    cfg.PeftMethod.BITFIT: r'(^|/)bias$',
    cfg.PeftMethod.PREFIX: r'(^|/)prefix_(key|value)$',
    cfg.PeftMethod.PROMPT: r'(^|/)soft_prompt$',
}
# The parameters each method adds (the rest come from the base checkpoint).
_ADDED = {
    cfg.PeftMethod.LORA: _TRAINABLE[cfg.PeftMethod.LORA],
    cfg.PeftMethod.IA3: _TRAINABLE[cfg.PeftMethod.IA3],
    cfg.PeftMethod.ADAPTERS: _TRAINABLE[cfg.PeftMethod.ADAPTERS],
    cfg.PeftMethod.BITFIT: None,
    cfg.PeftMethod.PREFIX: _TRAINABLE[cfg.PeftMethod.PREFIX],
    cfg.PeftMethod.PROMPT: _TRAINABLE[cfg.PeftMethod.PROMPT],
}


def trainable_pattern(peft: Optional[cfg.PeftConfig]) -> Optional[str]:
  """The regular expression of the parameters `peft` trains; None: all of them."""
  return None if peft is None else _TRAINABLE[peft.method]


def added_pattern(peft: Optional[cfg.PeftConfig]) -> Optional[str]:
  """The regular expression of the parameters `peft` adds to the base model (None: none)."""
  return None if peft is None else _ADDED[peft.method]


def flat(params: Params) -> Dict[str, Any]:
  """path -> leaf, paths '/'-joined."""
  return traverse_util.flatten_dict(dict(params), sep='/')


def unflat(flat_params: Mapping[str, Any]) -> Dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat_params), sep='/')


def mask(params: Params, pattern: Optional[str]) -> Dict[str, bool]:
  """path -> whether `pattern` (None: everything) is found in it."""
  regex = None if pattern is None else re.compile(pattern)
  return {k: regex is None or bool(regex.search(k)) for k in flat(params)}


def split(params: Params, pattern: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(trainable, frozen): the sub-trees of the leaves whose path `pattern` matches, and the rest."""
  m = mask(params, pattern)
  f = flat(params)
  return (unflat({k: v for k, v in f.items() if m[k]}),
          unflat({k: v for k, v in f.items() if not m[k]}))


def combine(trainable: Params, frozen: Params) -> Dict[str, Any]:
  """The whole tree from `split`'s two parts."""
  return unflat({**flat(frozen), **flat(trainable)})


def _close(pattern: str, names: List[str]) -> str:
  parts = [p for p in re.split(r'[|()^$\\.*+?]', pattern) if p]
  close = sorted({c for p in parts for c in difflib.get_close_matches(p, names, 3, 0.5)})
  return (f'close matches: {", ".join(close)}' if close else '') or \
      f'the dense layers are {", ".join(names)}'


def dense_layer_names(params: Params) -> List[str]:
  """The distinct names of the dense layers (modules holding a `kernel`)."""
  return sorted({k.split('/')[-2] for k in flat(params) if k.endswith('/kernel')})


def check(peft: Optional[cfg.PeftConfig], params: Params, setting: str = 'PeftConfig') -> None:
  """One-line errors for a PEFT config that does nothing on this model (abstract params do)."""
  if peft is None:
    return
  f = flat(params)
  if peft.method in (cfg.PeftMethod.LORA, cfg.PeftMethod.IA3):
    added = re.compile(_ADDED[peft.method])
    if not any(added.search(k) for k in f):
      names = dense_layer_names(params)
      raise cfg.ConfigError(
          f'{setting}.targets={peft.targets!r} matches no dense layer of this model '
          f'({_close(peft.targets, names)}): set {setting}.targets to a pattern of their '
          "paths, e.g. 'query|value' or '.' for all")
  if peft.method == cfg.PeftMethod.BITFIT:
    dense_biases = [k for k in f if k.endswith('/bias') and k[:-len('bias')] + 'kernel' in f]
    if not dense_biases:
      raise cfg.ConfigError(
          f'{setting}.method=bitfit trains the biases of dense layers, but this model has none '
          '(use_bias = False): choose a model with biases (e.g. BLOOM, GPT-NeoX) or another '
          "method such as 'lora'")


def _lora_delta(kernel, a, b, scale):
  """scale * A B in the kernel's layout: A [lead..., in..., r], B [lead..., r, out...]."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  n_in = a.ndim - 1 - lead
  lead_shape = kernel.shape[:lead]
  in_size = int(jnp.prod(jnp.array(kernel.shape[lead:lead + n_in])))
  r = a.shape[-1]
  a2 = a.reshape(lead_shape + (in_size, r)).astype(jnp.float32)
  b2 = b.reshape(lead_shape + (r, -1)).astype(jnp.float32)
  return (scale * jnp.matmul(a2, b2)).reshape(kernel.shape)


def _map_lora(params: Params, peft: cfg.PeftConfig, sign: float) -> Dict[str, Any]:
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping) and 'lora_a' in v and 'kernel' in v:
      kernel = v['kernel']
      delta = _lora_delta(kernel, v['lora_a'], v['lora_b'], peft.lora_scale)
      new_kernel = (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)
      out[k] = {n: x for n, x in v.items() if n not in ('lora_a', 'lora_b')}
      out[k]['kernel'] = new_kernel
      if sign < 0:  # unmerge keeps the adapter
        out[k]['lora_a'], out[k]['lora_b'] = v['lora_a'], v['lora_b']
    elif isinstance(v, Mapping):
      out[k] = _map_lora(v, peft, sign)
    else:
      out[k] = v
  return out


def merge_lora(params: Params, peft: cfg.PeftConfig) -> Dict[str, Any]:
  """The plain model's parameters: each LoRA kernel W + (alpha / r) A B, the A and B dropped
  (the model config then has `peft=None`)."""
  if peft.method != cfg.PeftMethod.LORA:
    raise cfg.ConfigError(f'merge_lora needs PeftConfig.method=lora, not {peft.method.value!r}')
  return _map_lora(params, peft, 1.0)


def unmerge_lora(merged: Params, lora: Params, peft: cfg.PeftConfig) -> Dict[str, Any]:
  """Inverse of `merge_lora`: `merged` (a plain tree) minus (alpha / r) A B for the A and B in
  `lora` (a tree holding at least the `lora_a`/`lora_b` leaves); returns the LoRA tree."""
  return _map_lora(combine(split(lora, _TRAINABLE[cfg.PeftMethod.LORA])[0], merged), peft, -1.0)


# --- a quantized frozen base (QLoRA) -------------------------------------------------
_PARTS = ('codes', 'absmax', 'absmax_scale', 'absmax_offset')  # models/quantization.py


def quantize_like(base: Params, target: Params, peft_config: cfg.PeftConfig) -> Dict[str, Any]:
  """`base` (a plain parameter tree) with each weight the quantized model stores quantized
  (a leaf `w` where `target`, its abstract parameters, holds `w_codes`: dense kernels, the
  embedding table, MoE experts) replaced by its parts; stacked weights (scanned layers,
  experts) are quantized matrix by matrix. Other leaves are kept."""
  from models import quantization  # pylint: disable=g-import-not-at-top
  kind, block = peft_config.quantization.value, peft_config.quantization_block_size
  t = target if isinstance(target, Mapping) else {}
  out = {}
  for k, v in base.items():
    if isinstance(v, Mapping):
      out[k] = quantize_like(v, t.get(k), peft_config)
    elif f'{k}_codes' in t:
      lead = t[f'{k}_codes'].ndim - 1  # stacked axes (scanned layers, experts)
      for name, x in quantization.quantize_stacked(v, lead, kind, block).items():
        out[f'{k}_{name}'] = x
    else:
      out[k] = v
  return out


def dequantize_like(params: Params, plain: Params) -> Dict[str, Any]:
  """The plain tree (f32 weights of the shapes in `plain`, abstract) from a quantized one."""
  from models import quantization  # pylint: disable=g-import-not-at-top
  p = plain if isinstance(plain, Mapping) else {}
  names = {k[:-len('_codes')] for k, v in params.items()
           if k.endswith('_codes') and not isinstance(v, Mapping) and k[:-len('_codes')] in p}
  out = {}
  for name in names:
    shape, lead = p[name].shape, params[f'{name}_codes'].ndim - 1
    parts = {part: params[f'{name}_{part}'] for part in _PARTS if f'{name}_{part}' in params}
    out[name] = quantization.dequantize_stacked(parts, shape, lead).astype(p[name].dtype)
  stored = {f'{n}_{part}' for n in names for part in _PARTS}
  for k, v in params.items():
    if isinstance(v, Mapping):
      out[k] = dequantize_like(v, p.get(k))
    elif k not in stored:
      out[k] = v
  return out


def _merge_ia3(params: Params) -> Dict[str, Any]:
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping) and 'ia3_scale' in v and 'kernel' in v:
      kernel, scale = v['kernel'], v['ia3_scale'].astype(jnp.float32)
      extra = kernel.ndim - scale.ndim
      if k == 'wo':  # scales the input (the MLP hidden): the kernel's leading dims
        factor = scale.reshape(scale.shape + (1,) * extra)
      else:  # scales the output: the kernel's trailing dims (and the bias)
        # A scanned scale is [layers, out...], its kernel [layers, in..., out...].
        n_out = _ia3_output_dims(kernel, scale)
        n_layer = scale.ndim - n_out
        factor = scale.reshape(scale.shape[:n_layer] + (1,) * extra + scale.shape[n_layer:])
      out[k] = {n: x for n, x in v.items() if n != 'ia3_scale'}
      out[k]['kernel'] = (kernel.astype(jnp.float32) * factor).astype(kernel.dtype)
      if 'bias' in v and k != 'wo':
        out[k]['bias'] = (v['bias'].astype(jnp.float32) * scale).astype(v['bias'].dtype)
    elif isinstance(v, Mapping):
      out[k] = _merge_ia3(v)
    else:
      out[k] = v
  return out


def _ia3_output_dims(kernel, scale) -> int:
  """How many trailing dims of `scale` are the kernel's output dims."""
  for n in range(scale.ndim, 0, -1):
    if tuple(kernel.shape[-n:]) == tuple(scale.shape[-n:]) and (
        scale.ndim == n or tuple(kernel.shape[:scale.ndim - n]) == tuple(scale.shape[:-n])):
      return n
  raise ValueError(f'ia3_scale {scale.shape} does not fit kernel {kernel.shape}')


def merge_into_base(params: Params, peft_config: Optional[cfg.PeftConfig],
                    plain: Params) -> Dict[str, Any]:
  """The plain model's parameters (the config with `peft=None`) equal to a PEFT model's:
  a quantized base dequantized, LoRA's (alpha / r) A B and IA3's scales folded into the
  kernels; BitFit's biases are plain already.

  Args:
    params: the PEFT model's parameters.
    peft_config: its PEFT config (None: `params` are returned as they are).
    plain: the plain model's abstract parameters (shapes of the f32 kernels).

  Raises:
    ConfigError: for adapters, which add layers no plain model has.
  """
  if peft_config is None:
    return dict(params)
  if peft_config.method in (cfg.PeftMethod.ADAPTERS, cfg.PeftMethod.PREFIX,
                            cfg.PeftMethod.PROMPT):
    raise cfg.ConfigError(f'{peft_config.method.value} add what the plain model does not have '
                          '(layers, attention prefixes, a soft prompt), so they cannot be merged '
                          'into it: use the run with its PEFT config, or LoRA')
  if peft_config.quantization != cfg.BaseQuantization.NONE:
    params = dequantize_like(params, plain)
  if peft_config.method == cfg.PeftMethod.LORA:
    params = merge_lora(params, peft_config)
  elif peft_config.method == cfg.PeftMethod.IA3:
    params = _merge_ia3(params)
  return dict(params)
