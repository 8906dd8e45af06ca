"""Time spent inside lightkv's own hooks during a forward (the method's overhead).

    timer = OverheadTimer.for_device(model.device)
    handle.timer = timer          # the engine times every hook while a timer is set
    model(**inputs)
    handle.timer = None
    timer.total                   # seconds; timer.seconds["layer_post"] etc. by hook kind

On CUDA the timer synchronises at the start and end of each timed hook so that the kernels a hook queues
count to it (and the model's own queued kernels do not); that costs some overlap, so time the prefill
itself in a run without a timer.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["OverheadTimer"]


class OverheadTimer:
    """Accumulates seconds per section; the engine calls ``start()`` and ``stop(section, start)``."""

    def __init__(self, synchronize: Callable[[], None] | None = None):
        self._synchronize = synchronize
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    @classmethod
    def for_device(cls, device: torch.device | str) -> "OverheadTimer":
        device = torch.device(device)
        if device.type == "cuda":
            return cls(lambda: torch.cuda.synchronize(device))
        return cls()

    def start(self) -> float:
        self._depth += 1
        if self._depth > 1:  # a timed section inside another one is already counted
            return -1.0
        if self._synchronize is not None:
            self._synchronize()
        return time.perf_counter()

    def stop(self, section: str, start: float) -> None:
        self._depth -= 1
        if start < 0:
            return
        if self._synchronize is not None:
            self._synchronize()
        self.seconds[section] = self.seconds.get(section, 0.0) + time.perf_counter() - start
        self.calls[section] = self.calls.get(section, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self._depth = 0
