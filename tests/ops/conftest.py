"""Kernel test setup. The extension cache is pinned in the root conftest (CSSFE_EXT_DIR)."""
import os
import shutil

import pytest
import torch


@pytest.fixture(scope="session")
def native_backend():
    """Builds (or loads the cached) C++ extension; skips only when there is no C++ compiler."""
    from cssfe.ops.backends import native

    mod, reason = native.load()
    if mod is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler to build the extension")
        pytest.fail(f"the C++ extension did not build: {reason}")
    return mod


@pytest.fixture
def poison():
    """torch.empty / at::empty return NaN-filled memory, so elements a kernel forgets to write fail."""
    old = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
