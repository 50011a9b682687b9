"""The tokens ops: trainable-token counts and position ids from cu_seqlens (CPU reference against direct
loops; CUDA kernels against the CPU reference, including unaligned views, int32/int64 and many tiny or one
huge sequence), best-fit-decreasing packing (property tests: never over max_tokens, every example placed
exactly once, rows tiled from 0, same room choices as a brute-force BFD), and the argument checks."""

import numpy as np
import pytest
import torch

try:  # the GPU machine may lack hypothesis: the property test skips there, the kernel tests run
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

from kindred import KindredValueError, ops


def reference_counts(labels: np.ndarray, cu: np.ndarray, rows: int):
    flat = labels.reshape(-1)
    row_len = flat.size // rows if rows else 0
    seq = np.array([(flat[cu[i] : cu[i + 1]] != -100).sum() for i in range(len(cu) - 1)], np.int32)
    row = (labels.reshape(rows, -1) != -100).sum(1).astype(np.int32) if row_len else np.zeros(rows, np.int32)
    return seq, row, int((flat != -100).sum())


def random_packed(rows: int, row_len: int, seed: int, mean_len: int = 40, empty_every: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((rows, row_len)) < 0.6, rng.integers(0, 50000, (rows, row_len)), -100)
    cu = [0]
    for r in range(rows):
        at = r * row_len
        while at < (r + 1) * row_len:
            at = min((r + 1) * row_len, at + int(rng.integers(1, 2 * mean_len)))
            cu.append(at)
            if empty_every and len(cu) % empty_every == 0:
                cu.append(at)  # an empty sequence
    return labels, np.asarray(cu, np.int32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rows,row_len,mean", [(1, 1, 1), (3, 37, 5), (4, 1000, 300), (2, 4096, 4096)])
def test_count_trainable_cpu(dtype, rows, row_len, mean):
    labels, cu = random_packed(rows, row_len, seed=rows * row_len, mean_len=mean, empty_every=7)
    t = torch.from_numpy(labels).to(dtype)
    got = ops.count_trainable(t, torch.from_numpy(cu))
    seq, row, total = reference_counts(labels, cu, rows)
    assert np.array_equal(got.per_sequence.numpy(), seq)
    assert np.array_equal(got.per_row.numpy(), row)
    assert got.total.item() == total
    assert got.per_sequence.dtype == torch.int32
    # flat labels: one row
    flat = ops.count_trainable(t.reshape(-1), torch.from_numpy(np.array([0, labels.size], np.int32)))
    assert flat.per_row.tolist() == [total]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_position_ids_cpu(dtype):
    _, cu = random_packed(3, 200, seed=5, empty_every=4)
    pos = ops.position_ids(torch.from_numpy(cu), int(cu[-1]), dtype)
    want = np.concatenate([np.arange(cu[i + 1] - cu[i]) for i in range(len(cu) - 1)])
    assert pos.dtype == dtype and np.array_equal(pos.numpy(), want)


def test_argument_checks():
    labels = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(KindredValueError, match="crosses a row boundary"):
        ops.count_trainable(labels, torch.tensor([0, 5, 12, 16], dtype=torch.int32))
    with pytest.raises(KindredValueError, match=r"cu_seqlens\[2\] must equal the number of tokens 16"):
        ops.count_trainable(labels, torch.tensor([0, 8, 15], dtype=torch.int32))
    with pytest.raises(KindredValueError, match="non-decreasing"):
        ops.count_trainable(labels, torch.tensor([0, 6, 5, 16], dtype=torch.int32))
    with pytest.raises(KindredValueError, match="cu_seqlens must be int32"):
        ops.count_trainable(labels, torch.tensor([0, 16], dtype=torch.int64))
    with pytest.raises(KindredValueError, match="labels must be int32 or int64"):
        ops.count_trainable(labels.float(), torch.tensor([0, 16], dtype=torch.int32))
    with pytest.raises(KindredValueError, match="must equal the number of tokens 10"):
        ops.position_ids(torch.tensor([0, 4, 8], dtype=torch.int32), 10)
    with pytest.raises(KindredValueError, match="dtype must be"):
        ops.position_ids(torch.tensor([0, 4], dtype=torch.int32), 4, torch.float32)
    with pytest.raises(KindredValueError, match="lengths\\[1\\] = 9"):
        ops.pack_bfd([3, 9], 8)


def test_ops_trace_under_torch_compile_fake_tensors():
    labels, cu = random_packed(2, 64, seed=1)
    args = (torch.from_numpy(labels), torch.from_numpy(cu))
    torch.library.opcheck(torch.ops.kindred.count_trainable.default, args)
    torch.library.opcheck(torch.ops.kindred.position_ids.default, (args[1], int(cu[-1]), torch.int64))


def brute_bfd_fills(lengths, cap):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    fills = []
    for i in order:
        best = None
        for r, f in enumerate(fills):
            if cap - f >= lengths[i] and (best is None or f > fills[best]):
                best = r
        if best is None:
            fills.append(0)
            best = len(fills) - 1
        fills[best] += lengths[i]
    return sorted(fills)


def _check_pack_bfd(case):
    cap, lengths = case
    row, start, rows = ops.pack_bfd(np.asarray(lengths, np.int32), cap)
    assert len(row) == len(lengths) == len(start)
    spans = {}
    for i, (r, s) in enumerate(
        zip(row.tolist(), start.tolist(), strict=True)
    ):  # every example once, in a row
        assert 0 <= r < rows
        spans.setdefault(r, []).append((s, s + lengths[i]))
    assert len(spans) == rows  # no empty rows
    fills = []
    for r, sp in spans.items():
        sp.sort()
        end = 0
        for a, b in sp:  # tiles the row from 0, no overlap
            assert a == end, (r, sp)
            end = b
        assert end <= cap  # never over the budget
        fills.append(end)
    assert sorted(fills) == brute_bfd_fills(lengths, cap)


if given is not None:

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(1, 300).flatmap(
            lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=120))
        )
    )
    def test_pack_bfd_properties(case):
        _check_pack_bfd(case)

