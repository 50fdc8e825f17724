"""Public top-k gating: validation, padding, backend choice and the VJP.

`top_k_gating` takes the arguments of `reference.top_k_gating` plus `backend`,
`block_sizes` and `interpret`, and returns the same experts exactly (ties to
the lower index, like lax.top_k) and the same weights within floating-point
tolerance. On GPU it runs the Triton kernels of `gating_gpu.py`, on TPU the
Mosaic kernels of `gating_tpu.py` (the same kernel bodies); on CPU the GPU
kernels run in the Pallas interpreter (slow: for tests and debugging).

The weights are differentiable in the logits through a `jax.custom_vjp`
whose backward is a Pallas kernel too. It keeps only the logits (the
caller's input, alive anyway) and the chosen experts as residuals and
recomputes the softmax, rather than saving the [tokens, experts] f32
probabilities: a second read of the logits costs less than writing and
reading back an f32 copy of them, and the recomputed probabilities are
bit-identical to the forward's (same body).

Logits containing nan are not supported (no expert attains a nan maximum;
the reference's choice is lax.top_k's).
"""

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib

# Tests set this to lower (not run) compiled kernels on a machine without the device.
_LOWERING_ONLY = False


def _module(backend):
  return backend_lib.load('pallas_kernels.moe_routing.gating_{}', backend)



# ------------------------------------------------------------ custom VJP
# On padded logits [tokens, ep] (whole token blocks, -inf expert columns) and
# padded outputs; the public function pads before and slices after, and
# autodiff carries the cotangents through the pads and slices.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _gating(logits, k, renormalize, backend, bs, interpret):
  return _module(backend).forward(logits, k, renormalize, bs, interpret=interpret)


def _gating_fwd(logits, k, renormalize, backend, bs, interpret):
  weights, experts = _gating(logits, k, renormalize, backend, bs, interpret)
  return (weights, experts), (logits, experts)


def _gating_bwd(k, renormalize, backend, bs, interpret, res, cotangents):
  logits, experts = res
  dweights, _ = cotangents  # experts are integers: their cotangent is float0
  dlogits = _module(backend).backward(logits, experts, dweights.astype(jnp.float32), k,
                                      renormalize, bs, interpret=interpret)
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
  if getattr(logits, 'ndim', None) != 2:
    raise ValueError(f'logits must have rank 2 ([num_tokens, num_experts]); got shape '
                     f'{getattr(logits, "shape", None)}')
  if logits.dtype not in backend_lib.FLOATS:
    raise ValueError(f'logits has dtype {logits.dtype}; top-k gating takes float32, '
                     'bfloat16 or float16')
  num_tokens, num_experts = logits.shape
  if num_tokens == 0 or num_experts == 0:
    raise ValueError(f'num_tokens={num_tokens} and num_experts={num_experts} must be '
                     'positive')
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_experts:
    raise ValueError(f'k={k!r} must be an integer between 1 and num_experts={num_experts}')
  if not isinstance(renormalize, (bool, np.bool_)):
    raise ValueError(f'renormalize={renormalize!r} must be a bool')
  k, renormalize = int(k), bool(renormalize)  # static arguments of the kernels
  backend, interpret = backend_lib.resolve_backend(backend, interpret,
                                                   lowering_only=_LOWERING_ONLY)
  module = _module(backend)
  if block_sizes is None:
    block_sizes = module.BlockSizes.default(num_experts)
  elif not isinstance(block_sizes, module.BlockSizes):
    raise ValueError(f'block_sizes is a {type(block_sizes).__module__}.'
                     f'{type(block_sizes).__name__}; the {backend} backend takes '
                     f'{module.__name__}.BlockSizes')
  bs = block_sizes.clipped(num_tokens)

  # Padded experts get -inf (probability 0, after every real expert: never
  # chosen while k <= num_experts); padded tokens get 0 (finite, sliced off).
  tokens_p, experts_p = backend_lib.round_up(num_tokens, bs.tm), module.padded_experts(num_experts)
  padded = logits
  if experts_p != num_experts:
    padded = jnp.pad(padded, ((0, 0), (0, experts_p - num_experts)),
                     constant_values=-jnp.inf)
  if tokens_p != num_tokens:
    padded = jnp.pad(padded, ((0, tokens_p - num_tokens), (0, 0)))
  weights, experts = _gating(padded, k, renormalize, backend, bs, bool(interpret))
  return weights[:num_tokens, :k], experts[:num_tokens, :k]
