"""Checkpoints written atomically (temporary file, then rename), so a crash never leaves half a file.

A checkpoint holds only tensors and plain data (dicts, lists, tuples, strings, numbers, None), so it
loads with ``torch.load(weights_only=True)``: a file that asks the unpickler for anything else (a
crafted ``best.pt`` that would run code) is refused, naming the file. Checkpoints written before
the random states were stored as tensors hold numpy arrays; the three numpy globals those need are
admitted when reading (see ``LEGACY_NUMPY_GLOBALS``), nothing else.

    python -m cssfe.engine.checkpoint --convert OLD.pt [NEW.pt]

rewrites a trusted checkpoint that holds other objects in this form (it runs the file's pickle).
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch

CONVERT_HINT = "python -m cssfe.engine.checkpoint --convert"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _legacy_numpy_globals() -> List[Any]:
    """What ``np.random.get_state()``'s key array pickles to (older checkpoints of this project)."""
    from numpy._core.multiarray import _reconstruct  # numpy >= 2; the package requires it

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


LEGACY_NUMPY_GLOBALS = _legacy_numpy_globals()


def previous_path(path: str) -> str:
    return path + ".prev"


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry that a weights-only load would refuse."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not a str or int")
            check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN) or (isinstance(obj, (int, float)) and type(obj) not in (int, float, bool)):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; a checkpoint holds only "
                        f"tensors and plain data (convert it to a tensor, list or number)")


def save_checkpoint(state: Dict[str, Any], path: str, keep_previous: bool = False) -> None:
    """Write to a temporary file, then rename; with ``keep_previous`` the file it replaces is kept
    as ``PATH.prev``, so a checkpoint that turns out bad never leaves the run without a good one.
    numpy arrays and scalars in ``state`` are stored as tensors and numbers; anything else that is
    not a tensor or plain data is a TypeError naming the entry, raised before any file is written."""
    state = to_plain(state)
    check_plain(state)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    if keep_previous and os.path.isfile(path):
        os.replace(path, previous_path(path))
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint read with ``weights_only=True``; ValueError naming the file when it cannot be
    read, and saying how to convert it when it holds objects a weights-only load refuses."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            found = re.search(r"GLOBAL (\S+)", str(exc))
            reason = f"it asks for {found.group(1)}" if found else str(exc).strip().splitlines()[0]
            raise ValueError(
                f"checkpoint {path} holds objects that a weights-only load refuses ({reason}); it was "
                f"not loaded, so none of its code ran. If the file comes from a source you trust, "
                f"convert it once: {CONVERT_HINT} {path}") from None
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
    """Every random generator's state as tensors and numbers (weights-only loadable)."""
    import random

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (or the tuples that older checkpoints hold)."""
    import random

    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy arrays as tensors, numpy scalars as numbers, tuples of random states as
    :func:`rng_state` dicts (what ``--convert`` writes)."""
    if isinstance(obj, dict):
        if "python" in obj and "numpy" in obj and "torch" in obj and isinstance(obj["numpy"], tuple):
            version, internal, gauss = obj["python"]
            kind, keys, pos, has_gauss, cached = obj["numpy"]
            obj = {**obj,
                   "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
                   "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                             "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
        out = (collections.OrderedDict if isinstance(obj, collections.OrderedDict) else dict)(
            (k, to_plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's per-module versions, read by load_state_dict
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj) if type(obj) in (list, tuple) else [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def convert(src: str, dst: Optional[str] = None) -> str:
    """Rewrite a trusted checkpoint of any form as one that loads with ``weights_only=True``."""
    dst = dst or src
    state = to_plain(torch.load(src, map_location="cpu", weights_only=False))  # trusted by the caller
    save_checkpoint(state, dst)
    return dst


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Rewrite a trusted checkpoint so that it loads with weights_only=True.")
    p.add_argument("--convert", required=True, metavar="OLD.pt", help="checkpoint to convert (its pickle is run: trust it)")
    p.add_argument("output", nargs="?", help="where to write it (default: in place)")
    args = p.parse_args(argv)
    try:
        out = convert(args.convert, args.output)
    except (OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
