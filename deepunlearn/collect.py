"""Collecting :class:`~deepunlearn.statistics.Statistics`: the model run over the data in eval mode
without autograd, its edited layers' inputs streamed into per-layer second moments by the hooks of
:mod:`deepunlearn.hooks`, summed over ranks under ``torch.distributed``.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as dist
from ._batches import DataLike, iter_batches
from .inputs import TokenInputs, call_model
from .hooks import Collector, SharingChanged, autocast_on, check_autocast, check_token_position
from .layers import EditTarget, eager_module, editable_targets
from .moments import moment_trace
from .pooling import pooling_by_maxima
from .statistics import Statistics, model_device, model_fingerprint


@contextmanager
def eval_no_grad(model: nn.Module, inference: bool = False) -> Iterator[None]:
    """Eval mode and no autograd inside, max pooling by :mod:`deepunlearn.pooling` where it is
    faster (the same values); every module's own training flag restored after, even on error.
    ``inference``: under ``torch.inference_mode`` (less overhead per op; tensors made inside
    cannot be changed in place or saved for autograd after, and have no version counter, which
    the statistics' hooks read), else ``torch.no_grad``."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad(), pooling_by_maxima(model):
            yield
    finally:
        for m, f in flags.items():
            m.training = f


def _length(data: DataLike) -> int | None:
    """Number of samples in ``data`` when it is known without iterating (for the progress bar)."""
    if isinstance(data, (torch.Tensor, TokenInputs)):
        return data.shape[0]
    if isinstance(data, DataLoader):
        data = data.dataset
    try:
        return len(data) if isinstance(data, Dataset) else None  # type: ignore[arg-type]
    except TypeError:  # an iterable-style dataset without a length
        return None


def run_with_hooks(model: nn.Module, data: DataLike, collector: Collector, batch_size: int, progress: bool, desc: str,
                   outputs: list[torch.Tensor | None] | None = None) -> int:
    """Run ``model`` over ``data`` in eval mode without autograd, feeding ``collector``; return the sample count.

    ``outputs``: emptied, then given the model's output per batch (:func:`batch_logits`).
    The hooks are removed and every module's training flag restored whatever happens.
    """
    from tqdm.auto import tqdm

    device = collector.device
    samples = 0
    # Fused transformer fast paths run whole encoder layers in one kernel, bypassing the module
    # calls our hooks watch; switch them off while collecting (restored after, whatever happens).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    collector.expected_samples = _length(data)
    if outputs is not None:
        outputs.clear()
    bar = tqdm(total=collector.expected_samples, desc=desc, unit="img", unit_scale=True, disable=not progress, leave=False)
    try:
        with eval_no_grad(model):
            for x in iter_batches(data, batch_size):
                if x.shape[0] == 0:
                    continue
                collector.batch_samples = x.shape[0]
                x = x.to(device, non_blocking=True)
                collector.mask = x.mask if isinstance(x, TokenInputs) else None
                with autocast_on(device, collector.autocast), collector.capture():
                    y = call_model(model, x)
                collector.end_forward()
                if outputs is not None:
                    outputs.append(batch_logits(y, x.shape[0]))
                samples += x.shape[0]
                bar.update(x.shape[0])
        collector.end_collection()
    finally:
        bar.close()
        collector.remove()
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return samples


def output_logits(output: object) -> torch.Tensor:
    """The logits in a model's output: the output itself where it is a tensor, else its ``.logits``
    (transformers' outputs, torchvision's ``InceptionOutputs``) or its ``["logits"]``. ``TypeError``
    otherwise: the classes a model predicts must be readable to score or evaluate it."""
    if isinstance(output, torch.Tensor):
        return output
    y = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the model returned a {type(output).__name__}, not a logits tensor (N, classes) nor an output "
                        "with .logits or ['logits']; wrap it so that it returns its logits (or give alpha_r and "
                        "alpha_f: only the automatic choice and the evaluation read the output)")
    return y


def batch_logits(output: object, rows: int) -> torch.Tensor | None:
    """A model's output on a batch of ``rows`` samples as float32 logits ``(rows, classes)``
    (:func:`output_logits`), or None where it is not such a tensor."""
    try:
        y = output_logits(output)
    except TypeError:
        return None
    if y.ndim != 2 or y.shape[0] != rows:
        return None
    return y.detach().float()


def collection_setup(model: nn.Module, dtype: torch.dtype | None) -> tuple[list[EditTarget], torch.device, torch.dtype]:
    """The model's edit targets, its one device, and the accumulation dtype (default float32, or
    float64 for a model whose weights are float64); ``ValueError`` when nothing is editable or
    devices are mixed."""
    targets, _ = editable_targets(model)
    device = model_device(model)
    return targets, device, dtype or default_dtype(targets)


