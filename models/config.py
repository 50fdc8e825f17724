"""Frozen configuration dataclasses and the enums that name every choice.

Gin binds these constructors (`DecoderConfig.emb_dim = 512`); enum fields
accept their lowercase string values too (`position_encoding = 'alibi'`).
"""

import dataclasses
import enum
import re
from typing import Optional

import jax.numpy as jnp


class ConfigError(ValueError):
  """An invalid model configuration."""


class PositionEncoding(enum.Enum):
  ROPE = 'rope'  # rotary, on `rotary_fraction` of each head's dims
  ALIBI = 'alibi'  # linear biases (BLOOM)
  T5_BIAS = 't5_bias'  # bucketed relative-position bias shared by a stack
  LEARNED = 'learned'  # learned absolute table of `max_length` rows
  NONE = 'none'


class RopeScaling(enum.Enum):
  """How RoPE frequencies are changed to extend context (`layers.Rope`, HF `rope_scaling`)."""
  NONE = 'none'
  LINEAR = 'linear'  # position interpolation
  DYNAMIC = 'dynamic'  # dynamic NTK
  YARN = 'yarn'  # YaRN, with its attention temperature
  LLAMA3 = 'llama3'  # Llama 3.1's frequency bands


class NormType(enum.Enum):
  RMS = 'rms'
  LAYER = 'layer'


class NormPosition(enum.Enum):
  PRE = 'pre'  # x + f(norm(x)); a final norm after the stack
  POST = 'post'  # norm(x + f(x))
  DEEPNORM = 'deepnorm'  # norm(alpha * x + f(x)), beta-scaled init (Wang et al., 2022)


class MlpKind(enum.Enum):
  RELU = 'relu'
  GELU = 'gelu'
  SWIGLU = 'swiglu'  # silu(x W0) * (x W1)
  GEGLU = 'geglu'  # gelu(x W0) * (x W1)

  @property
  def gated(self) -> bool:
    return self in (MlpKind.SWIGLU, MlpKind.GEGLU)


class AttentionKernel(enum.Enum):
  XLA = 'xla'  # pallas_kernels/flash_attention/xla.py: pure jnp, compiled by XLA
  FLASH = 'flash'  # Pallas flash attention (Triton on GPU, Mosaic on TPU, interpreted on CPU)


class RouterKind(enum.Enum):
  TOKEN_CHOICE = 'token_choice'  # each token picks its top-k experts (Switch, GLaM, Mixtral)
  EXPERT_CHOICE = 'expert_choice'  # each expert picks its top-capacity tokens (Zhou et al.)
  HASH = 'hash'  # a fixed hash of the token id (PanGu-Sigma random routing); k = 1


class MoeImpl(enum.Enum):
  CAPACITY = 'capacity'  # einsum dispatch with a capacity factor; overflow dropped
  DROPLESS = 'dropless'  # sort by expert + the Pallas grouped matmul; nothing dropped
  RAGGED_DOT = 'ragged_dot'  # sort by expert + XLA's jax.lax.ragged_dot; nothing dropped


class RematPolicy(enum.Enum):
  NONE = 'none'  # keep every activation
  FULL = 'full'  # recompute the whole layer in the backward pass
  DOTS = 'dots'  # save matmul outputs, recompute the rest
  DOTS_NO_BATCH = 'dots_no_batch'  # save weight matmuls only (not attention)
  # Named policies (jax.ad_checkpoint.checkpoint_name in models/attention.py and layers.py;
  # MaxText's names for the same tensors in brackets):
  MINIMAL = 'minimal'  # q/k/v projections, attention output, out projection, MLP input
  #   projections and output [query_proj, key_proj, value_proj, context, out_proj, mlpwi_0,
  #   mlpwi_1, mlpwo]: norms, RoPE, softmax and the MLP activation are recomputed
  SAVE_QKV_PROJ = 'save_qkv_proj'  # q/k/v projections only [save_qkv_proj]
  SAVE_OUT_PROJ = 'save_out_proj'  # attention output and out projection, MLP output
  MINIMAL_OFFLOADED = 'minimal_offloaded'  # MINIMAL's tensors kept in host memory (GPU/TPU)


