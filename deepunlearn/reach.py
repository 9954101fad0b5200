"""Which edited layers the forward passes reached, and in what order: the first layer (left
unedited where asked) and the classifier head (which may take its own forget scale)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .layers import EditTarget, SkippedLayer
from .statistics import Statistics


FIRST_LAYER_SKIPPED = "the first layer the input reaches (skip_first_layer): unchanged"


def _reached_at(targets: Sequence[EditTarget], stats: Statistics) -> dict[int, float]:
    """Per target (by id), the position among ``stats``' slots at which the forward passes first reached its input (inf: never)."""
    order = {slot: i for i, slot in enumerate(stats.slots)}
    return {id(t): min((order[s] for s in stats.resolve(t.slots) if s in order), default=math.inf) for t in targets}


def first_layer(targets: Sequence[EditTarget], stats: Statistics) -> str | None:
    """The layer (:attr:`EditTarget.layer`) of ``targets`` whose input the forward passes of
    ``stats`` reached first, or None if they reached none."""
    rank = _reached_at(targets, stats)
    first = min(targets, key=lambda t: rank[id(t)])
    return first.layer if rank[id(first)] < math.inf else None


def classifier_head(targets: Sequence[EditTarget], stats: Statistics) -> EditTarget | None:
    """The target that may take its own ``alpha_f``: the input the forward passes of ``stats``
    reached last, where it is a whole ``nn.Linear`` weight that no other target reads the input of,
    beside at least one other target; else None."""
    rank = _reached_at(targets, stats)
    reached = [t for t in targets if rank[id(t)] < math.inf]
    if len(reached) < 2:
        return None
    last = max(reached, key=lambda t: rank[id(t)])
    alone = all(t is last or not set(stats.resolve(t.slots)) & set(stats.resolve(last.slots)) for t in targets)
    whole_linear = isinstance(last.module, nn.Linear) and last.param == "weight" and last.rows is None and last.groups == 1
    return last if alone and whole_linear else None


def edited_and_head(targets: list[EditTarget], skipped: list[SkippedLayer], stats: Statistics, skip_first: bool,
                    want_head: bool) -> tuple[list[EditTarget], list[SkippedLayer], EditTarget | None]:
    """The targets to edit (the first layer ``stats``' forward passes reached left out where
    ``skip_first`` and more than one layer is editable), the skipped layers, and the classifier
    head (:func:`classifier_head`) where ``want_head``."""
    if skip_first and len({t.layer for t in targets}) > 1:
        first = first_layer(targets, stats)
        if first is not None:
            targets = [t for t in targets if t.layer != first]
            skipped = [*skipped, SkippedLayer(first, FIRST_LAYER_SKIPPED)]
    return targets, skipped, classifier_head(targets, stats) if want_head else None


def check_head_scale(head: EditTarget | None, alpha_f_head: float | None) -> None:
    """The error of a head scale given for a model whose head cannot take one."""
    if alpha_f_head is not None and head is None:
        raise ValueError("alpha_f_head was given, but the last layer the input reaches cannot take its own scale (it must "
                         "be a Linear whose input no other edited weight reads, beside other edited layers)")
