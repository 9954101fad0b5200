"""Scoring candidate edits on held-out samples, for the automatic choice of α (docs/auto_alpha.md):
the model's predictions, the forgotten classes inferred where no labels are given, the classifier
head read once per forward pass, the head's bias rebalanced, and the certification of a forget
accuracy target from the samples still recognised.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .collect import eval_no_grad, output_logits
from .frozen_prefix import FrozenPrefix, find_prefix
from .hooks import autocast_on
from .inputs import TokenInputs, call_model, cat_inputs, token_positions
from .sampling import HOLDOUT_CAP

FORGET_CONFIDENCE = 0.75  # a candidate forgets if its held-out bound holds at this one-sided confidence (at a bound
# of 1 %, 6 of 900 may be recognised). Picked on the suite's 30 cases: with the head's own scale searched, 0.65
# (7 of 900) let the chosen edits, each the gentlest of more candidates that pass, leave 1.2-1.4 % of unseen forget
# samples in 3 cases
HELD_OUT_SHARE = 0.25  # the held-out forget samples may show at most this share of the target: they are training
# samples, and a class's unseen samples were recognised up to four times as often (the suite's SmallCNN, class 7 at
# 200 per kept class: 0.33 % held out, 1.40 % of the test split); docs/auto_alpha.md
CHECK_SAMPLES = 16  # held-out samples the structural checks run on (the frozen prefix, the head, the class
# token): each compares outputs sample by sample, so a few show a mismatch, and each costs forward passes
REBALANCE_ITERATIONS = 50  # of the head's bias shift; on the suite's models the shares match to 1e-4 in about 20
REBALANCE_STEP = 0.5  # a damped step: the full one can overshoot where a class's logits are spread widely
MIN_SHARE = 0.1  # unlabelled data: a class is forgotten if it takes >= 10 % of the forget predictions
SHARE_RATIO = 2.0  # ... and at least twice its share of the retain predictions


def binomial_upper_bound(hits: int, n: int, confidence: float) -> float:
    """The one-sided Clopper–Pearson upper bound of a rate from ``hits`` of ``n``: the ``u`` with
    ``P(X <= hits | n, u) = 1 − confidence`` (by bisection; the binomial CDF falls with ``u``)."""
    if hits >= n:
        return 1.0

    def cdf(u: float) -> float:
        logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(u) + (n - k) * math.log1p(-u)
                for k in range(hits + 1)]
        return sum(math.exp(v) for v in logs)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mid > 0 and cdf(mid) > 1.0 - confidence:
            lo = mid
        else:
            hi = mid if mid > 0 else hi
    return hi


def held_out_bound(target: float) -> float:
    """The forget accuracy (percent) the held-out forget samples may show for an edit to reach
    ``target`` on unseen samples: :data:`HELD_OUT_SHARE` of it."""
    return target * HELD_OUT_SHARE


def forget_samples_to_show(target: float, confidence: float = FORGET_CONFIDENCE) -> int:
    """The fewest held-out forget samples with which none recognised shows a forget accuracy of at
    most ``target`` percent at ``confidence`` (none of ``n`` bounds it at ``1 − (1 − confidence)^(1/n)``);
    with fewer, :func:`allowed_forget_hits` asks for none, which cannot show it."""
    return max(1, math.ceil(math.log1p(-confidence) / math.log1p(-target / 100.0))) if target < 100 else 1


def allowed_forget_hits(n: int, target: float, confidence: float = FORGET_CONFIDENCE) -> int:
    """The most held-out forget samples (of ``n``) still recognised for which the forget accuracy is
    at most ``target`` percent at ``confidence``; 0 where even none cannot show it (few samples)."""
    k = 0
    while k < n and 100.0 * binomial_upper_bound(k + 1, n, confidence) <= target:
        k += 1
    return k


def _model_logits(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
    """The model's logits ``(N, classes)`` on one batch ``x`` (already on its device):
    :func:`~deepunlearn.collect.output_logits`; ``TypeError`` for logits of another shape."""
    with autocast_on(x.device, autocast):
        y = output_logits(call_model(model, x))
    if y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise TypeError(f"choosing alpha scores class predictions: the model's logits must be (N, classes), got "
                        f"{tuple(y.shape)} for {x.shape[0]} samples; give alpha_r and alpha_f")
    return y


def predictions(model: nn.Module, x: torch.Tensor, batch_size: int, autocast: torch.dtype | None) -> torch.Tensor:
    """Predicted classes ``(N,)`` on the CPU, in eval mode without autograd."""
    device = next(model.parameters()).device
    with eval_no_grad(model):
        return torch.cat([_model_logits(model, xb.to(device), autocast).argmax(-1).cpu() for xb in x.split(batch_size)])


def inferred_forget_classes(pred_f: torch.Tensor, pred_r: torch.Tensor) -> list[int]:
    """Classes the unedited model gives the forget samples far more often than the retain samples."""
    classes = int(max(pred_f.max(), pred_r.max())) + 1
    share_f = torch.bincount(pred_f, minlength=classes).double() / len(pred_f)
    share_r = torch.bincount(pred_r, minlength=classes).double() / len(pred_r)
    chosen = [c for c in range(classes) if share_f[c] >= MIN_SHARE and share_f[c] >= SHARE_RATIO * share_r[c]]
    return chosen or [int(share_f.argmax())]


class HeadReader:
    """Reads the classifier head's input (``(N, d)``) during the model's forward passes, so that
    several candidate head weights score the same forward pass: one ``F.linear`` each."""

    def __init__(self, module: nn.Linear, autocast: torch.dtype | None):
        self.module = module
        self.autocast = autocast
        self.features: torch.Tensor | None = None

    def _read(self, module: nn.Module, args: tuple) -> None:
        self.features = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def logits_of(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's logits on ``x``; the head's input is kept in :attr:`features`."""
        handle = self.module.register_forward_pre_hook(self._read)
        try:
            return _model_logits(model, x, self.autocast)
        finally:
            handle.remove()

    def logits(self, heads: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """Logits ``(len(heads), N, classes)`` (float32, on the features' device) with each head
        ``(weight, bias)`` on the last features read (bias None: the module's)."""
        with autocast_on(self.features.device, self.autocast):
            return torch.stack([F.linear(self.features, w, self.module.bias if b is None else b) for w, b in heads]).float()

    def reads_the_output(self, model: nn.Module, x: torch.Tensor) -> bool:
        """Whether the model's predictions on ``x`` are the head's, recomputed from its input: the
        head is the model's last step (no scaling or pooling after it). Expects eval mode without autograd."""
        self.features = None
        y = self.logits_of(model, x)
        if (not isinstance(y, torch.Tensor) or self.features is None or self.features.dim() != 2 or y.dim() != 2
                or y.shape[0] != self.features.shape[0]):
            return False
        return torch.equal(self.logits([(self.module.weight, None)])[0].argmax(-1), y.argmax(-1))


def rebalanced_shift(logits: torch.Tensor, shares: torch.Tensor, forgotten: Sequence[int]) -> torch.Tensor:
    """The shift ``s`` ``(C,)`` of the head's bias under which the samples' mean predicted
    probabilities of the retained classes keep the proportions of ``shares``.

    ``logits``: ``(N, C)`` of the edited model on retain samples; ``shares``: ``(C,)`` the unedited
    model's mean predicted probabilities on them; ``forgotten``: the forgotten classes. The edit
    takes probability from retained classes that share features with the forgotten ones (on the
    suite's ViT, forgetting T-shirts took shirts from 63 to 50 %); their logits get it back. The
    forgotten classes get a shift of 0 and every retained class one of at least 0, so no sample can
    become predicted as a forgotten class that was not before (a forget sample's recognition, and
    the choice's held-out count of it, can only fall). A fixed point of
    ``s_c += log(share_c / mean softmax(logits + s)_c)`` over the retained classes' proportions
    (:data:`REBALANCE_ITERATIONS` damped steps, :data:`REBALANCE_STEP`), in float64."""
    logits = logits.detach().double().cpu()
    kept = torch.ones(logits.shape[-1], dtype=torch.bool)
    kept[list(forgotten)] = False
    want = shares.detach().double().cpu()[kept]
    want = want / want.sum()
    shift = torch.zeros(logits.shape[-1], dtype=torch.float64)
    for _ in range(REBALANCE_ITERATIONS):
        got = (logits + shift).softmax(-1).mean(0)[kept]
        shift[kept] += REBALANCE_STEP * (want.clamp_min(1e-12) / (got / got.sum()).clamp_min(1e-12)).log()
        shift[kept] -= shift[kept].min()
    return shift


def read_position(model: nn.Module, x: torch.Tensor, head: nn.Module, autocast: torch.dtype | None) -> int | None:
    """The one sequence position ``model``'s output on ``x`` depends on after the last batch-first
    sequence ``(N, S, d)`` a module returns before ``head`` runs (``head`` itself where it reads
    every position): 0 for a class-token model (a ViT whose head reads ``[:, 0]``), -1 for one
    that reads its last position (GPT-2's sequence classifiers on unpadded inputs), None for one
    that pools its positions, or where it cannot tell (fewer than 2 samples, no such output, ``head``
    never called). The other positions of that output are replaced by other samples' and the
    output must stay the same. Runs in eval mode without autograd."""
    if x.shape[0] < 2:
        return None
    with eval_no_grad(model):
        return _read_position(model, x, head, autocast)


def _read_position(model: nn.Module, x: torch.Tensor, head: nn.Module, autocast: torch.dtype | None) -> int | None:
    last: list[tuple[nn.Module, int]] = []  # (module, its call number) of the last sequence output so far
    calls: dict[nn.Module, int] = {}
    head_ran = [False]

    def after(module: nn.Module, args: tuple, out: object) -> None:
        calls[module] = calls.get(module, 0) + 1
        if (not head_ran[0] and isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[0] == x.shape[0]
                and out.shape[1] > 1):
            last[:] = [(module, calls[module])]

    def at_head(module: nn.Module, args: tuple) -> None:
        head_ran[0] = True

    handles = [m.register_forward_hook(after) for m in model.modules() if m is not model and m is not head]
    handles.append(head.register_forward_pre_hook(at_head))
    try:
        want = _model_logits(model, x, autocast)
    finally:
        for h in handles:
            h.remove()
    if not head_ran[0] or not last or not isinstance(want, torch.Tensor):
        return None
    module, nth = last[0]
    mask = x.mask if isinstance(x, TokenInputs) else None
    for position in (0, -1):
        seen = [0]

        def swapped(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            seen[0] += 1
            if seen[0] != nth:
                return None
            others = out.roll(1, 0)  # every other position from the previous sample (a new tensor)
            if mask is not None and mask.shape == out.shape[:2]:  # each sample's own token at that position
                rows = torch.arange(out.shape[0], device=out.device)
                at = token_positions(mask, position)
                others[rows, at] = out[rows, at]
            else:
                others[:, position] = out[:, position]
            return others

        handle = module.register_forward_hook(swapped)
        try:
            got = _model_logits(model, x, autocast)
        finally:
            handle.remove()
        # the same to rounding: each row of a matrix product is computed apart from the others
        if (got.float() - want.float()).abs().max() <= 1e-5 * want.float().abs().max().clamp_min(1e-30):
            return position
    return None


@dataclass
class Scorer:
    """Held-out forget hits per fold and retain accuracy (percent) of the model as it is now; its
    methods expect the model in eval mode without autograd (:func:`eval_no_grad`).

    ``heads``: candidate ``(weight, bias)`` of the classifier head (:attr:`head`); each is scored on
    the same forward pass, as if written into the head. None: the model as it is."""

    x_f: list[torch.Tensor]  # per fold
    x_r: torch.Tensor
    forget_hit: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]  # per fold: (predictions (..., n), the
    # samples' indices (n,)) -> bool "still recognised"
    retain_ref: torch.Tensor  # (N,) the class each held-out retain sample counts as right for
    batch_size: int
    autocast: torch.dtype | None
    scoring: str
    head: HeadReader | None = None
    prefix: FrozenPrefix | None = None  # the unedited start of the forward pass, kept per held-out sample
    forgotten: list[int] = field(default_factory=list)  # the classes forgotten (labels, given, or inferred)
    original_retain_logits: torch.Tensor | None = None  # (N, C) of the unedited model on x_r, where known
    order: list[torch.Tensor] = field(init=False)  # per fold: the order its samples are scored in next
    # the head's inputs read while scoring with several head options, per (key, source): the inputs (n, d) and
    # which rows were read; key: what the model holds now (choose_alphas sets the pair), None: not kept
    key: tuple | None = field(default=None, init=False)
    inputs_read: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.order = [torch.arange(len(x)) for x in self.x_f]

    @property
    def forget_samples(self) -> int:
        return sum(len(x) for x in self.x_f)

    def _batches(self, model: nn.Module, source: int | str, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        """The samples ``rows`` (indices) of ``source`` (a fold's index, or ``"retain"``) in
        batches on the model's device, the frozen prefix standing in while each runs."""
        device = next(model.parameters()).device
        x = self.x_r if source == "retain" else self.x_f[source]
        with self.prefix.standing_in() if self.prefix is not None else nullcontext():
            for batch in rows.split(self.batch_size):
                if self.prefix is not None:
                    self.prefix.kept(source, batch)
                yield batch, x[batch].to(device)

    def _logits(self, model: nn.Module, source: int | str, rows: torch.Tensor,
                heads: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None) -> torch.Tensor:
        """``(len(heads) or 1, len(rows), classes)`` logits (float32, on the model's device) of the
        samples ``rows`` (indices) of ``source``: a fold's index, or ``"retain"``."""
        out = []
        for batch, xb in self._batches(model, source, rows):
            if heads is None:
                out.append(_model_logits(model, xb, self.autocast).float()[None])
            else:
                self.head.logits_of(model, xb)
                out.append(self.head.logits(heads))
                if self.key is not None:
                    self._keep_inputs(source, batch, self.head.features)
        return torch.cat(out, dim=1)

    def _size(self, source: int | str) -> int:
        return len(self.x_r if source == "retain" else self.x_f[source])

    def _keep_inputs(self, source: int | str, rows: torch.Tensor, features: torch.Tensor) -> None:
        if (self.key, source) not in self.inputs_read:
            self.inputs_read[self.key, source] = (features.new_empty(self._size(source), features.shape[-1]),
                                                  torch.zeros(self._size(source), dtype=torch.bool))
        inputs, read = self.inputs_read[self.key, source]
        inputs[rows.to(inputs.device)] = features
        read[rows] = True

    def read_whole(self, key: tuple, source: int | str) -> bool:
        """Whether the head's input of every held-out sample of ``source`` was read while scoring
        the model as it held ``key``."""
        return (key, source) in self.inputs_read and bool(self.inputs_read[key, source][1].all())

    def head_inputs(self, model: nn.Module, source: int | str, reader: HeadReader, key: tuple | None = None) -> torch.Tensor:
        """``(n, d)`` the head's input (``reader``'s module) for every held-out sample of ``source``:
        those read while scoring the model as it held ``key`` where every one was
        (:meth:`read_whole`), else read now from the model as it is."""
        if key is not None and self.read_whole(key, source):
            return self.inputs_read[key, source][0]
        out = []
        for _, xb in self._batches(model, source, torch.arange(self._size(source))):
            reader.logits_of(model, xb)
            out.append(reader.features)
        return torch.cat(out)

    def forget_recognised(self, model: nn.Module, fold: int, start: int, stop: int,
                          heads: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> torch.Tensor:
        """``(len(heads) or 1, n)`` bool: whether each held-out forget sample of ``fold`` at
        positions ``start:stop`` of its scoring order (:attr:`order`) is still recognised, per head
        (or by the model as it is)."""
        return self.rows_recognised(model, fold, self.order[fold][start:stop], heads)

    def rows_recognised(self, model: nn.Module, fold: int, rows: torch.Tensor,
                        heads: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> torch.Tensor:
        """:meth:`forget_recognised` of the samples ``rows`` (indices into ``fold``)."""
        return self.forget_hit[fold](self._logits(model, fold, rows, heads).argmax(-1).cpu(), rows)

    def next_rows(self, fold: int, scored: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` samples of ``fold`` in its scoring order (:attr:`order`) that are not
        among ``scored`` (indices)."""
        order = self.order[fold]
        return order[~torch.isin(order, scored)][:count]

    def recognised_first(self, fold: int, recognised: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Reorder ``fold`` so that the samples still recognised (``recognised``: ``(n,)`` bool over
        ``rows``, by default the first ``n`` positions of its order) are scored first next time, then
        those not scored, then the rest: a later candidate that misses the target shows it in its
        first chunk."""
        order = self.order[fold]
        rows = order[:len(recognised)] if rows is None else rows
        self.order[fold] = torch.cat([rows[recognised], order[~torch.isin(order, rows)], rows[~recognised]])

    def retain_logits(self, model: nn.Module) -> torch.Tensor:
        """``(N, C)`` float32 logits of the model as it is now on the held-out retain samples."""
        return self._logits(model, "retain", torch.arange(len(self.x_r)), None)[0]

    def retain_right(self, logits: torch.Tensor) -> torch.Tensor:
        """Which held-out retain samples logits ``(..., N, C)`` predict as counted right, ``(..., N)`` bool on the CPU."""
        return logits.argmax(-1).cpu() == self.retain_ref

    def retain_scores(self, model: nn.Module, heads: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None
                      ) -> list[tuple[float, float]]:
        """Per head (or the model as it is), ``(accuracy, probability)``: the percent of held-out
        retain samples still right, and their mean probability (percent) of the class counted right."""
        logits = self._logits(model, "retain", torch.arange(len(self.x_r)), heads)
        right = self.retain_right(logits).float().mean(-1)
        ref = self.retain_ref.to(logits.device).expand(logits.shape[:2])
        prob = logits.softmax(-1).gather(-1, ref[..., None])[..., 0].mean(-1)
        return list(zip((100.0 * right).tolist(), (100.0 * prob).tolist()))


def held_out_prefix(model: nn.Module, x: torch.Tensor, edited: Sequence[torch.Tensor], autocast: torch.dtype | None,
                    samples: int) -> FrozenPrefix | None:
    """:func:`find_prefix` of the modules before the first of the parameters ``edited``, checked on
    ``x`` (a few held-out samples on the model's device), for ``samples`` held-out samples in all.
    None for mapping inputs (their passes are not split)."""
    if isinstance(x, TokenInputs):
        return None
    with eval_no_grad(model):
        return find_prefix(model, x, edited, lambda xb: _model_logits(model, xb, autocast), samples)


def make_scorer(model: nn.Module, x_f: Sequence[torch.Tensor], y_f: Sequence[torch.Tensor] | None, x_r: torch.Tensor,
                y_r: torch.Tensor | None, classes: Sequence[int] | None, batch_size: int,
                autocast: torch.dtype | None, edited: Sequence[torch.Tensor] | None = None,
                original: tuple[Sequence[torch.Tensor | None], torch.Tensor | None] | None = None,
                prefix: FrozenPrefix | None = None) -> Scorer:
    """Scores folds ``x_f`` (labels ``y_f`` per fold, or None) and held-out retain samples ``x_r``:
    by the labels where the data carry them; by the forgotten classes where given; else by
    agreement with the unedited model (forget: predicted as one of :func:`inferred_forget_classes`).
    At most :data:`HOLDOUT_CAP` samples of each fold score. ``edited``: the parameters candidates
    change; the modules before the first of them run once per held-out sample (:func:`find_prefix`;
    ``prefix``: that chain found already, with the outputs of some sources kept: fold ``k``'s every
    sample, ``"retain"``'s). ``original``: the unedited model's logits on every sample of each fold
    and on ``x_r``, where known (None entries: computed here)."""
    x_f = [x[:HOLDOUT_CAP] for x in x_f]
    device = next(model.parameters()).device
    orig_f = orig_r = None
    logits_f, logits_r = original if original is not None else ([None] * len(x_f), None)
    if logits_r is not None and all(y is not None for y in logits_f):
        orig_f = torch.cat([y[:HOLDOUT_CAP].argmax(-1).cpu() for y in logits_f])
        orig_r = logits_r.argmax(-1).cpu()
    need_original = y_r is None or (y_f is None and classes is None)  # the unedited predictions
    if edited is not None and prefix is None:
        prefix = held_out_prefix(model, x_r[:CHECK_SAMPLES].to(device), edited, autocast, sum(map(len, x_f)) + len(x_r))
    if prefix is not None:
        for k in range(len(x_f)):
            if k in prefix.outputs:
                prefix.outputs[k] = prefix.outputs[k][:HOLDOUT_CAP]

        def run(x: torch.Tensor) -> torch.Tensor:
            return _model_logits(model, x, autocast)

        missing = [(source, x) for source, x in [*enumerate(x_f), ("retain", x_r)] if source not in prefix.outputs]
        with eval_no_grad(model):
            if prefix.composes and not (need_original and orig_f is None):  # the prefix alone
                for source, x in missing:
                    prefix.keep_composed(source, [xb.to(device) for xb in x.split(batch_size)])
            elif orig_f is not None:  # whole passes keep the missing outputs
                for source, x in missing:
                    prefix.capture(run, source, [xb.to(device) for xb in x.split(batch_size)])
            else:  # one whole pass over the held-out samples keeps the prefix's outputs and the predictions
                def kept_predictions(source: int | str, x: torch.Tensor) -> torch.Tensor:
                    return torch.cat([y.argmax(-1).cpu() for y in
                                      prefix.capture(run, source, [xb.to(device) for xb in x.split(batch_size)])])

                orig_f = torch.cat([kept_predictions(k, x) for k, x in enumerate(x_f)])
                orig_r = kept_predictions("retain", x_r)
    if need_original and orig_f is None:
        orig_f = predictions(model, cat_inputs(x_f), batch_size, autocast)
        orig_r = predictions(model, x_r, batch_size, autocast)
    if y_f is not None:
        forget_hit, scoring = [lambda p, rows, y=y[:HOLDOUT_CAP]: p == y[rows] for y in y_f], "labels"
        forgotten = torch.cat([y[:HOLDOUT_CAP] for y in y_f]).unique()
    else:
        forgotten = torch.as_tensor(list(classes) if classes is not None else inferred_forget_classes(orig_f, orig_r))
        forget_hit = [lambda p, rows: torch.isin(p, forgotten)] * len(x_f)
        scoring = "classes" if classes is not None else "original predictions"
    ref_r = y_r if y_r is not None else orig_r
    if y_r is None:
        scoring = scoring if scoring == "original predictions" else scoring + " (retain: original predictions)"
    return Scorer(x_f, x_r, forget_hit, ref_r, batch_size, autocast, scoring, prefix=prefix,
                   forgotten=[int(c) for c in forgotten.tolist()], original_retain_logits=logits_r)
