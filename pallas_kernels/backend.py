"""Which kernel backend runs, and whether compiled or interpreted.

Shared by every kernel package (flash attention, grouped matmuls), so they
pick the backend from the default device by the same rule.
"""

import importlib
import types
from typing import Optional

import jax
import jax.numpy as jnp

BACKENDS = ('gpu', 'tpu')
FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)  # dtypes every kernel takes


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def load(module_pattern: str, backend: str) -> types.ModuleType:
  """The backend's kernel module, e.g. load('pallas_kernels.moe_routing.gmm_{}', 'tpu').

  Imported only when asked for: the TPU modules import Mosaic-only pieces.
  """
  return importlib.import_module(module_pattern.format(backend))


def _platform() -> str:
  return jax.default_backend()


def resolve_backend(backend: Optional[str], interpret: Optional[bool], *,
                    lowering_only: bool = False) -> tuple[str, bool]:
  """(backend, interpret) for this process: GPU/TPU run compiled, CPU interprets.

  Args:
    backend: 'gpu' (Triton), 'tpu' (Mosaic) or None: the default device's
      ('tpu' on a TPU, 'gpu' everywhere else).
    interpret: run the kernels in the Pallas interpreter; None: only when the
      default device cannot run the backend (CPU).
    lowering_only: allow interpret=False without the device: each kernel
      package's `_LOWERING_ONLY` flag, set by tests that lower (not run)
      compiled kernels on a CPU machine.
  """
  platform = _platform()
  if backend is None:
    backend = 'tpu' if platform == 'tpu' else 'gpu'
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not one of {BACKENDS} (or None: '
                     'chosen from the default device)')
  native = {'gpu': ('gpu', 'cuda', 'rocm'), 'tpu': ('tpu',)}[backend]
  if interpret is None:
    interpret = platform not in native
  elif not interpret and platform not in native and not lowering_only:
    raise ValueError(f'interpret=False needs a {backend.upper()}, but the default device '
                     f'is {platform}: pass interpret=True (or None) to run the kernels '
                     'in the Pallas interpreter')
  return backend, bool(interpret)
