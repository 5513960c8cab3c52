"""Checkpoints written atomically (temporary file, then rename), so a crash never leaves half a file."""
from __future__ import annotations

import os
from typing import Any, Dict

import torch


def previous_path(path: str) -> str:
    return path + ".prev"


def save_checkpoint(state: Dict[str, Any], path: str, keep_previous: bool = False) -> None:
    """Write to a temporary file, then rename; with ``keep_previous`` the file it replaces is kept
    as ``PATH.prev``, so a checkpoint that turns out bad never leaves the run without a good one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    if keep_previous and os.path.isfile(path):
        os.replace(path, previous_path(path))
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None


def load_latest(path: str) -> Dict[str, Any]:
    """``path``, or its kept predecessor when ``path`` is missing or unreadable (a crash between
    the two renames of :func:`save_checkpoint`, or a damaged file)."""
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        prev = previous_path(path)
        if not os.path.isfile(prev):
            raise
        import warnings

        warnings.warn(f"{exc}; resuming from the previous checkpoint {prev}")
        return load_checkpoint(prev)


def rng_state() -> Dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
