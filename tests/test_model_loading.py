"""Loading model directories: quantize-on-load (NF4, INT4g), bitsandbytes checkpoints as stored, sharded
indexes, Gemma 3's multimodal layout, errors that name the tensors, and the streaming memory bound."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from kindred import models
from kindred.errors import KindredFormatError, KindredValueError
from kindred.nn import Linear4bit

from .model_helpers import FAMILY_CONFIGS, VOCAB, random_ids, saved_hf_model
from .tolerances import MODEL_BF16_REL_ERR, REL_ERR, rel_err

pytest.importorskip("transformers")


def _dense_twin(model_dir, quantized):
    """The dense float32 model whose linears hold exactly what `quantized`'s 4-bit linears stand for."""
    dense = models.from_pretrained(model_dir, dtype=torch.float32)
    for name, mod in quantized.named_modules():
        if isinstance(mod, Linear4bit):
            dense.get_submodule(name).weight.data.copy_(mod.dequantize(torch.float32))
    return dense


@pytest.mark.parametrize("name", ["llama3", "phi4", "gemma3"])
@pytest.mark.parametrize("quant", ["nf4", "int4g"])
def test_quantize_on_load(tmp_path, name, quant):
    saved_hf_model(name, tmp_path)
    model = models.from_pretrained(tmp_path, quant=quant, dtype=torch.float32, group_size=32)
    linears = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(linears) == 7 * model.config.num_layers
    assert all(m.quant_type == quant for m in linears)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the fused loss reads lm_head.weight densely
    ids = random_ids((2, 19), seed=1)
    assert rel_err(model(ids), _dense_twin(tmp_path, model)(ids)) < REL_ERR[torch.float32]


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    hf = saved_hf_model("qwen3", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = random_ids((1, 11))
    one = models.from_pretrained(tmp_path / "one", dtype=torch.float32)
    sharded = models.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    assert torch.equal(one(ids), sharded(ids))


def _rewrite(src, dst, edit, config_edit=None):
    """Copy a model directory, passing its tensors through edit(dict) and its config through config_edit."""
    dst.mkdir()
    tensors = edit(load_file(src / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(cfg) if config_edit else cfg))


def test_gemma3_multimodal_layout(tmp_path):
    """google/gemma-3-*-it store the text model under model.language_model (or language_model.model) next to
    a vision tower; kindred reads the language model and skips the rest."""
    saved_hf_model("gemma3", tmp_path / "text")

    def edit(t):
        out = {k.replace("model.", "model.language_model.", 1): v for k, v in t.items()}
        out["model.vision_tower.encoder.weight"] = torch.ones(3)
        out["model.multi_modal_projector.mm_input_projection_weight"] = torch.ones(2, 2)
        return out

    def config_edit(c):
        return {"model_type": "gemma3", "text_config": {**c, "model_type": "gemma3_text"}}

    _rewrite(tmp_path / "text", tmp_path / "mm", edit, config_edit)
    ids = random_ids((1, 13))
    text = models.from_pretrained(tmp_path / "text", dtype=torch.float32)
    assert torch.equal(models.from_pretrained(tmp_path / "mm", dtype=torch.float32)(ids), text(ids))


def _bnb_checkpoint(src, dst, fused=False):
    """A transformers-style *-bnb-4bit directory made with bitsandbytes itself from a saved model."""
    F = pytest.importorskip("bitsandbytes.functional")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets += ("qkv_proj", "gate_up_proj") if fused else ()
    dequantized = {}

    def edit(t):
        out = {}
        for k, v in t.items():
            if k.endswith(".weight") and k.rsplit(".", 2)[-2] in targets:
                packed, state = F.quantize_4bit(
                    v.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4"
                )
                dequantized[k] = F.dequantize_4bit(packed, state).float()
                out[k] = packed
                out.update({f"{k}.{s}": x for s, x in state.as_dict(packed=True).items()})
            else:
                out[k] = v.to(torch.bfloat16)
        return out

    def config_edit(c):
        return {**c, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}

    _rewrite(src, dst, edit, config_edit)
    return dequantized


def test_bitsandbytes_checkpoint_is_loaded_as_stored(tmp_path):
    # Rows are multiples of 64: bitsandbytes 0.50's CPU dequantize_4bit is wrong for other row lengths
    # (kindred reads those correctly; bitsandbytes' own reference is what does not hold there).
    saved_hf_model("llama3", tmp_path / "dense", intermediate_size=128)
    ref = _bnb_checkpoint(tmp_path / "dense", tmp_path / "bnb")
    model = models.from_pretrained(tmp_path / "bnb", dtype=torch.float32)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, Linear4bit) and q.quantized.double_quant
    for k, w in ref.items():  # bit for bit what bitsandbytes dequantizes (in the stored bfloat16)
        assert torch.equal(model.get_submodule(k[: -len(".weight")]).dequantize().float(), w), k
    ids = random_ids((1, 9))
    twin = _dense_twin(tmp_path / "dense", model)  # float32 norms and embeddings; the checkpoint's are bf16
    assert rel_err(model(ids), twin(ids)) < REL_ERR[torch.bfloat16]
    with pytest.raises(KindredValueError, match="bitsandbytes NF4 checkpoint; it loads as NF4"):
        models.from_pretrained(tmp_path / "bnb", quant="int4g")


