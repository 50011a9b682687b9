"""llama.cpp itself as the reference for GGUF export: its llama_model_quantize (llama-cpp-python's ctypes
bindings) run on an F32 GGUF that the tests write, and the blocks it produced read back with gguf-py."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

# Pure file types whose every quantizable tensor gets one block type (llama_ftype_get_default_type).
PURE_FTYPE = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
}
MIX_FTYPE = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}


def quantize_file(src: Path, dst: Path, ftype: str, pure: bool = False) -> None:
    """llama-quantize ``src`` to ``dst`` with the llama.cpp file type named ``ftype`` (e.g. Q4_K_M)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, MIX_FTYPE.get(ftype) or PURE_FTYPE[ftype])
    params.pure = pure
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed on {src} ({rc})"


def llama_blocks(tmp_path: Path, x: np.ndarray, block_type: str) -> np.ndarray:
    """The bytes [rows, row_bytes] that llama.cpp's reference quantizer writes for ``x`` [rows, cols].

    ``x`` goes into a minimal llama-architecture F32 file as one 2-D weight (quantization reads only the
    header's hyperparameters), quantized with a pure file type of that block type. A single row is written
    twice (llama.cpp leaves 1-D tensors, which a [1, cols] one is to ggml, in F32); blocks are independent.
    """
    rows, cols = x.shape
    if rows == 1:
        return llama_blocks(tmp_path, np.concatenate([x, x]), block_type)[:1]
    src, dst = tmp_path / f"ref-{block_type}-f32.gguf", tmp_path / f"ref-{block_type}.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_context_length(64)
    w.add_embedding_length(cols)
    w.add_block_count(1)
    w.add_feed_forward_length(cols)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tensor("blk.0.attn_q.weight", np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    quantize_file(src, dst, block_type, pure=True)
    (t,) = [t for t in gguf.GGUFReader(str(dst)).tensors if t.name == "blk.0.attn_q.weight"]
    assert t.tensor_type.name == block_type, f"llama.cpp wrote {t.tensor_type.name}, expected {block_type}"
    return np.array(t.data).view(np.uint8).reshape(rows, -1)
