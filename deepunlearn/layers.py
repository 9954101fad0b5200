"""Find the weight matrices of a model that the method edits, and the layers it cannot edit.

An *edit target* is one weight matrix (or a row block of one) together with the statistic
*slots* whose summed second moment describes the input vectors that matrix multiplies.
Usually a target has one slot named after its module. ``nn.MultiheadAttention`` is the
exception: its packed input projection has one row block each for query, key and value,
and its ``out_proj`` is applied functionally, so its input is collected by a hook on the
attention module itself (see :mod:`deepunlearn.hooks`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _transposed_linear_types() -> tuple[type, ...]:
    """Layers computing ``x @ W + b`` with ``W`` stored ``(in, out)``: transformers' ``Conv1D`` (the
    GPT-2 family, ImageGPT), where transformers is loaded (a model holding one has imported it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def eager_module(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (its parameters are the wrapper's), else ``model``:
    statistics are collected and candidates scored eagerly, where the wrapper would compile again for
    every hook and batch shape, with the same result."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # a compiled module means torch._dynamo is loaded
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return model


@dataclass(frozen=True)
class EditTarget:
    """One weight matrix the edit rewrites.

    Attributes:
        name: report name, e.g. ``"features.3"`` or ``"encoder.0.self_attn.in_proj.q"``.
        module: the module owning the parameter.
        param: attribute name of the parameter on ``module`` (``"weight"``, ``"in_proj_weight"``...).
        rows: ``(start, stop)`` row block of the parameter, or ``None`` for all rows.
        groups: number of independent input groups (conv ``groups``; 1 otherwise).
        slots: statistic slots whose covariances sum to this target's input second moment.
        kind: ``"linear"``, ``"conv{1,2,3}d"``, ``"attention-in"`` or ``"attention-out"``.
        layer: qualified name of the model layer it belongs to (the attention module for both
            attention kinds).
        transposed: the parameter is stored ``(in, out)`` (transformers' ``Conv1D``); :meth:`weight`
            gives the ``(out, in)`` view the edit works on, and writes go through it.
    """

    name: str
    module: nn.Module
    param: str
    rows: tuple[int, int] | None
    groups: int
    slots: tuple[str, ...]
    kind: str
    layer: str
    transposed: bool = False

    def weight(self) -> torch.Tensor:
        """The (possibly row-sliced) weight matrix, ``(out, in)`` (a view of the parameter, not a copy)."""
        w = getattr(self.module, self.param)
        w = w.t() if self.transposed else w
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]

    def bias_parameter(self) -> torch.Tensor | None:
        """The parameter holding this target's bias (attention's input projections keep theirs
        packed in ``in_proj_bias`` either way, returned whole), or None where it has none."""
        return getattr(self.module, "in_proj_bias" if self.kind == "attention-in" else "bias", None)

    def bias(self) -> torch.Tensor | None:
        """The bias added to this target's outputs (a view of its rows), or None where it has none."""
        b = self.bias_parameter()
        if b is None or self.kind != "attention-in":
            return b
        e = self.module.embed_dim
        part = "qkv".index(self.slots[-1].rsplit(".", 1)[1])
        return b[part * e : (part + 1) * e]

    def write(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy ``weight`` (this target's shape) into its parameter, and ``bias`` where given, in
        place and without autograd."""
        with torch.no_grad():
            self.weight().copy_(weight)
            if bias is not None:
                self.bias().copy_(bias)

    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight().shape)

    @property
    def in_features(self) -> int:
        """``d``: length of one input vector of one group (``C_in/groups * prod(kernel)`` for convs)."""
        w = self.weight()
        return w[0].numel()

    def as_matrices(self, w: torch.Tensor) -> torch.Tensor:
        """View a weight of this target's shape as ``(groups, out/groups, d)``."""
        return w.reshape(self.groups, w.shape[0] // self.groups, -1)


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


def _mha_targets(name: str, mha: nn.MultiheadAttention) -> list[EditTarget]:
    e = mha.embed_dim
    shared = f"{name}.in_proj"  # used by batches whose query, key and value are one tensor
    targets = []
    for i, part in enumerate("qkv"):
        slots = (shared, f"{name}.{part}")
        if mha.in_proj_weight is not None:
            targets.append(EditTarget(f"{name}.in_proj.{part}", mha, "in_proj_weight", (i * e, (i + 1) * e), 1, slots, "attention-in", name))
        else:
            targets.append(EditTarget(f"{name}.{part}_proj", mha, f"{part}_proj_weight", None, 1, slots, "attention-in", name))
    targets.append(EditTarget(f"{name}.out_proj", mha.out_proj, "weight", None, 1, (f"{name}.out_proj",), "attention-out", name))
    return targets


def find_targets(model: nn.Module) -> tuple[list[EditTarget], list[SkippedLayer]]:
    """Return the edit targets of ``model`` in module order, and the weighted layers left alone.

    Editable: ``nn.Linear`` (the classifier head included), ``nn.Conv1d/2d/3d`` (any
    padding mode, stride, dilation, groups), ``nn.MultiheadAttention``, and transformers'
    ``Conv1D`` (a linear layer with its weight stored transposed). Every other module
    holding a parameter of two or more dimensions (embeddings, transposed convs, RNNs,
    parametrized weights...) is returned as skipped, with the reason.
    """
    transposed_linear = _transposed_linear_types()
    targets: list[EditTarget] = []
    skipped: list[SkippedLayer] = []
    covered: set[int] = set()  # ids of parameters a target edits
    for name, module in model.named_modules():
        if id(module) in covered:
            continue
        if parametrize.is_parametrized(module):
            skipped.append(SkippedLayer(name, "weight is parametrized (e.g. weight_norm); edit the underlying tensors yourself"))
            for p in module.parameters():
                covered.add(id(p))
            continue
        if isinstance(module, (nn.Linear, *_CONV_TYPES)) and isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer '{name}' is a lazy module that was never run; run one forward pass first")
        if isinstance(module, nn.MultiheadAttention):
            new = _mha_targets(name, module)
            covered.add(id(module.out_proj))
        elif isinstance(module, nn.Linear):
            new = [EditTarget(name, module, "weight", None, 1, (name,), "linear", name)]
        elif isinstance(module, _CONV_TYPES):
            new = [EditTarget(name, module, "weight", None, module.groups, (name,), f"conv{module.weight.dim() - 2}d", name)]
        elif isinstance(module, transposed_linear) and isinstance(getattr(module, "weight", None), nn.Parameter) \
                and module.weight.dim() == 2:
            new = [EditTarget(name, module, "weight", None, 1, (name,), "linear", name, transposed=True)]
        else:
            new = []
        for t in new:
            covered.add(id(getattr(t.module, t.param)))
        targets.extend(new)
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in covered:
                skipped.append(SkippedLayer(f"{name}.{pname}" if name else pname,
                                            f"a {p.dim()}-d parameter of {type(module).__name__}, which is not a supported layer type "
                                            "(only the weights of Linear, Conv1d/2d/3d, MultiheadAttention and "
                                            "transformers' Conv1D are edited)"))
                covered.add(id(p))
    return targets, skipped


def editable_targets(model: nn.Module) -> tuple[list[EditTarget], list[SkippedLayer]]:
    """:func:`find_targets`, with ``ValueError`` where the model has no layer to edit."""
    targets, skipped = find_targets(model)
    if not targets:
        raise ValueError("the model has no layer deepunlearn can edit (Linear, Conv1d/2d/3d, MultiheadAttention)")
    return targets, skipped
