"""Packing and padding: a packed batch computes exactly what the samples computed one by one."""

from __future__ import annotations

import random

import pytest
import torch

from loraforge.config import ModelConfig
from loraforge.data.instruct import InstructionSource, Sample, pack, padded_batches
from loraforge.errors import LoraforgeError
from loraforge.model import IGNORE_INDEX, CausalLM

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0)
    m = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
            p.requires_grad_(False)
    return m


def random_samples(n: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[Sample]:
    """Samples with a prompt part (not trained) and a response part (trained), shift-aligned."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        labels = [ids[t + 1] if t + 1 >= prompt else IGNORE_INDEX for t in range(length - 1)] + [IGNORE_INDEX]
        out.append(Sample(ids, labels, row=i + 1))
    return out


def unpacked_loss(model: CausalLM, samples: list[Sample]) -> torch.Tensor:
    """Token-weighted mean of each sample's own loss, every sample run alone."""
    total, count = 0.0, 0
    for s in samples:
        loss, n = model.loss(torch.tensor([s.input_ids]), torch.tensor([s.labels]))
        total = total + loss * n
        count += n
    return total / count


def test_pack_places_every_sample_once_within_seq_len():
    samples = random_samples(50, seed=1)
    batches = pack(samples, seq_len=64, batch_size=4, pad_id=0, seed=0)
    seen = []
    n_rows = 0
    for b in batches:
        assert b.input_ids.shape == b.labels.shape == b.doc_ids.shape
        assert b.input_ids.shape[1] == 64 and b.input_ids.dtype == torch.long
        for r in range(b.input_ids.shape[0]):
            n_rows += 1
            docs = b.doc_ids[r]
            for d in docs.unique().tolist():
                idx = (docs == d).nonzero().flatten()
                assert idx.tolist() == list(range(idx[0], idx[-1] + 1))  # contiguous
                if d == 0:  # padding: never trained
                    assert (b.labels[r, idx] == IGNORE_INDEX).all()
                else:
                    seen.append((b.input_ids[r, idx].tolist(), b.labels[r, idx].tolist()))
    assert sorted(seen) == sorted((s.input_ids, s.labels) for s in samples)
    total = sum(len(s) for s in samples)
    assert n_rows == pytest.approx(total / 64, abs=2)  # best-fit decreasing fills rows nearly full
    with pytest.raises(LoraforgeError, match="longer than 8 tokens"):
        pack(samples, seq_len=8)


def test_packed_loss_equals_token_weighted_mean_of_unpacked(model):
    samples = random_samples(12, seed=2)
    batches = pack(samples, seq_len=80, batch_size=8, pad_id=0, seed=0)
    assert len(batches) == 1 and (batches[0].doc_ids.amax(dim=1) > 1).all()
    b = batches[0]
    packed, n_packed = model.loss(b.input_ids, b.labels, doc_ids=b.doc_ids)
    reference = unpacked_loss(model, samples)
    assert n_packed == sum(s.n_targets for s in samples)
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-6)
    # without per-document attention the result differs: the test can tell the two apart
    leaky, _ = model.loss(b.input_ids, b.labels)
    assert abs(float(leaky) - float(reference)) > 1e-3


def test_packed_gradients_equal_unpacked(model):
    samples = random_samples(6, seed=3)
    b = pack(samples, seq_len=128, batch_size=1, pad_id=0, seed=None)[0]
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        packed, _ = model.loss(b.input_ids, b.labels, doc_ids=b.doc_ids)
        g_packed = torch.autograd.grad(packed, params)
        g_ref = torch.autograd.grad(unpacked_loss(model, samples), params)
    finally:
        for p in params:
            p.requires_grad_(False)
    for gp, gr in zip(g_packed, g_ref):
        torch.testing.assert_close(gp, gr, rtol=1e-4, atol=1e-6)


