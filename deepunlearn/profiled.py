"""Named parts of the automatic choice: decompositions or factors, edits, weight writes, the forget
and retain sides' scoring, the head's re-fit. Each is a range a ``torch.profiler`` run reports
(``benchmarks/profile_unlearn.py --choose``) and, inside :func:`part_times`, a timed one
(``benchmarks/bench_auto_alpha.py --parts``)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch.profiler import record_function

CHOICE_PREFIX = "deepunlearn::choose/"


class _Timer:
    """Exclusive wall seconds and calls per part: a part nested in another pauses it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, list[float]] = {}  # name -> [seconds, calls]
        self._open: list[list[float]] = []  # per open part: [start, seconds of the parts nested in it]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        self.synchronize()
        frame = [time.perf_counter(), 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            self.synchronize()
            self._open.pop()
            whole = time.perf_counter() - frame[0]
            entry = self.seconds.setdefault(name, [0.0, 0])
            entry[0] += whole - frame[1]
            entry[1] += 1
            if self._open:
                self._open[-1][1] += whole


_timer: _Timer | None = None  # set inside part_times()


def part(name: str) -> AbstractContextManager:
    """A context manager marking ``deepunlearn::choose/<name>`` in a profile (a few microseconds
    when no profiler runs), and timing it inside :func:`part_times`."""
    if _timer is None:
        return record_function(CHOICE_PREFIX + name)
    return _timer.timed(name)


@contextmanager
def part_times(device: torch.device) -> Iterator[dict[str, list[float]]]:
    """Within the block, every part's exclusive wall seconds and calls, ``{name: [seconds, calls]}``
    (filled as the parts run): ``device`` is synchronised at each part's edges, so a GPU's queued
    work counts where it was launched, and the synchronisations slow a GPU run a little."""
    global _timer
    if _timer is not None:
        raise RuntimeError("part_times() is already active")
    _timer = _Timer(device)
    try:
        yield _timer.seconds
    finally:
        _timer = None
