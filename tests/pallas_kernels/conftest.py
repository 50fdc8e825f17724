"""Fixtures shared by the kernel tests."""

import pytest

from pallas_kernels import backend as backend_lib


@pytest.fixture
def lowering_only():
  """interpret=False passes without the device: for tests that lower (not run) compiled kernels."""
  with backend_lib.lowering_only():
    yield
