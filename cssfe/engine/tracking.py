"""Experiment tracking: the scalars and charts of a run, for TensorBoard and Weights & Biases.

A :class:`Tracker` receives scalars (``{"train/loss": 0.7, ...}``) and images at a global step,
the optimizer step. :class:`RunTracker` is what training talks to: it names the scalars once, for
every tracker the config asks for (``logging.tensorboard``, ``logging.wandb``), and is empty on
the ranks other than 0, which write nothing.

Per optimizer step (every ``logging.step_every``): ``train/loss``, ``train/first_pass_loss``,
``train/lr``, ``train/lambda``, ``train/grad_norm``, ``train/nonfinite_steps``. Per evaluation:
``mAP/{total,head,medium,tail}``, ``first_pass_mAP/...``, ``f1/{weighted,micro,macro}``,
``speed/train_images_per_second`` and the per-class AP chart ``eval/per_class_ap``.
"""
from __future__ import annotations

import abc
import importlib.util
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from cssfe.registry import Registry

logger = logging.getLogger(__name__)


class Tracker(abc.ABC):
    """One place a run's scalars and images go."""

    @abc.abstractmethod
    def log_scalars(self, values: Dict[str, float], step: int) -> None: ...

    @abc.abstractmethod
    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: uint8, [H, W, 3]."""

    def close(self) -> None:
        pass


TRACKERS: Registry[Tracker] = Registry("tracker")


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """Event files in ``<run>/tensorboard/``; a resumed run adds a file beside the first."""

    def __init__(self, run_dir: str, cfg: Any):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(run_dir, "tensorboard")
        self.writer = SummaryWriter(self.log_dir)

    def log_scalars(self, values: Dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as exc:  # the folder went away under the writer: the run itself is complete
            logger.warning(f"TensorBoard events in {self.log_dir} could not be flushed at the end: {exc}")


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """A Weights & Biases run named after the run folder, its files under it. ``wandb.init`` reads
    ``WANDB_MODE`` itself (``offline``: nothing leaves the machine; ``wandb sync`` uploads later)."""

    def __init__(self, run_dir: str, cfg: Any):
        import wandb

        from cssfe.config import to_dict

        self.wandb = wandb
        self.run = wandb.init(project=cfg.logging.wandb_project, name=os.path.basename(os.path.abspath(run_dir)),
                              dir=run_dir, config=to_dict(cfg))

    def log_scalars(self, values: Dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def wanted(cfg: Any) -> List[str]:
    """The trackers ``cfg.logging`` asks for, by registry name."""
    return [name for name in TRACKERS.names() if getattr(cfg.logging, name)]


def check(cfg: Any) -> None:
    """Before any work: a tracker asked for whose package is missing. W&B is an explicit choice, so
    its absence is an error. (TensorBoard is on by default: its absence is a warning, given when
    the trackers are built.)"""
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("config key 'logging.wandb' is true but the wandb package is not installed: "
                         "pip install wandb, or set logging.wandb=false")


def _available(name: str) -> bool:
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        logger.warning("no TensorBoard event files: the tensorboard package is not installed "
                       "(pip install tensorboard, or set logging.tensorboard=false to silence this)")
        return False
    return True


def _figure_pixels(figure) -> np.ndarray:
    """A matplotlib figure as uint8 RGB pixels [H, W, 3]; the figure is closed."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return pixels


def evaluation_scalars(metrics: Dict[str, Any], images_per_second: Optional[float] = None) -> Dict[str, float]:
    """The scalars of one evaluation; a group without classes (None) is left out."""
    out: Dict[str, float] = {}
    for block in ("mAP", "first_pass_mAP", "f1"):
        for name, value in (metrics.get(block) or {}).items():
            if value is not None:
                out[f"{block}/{name}"] = float(value)
    if images_per_second is not None:
        out["speed/train_images_per_second"] = float(images_per_second)
    return out


class RunTracker:
    """The trackers of one run; use as a context manager (closed on exit, also on an error)."""

    def __init__(self, trackers: Sequence[Tracker] = (), step_every: int = 1):
        self.trackers = list(trackers)
        self.step_every = step_every

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def wants_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is logged: the caller computes its values only then."""
        return bool(self.trackers) and step % self.step_every == 0

    def log_step(self, step: int, **values: Optional[float]) -> None:
        scalars = {f"train/{k}": float(v) for k, v in values.items() if v is not None}
        for tracker in self.trackers:
            tracker.log_scalars(scalars, step)

    def log_evaluation(self, step: int, metrics: Dict[str, Any], images_per_second: Optional[float],
                       class_names: Sequence[str], groups: np.ndarray, class_freq: np.ndarray) -> None:
        if not self.trackers:
            return
        scalars = evaluation_scalars(metrics, images_per_second)
        for tracker in self.trackers:
            tracker.log_scalars(scalars, step)
        from cssfe.engine.evaluation import per_class_figure  # matplotlib, only when a chart is drawn

        chart = _figure_pixels(per_class_figure(class_names, metrics["per_class_ap"], groups, np.asarray(class_freq)))
        for tracker in self.trackers:
            tracker.log_image("eval/per_class_ap", chart, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run_tracker(cfg: Any, run_dir: str, main: bool = True) -> RunTracker:
    """The trackers ``cfg.logging`` asks for, writing under ``run_dir``; none on ranks other than 0."""
    if not main:
        return RunTracker()
    trackers = [TRACKERS.build(name, run_dir, cfg) for name in wanted(cfg) if _available(name)]
    return RunTracker(trackers, cfg.logging.step_every)
