"""Top-k gating for TPUs: Pallas kernels lowered through Mosaic.

The kernel bodies are `tiles.py`'s (shared with the GPU kernels: softmax, k
rounds of max / lowest index attaining it / mask, the VJP through
renormalisation and softmax); only the blocking differs. One grid step per block of `tm`
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
from pallas_kernels.moe_routing import tiles


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
    backend_lib.check_tiles(self, ('tm',), 'tpu')

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
  """`gating_ops`' top-k on padded logits [tokens, padded_experts(experts)].

  tokens is a multiple of bs.tm and the padded columns hold -inf. Returns
  weights (f32, largest first) and experts (int32), both [tokens, k].
  interpret runs the TPU interpreter (CPU).
  """
  tokens, ep = logits.shape
  out_spec = pl.BlockSpec((bs.tm, k), lambda i: (i, 0))
  return _call(
      functools.partial(tiles.gating_forward_kernel, k=k, renormalize=renormalize),
      tokens, bs.tm, [pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))], [out_spec, out_spec],
      [jax.ShapeDtypeStruct((tokens, k), jnp.float32),
       jax.ShapeDtypeStruct((tokens, k), jnp.int32)],
      interpret, 'moe_gating_fwd')(logits)


def backward(logits: jax.Array, experts: jax.Array, dweights: jax.Array, k: int,
             renormalize: bool, bs: BlockSizes, *, interpret: bool = False) -> jax.Array:
  """The cotangent of `forward`'s weights in its logits (their shape and dtype).

  experts is `forward`'s output and dweights the f32 cotangent of its
  weights, both [tokens, k].
  """
  tokens, ep = logits.shape
  row_spec = pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))
  narrow_spec = pl.BlockSpec((bs.tm, k), lambda i: (i, 0))
  return _call(
      functools.partial(tiles.gating_backward_kernel, k=k, renormalize=renormalize),
      tokens, bs.tm, [row_spec, narrow_spec, narrow_spec], row_spec,
      jax.ShapeDtypeStruct(logits.shape, logits.dtype), interpret,
      'moe_gating_bwd')(logits, experts, dweights)
