"""Kernel test setup. The extension cache is pinned in the root conftest (CSSFE_EXT_DIR)."""

import pytest
import torch


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