class PeftMethod(enum.Enum):
  """Parameter-efficient fine-tuning (models/peft.py): what is added to the model and trained."""
  LORA = 'lora'  # low-rank deltas B A on the dense layers `targets` names (Hu et al., 2021)
  IA3 = 'ia3'  # learned scaling of keys, values and the MLP hidden (Liu et al., 2022)
  ADAPTERS = 'adapters'  # Houlsby bottlenecks after attention and the MLP (Houlsby et al., 2019)
  BITFIT = 'bitfit'  # the dense layers' biases only (Ben Zaken et al., 2021)
  PREFIX = 'prefix'  # learned per-layer key/value prefixes every query attends to (Li & Liang, 2021)
  PROMPT = 'prompt'  # a learned soft prompt before every sequence (Lester et al., 2021)


class BaseQuantization(enum.Enum):
  """How a PEFT run stores its frozen base's dense kernels (models/quantization.py)."""
  NONE = 'none'
  NF4 = 'nf4'  # QLoRA: 4-bit NormalFloat, blockwise, double-quantized maxima
  INT8 = 'int8'  # blockwise absmax int8


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """What a parameter-efficient fine-tuning run adds to the model.

  The added parameters start so that the model computes exactly the base
  model (LoRA B = 0, IA3 scales = 1, adapter up-projections = 0); the
  trainer trains them alone (`models.peft.trainable_pattern`) unless
  `train.trainable_params` says otherwise.

  Attributes:
    method: a `PeftMethod` (or its lowercase name).
    targets: regular expression searched in each dense layer's path, e.g.
      'query|value', 'self_attention' or '.' (every dense layer); None: the
      method's default ('query|value' for LoRA, 'key|value|wo' for IA3).
    rank, alpha, dropout: LoRA's r, its scale alpha / r, and the dropout on
      the low-rank branch's input.
    adapter_dim: the adapters' bottleneck width.
    num_virtual_tokens: prefix tuning's prefix length (key/value slots per layer);
      prompt tuning's soft-prompt length (0: none, the base model).
    quantization: 'nf4' (QLoRA) or 'int8' stores every frozen dense kernel of
      the base (and the MoE experts' weights) quantized in blocks of
      `quantization_block_size` weights, dequantized on the fly in the forward.
    quantize_embeddings: with `quantization`, also store the vocabulary-sized
      matrices quantized: the token embedding table and the output layer
      `logits_dense` (so the whole frozen base takes about 0.52 bytes per
      parameter with NF4). False keeps them in full precision, as the QLoRA
      paper's implementation does.
  """
  method: PeftMethod = PeftMethod.LORA
  targets: Optional[str] = None
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  adapter_dim: int = 16
  num_virtual_tokens: int = 8
  quantization: BaseQuantization = BaseQuantization.NONE
  quantization_block_size: int = 64
  quantize_embeddings: bool = True

  def __post_init__(self):
    object.__setattr__(self, 'method', _coerce(PeftMethod, self.method, 'PeftConfig.method'))
    object.__setattr__(self, 'quantization', _coerce(BaseQuantization, self.quantization,
                                                     'PeftConfig.quantization'))
    if int(self.quantization_block_size) < 2 or self.quantization_block_size % 2:
      raise ConfigError(f'PeftConfig.quantization_block_size={self.quantization_block_size} '
                        'must be an even number >= 2 (QLoRA: 64)')
    if self.quantization != BaseQuantization.NONE and self.method == PeftMethod.BITFIT:
      raise ConfigError('PeftConfig.quantization needs a frozen base, but BitFit trains the '
                        "biases of the quantized layers: use method 'lora' (QLoRA)")
    if self.targets is None:
      default = {PeftMethod.LORA: 'query|value', PeftMethod.IA3: 'key|value|wo'}
      object.__setattr__(self, 'targets', default.get(self.method))
    if self.targets is not None:
      try:
        re.compile(self.targets)
      except (re.error, TypeError) as e:
        raise ConfigError(f'PeftConfig.targets={self.targets!r} is not a regular expression '
                          f'({e}): use e.g. \'query|value\'') from None
    if int(self.rank) < 1:
      raise ConfigError(f'PeftConfig.rank={self.rank} must be at least 1')
    if int(self.num_virtual_tokens) < (0 if self.method == PeftMethod.PROMPT else 1):
      raise ConfigError(f'PeftConfig.num_virtual_tokens={self.num_virtual_tokens} must be at '
                        'least 1')
    if int(self.adapter_dim) < 1:
      raise ConfigError(f'PeftConfig.adapter_dim={self.adapter_dim} must be at least 1')
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f'PeftConfig.dropout={self.dropout} must be in [0, 1)')

  @property
  def lora_scale(self) -> float:
    return float(self.alpha) / float(self.rank)


