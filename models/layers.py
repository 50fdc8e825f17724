"""Transformer building blocks with logical axis names on every parameter.

Parameter names are checkpoint keys, chosen once: `kernel`/`bias` in dense
layers; `query/key/value/out` in attention; `wi`, `wi_0/wi_1`, `wo` in MLPs;
`embedding`; `scale`/`bias` in norms; `rel_embedding` for T5 buckets.
"""

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from models import config as cfg
from models import quantization
from partitioning import axes as ax

Array = jax.Array
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
# Dense layers a quantized base keeps in full precision unless
# `PeftConfig.quantize_embeddings` (the vocabulary-sized output layer).
UNQUANTIZED = ('logits_dense',)


def base_quantization(peft: Optional[cfg.PeftConfig]) -> Optional[Tuple[str, int]]:
  """(kind, block size) of a PEFT config's quantized frozen base, or None."""
  if peft is None or peft.quantization == cfg.BaseQuantization.NONE:
    return None
  return peft.quantization.value, peft.quantization_block_size


def quantized_parts(module: nn.Module, name: str, init: Initializer, shape: Tuple[int, ...],
                    quant: Tuple[str, int], lead_axes: Tuple[str, ...] = ()) -> dict:
  """Declares the stored parts of frozen weight `name` (`{name}_codes`, `{name}_absmax`, ...,
  see models/quantization.py) and returns them. The first len(lead_axes) dims of `shape`
  (e.g. experts, logical names `lead_axes`) each hold a separately quantized matrix.

  A fresh model quantizes its random initial weight; a fine-tuning run replaces the parts
  with those of its base checkpoint (`peft.quantize_like`).
  """
  kind, block = quant
  lead = len(lead_axes)
  lead_shape, matrix = tuple(shape[:lead]), tuple(shape[lead:])
  stored = None
  if module.is_initializing():
    stored = quantization.quantize_stacked(
        init(module.make_rng('params'), tuple(shape), jnp.float32), lead, kind, block)
  parts = {}
  for part, (part_shape, dtype) in quantization.stored_shapes(math.prod(matrix), kind,
                                                              block).items():
    full = lead_shape + tuple(part_shape)
    names = tuple(lead_axes) + (ax.QUANTIZED,) * len(part_shape)
    # (Flax also calls the initializer abstractly in apply, to check the shape.)
    init_part = lambda *_, n=part, s=full, d=dtype: (
        stored[n] if stored is not None else jnp.zeros(s, d))
    parts[part] = module.param(f'{name}_{part}', nn.with_logical_partitioning(init_part, names))
  return parts


def quantized_param(module: nn.Module, name: str, init: Initializer, shape: Tuple[int, ...],
                    quant: Tuple[str, int], lead_axes: Tuple[str, ...] = ()) -> Array:
  """The f32 weight of `shape` dequantized on the fly from `quantized_parts`."""
  parts = quantized_parts(module, name, init, shape, quant, lead_axes)
  return quantization.dequantize_stacked(parts, tuple(shape), len(lead_axes))


def dequantized_dot(parts: dict, shape: Tuple[int, ...], x: Array, dimension_numbers,
                    dtype: Any) -> Array:
  """`lax.dot_general(x, W, dimension_numbers)` for the quantized weight W of `shape` stored
  in `parts`, rematerialised: the backward pass dequantizes W again instead of keeping every
  layer's full-precision W alive from the forward (what makes a quantized base small in
  training, not only at rest)."""
  @jax.checkpoint
  def dot(parts, x):
    w = quantization.dequantize(parts, shape).astype(dtype)
    return jax.lax.dot_general(x, w, dimension_numbers)
  return dot(parts, x)


def _normalize_axes(axes: Sequence[int], ndim: int) -> Tuple[int, ...]:
  return tuple(a if a >= 0 else ndim + a for a in axes)


