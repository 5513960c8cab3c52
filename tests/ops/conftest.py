"""Kernel test setup. The extension cache is pinned in the root conftest (CSSFE_EXT_DIR)."""
import os
import shutil

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (deselect with -m 'not slow')")


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


def pytest_collection_modifyitems(config, items):
    """Slow tests (the ~2-5 min nvcc compile check) run only with -m / CSSFE_RUN_SLOW=1."""
    if config.getoption("markexpr") or os.environ.get("CSSFE_RUN_SLOW") == "1":
        return
    slow = [it for it in items if it.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [it for it in items if it.get_closest_marker("slow") is None]
