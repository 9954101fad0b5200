"""What an unlearning call did, per layer and in total, printable and JSON-ready."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from torch import nn

from .head_refit import HeadRefit
from .scoring import held_out_bound


@dataclass
class LayerReport:
    """One edited weight matrix.

    Attributes:
        name: target name (see :class:`deepunlearn.layers.EditTarget`).
        kind: layer kind.
        weight_shape: shape of the edited weight (or row block).
        groups: conv groups (1 otherwise).
        d: input vector length per group.
        forget_vectors, retain_vectors: input vectors (tokens / conv patches) accumulated per group.
        forget_energy, retain_energy: ``tr(C)`` summed over groups.
        relative_change: ``‖W_new − W‖_F / ‖W‖_F``.
        notes: anything unusual (groups that saw only zeros, a layer the data never reached).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    groups: int
    d: int
    forget_vectors: int
    retain_vectors: int
    forget_energy: float
    retain_energy: float
    relative_change: float
    notes: list[str] = field(default_factory=list)


@dataclass
class AlphaChoice:
    """How :func:`deepunlearn.unlearn` chose its scales.

    Attributes:
        alpha_r, alpha_f: the chosen pair.
        retain_acc, forget_acc: their held-out accuracies (percent).
        retain_prob: the held-out retain samples' mean probability of their right class (percent),
            by which candidates that reach the target are ranked.
        reached_target: whether the held-out forget accuracy reached its bound, ``target`` times
            :data:`~deepunlearn.scoring.HELD_OUT_SHARE`, by the chosen edit (else the best compromise was
            chosen) or with the head's bias rebalanced (:attr:`forget_acc_rebalanced`).
        target: the forget-accuracy target on unseen samples (percent).
        scoring: ``"labels"``, ``"classes"`` (the forgotten classes given, no labels) or
            ``"original predictions"`` (agreement with the unedited model).
        held_out: samples that scored ``(forget, retain)``: every forget sample (each by the
            candidate edited from the other folds, at most :data:`HOLDOUT_CAP` a fold) and the
            held-out retain samples.
        folds: forget folds (:data:`FORGET_FOLDS`, fewer for fewer samples).
        monotone: whether held-out forget accuracy never rose with ``alpha_f`` for any ``alpha_r``.
        candidates: every scored pair (a row per head option): ``alpha_r``, ``alpha_f``,
            ``retain_acc`` and ``retain_prob`` (scored for the
            smallest ``alpha_f`` reaching the target per ``alpha_r`` and for the pairs checked
            against the best of those (:func:`choose_alphas`'s bound), else NaN; for every pair
            where none reaches it), ``forget_acc`` (percent of the first fold; NaN where scoring stopped
            early), ``forget_hits`` (forget samples still recognised, of ``forget_scored`` scored:
            scoring stops, :data:`SCORE_CHUNK` samples at a time, once the pair has missed the target;
            NaN of 0 for a finer step that could not win, scored on the retain side only).
        seconds: wall time of decomposing and scoring (not of collecting the statistics).
        allowed_hits: the most held-out forget samples a candidate may still recognise to count as
            reaching the target (its held-out bound at :data:`FORGET_CONFIDENCE`, given ``held_out[0]``).
        first_token: whether the chosen edit uses the statistics of one sequence position only,
            ``token_position``: 0 (a class token) or -1 (a model that reads its last position).
        alpha_f_head: the classifier head's own ``alpha_f`` (the last layer the input reaches), or
            None where the head is edited with ``alpha_f`` like every other layer. Candidate rows
            carry ``alpha_f_head`` (the head's scale) and ``head_apart`` (1 where it was set apart).
        keep_retain_mean: whether the candidates' biases kept the retain samples' mean output
            (:func:`deepunlearn.unlearn`'s ``keep_retain_mean``).
        every_position_skipped: whether a model that reads sequences was searched with one
            position's statistics only (``token_position``): its output depends on that position alone
            (:func:`~deepunlearn.scoring.read_position`) and they reached the target, so every
            position's were not scored.
        head_shift: per class, what the edit adds to the classifier head's bias so that the
            held-out retain samples keep the unedited model's shares of the retained classes
            (:func:`rebalanced_shift`; :func:`deepunlearn.unlearn`'s ``refit_head``), where the
            head was not re-fitted and the shift leaves no fewer held-out retain samples right; else
            None. The held-out accuracies above are those before it.
        forget_acc_rebalanced: where no candidate reached the target and the head's bias was
            rebalanced, the percent of held-out forget samples (every fold, each by its own
            candidate) still recognised with the rebalancing; else None. The rebalancing lowers the
            forgotten classes against the kept ones, so it can reach the target the edit missed.
        head_shift_refused: whether a rebalancing was made and not applied, since it left fewer held-out
            retain samples right (the head is then left as the chosen edit made it).
        samples_to_show: the held-out forget samples with which none recognised shows the target at
            :data:`FORGET_CONFIDENCE`; with fewer (``held_out[0]``) a candidate reaches the target by
            none recognised, which cannot show it (the call warns).
        head_refit: the classifier head's retained rows re-fitted to the edited body
            (:class:`~deepunlearn.head_refit.HeadRefit`, with its cross-validated accuracies), or None.
    """

    alpha_r: float
    alpha_f: float
    retain_acc: float
    forget_acc: float
    reached_target: bool
    target: float
    scoring: str
    held_out: tuple[int, int]
    monotone: bool
    candidates: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    allowed_hits: int = 0
    first_token: bool = False
    folds: int = 1
    alpha_f_head: float | None = None
    retain_prob: float = math.nan
    keep_retain_mean: bool = False
    every_position_skipped: bool = False
    head_shift: list[float] | None = None
    head_refit: HeadRefit | None = None
    token_position: int = 0
    samples_to_show: int = 1
    head_shift_refused: bool = False
    forget_acc_rebalanced: float | None = None

    def to_dict(self) -> dict:
        """Every field as JSON-ready values; of :attr:`head_refit`, what it measured (not its rows)."""
        out = asdict(replace(self, head_refit=None))
        if self.head_refit is not None:
            out["head_refit"] = {f.name: getattr(self.head_refit, f.name) for f in fields(self.head_refit)
                                 if f.name not in ("weight", "bias")}
        return out

    def __str__(self) -> str:
        how = "reached" if self.reached_target else "NOT reached"
        if self.forget_acc_rebalanced is not None:  # the chosen edit alone missed it
            how += f" (held-out forget {self.forget_acc_rebalanced:.2f} % with the head's bias rebalanced)"
        head = "" if self.alpha_f_head is None else f", alpha_f_head={self.alpha_f_head:g}"
        return (f"alpha chosen: alpha_r={self.alpha_r:g}, alpha_f={self.alpha_f:g}{head} (held-out retain {self.retain_acc:.2f} %, "
                f"forget {self.forget_acc:.2f} %; target {self.target:g} % {how}: at most {self.allowed_hits} of "
                f"{self.held_out[0]} held-out forget samples recognised, the bound {held_out_bound(self.target):g} %"
                f"{'' if not self.reached_target or self.held_out[0] >= self.samples_to_show else f' (not shown: {self.samples_to_show} would show it)'}; "
                f"{'' if not self.first_token else 'statistics of the first sequence position; ' if self.token_position == 0 else f'statistics of sequence position {self.token_position}; '}"
                f"{'every position not searched (the output reads one alone); ' if self.every_position_skipped else ''}"
                f"{'retain mean kept; ' if self.keep_retain_mean else ''}"
                f"{'' if self.head_shift is None else f'head bias rebalanced (shifts up to {max(self.head_shift):.3g}); '}"
                f"{'head left as edited (its rebalancing would have cost held-out retain samples); ' if self.head_shift_refused else ''}"
                f"{'' if (r := self.head_refit) is None else f'head re-fitted (cross-validated retain {r.retain_acc_before:.2f} -> {r.retain_acc_after:.2f} %, {r.forget_hits} forget sample(s) recognised); '}"
                f"{len({(c['alpha_r'], c['alpha_f']) for c in self.candidates})} pairs scored"
                f"{'' if self.alpha_f_head is None and not any(c.get('head_apart') for c in self.candidates) else ' with each head scale'} "
                f"by {self.scoring} on {self.held_out[0]} forget samples in {self.folds} folds + {self.held_out[1]} held-out "
                f"retain samples in {self.seconds:.2f} s)")


