"""Where cssfe keeps what it downloads, builds or computes once: label embeddings, prepared data,
the C++ extension's builds."""
import os


def default_cache_dir() -> str:
    """``$CSSFE_CACHE``, else ``~/.cache/cssfe``."""
    return os.environ.get("CSSFE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cssfe")
