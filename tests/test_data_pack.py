"""Packing tokenized examples (property tests): never over max_tokens, every example placed exactly once with
its tokens and labels intact (first label of each sequence -100), position ids restarting per sequence,
cu_seqlens tiling the rows, per-row trainable counts; batches rebased and counted by the device op."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kindred import KindredValueError, ops
from kindred.data import pack, prepare
from kindred.data.samples import calibration_path


def fake_data(lengths, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(0, 1000, offsets[-1]).astype(np.int32)
    labels = np.where(rng.random(offsets[-1]) < 0.5, ids, -100).astype(np.int32)
    return SimpleNamespace(ids=ids, labels=labels, offsets=offsets)


def check_packed(data, packed, max_tokens):
    n = len(data.offsets) - 1
    assert packed.input_ids.shape == (packed.rows, max_tokens)
    cu = packed.cu_seqlens
    assert cu[0] == 0 and cu[-1] == packed.rows * max_tokens and (np.diff(cu) >= 1).all()
    placed = packed.seq_example[packed.seq_example >= 0]
    assert sorted(placed.tolist()) == list(range(n))  # every example exactly once
    flat_ids = packed.input_ids.reshape(-1)
    flat_labels = packed.labels.reshape(-1)
    flat_pos = packed.position_ids.reshape(-1)
    for q, e in enumerate(packed.seq_example.tolist()):
        a, b = int(cu[q]), int(cu[q + 1])
        assert a // max_tokens == (b - 1) // max_tokens  # no sequence crosses a row
        assert np.array_equal(flat_pos[a:b], np.arange(b - a))
        assert flat_labels[a] == -100
        if e < 0:
            assert (flat_labels[a:b] == -100).all()
            continue
        ea, eb = data.offsets[e], data.offsets[e + 1]
        assert b - a == eb - ea
        assert np.array_equal(flat_ids[a:b], data.ids[ea:eb])
        assert np.array_equal(flat_labels[a + 1 : b], data.labels[ea + 1 : eb])
        assert packed.example_row[e] == a // max_tokens and packed.example_start[e] == a % max_tokens
    assert np.array_equal(packed.row_trainable, (packed.labels != -100).sum(1))
    for r in range(packed.rows):
        seqs = packed.seq_example[packed.row_seqs[r] : packed.row_seqs[r + 1]]
        used = sum(int(data.offsets[e + 1] - data.offsets[e]) for e in seqs if e >= 0)
        assert used <= max_tokens


def test_pack_rejects_examples_longer_than_a_row():
    with pytest.raises(KindredValueError, match="example 1 has 9 tokens, more than the 8 of a packed row"):
        pack(fake_data([3, 9]), 8)


def test_prepare_and_batches_on_the_calibration_set(hf_tokenizer_path):
    prep = prepare(calibration_path(), hf_tokenizer_path, "qwen3", budget=1024, pack_to=2048)
    final = prep.final
    check_packed(final, prep.packed, 2048)
    assert prep.packed.fill > 0.9
    batch = prep.packed.batch([2, 0])
    assert batch["labels"].dtype == torch.int64 and batch["input_ids"].shape == (2, 2048)
    assert int(batch["cu_seqlens"][-1]) == 2 * 2048
    counts = ops.count_trainable(batch["labels"], batch["cu_seqlens"])
    assert torch.equal(counts.per_row, batch["row_trainable"])
    pos = ops.position_ids(batch["cu_seqlens"], 2 * 2048, torch.int32)
    assert torch.equal(pos.view(2, 2048), batch["position_ids"])
    assert batch["max_seqlen"] == int(np.diff(batch["cu_seqlens"].numpy()).max())
    with pytest.raises(KindredValueError, match="rows must be in"):
        prep.packed.batch([prep.packed.rows])


def test_budget_longer_than_pack_rows_keeps_long_examples_apart(hf_tokenizer_path):
    prep = prepare(calibration_path(), hf_tokenizer_path, "chatml", budget=4096, pack_to=600)
    long = prep.final.tokens > 600
    assert long.any() and len(prep.too_long) == long.sum()
    assert len(prep.packed.example_row) + len(prep.too_long) == len(prep.final)
    assert (np.diff(prep.too_long.offsets) > 600).all()
