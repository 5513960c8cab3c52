"""SIGTERM / SIGINT become a request to checkpoint and stop at the next step boundary."""
from __future__ import annotations

import signal
import threading
from typing import Optional


class TrainingInterrupted(Exception):
    def __init__(self, signum: int, checkpoint: str):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}; continue with --resume")


class StopRequest:
    """Context manager: while active, the first SIGTERM / SIGINT sets ``signum`` instead of killing
    the process (a second one acts as usual, unless ``second_signal_kills`` is false: launchers such
    as DeepSpeed's forward the signal a rank may already have had from its process group).
    Only the main thread can install handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, second_signal_kills: bool = True):
        self.signum: Optional[int] = None
        self.second_signal_kills = second_signal_kills
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None and self.second_signal_kills:  # give up waiting for the step boundary
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