class DenseGeneral(nn.Module):
  """The one dense-layer constructor: y = x . W (+ b) over `axis`.

  The kernel keeps the shape it is used in ([in..., out...]), each dimension
  named by `kernel_axes`. Fine-tuning methods (LoRA, IA3) and quantization
  wrap this class, so every projection in the models goes through it.

  Attributes:
    features: output dims, e.g. (heads, head_dim).
    kernel_axes: logical names of the kernel's dims (inputs then outputs).
    axis: input dims contracted (default: the last).
    use_bias: add a bias over the output dims.
    kernel_init: initializer; fan-in is the product of the contracted dims.
    init_scale: multiplies the initial kernel (DeepNorm's beta).
  """
  features: Tuple[int, ...]
  kernel_axes: Tuple[str, ...]
  axis: Tuple[int, ...] = (-1,)
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = default_kernel_init
  init_scale: float = 1.0
  peft: Optional[cfg.PeftConfig] = None  # LoRA / IA3 on this layer when `targets` matches its path
  deterministic: bool = True  # False: LoRA dropout on

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = tuple(self.features)
    axis = _normalize_axes(self.axis, x.ndim)
    in_shape = tuple(x.shape[a] for a in axis)
    kernel_shape = in_shape + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f'kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}')

    def init(key, shape, dtype):
      # Flatten to 2-D only for the fan-in computation, then restore the shape.
      fan_in = math.prod(shape[:len(in_shape)])
      flat = self.kernel_init(key, (fan_in, math.prod(shape[len(in_shape):])), dtype)
      return (flat * self.init_scale).reshape(shape).astype(dtype)

    quant = self._quantization()
    if quant is not None:
      parts = quantized_parts(self, 'kernel', init, kernel_shape, quant)
    else:
      kernel = jnp.asarray(self.param('kernel', nn.with_logical_partitioning(
          init, self.kernel_axes), kernel_shape, self.param_dtype), self.dtype)
    x = jnp.asarray(x, self.dtype)
    method = self._peft_method()
    n_in = len(in_shape)
    if method == cfg.PeftMethod.IA3 and self.name == 'wo':
      # IA3 scales the MLP hidden: the input of the output projection.
      x = x * self._ia3_scale(in_shape, self.kernel_axes[:n_in], axis, x.ndim)
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    if quant is not None:
      y = dequantized_dot(parts, kernel_shape, x, dims, self.dtype)
    else:
      y = jax.lax.dot_general(x, kernel, dims)
    # dot_general puts the uncontracted input dims first, then the features.
    if method == cfg.PeftMethod.LORA:
      y = y + self._lora_delta(x, axis, in_shape, features)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.kernel_axes[len(in_shape):]),
                        features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    if method == cfg.PeftMethod.IA3 and self.name != 'wo':
      y = y * jnp.asarray(self.param('ia3_scale', nn.with_logical_partitioning(
          nn.initializers.ones_init(), self.kernel_axes[n_in:]), features, self.param_dtype),
                          self.dtype)
    return y

  def _quantization(self) -> Optional[Tuple[str, int]]:
    """(kind, block size) when this layer's kernel is a quantized frozen base, else None."""
    q = base_quantization(self.peft)
    return q if q and (self.peft.quantize_embeddings or self.name not in UNQUANTIZED) else None

  def _peft_method(self) -> Optional[cfg.PeftMethod]:
    """LoRA or IA3 when this layer's path matches the PEFT targets, else None."""
    p = self.peft
    if p is None or p.method not in (cfg.PeftMethod.LORA, cfg.PeftMethod.IA3):
      return None
    return p.method if re.search(p.targets, '/'.join(self.path)) else None

  def _ia3_scale(self, in_shape, names, axis, ndim) -> Array:
    scale = jnp.asarray(self.param('ia3_scale', nn.with_logical_partitioning(
        nn.initializers.ones_init(), names), in_shape, self.param_dtype), self.dtype)
    # Broadcast over x's dims: the scale's dims sit at `axis`.
    shape = [1] * ndim
    for a, d in zip(axis, in_shape):
      shape[a] = d
    return scale.reshape(shape)

  def _lora_delta(self, x: Array, axis, in_shape, features) -> Array:
    """(alpha / r) * (dropout(x) . A) . B: A [in..., rank], B [rank, out...] (B starts at 0)."""
    p = self.peft
    fan_in, fan_out = math.prod(in_shape), math.prod(features)
    if p.rank > min(fan_in, fan_out):
      raise cfg.ConfigError(
          f'PeftConfig.rank={p.rank} is larger than dense layer {"/".join(self.path)} '
          f'({fan_in} -> {fan_out}): lower the rank or leave {self.name} out of '
          'PeftConfig.targets')
    n_in = len(in_shape)

    def init_a(key, shape, dtype):
      # Kaiming-uniform (bound 1/sqrt(fan_in)), as the LoRA and PEFT references.
      flat = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')(
          key, (fan_in, p.rank), dtype)
      return flat.reshape(shape)

    a = self.param('lora_a', nn.with_logical_partitioning(
        init_a, tuple(self.kernel_axes[:n_in]) + (ax.ADAPTER,)), in_shape + (p.rank,),
                   self.param_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (ax.ADAPTER,) + tuple(self.kernel_axes[n_in:])),
                   (p.rank,) + features, self.param_dtype)
    h = nn.Dropout(p.dropout)(x, deterministic=self.deterministic or p.dropout == 0.0)
    h = jax.lax.dot_general(h, jnp.asarray(a, self.dtype),
                            ((axis, tuple(range(n_in))), ((), ())))  # [..., rank]
    delta = jax.lax.dot_general(h, jnp.asarray(b, self.dtype),
                                (((h.ndim - 1,), (0,)), ((), ())))  # [..., out...]
    return delta * jnp.asarray(p.lora_scale, self.dtype)


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; `attend` gives tied logits.

  `quantization` (kind, block size): the table is a frozen, quantized base
  (`embedding_codes`, ...; QLoRA with `PeftConfig.quantize_embeddings`), a lookup
  dequantizing only the rows it gathers.
  """
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
  axes: Tuple[str, str] = (ax.VOCAB, ax.EMBED)
  quantization: Optional[Tuple[str, int]] = None

  def setup(self):
    shape = (self.num_embeddings, self.features)
    if self.quantization is None:
      self.embedding = self.param(
          'embedding', nn.with_logical_partitioning(self.embedding_init, self.axes), shape,
          self.param_dtype)
    else:
      self.parts = quantized_parts(self, 'embedding', self.embedding_init, shape,
                                   self.quantization)

  def table(self) -> Array:
    """The whole table [vocab, embed] in `dtype`."""
    if self.quantization is None:
      return jnp.asarray(self.embedding, self.dtype)
    shape = (self.num_embeddings, self.features)
    return quantization.dequantize(self.parts, shape).astype(self.dtype)

  def __call__(self, ids: Array) -> Array:
    """ids [batch, length] -> [batch, length, embed]."""
    if self.quantization is None:
      return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)
    return quantization.dequantize_rows(self.parts, (self.num_embeddings, self.features), ids,
                                        self.quantization[1]).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """x [batch, length, embed] -> logits [batch, length, vocab]."""
    x = jnp.asarray(x, self.dtype)
    if self.quantization is None:
      return jnp.einsum('ble,ve->blv', x, jnp.asarray(self.embedding, self.dtype))
    return dequantized_dot(self.parts, (self.num_embeddings, self.features), x,
                           (((2,), (1,)), ((), ())), self.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in f32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), (ax.EMBED,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
  """(x - mean) / std * scale + bias, computed in f32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), (ax.EMBED,)),
                       (d,), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), (ax.EMBED,)),
                      (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(config: cfg.DecoderConfig, name: str) -> nn.Module:
  match config.norm:
    case cfg.NormType.RMS:
      return RMSNorm(epsilon=config.norm_epsilon, dtype=config.compute_dtype,
                     param_dtype=config.params_dtype, name=name)
    case cfg.NormType.LAYER:
      return LayerNorm(epsilon=config.norm_epsilon, dtype=config.compute_dtype,
                       param_dtype=config.params_dtype, name=name)


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary position embedding on the first `dim` dims of each head, with an
  optional context-extension rule (Hugging Face's `rope_scaling`).

  scaling:
    'none'     frequencies base^(-2i/dim).
    'linear'   position interpolation (Chen et al., 2023): frequencies / factor.
    'dynamic'  dynamic NTK: when a call's longest position exceeds
               `original_max_length`, the base grows to
               base * (factor * length / original - (factor - 1)) ** (dim / (dim - 2)).
    'yarn'     YaRN (Peng et al., 2023): interpolation for low frequencies,
               extrapolation for high ones, blended between `beta_slow` and
               `beta_fast` rotations over `original_max_length`; the rotated dims
               are scaled by `attention_factor` (default 0.1 ln(factor) + 1), the
               attention temperature.
    'llama3'   Llama 3.1: wavelengths above original / low_freq_factor are
               divided by factor, those below original / high_freq_factor kept,
               and the band between blended.
  """
  dim: int
  base: float = 10_000.0
  scaling: str = 'none'
  factor: float = 1.0
  original_max_length: Optional[int] = None
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: Optional[float] = None

  def inv_freq(self) -> np.ndarray:
    """The frequencies [dim // 2] (f32) of every rule but 'dynamic' (which depends on length)."""
    half = self.dim // 2
    inv = 1.0 / (self.base ** (np.arange(0, self.dim, 2, dtype=np.float32) / self.dim))
    inv = inv.astype(np.float32)
    if self.scaling == 'linear':
      return (inv / self.factor).astype(np.float32)
    if self.scaling == 'yarn':
      def correction_dim(rotations):
        return (self.dim * math.log(self.original_max_length / (rotations * 2 * math.pi)) /
                (2 * math.log(self.base)))
      low = max(math.floor(correction_dim(self.beta_fast)), 0)
      high = min(math.ceil(correction_dim(self.beta_slow)), self.dim - 1)
      if low == high:
        high += 0.001
      ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1)
      extrapolation = 1 - ramp
      return (inv / self.factor * (1 - extrapolation) + inv * extrapolation).astype(np.float32)
    if self.scaling == 'llama3':
      old = self.original_max_length
      low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor -
                                                         self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv

  @property
  def output_scale(self) -> float:
    """What the rotated dims are multiplied by (YaRN's attention factor; else 1)."""
    if self.scaling != 'yarn':
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)
    return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0

  def frequencies(self, positions: Array) -> Array:
    """[half] or, for 'dynamic', the frequencies for the longest of `positions`."""
    if self.scaling != 'dynamic':
      return jnp.asarray(self.inv_freq())
    length = jnp.max(positions).astype(jnp.float32) + 1.0
    original = float(self.original_max_length)
    grown = self.base * ((self.factor * length / original) - (self.factor - 1)) ** (
        self.dim / (self.dim - 2))
    base = jnp.where(length > original, grown, self.base)
    return 1.0 / (base ** (jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim))


def apply_rope(x: Array, positions: Array, rope: Union[int, Rope],
               max_wavelength: float = 10_000.0) -> Array:
  """Rotary embedding on the first `rope.dim` dims of each head.

  GPT-NeoX/LLaMA layout: the rotated dims are split in halves (x1, x2) and
  rotated as (x1 cos - x2 sin, x2 cos + x1 sin); the rest pass through.

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] integer positions.
    rope: a `Rope`, or the number of rotated dims (even) with base `max_wavelength`.
    max_wavelength: the base of the frequencies when `rope` is an int.
  """
  if not isinstance(rope, Rope):
    rope = Rope(int(rope), max_wavelength)
  rotary_dim = rope.dim
  half = rotary_dim // 2
  freq = rope.frequencies(positions)  # [half]
  angle = positions.astype(jnp.float32)[:, :, None] * freq  # [batch, length, half]
  sin = jnp.sin(angle)[:, :, None, :]
  cos = jnp.cos(angle)[:, :, None, :]
  if rope.output_scale != 1.0:
    sin, cos = sin * rope.output_scale, cos * rope.output_scale
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x.dtype)