def default_dtype(targets: list[EditTarget]) -> torch.dtype:
    """float32, enough for statistics and solves whatever the data (docs/solver.md); float64 where
    the model itself computes in float64."""
    return torch.float64 if any(t.weight().dtype == torch.float64 for t in targets) else torch.float32


@torch.inference_mode(False)  # called under inference mode: the hooks read version counters
def collect_statistics(
    model: nn.Module,
    data: DataLike,
    *,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    distributed: bool = True,
    keep_vectors: bool | str = True,
    first_token: bool = False,
    token_position: int = 0,
    progress: bool = False,
    desc: str = "statistics",
    outputs: list[torch.Tensor | None] | None = None,
) -> Statistics:
    """Stream ``data`` through ``model`` and return every edited layer's input second moments.

    Args:
        model: the classifier; left exactly as it was (weights, training flags, hooks, requires_grad).
        data: a DataLoader, Dataset, tensor ``(N, ...)`` or iterable of batches ``x``, ``(x, y, ...)`` or
            mappings of model inputs (as :func:`deepunlearn.unlearn` takes them); batches are moved to
            the model's device.
        batch_size: batch size used when ``data`` is a tensor or a Dataset.
        dtype: accumulation dtype; default float32 (float64 for a float64 model).
        autocast: run the forward passes under ``torch.autocast`` with this dtype (``torch.bfloat16``
            or ``torch.float16``); each layer's statistics are then those of the reduced-precision
            inputs it really multiplies, accumulated in ``dtype``.
        distributed: when a ``torch.distributed`` process group is initialised, treat ``data`` as
            this rank's shard and return the sum over all ranks (every rank must call this).
        keep_vectors: keep a layer's input vectors themselves, ``(groups, n, d)``, while it sees
            fewer than its width ``d`` (less memory, and the solve then works on ``n × n``
            matrices): ``True`` (default) for linear inputs, and for conv inputs where that solve
            costs fewer flops than one from the ``d × d`` sum; ``"always"`` for every input;
            ``False``: always the ``(groups, d, d)`` sum.
        first_token: for inputs that are sequences, only the first position's vectors: every
            ``nn.Linear`` input of shape ``(batch, sequence, features)`` and every
            ``nn.MultiheadAttention`` input and output (in its own layout). For classifiers that
            read a class token at position 0 (ViT, DeiT): the statistics of what the head sees.
        token_position: the position ``first_token`` keeps: 0, or -1 for classifiers that read the
            last position (GPT-2's sequence classifiers, inputs without right padding).
        progress: show a progress bar (images and images per second).
        desc: progress bar label.
        outputs: a list that is emptied, then given the model's output on each batch as float32
            logits ``(batch, classes)`` (its ``.logits`` where it has them; None for a batch whose
            output is no such tensor): the unedited predictions, at no extra forward pass.

    Raises:
        ValueError: empty data, no editable layer, the model on several devices, or non-finite
            statistics (the message names the first layer, in execution order, that saw them).
    """
    model = eager_module(model)
    targets, device, dtype = collection_setup(model, dtype)
    check_autocast(autocast)
    check_token_position(token_position)
    ranks = dist.world() if distributed else None
    try:
        stats, samples = collect_slots(model, data, targets, device, dtype, autocast, batch_size, progress, desc, keep_vectors,
                                  first_token, outputs, token_position)
    except Exception as exc:
        if ranks is None:
            raise
        stats, samples, error = Statistics(), 0, exc
    else:
        error = None
    return finish_statistics(model, stats, samples, error, ranks is not None, desc)


def finish_statistics(model: nn.Module, stats: Statistics, samples: int, error: BaseException | None,
                      distributed: bool, desc: str) -> Statistics:
    """Sum over ranks (if ``distributed``; a collective), check, and stamp with the model's fingerprint."""
    if distributed:  # every rank reaches this collective, failed or not
        stats, samples = dist.all_reduce_statistics(stats, samples, error)
    elif error is not None:
        raise error
    if samples == 0:
        raise ValueError(f"no samples in the {desc} data: it yielded no non-empty batch")
    # a NaN or an infinity in any input vector, or an overflowed product, makes its diagonal entry
    # of C (Σ x_i²) non-finite, so the traces tell what checking all d² entries would
    traces = [moment_trace(s.moment).sum() for s in stats.slots.values()]
    finite = torch.isfinite(torch.stack(traces)).tolist() if traces else []
    for (name, slot), ok in zip(stats.slots.items(), finite):
        if not ok:
            raise ValueError(
                f"non-finite statistics at layer '{name}': its inputs contain NaN/Inf (or overflowed {slot.stored.dtype}); "
                "check the data and the layers before it"
            )
    stats.samples = samples
    stats.fingerprint = model_fingerprint(model)
    return stats


