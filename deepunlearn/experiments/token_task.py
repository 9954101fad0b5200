"""A synthetic text-classification task given as Hugging Face batches, and the small transformers
trained on it: the tests and ``benchmarks/bench_text.py`` forget its classes through padded mapping
batches (``input_ids``, ``attention_mask``, ``labels``).

A sequence of class ``c`` starts with token :data:`CLS` and draws each further token from the class's
own eight tokens with probability :data:`OWN_SHARE`, else from :data:`SHARED` tokens every class uses;
:data:`PAD` pads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CLASSES, VOCAB, CLS, PAD = 4, 60, 1, 0
OWN_TOKENS, SHARED, FIRST_SHARED = 8, 24, 36  # class c owns tokens 4 + 8c ... 11 + 8c; 36 ... 59 are shared
OWN_SHARE = 0.4  # of a sequence's tokens after CLS, drawn from its class's own: about 90 % accuracy for a small model
LENGTHS = (4, 13)  # tokens a sequence holds, CLS included: from 4 up to 12


def text_batches(n: int, classes: Sequence[int], seed: int, batch: int = 50, side: str = "right",
                 lengths: tuple[int, int] = LENGTHS) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of the task, their classes drawn from ``classes``, in padded mapping batches of
    ``batch`` (each padded to its longest sequence on ``side``)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(list(classes))[torch.randint(len(classes), (n,), generator=g)]
    out = []
    for i in range(0, n, batch):
        y = labels[i:i + batch]
        sizes = torch.randint(*lengths, (len(y),), generator=g)
        ids = torch.full((len(y), int(sizes.max())), PAD)
        mask = torch.zeros_like(ids)
        for r, (c, size) in enumerate(zip(y.tolist(), sizes.tolist())):
            own = 4 + OWN_TOKENS * c + torch.randint(OWN_TOKENS, (size - 1,), generator=g)
            shared = FIRST_SHARED + torch.randint(SHARED, (size - 1,), generator=g)
            tokens = torch.cat([torch.tensor([CLS]), torch.where(torch.rand(size - 1, generator=g) < OWN_SHARE, own, shared)])
            at = slice(0, size) if side == "right" else slice(ids.shape[1] - size, None)
            ids[r, at], mask[r, at] = tokens, 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return out


def text_classifier(arch: str, blocks: int = 1, width: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """An untrained transformers sequence classifier for the task: ``"bert"`` (reads ``[CLS]`` through
    its pooler) or ``"gpt2"`` (reads its last token), ``blocks`` layers ``width`` wide, two heads."""
    import transformers

    torch.manual_seed(seed)
    if arch == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=blocks, num_attention_heads=2,
                                         intermediate_size=2 * width, num_labels=CLASSES, pad_token_id=PAD)
        model = transformers.BertForSequenceClassification(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=blocks, n_head=2, num_labels=CLASSES,
                                         pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2ForSequenceClassification(config)
    else:
        raise ValueError(f"arch must be 'bert' or 'gpt2', got {arch!r}")
    return model.to(dtype).eval()


def train_text_classifier(model: nn.Module, batches: list[dict[str, torch.Tensor]], epochs: int = 3, lr: float = 3e-3) -> nn.Module:
    """Adam on the model's own loss over ``batches`` (labels included); returned in eval mode."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in batches:
            loss = model(**batch).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()
