"""Public top-k gating: validation, padding, backend choice and the VJP.

`top_k_gating` takes the arguments of `xla.top_k_gating` plus `backend`,
`block_sizes` and `interpret`, and returns the same experts exactly (ties to
the lower index, like lax.top_k) and the same weights within floating-point
tolerance. On GPU it runs the Triton kernels of `gating_gpu.py`, on TPU the
Mosaic kernels of `gating_tpu.py` (the same kernel bodies, from `tiles.py`);
on CPU the GPU kernels run in the Pallas interpreter (slow: for tests and
debugging).

The weights are differentiable in the logits through a `jax.custom_vjp`
whose backward is a Pallas kernel too. It keeps only the logits (the
caller's input, alive anyway) and the chosen experts as residuals and
recomputes the softmax, rather than saving the [tokens, experts] f32
probabilities: a second read of the logits costs less than writing and
reading back an f32 copy of them, and the recomputed probabilities are
bit-identical to the forward's (same body).

Logits containing nan are not supported (no expert attains a nan maximum;
`xla.top_k_gating`'s choice is lax.top_k's).
"""

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib


# ------------------------------------------------------------ custom VJP
# On padded logits [tokens, ep] (whole token blocks, -inf expert columns) and
# padded outputs; the public function pads before and slices after, and
# autodiff carries the cotangents through the pads and slices.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gating(logits, k, renormalize, kernels):
  return kernels.module.forward(logits, k, renormalize, kernels.block_sizes,
                                interpret=kernels.interpret)


def _gating_fwd(logits, k, renormalize, kernels):
  weights, experts = _gating(logits, k, renormalize, kernels)
  return (weights, experts), (logits, experts)


def _gating_bwd(k, renormalize, kernels, res, cotangents):
  logits, experts = res
  dweights, _ = cotangents  # experts are integers: their cotangent is float0
  dlogits = kernels.module.backward(logits, experts, dweights.astype(jnp.float32), k,
                                    renormalize, kernels.block_sizes,
                                    interpret=kernels.interpret)
  return (dlogits,)


_gating.defvjp(_gating_fwd, _gating_bwd)


# ------------------------------------------------------------- public API


def top_k_gating(logits: jax.Array, k: int, renormalize: bool = True, *,
                 backend: Optional[str] = None,
                 block_sizes=None,
                 interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array]:
  """Router probabilities of the k chosen experts per token, as Pallas kernels.

  Args:
    logits: [num_tokens, num_experts] router logits, float32, bfloat16 or
      float16 (the softmax runs in f32 whatever the dtype).
    k: experts per token, 1 <= k <= num_experts.
    renormalize: divide the k probabilities by their sum (Mixtral, GLaM), or
      keep them as they are (Switch).
    backend: 'gpu' (Triton) or 'tpu' (Mosaic); None picks the default device's.
    block_sizes: the backend's BlockSizes (tokens per program); None: its
      default for this number of experts.
    interpret: run in the Pallas interpreter; None: only when the default
      device cannot run the backend (CPU).

  Returns:
    weights [num_tokens, k] f32, largest first, and experts [num_tokens, k]
    int32; ties go to the lower expert index (lax.top_k's order). Only the
    weights are differentiable (in logits).
  """
  backend_lib.check_float_array('logits', logits, '[num_tokens, num_experts]')
  num_tokens, num_experts = logits.shape
  if num_tokens == 0 or num_experts == 0:
    raise ValueError(f'num_tokens={num_tokens} and num_experts={num_experts} must be '
                     'positive')
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_experts:
    raise ValueError(f'k={k!r} must be an integer between 1 and num_experts={num_experts}')
  if not isinstance(renormalize, (bool, np.bool_)):
    raise ValueError(f'renormalize={renormalize!r} must be a bool')
  k, renormalize = int(k), bool(renormalize)  # static arguments of the kernels
  kernels = backend_lib.select('pallas_kernels.moe_routing.gating_{}', backend, interpret,
                               block_sizes, default=(num_experts,), clip=(num_tokens,))

  # Padded experts get -inf (probability 0, after every real expert: never
  # chosen while k <= num_experts); padded tokens get 0 (finite, sliced off).
  tokens_p = backend_lib.round_up(num_tokens, kernels.block_sizes.tm)
  experts_p = kernels.module.padded_experts(num_experts)
  padded = logits
  if experts_p != num_experts:
    padded = jnp.pad(padded, ((0, 0), (0, experts_p - num_experts)),
                     constant_values=-jnp.inf)
  if tokens_p != num_tokens:
    padded = jnp.pad(padded, ((0, tokens_p - num_tokens), (0, 0)))
  weights, experts = _gating(padded, k, renormalize, kernels)
  return weights[:num_tokens, :k], experts[:num_tokens, :k]