else:

    @pytest.mark.skip(reason="needs hypothesis")
    def test_pack_bfd_properties():
        pass


def test_pack_bfd_accepts_torch_and_orders_longest_first():
    row, start, rows = ops.pack_bfd(torch.tensor([5, 3, 4, 2, 6, 1]), 8)
    assert rows == 3 and row.tolist() == [1, 1, 2, 0, 0, 2] and start.tolist() == [0, 5, 0, 6, 0, 4]


# ---------------------------------------------------------------------------------------------------------
# CUDA kernels against the CPU reference


def _gpu_case(labels: np.ndarray, cu: np.ndarray, dtype, offset: int = 0):
    t = torch.from_numpy(labels).to(dtype)
    if offset:  # an unaligned view: the same labels one element into a bigger buffer
        buf = torch.full((t.numel() + offset,), -100, dtype=dtype, device="cuda")
        buf[offset:] = t.reshape(-1).cuda()
        t_gpu = buf[offset:].view(t.shape)
    else:
        t_gpu = t.cuda()
    cu_t = torch.from_numpy(cu)
    cpu = ops.count_trainable(t, cu_t)
    gpu = ops.count_trainable(t_gpu, cu_t.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b.cpu())
    for pdt in (torch.int32, torch.int64):
        want = ops.position_ids(cu_t, int(cu[-1]), pdt)
        got = ops.position_ids(cu_t.cuda(), int(cu[-1]), pdt)
        assert torch.equal(want, got.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "rows,row_len,mean",
    [
        (1, 1, 1),
        (1, 17, 3),
        (3, 37, 5),
        (8, 8192, 500),
        (2, 65536, 20000),
        (64, 4096, 8),
        (1, 300_001, 300_001),
    ],
)
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_count_and_positions_match_cpu(dtype, rows, row_len, mean, offset):
    labels, cu = random_packed(rows, row_len, seed=rows + row_len + offset, mean_len=mean, empty_every=5)
    _gpu_case(labels, cu, dtype, offset)


@pytest.mark.gpu
def test_gpu_many_tiny_sequences_overflow_shared_memory():
    # one-token sequences: a 4096-token tile holds 4096 sequences, more than the kernel's shared-memory slice
    rows, row_len = 4, 8192
    labels = np.where(np.arange(rows * row_len).reshape(rows, row_len) % 3 == 0, 7, -100)
    cu = np.arange(rows * row_len + 1, dtype=np.int32)
    _gpu_case(labels, cu, torch.int64)


@pytest.mark.gpu
def test_gpu_counts_stay_on_device_without_sync():
    labels, cu = random_packed(16, 8192, seed=3, mean_len=700)
    t, c = torch.from_numpy(labels).cuda(), torch.from_numpy(cu).cuda()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # keep the stream busy: a host sync inside the op would wait for this
        counts = ops.count_trainable(t, c)
        assert not stream.query()  # the op returned while the stream is still busy
    stream.synchronize()
    assert counts.total.item() == int((labels != -100).sum())
