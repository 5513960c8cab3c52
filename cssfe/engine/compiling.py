"""``torch.compile`` of the model and the loss: the config keys ``compile`` and ``compile_mode``.

Modules are compiled in place (``nn.Module.compile``): their ``state_dict`` keys, the checkpoints,
the EMA copy's update and DeepSpeed's wrapping see the same modules as without compilation. The
CSSFE ops stay one opaque graph node each, whatever kernels backend runs them (registered custom
ops with fake implementations, ``cssfe/ops/library.py``), and the enhancement's plan comes from the
head (no read-back inside the step), so ``reduce-overhead`` (CUDA graphs) can capture the step.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from cssfe.config import COMPILE_MODES as MODES

# The compiler backend: inductor, or CSSFE_COMPILE_BACKEND (tests and CPU dry runs trace with
# "aot_eager": no C++ code generation, which takes minutes on a small CPU); ``mode`` is inductor's.
BACKEND = os.environ.get("CSSFE_COMPILE_BACKEND") or "inductor"


def compile_module(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Compile ``module`` in place for ``mode`` (one of MODES) and return it."""
    if mode not in MODES:
        raise ValueError(f"config key 'compile_mode' must be one of {', '.join(MODES)}, got {mode!r}")
    if BACKEND == "inductor":
        module.compile(mode=None if mode == "default" else mode)
    else:
        module.compile(backend=BACKEND)
    return module


def compile_for_training(model: torch.nn.Module, eval_model: Optional[torch.nn.Module], loss_fn, mode: str) -> None:
    """The trained model, the model evaluated (the EMA copy) and the loss, each compiled in place.
    A loss that is a plain function is left as it is (the train loop calls the one it holds)."""
    compile_module(model, mode)
    if eval_model is not None:
        compile_module(eval_model, mode)
    if isinstance(loss_fn, torch.nn.Module):
        compile_module(loss_fn, mode)