def test_fused_bitsandbytes_phi_checkpoint_is_split(tmp_path):
    saved_hf_model("phi4", tmp_path / "dense", intermediate_size=128)
    ref = _bnb_checkpoint(tmp_path / "dense", tmp_path / "bnb", fused=True)
    model = models.from_pretrained(tmp_path / "bnb", dtype=torch.float32)
    rows = model.config.num_heads * model.config.head_dim
    q = model.model.layers[0].self_attn.q_proj.dequantize(torch.float32)
    fused = ref["model.layers.0.self_attn.qkv_proj.weight"][:rows]
    assert rel_err(q, fused) < 0.01  # re-quantized from the dequantized part: only the scales re-round


def test_fp4_checkpoint_is_refused_by_name(tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"] = torch.zeros(
            4, dtype=torch.uint8
        )
        return t

    with pytest.raises(
        KindredFormatError, match=r"up_proj\.weight\.quant_state\.bitsandbytes__fp4' is not NF4"
    ):
        models.from_pretrained(_edited(tmp_path, edit))


def _edited(tmp_path, edit, config_edit=None, name="llama3"):
    saved_hf_model(name, tmp_path / "ok")
    _rewrite(tmp_path / "ok", tmp_path / "bad", edit, config_edit)
    return tmp_path / "bad"


def test_missing_tensors_are_named(tmp_path):
    def edit(t):
        del t["model.layers.1.self_attn.k_proj.weight"], t["model.norm.weight"]
        return t

    with pytest.raises(
        KindredFormatError, match=r"missing tensors: .*model\.layers\.1\.self_attn\.k_proj\.weight"
    ):
        models.from_pretrained(_edited(tmp_path, edit))


def test_mismatched_shapes_are_named(tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:90].contiguous()
        return t

    with pytest.raises(
        KindredFormatError, match=r"up_proj\.weight: checkpoint \[90, 64\] vs model \[96, 64\]"
    ):
        models.from_pretrained(_edited(tmp_path, edit))


def test_fused_shape_mismatch_and_unexpected_tensors_are_named(tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(10, 64)
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        return t

    match = (
        r"qkv_proj\.weight: checkpoint \[10, 64\] vs model \[128, 64\].*unexpected tensors: .*extra\.weight"
    )
    with pytest.raises(KindredFormatError, match=match):
        models.from_pretrained(_edited(tmp_path, edit, name="phi4"))


def test_config_that_does_not_match_the_weights(tmp_path):
    def config_edit(c):
        return {**c, "num_hidden_layers": 3}

    path = _edited(tmp_path, lambda t: t, config_edit)
    with pytest.raises(KindredFormatError, match=r"missing tensors: model\.layers\.2\."):
        models.from_pretrained(path)


def test_bad_directories_and_arguments(tmp_path):
    with pytest.raises(KindredValueError, match="must be a model directory"):
        models.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KindredValueError, match=r"no config\.json"):
        models.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(
        json.dumps({**FAMILY_CONFIGS["llama3"], "vocab_size": VOCAB})
    )
    with pytest.raises(KindredFormatError, match=r"no model\.safetensors"):
        models.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(KindredFormatError, match="not a readable safetensors file"):
        models.from_pretrained(tmp_path / "empty")
    with pytest.raises(KindredValueError, match="quant must be one of"):
        models.from_pretrained(tmp_path / "empty", quant="int8")
    with pytest.raises(KindredValueError, match="dtype must be"):
        models.from_pretrained(tmp_path / "empty", dtype=torch.int8)


