"""Named parts of the automatic choice, as ranges a ``torch.profiler`` run reports
(``benchmarks/profile_unlearn.py --choose``): decompositions or factors, edits, weight writes, the
forget and retain sides' scoring, the head's re-fit."""
from __future__ import annotations

from torch.profiler import record_function

CHOICE_PREFIX = "deepunlearn::choose/"


def part(name: str) -> record_function:
    """A context manager marking ``deepunlearn::choose/<name>`` in a profile (a few microseconds
    when no profiler runs)."""
    return record_function(CHOICE_PREFIX + name)