def _coerce(enum_cls, value, field):
  if isinstance(value, enum_cls):
    return value
  try:
    return enum_cls(str(value).lower())
  except ValueError:
    valid = ', '.join(repr(e.value) for e in enum_cls)
    raise ConfigError(f'{field}={value!r} is not one of {valid}') from None


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A decoder-only transformer (causal, or prefix-LM when the batch says so)."""
  vocab_size: int = 384
  emb_dim: int = 512
  num_heads: int = 8
  num_kv_heads: Optional[int] = None  # None: = num_heads (MHA); 1: MQA
  head_dim: int = 64
  mlp_dim: int = 2048
  num_layers: int = 6
  mlp: MlpKind = MlpKind.SWIGLU
  use_bias: bool = False
  attention_bias: Optional[bool] = None  # biases of q/k/v/out; None: use_bias (LLaMA's attention_bias)
  norm: NormType = NormType.RMS
  norm_position: NormPosition = NormPosition.PRE
  norm_epsilon: float = 1e-6
  embed_norm: bool = False  # BLOOM's LayerNorm after the embedding
  parallel_block: bool = False  # PaLM: x + attn(norm(x)) + mlp(norm(x))
  parallel_mlp_norm: bool = False  # GPT-NeoX: the parallel MLP reads its own norm of x
  position_encoding: PositionEncoding = PositionEncoding.ROPE
  rotary_fraction: float = 1.0  # GPT-NeoX: 0.25
  rope_max_wavelength: float = 10_000.0  # the RoPE base (HF rope_theta)
  rope_scaling: RopeScaling = RopeScaling.NONE  # context extension (layers.Rope)
  rope_scaling_factor: float = 1.0
  rope_original_max_length: Optional[int] = None  # the trained context (dynamic, yarn, llama3)
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_yarn_beta_fast: float = 32.0
  rope_yarn_beta_slow: float = 1.0
  rope_yarn_attention_factor: Optional[float] = None  # None: 0.1 ln(factor) + 1
  query_scale: Optional[float] = None  # softmax scale of q.k; None: 1/sqrt(head_dim); T5: 1.0
  max_length: Optional[int] = None  # longest sequence supported; required for LEARNED
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  tie_embeddings: bool = True
  scale_tied_logits: bool = True  # tied logits / sqrt(emb_dim) (T5 v1.0); False: BLOOM, GPT-2
  gelu_approximate: bool = True  # GELU/GeGLU as tanh (HF gelu_new); False: exact erf (HF gelu)
  dropout_rate: float = 0.0
  dtype: str = 'float32'  # compute dtype; parameters stay in param_dtype
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat_policy: RematPolicy = RematPolicy.NONE
  attention_kernel: AttentionKernel = AttentionKernel.XLA
  # The XLA kernel computes causal self-attention in blocks of this many query rows,
  # skipping the fully masked blocks above the diagonal and keeping no [length,
  # length] array for the backward pass (pallas_kernels/flash_attention/blockwise.py),
  # when the length is a multiple of it and at least twice it; 0: never.
  attention_block_size: int = 128
  # ... and in at most this many blocks where doubling the block allows: the blocks are
  # unrolled, so their number sets the compile time, while past ~8 finer blocks skip
  # little more work (blockwise.block_for; at 2048 tokens, 8 blocks of 256). 0: no limit.
  attention_max_blocks: int = 8
  # Decoder-only training applies the output layer and the cross-entropy together over
  # slices of this many positions, recomputing each slice's logits in the backward pass
  # (models/losses.py: chunked_head_cross_entropy), when the length is a multiple of it
  # and at least twice it and no PEFT method is on; 0: full logits.
  loss_chunk_length: int = 128
  # Mixture of experts: num_experts = 0 is a dense model. Layer i has an MoE
  # block in place of its MLP when (i + 1) % moe_layer_interval == 0 (2: every
  # other layer, as Switch and GLaM).
  num_experts: int = 0
  num_experts_per_token: int = 2  # k of token choice; expert choice: mean experts per token
  moe_layer_interval: int = 1
  moe_mlp_dim: Optional[int] = None  # None: mlp_dim
  router: RouterKind = RouterKind.TOKEN_CHOICE
  moe_impl: MoeImpl = MoeImpl.CAPACITY
  capacity_factor: float = 1.25
  renormalize_gates: bool = True  # top-k weights sum to 1 (Mixtral); False: raw probs (Switch)
  router_jitter: float = 0.0  # multiplicative noise on the router input while training
  num_shared_experts: int = 0  # DeepSeek: experts every token uses
  load_balance_loss_weight: float = 0.01
  router_z_loss_weight: float = 0.001
  # Parameter-efficient fine-tuning: the parameters it adds (models/peft.py); None: none.
  peft: Optional[PeftConfig] = None

  def __post_init__(self):
    name = type(self).__name__
    for field, cls in (('mlp', MlpKind), ('norm', NormType),
                       ('norm_position', NormPosition),
                       ('position_encoding', PositionEncoding),
                       ('remat_policy', RematPolicy),
                       ('attention_kernel', AttentionKernel),
                       ('router', RouterKind), ('moe_impl', MoeImpl),
                       ('rope_scaling', RopeScaling)):
      object.__setattr__(self, field, _coerce(cls, getattr(self, field), f'{name}.{field}'))
    if self.num_kv_heads is None:
      object.__setattr__(self, 'num_kv_heads', self.num_heads)
    for field in ('vocab_size', 'emb_dim', 'num_heads', 'num_kv_heads', 'head_dim',
                  'mlp_dim', 'num_layers'):
      if int(getattr(self, field)) < 1:
        raise ConfigError(f'{name}.{field}={getattr(self, field)} must be at least 1')
    if int(self.loss_chunk_length) < 0:
      raise ConfigError(f'{name}.loss_chunk_length={self.loss_chunk_length} must be 0 '
                        '(full logits) or a positive number of positions')
    if int(self.attention_max_blocks) < 0:
      raise ConfigError(f'{name}.attention_max_blocks={self.attention_max_blocks} must be 0 '
                        '(no limit) or a positive number of blocks')
    if int(self.attention_block_size) < 0:
      raise ConfigError(f'{name}.attention_block_size={self.attention_block_size} must be 0 '
                        '(never blockwise) or a positive number of query rows')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f'{name}.num_heads={self.num_heads} is not divisible by num_kv_heads='
          f'{self.num_kv_heads}: set num_kv_heads to a divisor of num_heads')
    if not 0.0 < self.rotary_fraction <= 1.0:
      raise ConfigError(f'{name}.rotary_fraction={self.rotary_fraction} must be in (0, 1]')
    if (self.position_encoding == PositionEncoding.ROPE and self.rotary_dim % 2):
      raise ConfigError(f'{name}: rotary dims head_dim*rotary_fraction='
                        f'{self.rotary_dim} must be even: change rotary_fraction')
    self._check_rope(name)
    if self.query_scale is not None and not self.query_scale > 0:
      raise ConfigError(f'{name}.query_scale={self.query_scale} must be > 0, or None for '
                        '1/sqrt(head_dim)')
    if self.parallel_mlp_norm and not self.parallel_block:
      raise ConfigError(f'{name}.parallel_mlp_norm=True needs parallel_block=True')
    if self.position_encoding == PositionEncoding.LEARNED and not self.max_length:
      raise ConfigError(f'{name}.position_encoding=learned needs max_length: set '
                        f'{name}.max_length to the longest sequence')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f'{name}.dropout_rate={self.dropout_rate} must be in [0, 1)')
    if self.attention_kernel == AttentionKernel.FLASH and self.dropout_rate > 0.0:
      raise ConfigError(f'{name}.attention_kernel=flash does not drop attention '
                        f'probabilities, but dropout_rate={self.dropout_rate}: set '
                        f'{name}.dropout_rate = 0.0 or {name}.attention_kernel = "xla"')
    self._check_moe(name)
    if self.peft is not None and not isinstance(self.peft, PeftConfig):
      raise ConfigError(f'{name}.peft={self.peft!r} must be @model_config.PeftConfig() or None')
    if (self.peft is not None and self.peft.method == PeftMethod.PREFIX and
        self.attention_kernel == AttentionKernel.FLASH):
      raise ConfigError(f'{name}: prefix tuning attends to its prefixes in the XLA attention: '
                        f"set {name}.attention_kernel = 'xla'")
    for field in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError:
        raise ConfigError(f'{name}.{field}={getattr(self, field)!r} is not a dtype: '
                          "use 'float32' or 'bfloat16'") from None

  def _check_rope(self, name: str) -> None:
    if self.rope_scaling == RopeScaling.NONE:
      return
    if self.position_encoding != PositionEncoding.ROPE:
      raise ConfigError(f'{name}.rope_scaling={self.rope_scaling.value!r} needs '
                        "position_encoding='rope'")
    if not self.rope_scaling_factor >= 1.0:
      raise ConfigError(f'{name}.rope_scaling_factor={self.rope_scaling_factor} must be >= 1 '
                        '(the context extension, e.g. 4.0)')
    needs_original = self.rope_scaling in (RopeScaling.DYNAMIC, RopeScaling.YARN,
                                           RopeScaling.LLAMA3)
    if needs_original and not (self.rope_original_max_length or 0) > 0:
      raise ConfigError(f'{name}.rope_scaling={self.rope_scaling.value!r} needs '
                        f'rope_original_max_length: set it to the context the model was trained '
                        'with')
    if (self.rope_scaling == RopeScaling.LLAMA3 and
        not self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
      raise ConfigError(f'{name}: rope_high_freq_factor={self.rope_high_freq_factor} must '
                        f'exceed rope_low_freq_factor={self.rope_low_freq_factor} > 0')

  def _check_moe(self, name: str) -> None:
    if self.num_experts < 0:
      raise ConfigError(f'{name}.num_experts={self.num_experts} must be >= 0 (0: dense)')
    if not self.num_experts:
      return
    k = self.num_experts_per_token
    if self.router == RouterKind.HASH and k != 1:
      raise ConfigError(f'{name}.router=hash routes each token to one expert, but '
                        f'num_experts_per_token={k}: set it to 1')
    if self.router == RouterKind.TOKEN_CHOICE and not 1 <= k <= self.num_experts:
      raise ConfigError(f'{name}.num_experts_per_token={k} must be between 1 and '
                        f'num_experts={self.num_experts}: lower the top-k')
    if self.router == RouterKind.EXPERT_CHOICE and k < 1:
      raise ConfigError(f'{name}.num_experts_per_token={k} must be at least 1')
    if self.router == RouterKind.EXPERT_CHOICE and self.moe_impl != MoeImpl.CAPACITY:
      raise ConfigError(f'{name}.router=expert_choice fills fixed capacities: set '
                        f"{name}.moe_impl = 'capacity'")
    if not self.capacity_factor > 0:
      raise ConfigError(f'{name}.capacity_factor={self.capacity_factor} must be > 0: '
                        'use e.g. 1.25 (Switch) or 2.0')
    if self.moe_layer_interval < 1 or self.num_layers % self.moe_layer_interval:
      raise ConfigError(f'{name}.moe_layer_interval={self.moe_layer_interval} must divide '
                        f'num_layers={self.num_layers}')
    if self.num_shared_experts < 0 or not 0.0 <= self.router_jitter < 1.0:
      raise ConfigError(f'{name}: num_shared_experts={self.num_shared_experts} must be >= 0 '
                        f'and router_jitter={self.router_jitter} in [0, 1)')
    for field in ('load_balance_loss_weight', 'router_z_loss_weight'):
      if getattr(self, field) < 0:
        raise ConfigError(f'{name}.{field}={getattr(self, field)} must be >= 0')

  def is_moe_layer(self, index: int) -> bool:
    """Whether layer `index` (0-based) has an MoE block in place of its MLP."""
    return self.num_experts > 0 and (index + 1) % self.moe_layer_interval == 0

  @property
  def rotary_dim(self) -> int:
    return int(round(self.head_dim * self.rotary_fraction))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def check_length(self, length: int, what: str = 'sequence') -> None:
    """Fails when a `length`-token sequence exceeds what positions support."""
    if self.max_length and length > self.max_length:
      raise ConfigError(
          f'{what} length {length} is longer than {type(self).__name__}.max_length='
          f'{self.max_length} supported by {self.position_encoding.value} positions: '
          'shorten the task feature lengths or raise max_length')


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig(DecoderConfig):
  """A T5-style encoder-decoder; `num_layers` counts decoder layers."""
  num_encoder_layers: int = 6

  def __post_init__(self):
    super().__post_init__()
    if self.num_encoder_layers < 1:
      raise ConfigError(f'EncoderDecoderConfig.num_encoder_layers='
                        f'{self.num_encoder_layers} must be at least 1')
    if self.num_experts and self.num_encoder_layers % self.moe_layer_interval:
      raise ConfigError(f'EncoderDecoderConfig.moe_layer_interval={self.moe_layer_interval} '
                        f'must divide num_encoder_layers={self.num_encoder_layers}')