@dataclass
class UnlearnReport:
    """Result of :func:`deepunlearn.unlearn`.

    Attributes:
        model: the edited model (the caller's own when ``inplace=True``, else a new copy).
        layers: one :class:`LayerReport` per weight matrix, in model order.
        skipped: ``(name, reason)`` for weighted layers that were not edited.
        forget_samples, retain_samples: samples that went through the model.
        alpha_r, alpha_f, solver: the settings used.
        seconds: wall time in seconds: ``collect_forget``, ``collect_retain``, ``choose_alpha`` (0 when
            both scales were given), ``decompose``, ``edit``, ``total``.
        alpha_choice: how the scales were chosen (:class:`AlphaChoice`), or
            None when both were given.
        alpha_f_head: the classifier head's own forget scale, or None where it took ``alpha_f``.
        keep_retain_mean: whether the biases were shifted to keep the retain samples' mean output.
    """

    model: nn.Module
    layers: list[LayerReport]
    skipped: list[tuple[str, str]]
    forget_samples: int
    retain_samples: int
    alpha_r: float
    alpha_f: float
    solver: str
    seconds: dict[str, float]
    alpha_choice: AlphaChoice | None = None
    alpha_f_head: float | None = None
    keep_retain_mean: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain JSON-serialisable data."""
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [list(s) for s in self.skipped],
            "forget_samples": self.forget_samples,
            "retain_samples": self.retain_samples,
            "alpha_r": self.alpha_r,
            "alpha_f": self.alpha_f,
            "alpha_f_head": self.alpha_f_head,
            "keep_retain_mean": self.keep_retain_mean,
            "solver": self.solver,
            "seconds": dict(self.seconds),
            "alpha_choice": None if self.alpha_choice is None else self.alpha_choice.to_dict(),
        }

    def __str__(self) -> str:
        head = (
            f"deepunlearn: edited {len(self.layers)} weight matrices with {self.forget_samples} forget / "
            f"{self.retain_samples} retain samples, alpha_r={self.alpha_r:g}, alpha_f={self.alpha_f:g}"
            f"{'' if self.alpha_f_head is None else f', alpha_f_head={self.alpha_f_head:g}'}"
            f"{', retain mean kept' if self.keep_retain_mean else ''}, solver={self.solver}"
        )
        t = self.seconds
        times = (
            f"time: collect {t['collect_forget'] + t['collect_retain']:.3f}s, choose alpha {t.get('choose_alpha', 0.0):.3f}s, "
            f"decompose {t['decompose']:.3f}s, "
            f"edit {t['edit']:.3f}s, total {t['total']:.3f}s"
        )
        rows = [f"{'layer':<40} {'kind':<14} {'d':>6} {'groups':>6} {'forget vec':>11} {'retain vec':>11} {'|dW|/|W|':>9}"]
        for r in self.layers:
            rows.append(
                f"{r.name[:40]:<40} {r.kind:<14} {r.d:>6} {r.groups:>6} {r.forget_vectors:>11} {r.retain_vectors:>11} "
                f"{r.relative_change:>9.4f}" + (f"  ({'; '.join(r.notes)})" if r.notes else "")
            )
        rows += [f"skipped {name}: {why}" for name, why in self.skipped]
        choice = [] if self.alpha_choice is None else [str(self.alpha_choice)]
        return "\n".join([head, *choice, times, *rows])
