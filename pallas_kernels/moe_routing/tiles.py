"""Per-tile math shared by the GPU and TPU routing kernels.

Everything here is plain jnp and lax on one block, so the same functions run
inside a Triton kernel, a Mosaic kernel and the interpreter:

* the top-k gating kernel bodies (`gating_forward_kernel`,
  `gating_backward_kernel`): both backends run them, so both choose the same
  experts; only the blocking (`gating_gpu.py`, `gating_tpu.py`) differs;
* the grouped matmuls' tile product `dot` and its dimension numbers, and
  what their `BlockSizes` share (`GmmBlockSizes`).

The gating bodies keep per-token scalars as [tm, 1] columns (keepdims) and
column indices as f32 (exact below 2^24), a form Mosaic lowers too: 2-D
vectors and f32 lane reductions only.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import backend as backend_lib

# dot_general dimension numbers of a tile product.
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """An f32-accumulated tile product in the operands' common dtype.

  f32 operands get exact f32 products (IEEE on GPUs, not TF32; fp32 contract
  precision on the MXU), so f32 kernels match the reference to 1e-5.
  """
  dtype = jnp.promote_types(a.dtype, b.dtype)
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                         preferred_element_type=jnp.float32)


def gmm_dims(lhs: jax.Array, rhs: jax.Array, transpose_rhs: bool
             ) -> tuple[int, int, int, int]:
  """(m, k, n, num_groups) of gmm's lhs [m, k] and rhs [num_groups, k, n]
  ([num_groups, n, k] with transpose_rhs)."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  return m, k, n, rhs.shape[0]


class GmmBlockSizes:
  """Base of both backends' grouped-matmul BlockSizes (frozen dataclasses).

  Tiles of rows (tm), of the contraction (tk) and of output columns (tn); for
  `tgmm` tm tiles the contracted rows, tk the lhs columns and tn the dout
  columns. A backend sets BACKEND (its tile rule, `backend.check_tiles`) and
  `dim_cap`, the tile that covers a whole dimension of size d.
  """
  BACKEND = ''

  def __post_init__(self):
    backend_lib.check_tiles(self, ('tm', 'tk', 'tn'), self.BACKEND)

  @staticmethod
  def dim_cap(d: int) -> int:
    raise NotImplementedError

  def clipped(self, m: int, k: int, n: int):
    """Tiles no larger than the dimensions (each rounded up to `dim_cap`)."""
    fit = lambda t, d: min(t, self.dim_cap(d))
    return dataclasses.replace(self, tm=fit(self.tm, m), tk=fit(self.tk, k),
                               tn=fit(self.tn, n))

  def swapped(self):
    """The tiles of the problem whose contraction and output columns trade
    places (gmm's lhs gradient; tgmm with its operands swapped)."""
    return dataclasses.replace(self, tk=self.tn, tn=self.tk)


# ------------------------------------------------------------------ gating


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


def gating_forward_kernel(logits_ref, weights_ref, experts_ref, *, k: int,
                          renormalize: bool):
  """Block [tm, ep] of logits -> weights, experts [tm, kp] (f32, int32).

  Softmax in f32 (jax.nn.softmax's formula, so the probabilities are the
  reference's), then k rounds of (row max, the lowest column attaining it,
  that column masked to -1 below every probability): the order and tie rule
  of `lax.top_k`. Columns of weights and experts past k are zero.
  """
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


def gating_backward_kernel(logits_ref, experts_ref, dweights_ref, dlogits_ref, *, k: int,
                           renormalize: bool):
  """Blocks of logits [tm, ep], experts and d weights [tm, kp] -> d logits [tm, ep].

  Recomputes the probabilities from the logits (bit-identical to the
  forward's; no [tokens, experts] f32 residual is kept) and takes the chosen
  experts from the forward's output; the cotangent of the k weights goes
  through the renormalisation, is scattered into the expert columns by
  comparison (no scatter), and through the softmax.
  """
  p = _probs(logits_ref)  # [tm, ep]
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
    inner = grads[0] * chosen[0]
    for g, c in zip(grads[1:], chosen[1:]):
      inner = inner + g * c
    grads = [(g - inner / total) / total for g in grads]
  dp = jnp.zeros((tm, ep), jnp.float32)
  for hit, g in zip(hits, grads):  # a token's k experts are distinct: no collisions
    dp = jnp.where(hit, g, dp)
  # Softmax's VJP: p * (dp - <p, dp>). Unchosen and padded experts get
  # p * (0 - <p, dp>), which is 0 under renormalisation.
  dlogits = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
  dlogits_ref[...] = dlogits.astype(dlogits_ref.dtype)