def test_no_cross_contamination_between_packed_documents(model):
    samples = random_samples(5, seed=4, min_len=10, max_len=20)
    b = pack(samples, seq_len=100, batch_size=1, pad_id=0, seed=None)[0]
    ids, docs = b.input_ids.clone(), b.doc_ids
    assert docs.max() >= 3
    with torch.no_grad():
        before = model(ids, doc_ids=docs)
        changed = ids.clone()
        target = docs == 2
        changed[target] = (changed[target] + 1 + torch.arange(int(target.sum()))) % VOCAB
        after = model(changed, doc_ids=docs)
    others = (docs != 2) & (docs != 0)
    assert torch.equal(before[others], after[others])  # every other document: bit-identical logits
    assert not torch.allclose(before[target], after[target])
    # and each document's logits equal those of the sample run alone (positions restart)
    with torch.no_grad():
        for d in range(1, int(docs.max()) + 1):
            mask = docs[0] == d
            alone = model(ids[:, mask])
            torch.testing.assert_close(before[0, mask], alone[0], rtol=1e-5, atol=1e-5)


def test_padded_batches_loss_equals_unpacked(model):
    samples = random_samples(10, seed=5)
    batches = padded_batches(samples, batch_size=4, pad_id=0, group_by_length=True, seed=1)
    assert sum(b.input_ids.shape[0] for b in batches) == 10
    total, count = 0.0, 0
    for b in batches:
        loss, n = model.loss(b.input_ids, b.labels)
        total, count = total + loss * n, count + n
    torch.testing.assert_close(total / count, unpacked_loss(model, samples), rtol=1e-5, atol=1e-6)


def test_group_by_length_reduces_padding():
    samples = random_samples(400, seed=6, min_len=3, max_len=200)
    pad = VOCAB  # never a data token, so rows can be unpadded exactly

    def unpadded_rows(batches):
        rows = []
        for b in batches:
            for r in range(b.input_ids.shape[0]):
                ids = b.input_ids[r]
                n = int((ids != pad).sum())
                assert (ids[n:] == pad).all() and (b.labels[r, n:] == IGNORE_INDEX).all()
                rows.append((ids[:n].tolist(), b.labels[r, :n].tolist()))
        return rows

    def padding(batches):
        return sum(b.input_ids.numel() for b in batches) - sum(len(s) for s in samples)

    grouped = padded_batches(samples, 8, pad_id=pad, group_by_length=True, seed=0)
    plain = padded_batches(samples, 8, pad_id=pad, group_by_length=False, seed=0)
    assert padding(grouped) < 0.3 * padding(plain)
    expected = sorted((s.input_ids, s.labels) for s in samples)
    assert sorted(unpadded_rows(grouped)) == expected and sorted(unpadded_rows(plain)) == expected
    in_order = padded_batches(samples, 8, pad_id=pad, group_by_length=False, seed=None)
    assert unpadded_rows(in_order) == [(s.input_ids, s.labels) for s in samples]


@pytest.mark.parametrize("packing,group", [(True, False), (False, True), (False, False)])
def test_instruction_source_covers_every_sample(packing, group):
    samples = random_samples(30, seed=7)
    source = InstructionSource(samples, batch_size=4, pad_id=VOCAB, seq_len=64, packing=packing,
                               group_by_length=group, seed=0)
    batches = source.batches()
    seen = []
    for b in batches:
        assert (b.doc_ids is not None) == packing
        for r in range(b.input_ids.shape[0]):
            docs = b.doc_ids[r] if packing else torch.ones_like(b.input_ids[r])
            for d in docs.unique().tolist():
                keep = (docs == d) & (b.input_ids[r] != VOCAB)
                if d != 0 and keep.any():
                    seen.append((b.input_ids[r, keep].tolist(), b.labels[r, keep].tolist()))
    assert sorted(seen) == sorted((s.input_ids, s.labels) for s in samples)
    if packing:
        assert source.items_per_batch == 4 and source.n_items < 30
    elif group:
        assert source.items_per_batch == 1 and source.n_items == 8
    else:
        assert source.items_per_batch == 4 and source.n_items == 30