# Runs in a fresh interpreter: peak anonymous RSS (the safetensors mmap is file-backed and does not count)
# above the level after imports, sampled every ~0.2 ms while loading.
_PEAK_SCRIPT = """
import json, sys, threading, torch
from safetensors.torch import load_file
from kindred import models
from kindred.ops import quantize_nf4

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

def naive(path):  # a non-streaming loader: every dense tensor in memory (as torch.load gives), then quantize
    state = {k: v.clone() for k, v in load_file(path + "/model.safetensors").items()}
    return state, [quantize_nf4(w) for k, w in state.items() if k.endswith("proj.weight")]

with torch.device("meta"):  # imports torch._dynamo once (~70 MB of modules): not the loader's memory
    torch.nn.Embedding(2, 2)
base, peak, stop = rss(), [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss() - base)
        stop.wait(0.0002)
thread = threading.Thread(target=sample)
thread.start()
path, mode = sys.argv[1], sys.argv[2]
model = models.from_pretrained(path, quant="nf4") if mode == "stream" else naive(path)
stop.set()
thread.join()
print(json.dumps({"peak": max(peak[0], rss() - base)}))
"""


def _peak_load(path, mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path), mode], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.slow
def test_streaming_load_peak_memory_is_final_footprint_plus_a_layer(tmp_path):
    """Quantizing on load never holds the dense model: peak host memory stays under the final footprint
    plus two layers' dense weights, while loading everything first (the naive way) exceeds that bound."""
    cfg = dict(FAMILY_CONFIGS["llama3"], hidden_size=512, intermediate_size=1536, num_hidden_layers=12)
    cfg.update(num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
    model = models.from_config(cfg, dtype=torch.bfloat16, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    loaded = models.from_pretrained(tmp_path, quant="nf4")
    final = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()])
    bound = final + 2 * layer + 8 * 2**20  # + allocator and interpreter slack
    peak, naive = _peak_load(tmp_path, "stream"), _peak_load(tmp_path, "naive")
    mib = {k: round(v / 2**20, 1) for k, v in dict(dense=dense, final=final, peak=peak, naive=naive).items()}
    print(f"MiB: {mib}, bound {bound / 2**20:.1f}")
    assert peak < bound, mib
    assert naive > bound, mib  # the measurement does see a loader that materializes the dense model


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", "int4g"])
def test_cuda_quantize_on_load_peak_memory(tmp_path, quant):
    cfg = dict(FAMILY_CONFIGS["qwen3"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=8)
    cfg.update(num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=1024)
    src = models.from_config(cfg, seed=0)
    state = src.state_dict()
    if state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr():
        state.pop("lm_head.weight")  # tied: checkpoints store the embedding once, as transformers does
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    layer_bytes = sum(p.numel() * p.element_size() for p in src.model.layers[0].parameters())
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = models.from_pretrained(tmp_path, quant=quant, device="cuda")
    final = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < final + 2 * layer_bytes, (peak, final, layer_bytes)
    cpu = models.from_pretrained(tmp_path, quant=quant)
    ids = random_ids((1, 33), seed=2)
    # Whole bf16 models: each side rounds every layer's output, so the per-op bound grows with depth.
    assert rel_err(model(ids.cuda()), cpu(ids)) < MODEL_BF16_REL_ERR
