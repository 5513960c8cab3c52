"""Test session setup: offline model hubs, a fresh cache folder, small thread count."""
import os

# Processes the tests start (launchers, ranks, interpreter runs) import this checkout, in front of
# whatever PYTHONPATH the session was given (which may choose another torch or triton).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The C++ extension is built once and kept across test sessions in the user's cache (the rest of
# the session's cache is a fresh folder, see _cache_dir).
if not os.environ.get("CSSFE_EXT_DIR"):
    _cache = os.environ.get("CSSFE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cssfe")
    os.environ["CSSFE_EXT_DIR"] = os.path.join(_cache, "extensions")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Datasets and embeddings the tests generate go to a session folder, never the user's cache."""
    path = tmp_path_factory.mktemp("cssfe-cache")
    old = os.environ.get("CSSFE_CACHE")
    os.environ["CSSFE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CSSFE_CACHE", None)
    else:
        os.environ["CSSFE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _leave_the_process_group():
    """In-process DeepSpeed tests join a gloo group that DeepSpeed keeps for the session; it is left
    before the interpreter exits (gloo's threads left to finalization can abort the test process)."""
    from cssfe.engine.distributed import leaving_process_group

    with leaving_process_group():
        yield


@pytest.fixture
def one_thread():
    """CPU training is bitwise reproducible only with one thread (parallel reductions)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bundled_root(_cache_dir):
    """The bundled dataset (seed 0), generated once per test session."""
    from cssfe.data.bundled import ensure_bundled

    return ensure_bundled(str(_cache_dir), seed=0, progress=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, bundled_root):
    """A short CSSFE training on the bundled data, shared by the end-to-end and tooling tests."""
    from cssfe.config import load_config
    from cssfe.engine.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(None, [f"output_dir={out}", "progress=false", "optim.epochs=6", "optim.lr=0.004"])
    return out, train(cfg)


@pytest.fixture(scope="session")
def native_backend():
    """Builds (or loads the cached) C++ extension; skips only when there is no C++ compiler."""
    import shutil

    from cssfe.ops.backends import native

    mod, reason = native.load()
    if mod is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler to build the extension")
        pytest.fail(f"the C++ extension did not build: {reason}")
    return mod
