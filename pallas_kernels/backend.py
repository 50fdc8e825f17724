"""Which kernel backend runs, compiled or interpreted, with which block sizes.

Shared by every kernel package (flash attention, MoE routing): each public op
calls `select` once, which resolves the backend from the default device by
one rule, loads that backend's kernel module, and defaults, type-checks and
clips its `BlockSizes`. The tile rules and size arithmetic the backends'
`BlockSizes` share live here too.
"""

import contextlib
import dataclasses
import importlib
import types
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp

BACKENDS = ('gpu', 'tpu')
FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)  # dtypes every kernel takes

_LOWERING_ONLY = False  # set only by `lowering_only()`


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@contextlib.contextmanager
def lowering_only() -> Iterator[None]:
  """Lets interpret=False through on a machine without the device.

  For tests that lower (not run) compiled kernels on a CPU machine
  (`jit(f).trace(...).lower(lowering_platforms=...)`): wrap the tracing.
  """
  global _LOWERING_ONLY
  before, _LOWERING_ONLY = _LOWERING_ONLY, True
  try:
    yield
  finally:
    _LOWERING_ONLY = before


def resolve_backend(backend: Optional[str], interpret: Optional[bool]) -> tuple[str, bool]:
  """(backend, interpret) for this process: GPU/TPU run compiled, CPU interprets.

  Args:
    backend: 'gpu' (Triton), 'tpu' (Mosaic) or None: the default device's
      ('tpu' on a TPU, 'gpu' everywhere else).
    interpret: run the kernels in the Pallas interpreter; None: only when the
      default device cannot run the backend (CPU). False without the device
      is an error, except inside `lowering_only()`.
  """
  platform = jax.default_backend()
  if backend is None:
    backend = 'tpu' if platform == 'tpu' else 'gpu'
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not one of {BACKENDS} (or None: '
                     'chosen from the default device)')
  native = {'gpu': ('gpu', 'cuda', 'rocm'), 'tpu': ('tpu',)}[backend]
  if interpret is None:
    interpret = platform not in native
  elif not interpret and platform not in native and not _LOWERING_ONLY:
    raise ValueError(f'interpret=False needs a {backend.upper()}, but the default device '
                     f'is {platform}: pass interpret=True (or None) to run the kernels '
                     'in the Pallas interpreter')
  return backend, bool(interpret)


@dataclasses.dataclass(frozen=True)
class Kernels:
  """What one call runs: a backend's kernel module, its block sizes, compiled or not.

  Hashable, so the ops pass it whole as a static (nondiff) argument of their
  `jax.custom_vjp`s.
  """
  backend: str  # 'gpu' or 'tpu'
  module: types.ModuleType  # e.g. pallas_kernels.moe_routing.gmm_tpu
  block_sizes: Any  # module.BlockSizes, clipped to the problem
  interpret: bool


def select(module_pattern: str, backend: Optional[str], interpret: Optional[bool],
           block_sizes, *, default: Sequence[Any], clip: Sequence[Any]) -> Kernels:
  """The kernels of one call, with the backend's BlockSizes defaulted or checked, and clipped.

  Args:
    module_pattern: the backend modules' import path with '{}' for the
      backend, e.g. 'pallas_kernels.moe_routing.gmm_{}'. Only the chosen one
      is imported: the TPU modules import Mosaic-only pieces.
    backend, interpret: as for `resolve_backend`.
    block_sizes: the backend module's BlockSizes, or None for its default.
    default: the arguments of `BlockSizes.default`.
    clip: the arguments of `BlockSizes.clipped` (the problem's sizes).
  """
  backend, interpret = resolve_backend(backend, interpret)
  module = importlib.import_module(module_pattern.format(backend))
  if block_sizes is None:
    block_sizes = module.BlockSizes.default(*default)
  elif not isinstance(block_sizes, module.BlockSizes):
    raise ValueError(f'block_sizes is a {type(block_sizes).__module__}.'
                     f'{type(block_sizes).__name__}; the {backend} backend takes '
                     f'{module.__name__}.BlockSizes')
  return Kernels(backend, module, block_sizes.clipped(*clip), interpret)


def check_float_array(name: str, x, shape: str) -> None:
  """Raises ValueError unless x is an array of FLOATS with one dimension per name in shape.

  Args:
    name: the argument's name, for the message.
    x: the argument.
    shape: its dimensions' names, e.g. '[num_tokens, embed]'.
  """
  rank = shape.count(',') + 1
  if getattr(x, 'ndim', None) != rank:
    raise ValueError(f'{name} must have rank {rank} ({shape}); got shape '
                     f'{getattr(x, "shape", None)}')
  if x.dtype not in FLOATS:
    raise ValueError(f'{name} has dtype {x.dtype}; expected float32, bfloat16 or float16')


def check_tiles(block_sizes, fields: Sequence[str], backend: str) -> None:
  """Raises ValueError unless each named field of a BlockSizes is a legal tile.

  GPU (Triton): a power of 2 of at least 16, and the launch knobs num_warps
  (None or a power of 2) and num_stages (positive) where the class has them.
  TPU (Mosaic): a positive multiple of 8 sublanes (multiples of 128 fill the
  lanes; `clipped` may also give a whole padded dimension).
  """
  for f in fields:
    b = getattr(block_sizes, f)
    legal = isinstance(b, int) and not isinstance(b, bool)
    if backend == 'gpu':
      if not (legal and b >= 16 and not b & (b - 1)):
        raise ValueError(f'BlockSizes.{f}={b!r} must be a power of 2 of at least 16 '
                         '(Triton tiles)')
    elif not (legal and b > 0 and not b % 8):
      raise ValueError(f'BlockSizes.{f}={b!r} must be a positive multiple of 8 (TPU '
                       'sublanes; multiples of 128 fill the lanes)')
  warps = getattr(block_sizes, 'num_warps', None)
  if warps is not None and (warps < 1 or warps & (warps - 1)):
    raise ValueError(f'BlockSizes.num_warps={warps!r} must be a power of 2')
  if getattr(block_sizes, 'num_stages', 1) < 1:
    raise ValueError(f'BlockSizes.num_stages={block_sizes.num_stages!r} must be positive')
