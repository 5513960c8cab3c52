"""One training step behind one interface: a single process (torch's optimizer, optional AMP) or
DeepSpeed. Both take a micro-batch's loss and return a :class:`StepResult`; the trainer applies
the rules common to both (non-finite steps, logging, stop and checkpoint) once."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch

from cssfe.engine import distributed


@dataclass
class StepResult:
    """What one micro-batch did."""

    loss: Union[torch.Tensor, float]  # the micro-batch loss (a device tensor is read only when logged)
    finite: bool  # False: the update was skipped (non-finite loss or gradient)
    stop_signum: int = 0  # a stop signal the step saw (under DeepSpeed: agreed on by every rank), 0 if none
    grad_norm: Optional[torch.Tensor] = None  # single process: read only when logged
    aux_loss: Optional[torch.Tensor] = None


def _amp_context(device: torch.device, amp: str):
    enabled = amp == "on" or (amp == "auto" and device.type == "cuda")
    if not enabled:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _head_scalars(model: torch.nn.Module, aux_loss: Optional[torch.Tensor], lam: bool = True) -> Dict[str, float]:
    """Per-step scalars of the CSSFE head: lambda and the first-pass loss, where the head has them."""
    out = {}
    if lam and hasattr(model.head, "lam"):
        out["lambda"] = float(model.head.lam.detach().float())
    if aux_loss is not None:
        out["first_pass_loss"] = aux_loss.item()
    return out


def _as_float(value) -> Optional[float]:
    return None if value is None else float(value)


class SingleProcessStep:
    """zero_grad, backward (scaled under fp16 AMP), clipping, and the optimizer and EMA update
    when the loss and the gradient norm are finite; the schedule moves on in :meth:`after_log`."""

    nonfinite_what = "a non-finite loss or gradient"
    divergence_hint = "Try a lower optim.lr, optim.amp=off or a smaller optim.grad_clip."

    def __init__(self, model, ema, optimizer, scheduler, scaler, grad_clip: Optional[float]):
        self.model, self.ema, self.optimizer, self.scheduler, self.scaler = model, ema, optimizer, scheduler, scaler
        self.grad_clip = grad_clip

    def __call__(self, loss: torch.Tensor, aux_loss: Optional[torch.Tensor], run: Dict[str, Any], signum) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"))
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:  # never apply a non-finite update
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.ema.update(self.model)
        return StepResult(loss=loss.detach().float(), finite=finite,
                          stop_signum=signum or 0, grad_norm=grad_norm, aux_loss=aux_loss)

    def log_scalars(self, result: StepResult) -> Dict[str, Optional[float]]:
        return {"grad_norm": result.grad_norm.item()}

    def head_scalars(self, result: StepResult) -> Dict[str, float]:
        return _head_scalars(self.model, result.aux_loss)

    def after_log(self) -> None:
        """The schedule moves on after the step's learning rate is logged."""
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()

    def pending_stop(self, signum) -> int:
        """The stop signal to act on now: this process's own, as soon as it arrives."""
        return signum or 0


class DeepSpeedStep:
    """One micro-batch under DeepSpeed (:func:`_ds_step`): the engine steps the optimizer, clips,
    zeroes and moves the schedule at accumulation boundaries."""

    nonfinite_what = "a non-finite loss"
    divergence_hint = "Try a lower optim.lr, distributed.precision=fp32 or a smaller optim.grad_clip."

    def __init__(self, engine, model, ema, loss_scale: float, device: torch.device, zero3: bool):
        self.engine, self.model, self.ema, self.loss_scale, self.device = engine, model, ema, loss_scale, device
        self.zero3 = zero3
        self.agreed_signum = 0  # the stop signal the ranks last agreed on

    def __call__(self, loss: torch.Tensor, aux_loss: Optional[torch.Tensor], run: Dict[str, Any], signum) -> StepResult:
        result = _ds_step(self.engine, loss, self.loss_scale, run, signum,
                              lambda: self.ema.update(self.model), self.device)
        self.agreed_signum = result.stop_signum
        return result

    def log_scalars(self, result: StepResult) -> Dict[str, Optional[float]]:
        return {"grad_norm": _as_float(self.engine.get_global_grad_norm())}

    def head_scalars(self, result: StepResult) -> Dict[str, float]:
        # this rank's first-pass loss is not the global one: left out
        return _head_scalars(self.model, None, lam=not self.zero3)

    def after_log(self) -> None:
        """engine.step() has moved the schedule already."""

    def pending_stop(self, signum) -> int:
        """The stop signal to act on now: the one the ranks agreed on at the last step."""
        return self.agreed_signum


def _ds_step(engine, loss, loss_scale, run, signum, update_ema, device) -> StepResult:
    """One micro-batch under DeepSpeed. The ranks agree (one all-reduce) on the global batch's loss
    and on whether any of them got a stop signal, so they all skip or all stop together."""
    import torch.distributed as dist

    # one host read per micro-batch, after the all-reduce: the skip decision needs the global loss
    flags = torch.stack([loss.detach().to(torch.float64), torch.tensor(1.0 if signum else 0.0, dtype=torch.float64, device=device)])
    dist.all_reduce(flags)
    total, stops = flags.tolist()
    # The window is ours (run["step"]), not DeepSpeed's micro-step count, which a resume resets and
    # a skipped micro-batch would leave behind: windows stay where an uninterrupted run has them.
    boundary = (run["step"] + 1) % engine.gradient_accumulation_steps() == 0
    finite = math.isfinite(total)
    if finite or (boundary and run.get("window_good", 0)):
        engine.set_gradient_accumulation_boundary(boundary)
        if finite:
            engine.backward(loss * loss_scale)
        else:  # a non-finite micro-batch that closes a window adds zero to the window's other gradients
            _backward_zero(engine)
        engine.step()  # optimizer, clipping, zeroing and the LR schedule at accumulation boundaries
        if boundary:
            update_ema()
    # never apply a non-finite update: every rank skips this micro-batch
    run["window_good"] = 0 if boundary else run.get("window_good", 0) + finite
    return StepResult(loss=total, finite=finite, stop_signum=(signum or 15) if stops else 0)


def _backward_zero(engine) -> None:
    """A backward that adds exactly zero to every gradient (built from the weights, not from a
    forward that may hold non-finite values), so that DeepSpeed still closes the window."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    with distributed.gathered(params, engine.zero_optimization_partition_weights()):
        engine.backward(sum((p * 0).sum() for p in params))
