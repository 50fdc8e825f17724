"""Mixture-of-experts routing in plain jnp: XLA's routing, and the kernels' specification.

Token-choice routing in four steps, each differentiable:
  1. `top_k_gating`: softmax over experts, the k largest, optionally
     renormalised to sum to 1 (Mixtral, GLaM) or not (Switch, k = 1). The
     XLA routing the models run (capacity and ragged_dot MoE), and the spec
     of `gating_ops.top_k_gating`.
  2. `permute`: the k copies of every token in expert-contiguous order, with
     the number of rows per expert (`group_sizes`, possibly 0).
  3. a grouped matmul per expert (`gmm_reference.gmm`), or any expert MLP.
  4. `unpermute`: rows back to their tokens, weighted by the gates and summed.
`permute` and `unpermute` (plain autodiff: scatters in the backward) and
`moe_mlp_loop`, the loop-over-experts formulation the four steps must equal,
are specifications only: the models permute with `routing_ops`, whose
backward gathers instead. Shapes: tokens [num_tokens, embed] (batch and
length flattened), logits [num_tokens, num_experts].
"""

from typing import Callable, Tuple

import jax
import jax.numpy as jnp


def top_k_gating(logits: jax.Array, k: int, renormalize: bool = True
                 ) -> Tuple[jax.Array, jax.Array]:
  """Router probabilities of the k chosen experts per token.

  Args:
    logits: [num_tokens, num_experts] router logits (any float dtype).
    k: experts per token, 1 <= k <= num_experts.
    renormalize: divide the k probabilities by their sum.

  Returns:
    weights [num_tokens, k] f32 (largest first) and experts [num_tokens, k]
    int32. Ties go to the lower expert index (lax.top_k's order).
  """
  num_experts = logits.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and num_experts={num_experts}')
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def permute(tokens: jax.Array, experts: jax.Array, num_experts: int
            ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Copies of tokens sorted by expert.

  Args:
    tokens: [num_tokens, embed].
    experts: [num_tokens, k] int expert ids.
    num_experts: number of experts (group_sizes' length).

  Returns:
    rows [num_tokens * k, embed]: token copies, expert 0's first; the order
      within an expert is the token order (a stable sort).
    order [num_tokens * k] int32: row r is copy `order[r]` of the flattened
      [num_tokens, k] choices (token order[r] // k).
    group_sizes [num_experts] int32: rows per expert (0 for an unused expert).
  """
  k = experts.shape[-1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  rows = jnp.take(tokens, order // k, axis=0)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return rows, order, group_sizes


def unpermute(rows: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
  """Inverse of `permute`, combining each token's k rows with its gate weights.

  Args:
    rows: [num_tokens * k, embed] expert outputs in `permute`'s order.
    order: [num_tokens * k] from `permute`.
    weights: [num_tokens, k] gate weights.

  Returns:
    [num_tokens, embed] in rows' dtype; the sum accumulates in f32.
  """
  num_tokens, k = weights.shape
  copies = jnp.zeros_like(rows).at[order].set(rows)  # [num_tokens * k, embed]
  copies = copies.reshape(num_tokens, k, rows.shape[-1]).astype(jnp.float32)
  out = jnp.einsum('tke,tk->te', copies, weights.astype(jnp.float32))
  return out.astype(rows.dtype)


def moe_mlp_loop(tokens: jax.Array, weights: jax.Array, experts: jax.Array,
                 expert_fn: Callable[[int, jax.Array], jax.Array],
                 num_experts: int) -> jax.Array:
  """The loop-over-experts reference: every expert sees every token, masked.

  Args:
    tokens: [num_tokens, embed].
    weights, experts: [num_tokens, k] from `top_k_gating`.
    expert_fn: (expert index, [num_tokens, embed]) -> [num_tokens, embed].
    num_experts: number of experts.

  Returns:
    [num_tokens, embed]: sum over chosen experts of weight * expert output.
  """
  out = jnp.zeros(tokens.shape, jnp.float32)
  for e in range(num_experts):
    gate = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=-1)  # [num_tokens]
    out = out + gate[:, None] * expert_fn(e, tokens).astype(jnp.float32)
  return out.astype(tokens.dtype)