def gather_statistics(model: nn.Module, data: DataLike | Statistics, role: str, **collect_kwargs) -> Statistics:
    """``data`` as :class:`Statistics` of ``model``: collected (``collect_kwargs`` as for
    :func:`collect_statistics`), or checked against the model (and ``first_token``) if given.
    ``role`` names the data in errors and progress bars."""
    if isinstance(data, Statistics):
        data.check_matches(model)
        if data.samples == 0 or not data.slots:
            raise ValueError(f"the {role} statistics are empty")
        wanted = collect_kwargs.get("first_token", False)
        if data.first_token != wanted:
            raise ValueError(f"the {role} statistics were collected with first_token={data.first_token}, but the call "
                             f"has first_token={wanted}")
        position = collect_kwargs.get("token_position", 0)
        if wanted and data.token_position != position:
            raise ValueError(f"the {role} statistics were collected with token_position={data.token_position}, but the "
                             f"call has token_position={position}")
        return data
    if data is None:
        raise ValueError(f"no {role} data given")
    return collect_statistics(model, data, desc=role, **collect_kwargs)


def collect_both_kinds(model: nn.Module, data: DataLike, *, batch_size: int = 256, dtype: torch.dtype | None = None,
                       autocast: torch.dtype | None = None, progress: bool = False, desc: str = "statistics",
                       outputs: list[torch.Tensor | None] | None = None,
                       token_position: int = 0) -> tuple[Statistics, Statistics | None]:
    """Every position's statistics and one position's (``first_token``, at ``token_position``), from
    one set of forward passes; the second is None when no edited layer read a sequence. Slots that
    never saw a sequence are the same objects in both. In one process (not summed over ranks).
    ``outputs`` as for :func:`collect_statistics`."""
    targets, device, dtype = collection_setup(model, dtype)
    check_autocast(autocast)
    collector = Collector(targets, device, dtype, autocast=autocast, keep_vectors="always", both_kinds=True,
                          token_position=token_position)
    try:
        samples = run_with_hooks(model, data, collector, batch_size, progress, desc, outputs)
    except SharingChanged:  # rare: collect each kind with one slot per layer
        full = collect_statistics(model, data, batch_size=batch_size, dtype=dtype, autocast=autocast, distributed=False,
                                  progress=progress, desc=desc, outputs=outputs)
        if not full.sequence_inputs:
            return full, None
        return full, collect_statistics(model, data, batch_size=batch_size, dtype=dtype, autocast=autocast,
                                        distributed=False, first_token=True, token_position=token_position,
                                        progress=progress, desc=desc)
    full = finish_statistics(model, collector.stats, samples, None, False, desc)
    if not full.sequence_inputs:
        return full, None
    token = Statistics({k: collector.token_slots.get(k, v) for k, v in full.slots.items()}, samples, "",
                       dict(full.aliases), first_token=True, sequence_inputs=True, token_position=token_position)
    return full, finish_statistics(model, token, samples, None, False, desc)


def collect_slots(model, data, targets, device, dtype, autocast, batch_size, progress, desc,
             keep_vectors: bool | str = True, first_token: bool = False,
             outputs: list[torch.Tensor | None] | None = None, token_position: int = 0) -> tuple[Statistics, int]:
    collector = Collector(targets, device, dtype, autocast=autocast, keep_vectors=keep_vectors, first_token=first_token,
                          token_position=token_position)
    try:
        samples = run_with_hooks(model, data, collector, batch_size, progress, desc, outputs)
    except SharingChanged as exc:
        # Rare (layers whose inputs coincide only sometimes): collect again, one slot per layer.
        if isinstance(data, Iterator):
            raise ValueError(f"{exc}; pass data that can be iterated twice (a DataLoader, Dataset or tensor, "
                             "not a one-shot iterator) so the statistics can be collected again per layer") from exc
        warnings.warn(f"{exc}: collecting again with one statistic per layer", RuntimeWarning, stacklevel=3)
        collector = Collector(targets, device, dtype, share_inputs=False, autocast=autocast, keep_vectors=keep_vectors,
                               first_token=first_token, token_position=token_position)
        samples = run_with_hooks(model, data, collector, batch_size, progress, desc, outputs)
    return collector.stats, samples