def activation(kind: cfg.MlpKind, gelu_approximate: bool = True) -> Callable[[Array], Array]:
  """The nonlinearity of an MLP kind (the activated branch of a gated one).

  GELU is the tanh approximation (HF 'gelu_new', 'gelu_pytorch_tanh') unless
  `gelu_approximate` is False: the exact erf form (HF 'gelu').
  """
  gelu = functools.partial(jax.nn.gelu, approximate=gelu_approximate)
  return {cfg.MlpKind.RELU: jax.nn.relu, cfg.MlpKind.GELU: gelu,
          cfg.MlpKind.SWIGLU: jax.nn.silu, cfg.MlpKind.GEGLU: gelu}[kind]


class MlpBlock(nn.Module):
  """Feed-forward block: [batch, length, embed] -> same.

  Gated kinds (SwiGLU, GeGLU) use `wi_0` (activated) and `wi_1` (linear);
  plain kinds use `wi`. The output projection is `wo`.
  """
  mlp_dim: int
  kind: cfg.MlpKind = cfg.MlpKind.SWIGLU
  use_bias: bool = False
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_scale: float = 1.0  # DeepNorm beta on both projections
  gelu_approximate: bool = True  # tanh GELU; False: exact (erf)
  peft: Optional[cfg.PeftConfig] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    emb = x.shape[-1]
    dense = functools.partial(DenseGeneral, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, init_scale=self.init_scale,
                              peft=self.peft, deterministic=self.deterministic)
    act = activation(self.kind, self.gelu_approximate)
    # checkpoint_name: what the named rematerialisation policies save (transformer.py).
    if self.kind.gated:
      h = act(checkpoint_name(dense((self.mlp_dim,), (ax.EMBED, ax.MLP), name='wi_0')(x),
                              'mlp_wi_0'))
      h = h * checkpoint_name(dense((self.mlp_dim,), (ax.EMBED, ax.MLP), name='wi_1')(x),
                              'mlp_wi_1')
    else:
      h = act(checkpoint_name(dense((self.mlp_dim,), (ax.EMBED, ax.MLP), name='wi')(x),
                              'mlp_wi_0'))
    h = nn.with_logical_constraint(h, (ax.BATCH, ax.LENGTH, ax.MLP))  # [batch, length, mlp]
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=self.deterministic)
    return checkpoint_name(dense((emb,), (ax.MLP, ax.EMBED), name='wo')(h), 'mlp_out')


class Adapter(nn.Module):
  """Houlsby's bottleneck adapter: x + up(gelu(down(x))) over [..., embed].

  `up` starts at zero, so a fresh adapter is the identity.
  """
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    h = jax.nn.gelu(dense((self.dim,), (ax.EMBED, ax.ADAPTER), name='down')(x))
    up = dense((x.shape[-1],), (ax.ADAPTER, ax.EMBED), kernel_init=nn.initializers.zeros_init(),
               name='up')(h)
    return x + up.astype(x.dtype)
