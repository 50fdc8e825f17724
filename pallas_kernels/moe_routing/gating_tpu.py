"""Top-k gating for TPUs: Pallas kernels lowered through Mosaic.

The kernel bodies are `gating_gpu`'s (backend-neutral jnp: softmax, k rounds
of max / lowest index attaining it / mask, the VJP through renormalisation
and softmax); only the blocking differs. One grid step per block of `tm`
tokens (a multiple of 8 sublanes), each holding its whole row of experts,
padded to a multiple of 128 lanes with -inf logits (probability exactly 0,
after every real expert: never selected). The narrow outputs, weights and
experts [tokens, k], are blocks spanning all k columns (legal for Mosaic at
any width): padding k to 128 lanes would multiply their HBM traffic instead.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend as backend_lib
from pallas_kernels.moe_routing import gating_gpu



def padded_experts(num_experts: int) -> int:
  """Expert columns of the kernels' logits blocks: a multiple of 128 lanes."""
  return backend_lib.round_up(num_experts, 128)


def padded_k(k: int) -> int:
  """Columns of the kernels' weights and experts blocks: k itself (whole-dimension blocks)."""
  return k


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per grid step (tm): a positive multiple of 8; 16 for 16-bit logits
  (two rows per packed sublane), unless it spans all the (padded) tokens."""
  tm: int = 256

  def __post_init__(self):
    if not isinstance(self.tm, int) or self.tm <= 0 or self.tm % 8:
      raise ValueError(f'BlockSizes.tm={self.tm!r} must be a positive multiple of 8 (TPU '
                       'sublanes)')

  @classmethod
  def default(cls, num_experts: int) -> 'BlockSizes':
    # About 64K logits per step: large enough to amortise the ~0.35us per
    # grid step, small enough that the few live [tm, experts] f32 temporaries
    # of the k rounds stay far inside VMEM. Multiples of 16 suit bf16 blocks.
    tm = (64 * 1024 // padded_experts(num_experts)) // 16 * 16
    return cls(tm=max(16, min(512, tm)))

  def clipped(self, num_tokens: int) -> 'BlockSizes':
    """A token block no larger than the tokens rounded up to 8 (a block
    spanning the whole padded dimension is legal whatever its size)."""
    return dataclasses.replace(self, tm=min(self.tm, backend_lib.round_up(num_tokens, 8)))


def _call(kernel, tokens: int, tm: int, in_specs, out_specs, out_shape, interpret: bool,
          name: str):
  return pl.pallas_call(
      kernel, grid=(tokens // tm,), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape,
      # Token blocks are independent: megacore chips may split them.
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)),
      interpret=pltpu.InterpretParams() if interpret else False, name=name)


def forward(logits: jax.Array, k: int, renormalize: bool, bs: BlockSizes, *,
            interpret: bool = False):
  """Top-k gating of padded logits.

  Args:
    logits: [tokens, ep] float, tokens a multiple of bs.tm, ep =
      padded_experts(experts) with -inf in the padded columns.
    k: experts per token (static), 1 <= k <= the real number of experts.
    renormalize: divide the k weights by their sum.
    bs: the token block.
    interpret: run in the TPU interpreter (CPU) instead of compiling.

  Returns:
    weights [tokens, k] f32 (largest first) and experts [tokens, k] int32.
  """
  tokens, ep = logits.shape
  out_spec = pl.BlockSpec((bs.tm, k), lambda i: (i, 0))
  return _call(
      functools.partial(gating_gpu.forward_kernel, k=k, renormalize=renormalize),
      tokens, bs.tm, [pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))], [out_spec, out_spec],
      [jax.ShapeDtypeStruct((tokens, k), jnp.float32),
       jax.ShapeDtypeStruct((tokens, k), jnp.int32)],
      interpret, 'moe_gating_fwd')(logits)


def backward(logits: jax.Array, experts: jax.Array, dweights: jax.Array, k: int,
             renormalize: bool, bs: BlockSizes, *, interpret: bool = False) -> jax.Array:
  """The logits' cotangent of `forward`'s weights.

  Args:
    logits: [tokens, ep], as given to `forward`.
    experts: [tokens, k] int32, `forward`'s output.
    dweights: [tokens, k] f32, the weights' cotangent.
    k, renormalize, bs: as given to `forward`.
    interpret: run in the TPU interpreter (CPU) instead of compiling.

  Returns:
    [tokens, ep] in logits' dtype; zero in the padded columns.
  """
  tokens, ep = logits.shape
  row_spec = pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))
  narrow_spec = pl.BlockSpec((bs.tm, k), lambda i: (i, 0))
  return _call(
      functools.partial(gating_gpu.backward_kernel, k=k, renormalize=renormalize),
      tokens, bs.tm, [row_spec, narrow_spec, narrow_spec], row_spec,
      jax.ShapeDtypeStruct(logits.shape, logits.dtype), interpret,
      'moe_gating_bwd')(logits, experts, dweights)
