"""Batches given as mappings (``input_ids``, ``attention_mask``, ``labels``), as Hugging Face
tokenizers and collators make them: the model called with keywords, padding left out of the
statistics, the labels used, and the default call on a trained text classifier."""
import functools
import operator

import pytest
import torch

from conftest import rel_err

import deepunlearn
from deepunlearn import collect_statistics
from deepunlearn.evaluation import predictions
from deepunlearn.inputs import TokenInputs, token_positions
from deepunlearn.sampling import materialise
from deepunlearn.scoring import read_position

transformers = pytest.importorskip("transformers")

from deepunlearn.experiments.token_task import CLASSES, PAD, text_batches, text_classifier, train_text_classifier  # noqa: E402


def one_by_one(batches: list[dict]) -> list[torch.Tensor]:
    """Every sample of ``batches`` alone, without its padding: ``(1, tokens)``."""
    return [ids[m.bool()][None] for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"])]


def token_rows(model, batches: list[dict], position: int | None) -> dict[str, torch.Tensor]:
    """Independently of the package: every edited layer's input vectors over ``batches`` as the
    model reads them, ``(n, d)``: of a sequence input ``(N, S, d)`` the tokens only (by the mask),
    or each sample's token number ``position``; of a ``(N, d)`` input every row."""
    rows: dict[str, list[torch.Tensor]] = {}
    mask = [None]

    def keep(name):
        def hook(module, args):
            x = args[0]
            if x.dim() == 3:
                m = mask[0]
                if position is None:
                    x = x[m]
                else:  # the position-th True of each row of the mask
                    x = torch.stack([x[i, m[i].nonzero().flatten()[position]] for i in range(len(x))])
            rows.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    handles = [m.register_forward_pre_hook(keep(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for b in batches:
                mask[0] = b["attention_mask"].bool()
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.mark.parametrize("arch, side", [("bert", "right"), ("gpt2", "right"), ("gpt2", "left")])
@pytest.mark.parametrize("kind", ["every", "first", "last"])
def test_statistics_of_padded_mapping_batches_match_an_independent_computation_over_tokens(arch, side, kind):
    model = text_classifier(arch, dtype=torch.float64)
    batches = text_batches(40, range(CLASSES), 0, batch=16, side=side)
    options = {"every": {}, "first": {"first_token": True}, "last": {"first_token": True, "token_position": -1}}[kind]
    got = collect_statistics(model, batches, **options)
    want = token_rows(model, batches, options.get("token_position", 0) if options else None)
    assert got.slots and set(got.slots) <= set(want)
    for name, slot in got.slots.items():
        rows = want[name]
        assert slot.count == len(rows), name
        assert rel_err(slot.cov[0], rows.T @ rows) < 1e-12, name
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    # BERT's pooler and head read one vector a sample; GPT-2's head reads every position and keeps the last
    assert {s.count for s in got.slots.values()} == ({40} if kind != "every" else {40, tokens} if arch == "bert" else {tokens})


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_right_padding_changes_no_statistic(arch):
    """The same samples one at a time, unpadded, as plain token tensors: the same statistics."""
    model = text_classifier(arch, dtype=torch.float64)
    batches = text_batches(30, range(CLASSES), 5, batch=16)
    for options in ({}, {"first_token": True, "token_position": -1 if arch == "gpt2" else 0}):
        got = collect_statistics(model, batches, **options)
        want = functools.reduce(operator.add, [collect_statistics(model, x, **options) for x in one_by_one(batches)])
        for name, slot in got.slots.items():
            assert slot.count == want.slots[name].count and rel_err(slot.cov, want.slots[name].cov) < 1e-10, name


class TokenDataset(torch.utils.data.Dataset):
    """Unpadded token sequences with labels, one mapping a sample (as a tokenised Hugging Face dataset)."""

    def __init__(self, batches: list[dict]):
        self.samples = [{"input_ids": ids[m.bool()], "labels": y} for b in batches
                        for ids, m, y in zip(b["input_ids"], b["attention_mask"], b["labels"])]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def pad_collate(items: list[dict]) -> dict:
    """Pads each batch to its longest sample, as transformers' DataCollatorWithPadding does."""
    length = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), length), PAD)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(items):
        ids[r, :len(i["input_ids"])], mask[r, :len(i["input_ids"])] = i["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([i["labels"] for i in items])}


def padding_loader(batches: list[dict], batch_size: int) -> torch.utils.data.DataLoader:
    """A DataLoader over the samples of ``batches``, unpadded, padding each batch of its own."""
    return torch.utils.data.DataLoader(TokenDataset(batches), batch_size=batch_size, collate_fn=pad_collate)


def test_a_fixed_edit_from_mapping_batches_equals_the_edit_from_the_unpadded_samples():
    model = text_classifier("bert", dtype=torch.float64)
    forget, retain = text_batches(30, [0], 1, batch=8), text_batches(45, [1, 2, 3], 2, batch=8)
    got = deepunlearn.unlearn(model, padding_loader(forget, 7), padding_loader(retain, 7), alpha_r=100, alpha_f=10,
                              inplace=False)
    stats = [functools.reduce(operator.add, [collect_statistics(model, x) for x in one_by_one(data)])
             for data in (forget, retain)]
    want = deepunlearn.unlearn(model, *stats, alpha_r=100, alpha_f=10, inplace=False)
    changed = 0
    for (name, p), q, o in zip(got.model.named_parameters(), want.model.parameters(), model.parameters()):
        assert rel_err(p, q) < 1e-9, name
        changed += not torch.equal(p, o)
    assert changed >= 8


def test_joined_batches_are_padded_to_the_longest_on_their_side_with_their_pad_values():
    model = text_classifier("gpt2")
    for side in ("right", "left"):
        batches = text_batches(20, range(CLASSES), 3, batch=7, side=side)
        x, y = materialise(batches, 64, "forget", model)
        assert isinstance(x, TokenInputs) and x.padding_side == side and len(x) == 20
        assert torch.equal(y, torch.cat([b["labels"] for b in batches]))
        length = max(b["input_ids"].shape[1] for b in batches)
        assert x.tensors["input_ids"].shape == (20, length) and "labels" not in x.tensors
        assert torch.equal(x.tensors["input_ids"][x.mask], torch.cat([b["input_ids"][b["attention_mask"].bool()]
                                                                          for b in batches]))
        assert (x.tensors["input_ids"][~x.mask] == PAD).all()
        edge = x.mask[:, -1] if side == "right" else x.mask[:, 0]
        assert not edge.all()  # padding only where the batches had it: on their side
    # no padding anywhere but lengths that differ: the pad token comes from the model's config
    a = {"input_ids": torch.full((2, 3), 5), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    b = {"input_ids": torch.full((2, 5), 6), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    x, _ = materialise([a, b], 64, "retain", model)
    assert x.tensors["input_ids"][:2, 3:].eq(PAD).all() and x.tensors["attention_mask"][:2, 3:].eq(0).all()


def test_mapping_batches_that_cannot_be_joined_are_named_and_leave_the_model_unchanged():
    model = text_classifier("bert")
    before = [p.clone() for p in model.parameters()]
    right, left = text_batches(10, [0], 1, batch=5), text_batches(10, [0], 2, batch=5, side="left")
    retain = text_batches(20, [1, 2], 3)
    with pytest.raises(ValueError, match="padded on the left and some on the right"):
        deepunlearn.unlearn(model, right + left, retain)
    unpadded = [{"input_ids": torch.full((2, n), 5), "attention_mask": torch.ones(2, n, dtype=torch.long)} for n in (3, 5)]
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="none shows what 'input_ids' holds at a padded position"):
        deepunlearn.unlearn(model, unpadded, retain)
    model.config.pad_token_id = PAD
    with pytest.raises(ValueError, match="every batch must give the same model inputs"):
        deepunlearn.unlearn(model, [right[0], {"input_ids": right[1]["input_ids"]}], retain)
    with pytest.raises(ValueError, match="'input_ids' differ in shape beyond their samples"):
        deepunlearn.unlearn(model, [{"input_ids": u["input_ids"]} for u in unpadded], retain)
    with pytest.raises(TypeError, match="mixes mapping batches with tensor batches"):
        deepunlearn.unlearn(model, [right[0], right[1]["input_ids"]], retain)
    with pytest.raises(ValueError, match="same number of samples"):
        deepunlearn.unlearn(model, [{"input_ids": torch.ones(3, 4, dtype=torch.long),
                                     "attention_mask": torch.ones(2, 4, dtype=torch.long)}], retain, alpha_r=100, alpha_f=3)
    short = {"input_ids": torch.tensor([[1, 5, 5, 0, 0], [1, 5, 5, 5, 5]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    with pytest.raises(ValueError, match="token_position=-5, but some sample holds only 3 token"):
        deepunlearn.unlearn(model, [short], retain, alpha_r=100, alpha_f=3, first_token=True, token_position=-5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_token_positions_count_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert token_positions(mask, 0).tolist() == [0, 1, 2]
    assert token_positions(mask, -1).tolist() == [2, 3, 2]
    assert token_positions(mask[:2], 1).tolist() == [1, 2]


@pytest.mark.parametrize("arch, want", [("bert", 0), ("gpt2", -1)])
def test_the_read_position_counts_tokens_in_padded_batches(arch, want):
    model = text_classifier(arch)
    x, _ = materialise(text_batches(12, range(CLASSES), 4, batch=6), 64, "retain", model)
    assert not x.mask.all()
    head = model.classifier if arch == "bert" else model.score
    assert read_position(model, x, head, None) == want


def test_the_default_call_forgets_a_class_of_a_trained_text_classifier_given_as_padded_mapping_batches():
    model = train_text_classifier(text_classifier("bert"), text_batches(2000, range(CLASSES), 0))
    test = text_batches(1000, range(CLASSES), 9)

    def accuracies(m):
        probs, labels = predictions(m, test)
        right = probs.argmax(1) == labels
        return 100 * float(right[labels == 0].float().mean()), 100 * float(right[labels != 0].float().mean())

    forget_before, retain_before = accuracies(model)
    assert forget_before > 80 and retain_before > 80
    report = deepunlearn.unlearn(model, text_batches(200, [0], 1), text_batches(300, [1, 2, 3], 2), inplace=False)
    choice = report.alpha_choice
    assert choice.scoring == "labels" and choice.reached_target
    forget_after, retain_after = accuracies(report.model)
    assert forget_after <= 1.0 and retain_after >= retain_before - 1.0



def test_a_dataset_of_mapping_samples_serves_forget_classes_and_class_statistics():
    from torch.utils.data import DataLoader, Subset

    from deepunlearn import ClassStatistics
    from deepunlearn.sampling import dataset_labels, draw_samples

    model = text_classifier("bert", dtype=torch.float64)
    dataset = TokenDataset(text_batches(160, range(CLASSES), 6))
    labels = dataset_labels(dataset)
    assert torch.equal(labels, torch.stack([s["labels"] for s in dataset.samples]))
    got = deepunlearn.forget_classes(model, dataset, 0, retain_per_class=12, collate_fn=pad_collate, alpha_r=100,
                                     alpha_f=10, inplace=False, batch_size=9)
    forget_idx, retain_idx = draw_samples(labels, [0], 12, None, 0)
    want = deepunlearn.unlearn(model, DataLoader(Subset(dataset, forget_idx), batch_size=5, collate_fn=pad_collate),
                               DataLoader(Subset(dataset, retain_idx), batch_size=5, collate_fn=pad_collate),
                               alpha_r=100, alpha_f=10, inplace=False)
    for p, q in zip(got.model.parameters(), want.model.parameters()):
        assert rel_err(p, q) < 1e-9
    per_class = ClassStatistics.collect(model, dataset, per_class=7, batch_size=4, collate_fn=pad_collate)
    for c in (0, 2):
        rows = [dataset.samples[i]["input_ids"][None] for i in per_class.indices[c]]
        direct = functools.reduce(operator.add, [collect_statistics(model, x) for x in rows])
        for name, slot in per_class.per_class[c].slots.items():
            assert slot.count == direct.slots[name].count and rel_err(slot.cov, direct.slots[name].cov) < 1e-10, name
    with pytest.raises(TypeError, match="sample 0 of the dataset carries no label"):
        dataset_labels([{"input_ids": torch.ones(3, dtype=torch.long)}])


def test_image_batches_as_mappings_edit_as_their_pixel_tensors_do():
    """Hugging Face image datasets' batches, ``{"pixel_values", "labels"}``: no mask, the same edit as the tensors."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=48, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    forget = [{"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.zeros(8, dtype=torch.long)} for _ in range(3)]
    retain = [{"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.tensor([1, 2] * 4)} for _ in range(3)]
    got = deepunlearn.unlearn(model, forget, retain, alpha_r=100, alpha_f=3, inplace=False)
    want = deepunlearn.unlearn(model, [b["pixel_values"] for b in forget], [b["pixel_values"] for b in retain],
                               alpha_r=100, alpha_f=3, inplace=False)
    assert all(torch.equal(p, q) for p, q in zip(got.model.parameters(), want.model.parameters()))
    chosen = deepunlearn.unlearn(model, forget, retain, inplace=False)
    assert chosen.alpha_choice.scoring == "labels"


@pytest.mark.cuda
def test_mapping_batches_on_a_gpu_give_the_cpu_s_statistics():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    batches = text_batches(40, range(CLASSES), 0, batch=16)
    cpu, gpu = text_classifier("bert", dtype=torch.float64), text_classifier("bert", dtype=torch.float64).cuda()
    for options in ({}, {"first_token": True}):
        want, got = collect_statistics(cpu, batches, **options), collect_statistics(gpu, batches, **options)
        for name, slot in want.slots.items():
            assert got.slots[name].count == slot.count and rel_err(got.slots[name].cov.cpu(), slot.cov) < 1e-10, name
    x, _ = materialise(batches, 64, "retain", gpu)
    assert read_position(gpu, x.to("cuda"), gpu.classifier, None) == 0
    report = deepunlearn.unlearn(gpu.float(), batches[:1], batches[1:], inplace=False)
    assert report.alpha_choice.scoring == "labels"


class MaskedTokenNet(torch.nn.Module):
    """nn.MultiheadAttention (batch first or not) told the padding by ``key_padding_mask``, an MLP on
    every token, a head on token 0: called as ``model(x=..., attention_mask=...)``."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.embed = torch.nn.Linear(6, 16)
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.mlp = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x, attention_mask=None):
        t = self.embed(x)
        a = t if self.batch_first else t.transpose(0, 1)
        padding = None if attention_mask is None else attention_mask == 0
        a = self.attn(a, a, a, key_padding_mask=padding, need_weights=False)[0]
        t = t + (a if self.batch_first else a.transpose(0, 1))
        t = t + torch.relu(self.mlp(t))
        return self.head(t[:, 0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_layers_count_only_tokens_too(batch_first):
    torch.manual_seed(0)
    model = MaskedTokenNet(batch_first).double().eval()
    lengths = [[5, 3, 7], [2, 6]]
    batches = []
    for sizes in lengths:
        x = torch.zeros(len(sizes), max(sizes), 6, dtype=torch.float64)
        mask = torch.zeros(len(sizes), max(sizes), dtype=torch.long)
        for r, n in enumerate(sizes):
            x[r, :n], mask[r, :n] = torch.randn(n, 6, dtype=torch.float64), 1
        batches.append({"x": x, "attention_mask": mask, "labels": torch.arange(len(sizes)) % 3})
    alone = [b["x"][r, :n][None] for b, sizes in zip(batches, lengths) for r, n in enumerate(sizes)]
    for options in ({}, {"first_token": True}, {"first_token": True, "token_position": -1}):
        got = collect_statistics(model, batches, **options)
        want = functools.reduce(operator.add, [collect_statistics(model, x, **options) for x in alone])
        assert set(got.slots) == set(want.slots) == {"embed", "attn.in_proj", "attn.out_proj", "mlp", "head"}
        for name, slot in got.slots.items():
            assert slot.count == want.slots[name].count and rel_err(slot.cov, want.slots[name].cov) < 1e-10, name


def test_one_mapping_of_every_sample_is_split_into_batches():
    """A tokenizer's whole output (``tokenizer(texts, padding=True, return_tensors="pt")``) as the data."""
    model = text_classifier("bert", dtype=torch.float64)
    batches = text_batches(30, range(CLASSES), 7, batch=30)  # one batch: every sample, padded alike
    whole = batches[0]
    got = collect_statistics(model, whole, batch_size=8)
    want = collect_statistics(model, batches)
    for name, slot in want.slots.items():
        assert got.slots[name].count == slot.count and rel_err(got.slots[name].cov, slot.cov) < 1e-10, name
    x, y = materialise(whole, 8, "forget", model)
    assert len(x) == 30 and torch.equal(y, whole["labels"])
    with pytest.raises(TypeError, match="must hold tensors with a batch dimension.*'input_ids'"):
        collect_statistics(model, {"input_ids": [[1, 2, 3]]})


def test_a_tokenised_dataset_forgets_through_transformers_own_padding_collator(tmp_path):
    """As a tokenised ``datasets.Dataset`` gives samples (python lists, a ``label`` column), padded by
    ``DataCollatorWithPadding`` with a real tokenizer (built offline from a vocabulary file)."""
    from deepunlearn.experiments.token_task import VOCAB

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[UNK]", *map(str, range(4, VOCAB))]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))

    class Tokenised(torch.utils.data.Dataset):
        def __init__(self, batches):
            self.rows = [{"input_ids": ids[m.bool()].tolist(), "attention_mask": [1] * int(m.sum()), "label": int(y)}
                         for b in batches for ids, m, y in zip(b["input_ids"], b["attention_mask"], b["labels"])]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    model = train_text_classifier(text_classifier("bert"), text_batches(2000, range(CLASSES), 0))
    report = deepunlearn.forget_classes(model, Tokenised(text_batches(2000, range(CLASSES), 5)), classes=[3],
                                        collate_fn=transformers.DataCollatorWithPadding(tokenizer), inplace=False)
    assert report.alpha_choice.scoring == "labels" and report.alpha_choice.reached_target
    probs, labels = predictions(report.model, text_batches(1000, range(CLASSES), 9))
    right = probs.argmax(1) == labels
    assert float(right[labels == 3].float().mean()) <= 0.01 and float(right[labels != 3].float().mean()) > 0.9
