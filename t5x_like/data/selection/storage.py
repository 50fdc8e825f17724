"""The .npz files of fitted selection models: written atomically, read back checked.

Each file holds its `kind` (what model) and the format version it was written in.
"""

import os
import tempfile
from typing import Dict

import numpy as np

from t5x_like.data.selection import features

FORMAT_VERSION = 1


def write_npz(path: str, kind: str, **arrays) -> None:
  """Writes `arrays`, `kind` and the format version to `path`, atomically.

  The name is kept as given (np.savez alone would append .npz).
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, kind=np.array(kind), version=np.array(FORMAT_VERSION), **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_npz(path: str, kind: str, how_to_make: str) -> Dict[str, np.ndarray]:
  """The arrays of a file that `write_npz` wrote with `kind`.

  Args:
    path: the .npz file.
    kind: what it must hold.
    how_to_make: the command that makes one ({path} is filled in), for the errors.
  """
  how_to_make = how_to_make.format(path=path)
  if not os.path.exists(path):
    raise features.SelectionError(f'{kind.replace("_", " ")} file {path} not found: make it '
                                  f'with {how_to_make}')
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise features.SelectionError(f'{path} is not a readable .npz file ({e}): make it again '
                                  f'with {how_to_make}') from e
  found = str(arrays.get('kind', 'unknown'))
  if found != kind:
    raise features.SelectionError(
        f'{path} holds {found!r}, not {kind!r}: make one with {how_to_make}')
  if int(arrays.get('version', 0)) > FORMAT_VERSION:
    raise features.SelectionError(
        f'{path} has format version {int(arrays["version"])}, newer than this code reads '
        f'({FORMAT_VERSION}): update the code')
  return arrays
