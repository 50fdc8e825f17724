"""Top-k gating for GPUs: Pallas kernels lowered through Triton.

One program per block of `tm` tokens, each holding its whole row of experts
(padded to a power of 2, Triton's block shapes). The padded experts' logits
are -inf, so their probability is exactly 0: they add nothing to the softmax
sum and, sitting after every real expert, lose every tie at 0 (k <= the real
number of experts), so they are never selected.

Forward: softmax in f32 (jax.nn.softmax's formula, so the probabilities are
the reference's), then k rounds of (row max, the lowest column attaining it,
that column masked to -1 below every probability): the order and tie rule of
`lax.top_k`. Writes weights [tokens, kp] f32 and experts [tokens, kp] int32,
kp = k rounded up to a power of 2 (columns past k are zero and sliced off by
`gating_ops`).

Backward: recomputes the probabilities from the logits (no [tokens, experts]
f32 residual is kept) and takes the chosen experts from the forward's output;
the cotangent of the k weights goes through the renormalisation, is scattered
into the expert columns by comparison (no scatter), and through the softmax.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def padded_experts(num_experts: int) -> int:
  """Expert columns of the kernels' logits blocks: a power of 2 of at least 16."""
  return max(16, _next_power_of_2(num_experts))


def padded_k(k: int) -> int:
  """Columns of the kernels' weights and experts blocks: a power of 2."""
  return _next_power_of_2(k)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per program (tm, a power of 2 of at least 16) and Triton's launch knobs."""
  tm: int = 64
  num_warps: Optional[int] = None  # None: 4, or 8 for blocks of more than 4096 logits
  num_stages: int = 1  # one block per program: nothing to pipeline

  def __post_init__(self):
    if not isinstance(self.tm, int) or self.tm < 16 or self.tm & (self.tm - 1):
      raise ValueError(f'BlockSizes.tm={self.tm!r} must be a power of 2 of at least 16 '
                       '(Triton blocks)')
    if self.num_warps is not None and (self.num_warps < 1 or self.num_warps & (self.num_warps - 1)):
      raise ValueError(f'BlockSizes.num_warps={self.num_warps!r} must be a power of 2')
    if self.num_stages < 1:
      raise ValueError(f'BlockSizes.num_stages={self.num_stages!r} must be positive')

  @classmethod
  def default(cls, num_experts: int) -> 'BlockSizes':
    # About 8K logits per program: the k rounds keep a few [tm, experts] f32
    # tensors live, which must fit in registers of 4-8 warps.
    return cls(tm=max(16, min(128, 8192 // padded_experts(num_experts))))

  def clipped(self, num_tokens: int) -> 'BlockSizes':
    """A token block no larger than the (power-of-2 rounded) number of tokens."""
    return dataclasses.replace(self, tm=min(self.tm, max(16, _next_power_of_2(num_tokens))))

  def params(self, num_experts: int) -> plgpu.CompilerParams:
    warps = self.num_warps or (8 if self.tm * padded_experts(num_experts) > 4096 else 4)
    return plgpu.CompilerParams(num_warps=warps, num_stages=self.num_stages)


# ----------------------------------------------------------- kernel bodies
# Backend-neutral (jnp and lax only): `gating_tpu` runs the same bodies, so
# both backends choose the same experts. Per-token scalars are kept as
# [tm, 1] columns (keepdims) and column indices as f32 (exact below 2^24), a
# form Mosaic lowers too: 2-D vectors and f32 lane reductions only.


def _probs(logits_ref) -> jax.Array:
  """[tm, ep] f32 softmax of the block: jax.nn.softmax's formula."""
  x = logits_ref[...].astype(jnp.float32)
  e = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
  return e / jnp.sum(e, axis=1, keepdims=True)


def _column(x: jax.Array, j: int) -> jax.Array:
  """Column j of a narrow [tm, kp] block as [tm, 1] f32 (a masked lane sum:
  no lane slicing at an unaligned offset)."""
  cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.sum(jnp.where(cols == j, x.astype(jnp.float32), 0.0), axis=1, keepdims=True)


def forward_kernel(logits_ref, weights_ref, experts_ref, *, k: int, renormalize: bool):
  """Block [tm, ep] of logits -> weights, experts [tm, kp] (f32, int32)."""
  p = _probs(logits_ref)  # [tm, ep]
  tm, ep = p.shape
  kp = weights_ref.shape[1]
  cols = lax.broadcasted_iota(jnp.int32, (tm, ep), 1).astype(jnp.float32)
  slot = lax.broadcasted_iota(jnp.int32, (tm, kp), 1)
  weights = jnp.zeros((tm, kp), jnp.float32)
  experts = jnp.zeros((tm, kp), jnp.float32)
  rest = p
  for j in range(k):  # k is small and static: unrolled
    best = jnp.max(rest, axis=1, keepdims=True)  # [tm, 1]
    # The lowest column attaining the max: lax.top_k's tie rule.
    first = jnp.min(jnp.where(rest == best, cols, float(ep)), axis=1, keepdims=True)
    weights = jnp.where(slot == j, best, weights)
    experts = jnp.where(slot == j, first, experts)
    # Probabilities are >= 0, so -1 takes the column out of every later round.
    rest = jnp.where(cols == first, -1.0, rest)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)  # columns past k are 0
  weights_ref[...] = weights
  experts_ref[...] = experts.astype(jnp.int32)


def backward_kernel(logits_ref, experts_ref, dweights_ref, dlogits_ref, *, k: int,
                    renormalize: bool):
  """Blocks of logits [tm, ep], experts and d weights [tm, kp] -> d logits [tm, ep]."""
  p = _probs(logits_ref)  # [tm, ep], bit-identical to the forward's
  tm, ep = p.shape
  cols = lax.broadcasted_iota(jnp.int32, (tm, ep), 1).astype(jnp.float32)
  experts = experts_ref[...]
  dweights = dweights_ref[...]
  hits, chosen, grads = [], [], []
  for j in range(k):
    hit = cols == _column(experts, j)  # [tm, ep]: expert j of each token
    hits.append(hit)
    chosen.append(jnp.sum(jnp.where(hit, p, 0.0), axis=1, keepdims=True))  # [tm, 1]
    grads.append(_column(dweights, j))
  if renormalize:
    # w_j = p_j / s with s = sum_i p_i: d p_j = (d w_j - sum_i d w_i w_i) / s.
    total = chosen[0]
    for c in chosen[1:]:
      total = total + c
    dot = grads[0] * chosen[0]
    for g, c in zip(grads[1:], chosen[1:]):
      dot = dot + g * c
    grads = [(g - dot / total) / total for g in grads]
  dp = jnp.zeros((tm, ep), jnp.float32)
  for hit, g in zip(hits, grads):  # a token's k experts are distinct: no collisions
    dp = jnp.where(hit, g, dp)
  # Softmax's VJP: p * (dp - <p, dp>). Unchosen and padded experts get
  # p * (0 - <p, dp>), which is 0 under renormalisation.
  dlogits = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
  dlogits_ref[...] = dlogits.astype(dlogits_ref.dtype)


# ------------------------------------------------------------ entry points


def forward(logits: jax.Array, k: int, renormalize: bool, bs: BlockSizes, *,
            interpret: bool = False):
  """Top-k gating of padded logits.

  Args:
    logits: [tokens, ep] float, tokens a multiple of bs.tm, ep =
      padded_experts(experts) with -inf in the padded columns.
    k: experts per token (static), 1 <= k <= the real number of experts.
    renormalize: divide the k weights by their sum.
    bs: the token block.
    interpret: run in the Pallas interpreter instead of compiling.

  Returns:
    weights [tokens, padded_k(k)] f32 (largest first) and experts
    [tokens, padded_k(k)] int32; columns past k are zero.
  """
  tokens, ep = logits.shape
  kp = padded_k(k)
  out_spec = pl.BlockSpec((bs.tm, kp), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(forward_kernel, k=k, renormalize=renormalize),
      grid=(tokens // bs.tm,),
      in_specs=[pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))],
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((tokens, kp), jnp.float32),
                 jax.ShapeDtypeStruct((tokens, kp), jnp.int32)],
      compiler_params=bs.params(ep), interpret=interpret, name='moe_gating_fwd',
  )(logits)


def backward(logits: jax.Array, experts: jax.Array, dweights: jax.Array, k: int,
             renormalize: bool, bs: BlockSizes, *, interpret: bool = False) -> jax.Array:
  """The logits' cotangent of `forward`'s weights.

  Args:
    logits: [tokens, ep], as given to `forward`.
    experts: [tokens, padded_k(k)] int32, `forward`'s output.
    dweights: [tokens, padded_k(k)] f32, the weights' cotangent (columns past
      k are ignored).
    k, renormalize, bs: as given to `forward`.
    interpret: run in the Pallas interpreter instead of compiling.

  Returns:
    [tokens, ep] in logits' dtype; zero in the padded columns.
  """
  tokens, ep = logits.shape
  kp = experts.shape[1]
  row_spec = pl.BlockSpec((bs.tm, ep), lambda i: (i, 0))
  narrow_spec = pl.BlockSpec((bs.tm, kp), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(backward_kernel, k=k, renormalize=renormalize),
      grid=(tokens // bs.tm,),
      in_specs=[row_spec, narrow_spec, narrow_spec],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
      compiler_params=bs.params(ep), interpret=interpret, name='moe_gating_bwd',
  )(logits, experts, dweights)
