"""GGUF quantization (kindred.ops.quantize_gguf): byte-identical to gguf-py's numpy quantizers (F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and to llama.cpp's own reference quantizers run through llama-cpp-python (every
type, the k-quants included), on awkward data; round trips through kindred's dequantizer; bad input."""

import numpy as np
import pytest
import torch

from kindred import ops
from kindred.errors import KindredValueError

gguf = pytest.importorskip("gguf")

NUMPY_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
ALL_TYPES = (*NUMPY_TYPES, "Q4_K", "Q5_K", "Q6_K")
# Largest relative Frobenius error of a round trip on Gaussian rows (the formats' resolution, with margin).
ROUND_TRIP = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.01, "Q6_K": 0.02, "Q5_1": 0.05, "Q5_0": 0.05, "Q5_K": 0.05}
ROUND_TRIP |= {"Q4_1": 0.1, "Q4_0": 0.12, "Q4_K": 0.1}


def awkward(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows at scales from 1e-6 to 5e3, plus (where rows allow) an all-zero row, a constant row,
    an all-positive and an all-negative row, a zero block, one outlier and exact ties of magnitude."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-6, 1e-3, 1.0, 50.0, 5e3], size=(rows, 1))
    x = rng.standard_normal((rows, cols)) * scale
    special = [
        np.zeros(cols),
        np.full(cols, 0.37),
        np.abs(rng.standard_normal(cols)) + 2.0,
        -np.abs(rng.standard_normal(cols)) - 0.5,
    ]
    for i, row in enumerate(special[: max(0, rows - 1)]):
        x[i + 1 if rows > 1 else 0] = row
    x[0, :32] = 0.0  # one block of zeros
    x[0, 40] = min(6e4, 20 * float(np.abs(x[0]).max()))  # an outlier, within fp16 (llama.cpp refuses inf)
    x[-1, 64:96] = np.where(np.arange(32) % 2, 1.5, -1.5)  # ties: +-max within a block
    return x.astype(np.float32)


def quantize(x: np.ndarray, name: str) -> np.ndarray:
    return ops.quantize_gguf(torch.from_numpy(x), int(gguf.GGMLQuantizationType[name])).numpy()


@pytest.mark.parametrize("name", NUMPY_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 117])
def test_bit_exact_against_gguf_numpy(name, rows):
    x = awkward(rows, 96, seed=rows)
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    ref = np.ascontiguousarray(ref).view(np.uint8).reshape(rows, -1)
    np.testing.assert_array_equal(quantize(x, name), ref)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_bit_exact_against_llama_cpp(name, tmp_path):
    from .llama_reference import llama_blocks

    for rows in (1, 3, 117, 1500):  # 1500: 3,000 blocks, for the k-quants' per-lane branches of the fits
        x = awkward(rows, 512, seed=100 + rows)
        ref = llama_blocks(tmp_path, x, name)
        mine = quantize(x, name)
        assert mine.shape == ref.shape
        bad = np.nonzero((mine != ref).any(1))[0]
        assert bad.size == 0, f"{name}: rows {bad[:5].tolist()} of {rows} differ from llama.cpp"


@pytest.mark.parametrize("name", ALL_TYPES)
def test_round_trip_and_dtypes(name):
    type_id, elems, nbytes = ops.GGUF_BLOCK_TYPES[name]
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(3))
    blocks = ops.quantize_gguf(x, type_id)
    assert blocks.dtype == torch.uint8 and blocks.shape == (5, 768 // elems * nbytes)
    back = ops.dequantize_gguf(blocks, type_id, x.shape)
    assert ((back - x).norm() / x.norm()).item() < ROUND_TRIP[name]
    # 16-bit inputs quantize as their exact float32 values (llama.cpp converts F16 to F32 first)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        assert torch.equal(ops.quantize_gguf(low, type_id), ops.quantize_gguf(low.float(), type_id))


def test_bad_input():
    q4k = ops.GGUF_BLOCK_TYPES["Q4_K"][0]
    with pytest.raises(KindredValueError, match="ggml_type 99"):
        ops.quantize_gguf(torch.zeros(256), 99)
    with pytest.raises(KindredValueError, match="multiple of 256 for Q4_K"):
        ops.quantize_gguf(torch.zeros(4, 96), q4k)
    with pytest.raises(KindredValueError, match="float32, float16 or bfloat16"):
        ops.quantize_gguf(torch.zeros(256, dtype=torch.int32), q4k)
    x = torch.zeros(2, 256)
    x[1, 7] = float("nan")
    with pytest.raises(KindredValueError, match=r"non-finite value .* flat index 263"):
        ops.quantize_gguf(x, q4k)
