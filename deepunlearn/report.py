"""What an unlearning call did, per layer and in total, printable and JSON-ready."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .auto_alpha import AlphaChoice


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
        alpha_choice: how the scales were chosen (:class:`~deepunlearn.auto_alpha.AlphaChoice`), or
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
