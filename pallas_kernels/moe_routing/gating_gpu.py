"""Top-k gating for GPUs: Pallas kernels lowered through Triton.

One program per block of `tm` tokens, each holding its whole row of experts
(padded to a power of 2, Triton's block shapes). The padded experts' logits
are -inf, so their probability is exactly 0: they add nothing to the softmax
sum and, sitting after every real expert, lose every tie at 0 (k <= the real
number of experts), so they are never selected.

The kernel bodies are `tiles.py`'s (shared with the TPU kernels). The forward
writes weights [tokens, kp] f32 and experts [tokens, kp] int32, kp = k
rounded up to a power of 2 (columns past k are zero and sliced off by
`gating_ops`); the backward writes the logits' cotangent.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import backend as backend_lib
from pallas_kernels.moe_routing import tiles


def padded_experts(num_experts: int) -> int:
  """Expert columns of the kernels' logits blocks: a power of 2 of at least 16."""
  return max(16, backend_lib.next_power_of_2(num_experts))


def padded_k(k: int) -> int:
  """Columns of the kernels' weights and experts blocks: a power of 2."""
  return backend_lib.next_power_of_2(k)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per program (tm, a power of 2 of at least 16) and Triton's launch knobs."""
  tm: int = 64
  num_warps: Optional[int] = None  # None: 4, or 8 for blocks of more than 4096 logits
  num_stages: int = 1  # one block per program: nothing to pipeline

  def __post_init__(self):
    backend_lib.check_tiles(self, ('tm',), 'gpu')

  @classmethod
  def default(cls, num_experts: int) -> 'BlockSizes':
    # About 8K logits per program: the k rounds keep a few [tm, experts] f32
    # tensors live, which must fit in registers of 4-8 warps.
    return cls(tm=max(16, min(128, 8192 // padded_experts(num_experts))))

  def clipped(self, num_tokens: int) -> 'BlockSizes':
    """A token block no larger than the (power-of-2 rounded) number of tokens."""
    return dataclasses.replace(
        self, tm=min(self.tm, max(16, backend_lib.next_power_of_2(num_tokens))))

  def params(self, num_experts: int) -> plgpu.CompilerParams:
    warps = self.num_warps or (8 if self.tm * padded_experts(num_experts) > 4096 else 4)
    return plgpu.CompilerParams(num_warps=warps, num_stages=self.num_stages)


# ------------------------------------------------------------ entry points


def forward(logits: jax.Array, k: int, renormalize: bool, bs: BlockSizes, *,
            interpret: bool = False):
  """`gating_ops`' top-k on padded logits [tokens, padded_experts(experts)].

  tokens is a multiple of bs.tm and the padded columns hold -inf. Returns
  weights (f32, largest first) and experts (int32), both [tokens,
  padded_k(k)] and zero past column k.
  """
  tokens, ep = logits.shape
  kp = padded_k(k)
  out_spec = pl.BlockSpec((bs.tm, kp), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(tiles.gating_forward_kernel, k=k, renormalize=renormalize),
      grid=(tokens // bs.tm,),
      in_specs=[pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))],
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((tokens, kp), jnp.float32),
                 jax.ShapeDtypeStruct((tokens, kp), jnp.int32)],
      compiler_params=bs.params(ep), interpret=interpret, name='moe_gating_fwd',
  )(logits)


def backward(logits: jax.Array, experts: jax.Array, dweights: jax.Array, k: int,
             renormalize: bool, bs: BlockSizes, *, interpret: bool = False) -> jax.Array:
  """The cotangent of `forward`'s weights in its logits (their shape and dtype).

  experts is `forward`'s output and dweights the f32 cotangent of its weights,
  both [tokens, padded_k(k)] (columns past k are ignored).
  """
  tokens, ep = logits.shape
  kp = experts.shape[1]
  row_spec = pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))
  narrow_spec = pl.BlockSpec((bs.tm, kp), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(tiles.gating_backward_kernel, k=k, renormalize=renormalize),
      grid=(tokens // bs.tm,),
      in_specs=[row_spec, narrow_spec, narrow_spec],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
      compiler_params=bs.params(ep), interpret=interpret, name='moe_gating_bwd',
  )(logits, experts, dweights)
