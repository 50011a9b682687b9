"""Merged export and adapters for other tools, per family (Gemma 3 multimodal and Phi's fused linears
included): transformers loads the merged folder and PEFT the adapter, and both give kindred's logits."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from kindred import models
from kindred.errors import KindredFormatError, KindredValueError
from kindred.export import merge_adapter, save_merged
from kindred.export.merged import QUANTIZED_BASE_WARNING
from kindred.nn import load_adapter, save_adapter

from .export_helpers import EXPORT_FAMILIES, hf_logits, load_hf, saved_base, with_lora
from .model_helpers import random_ids
from .tolerances import REL_ERR, rel_err

pytest.importorskip("transformers")
FP32 = REL_ERR[torch.float32]


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=EXPORT_FAMILIES)
def family(request, tmp_path_factory):
    """(name, base folder, transformers' base, kindred model with LoRA, its logits on ids, ids)."""
    name = request.param
    base = tmp_path_factory.mktemp(name) / "base"
    hf = saved_base(name, base)
    model = with_lora(base)
    ids = random_ids((2, 13), seed=1)
    with torch.no_grad():
        ref = model(ids)
    assert rel_err(hf_logits(hf, ids), ref) > 0.05  # the adapter changes the model
    return name, base, hf, model, ref, ids


def test_transformers_loads_the_merged_folder(family, tmp_path):
    name, base, _, model, ref, ids = family
    hf_config = json.loads((base / "config.json").read_text())
    out = save_merged(model, hf_config, tmp_path / "merged", base=base, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert rel_err(hf_logits(load_hf(out, name), ids), ref) < FP32
    # The checkpoint's own layout: the same tensor names; what no adapter touches is carried bit for bit.
    before, after = _tensors(base), _tensors(out)
    assert set(before) == set(after)
    touched = [k for k in before if not torch.equal(before[k], after[k])]
    assert touched and all(k.endswith("_proj.weight") for k in touched)
    if name == "gemma3_mm":
        assert any(k.startswith("vision_tower.") for k in before)
        assert not any("vision_tower" in k or "multi_modal_projector" in k for k in touched)
    gen = json.loads((out / "generation_config.json").read_text())
    assert set(models.load_config(out).eos_token_ids) <= set(gen["eos_token_id"])
    # kindred reads it back as the same model
    again = models.from_pretrained(out, dtype=torch.float32)
    assert rel_err(again(ids), ref) < FP32


@pytest.mark.gpu
def test_a_model_on_cuda_merges_onto_its_host_base(family, tmp_path):
    # The adapters live on the GPU, the base tensors are read from the folder on the host (the bake-off's
    # export of a winner trained on CUDA).
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    name, base, _, model, ref, ids = family
    on_gpu = copy.deepcopy(model).to("cuda")
    out = save_merged(on_gpu, json.loads((base / "config.json").read_text()), tmp_path / "merged", base=base)
    assert rel_err(hf_logits(load_hf(out, name), ids), ref) < FP32


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_applies_every_module_of_the_adapter(family, tmp_path):
    import peft

    name, base, hf, model, ref, ids = family
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(adapter))
    applied = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}
    per_layer = 4 if name == "phi4" else 7  # Phi: qkv_proj, o_proj, gate_up_proj, down_proj
    assert len(applied) == per_layer * model.config.num_layers
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in applied.values())
    assert not any("vision_tower" in n for n in applied)
    assert rel_err(hf_logits(theirs, ids), ref) < FP32
    # ... and merging the adapter file onto the base, without the model, gives the same weights
    merged = merge_adapter(adapter, base, tmp_path / "from_files")
    assert rel_err(hf_logits(load_hf(merged, name), ids), ref) < FP32


def test_phi_fused_adapter_is_exact_and_round_trips(tmp_path):
    base = tmp_path / "base"
    saved_base("phi4", base)
    model = with_lora(base)
    adapter = save_adapter(model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    qkv = "base_model.model.model.layers.0.self_attn.qkv_proj"
    assert config["rank_pattern"]["qkv_proj"] == 12 and config["rank_pattern"]["gate_up_proj"] == 8
    assert config["alpha_pattern"]["qkv_proj"] == 24  # scaling 24 / 12 = the parts' 8 / 4
    b = tensors[f"{qkv}.lora_B.weight"]
    assert b.shape == (64 + 2 * 32, 12) and torch.count_nonzero(b[:64, 4:]) == 0  # block-diagonal
    again = models.from_pretrained(base, dtype=torch.float32)
    names = load_adapter(again, adapter)
    assert len(names) == 7 * again.config.num_layers
    assert again.model.layers[0].self_attn.k_proj.r["default"] == 4  # the zero blocks are dropped
    ids = random_ids((1, 11), seed=4)
    assert rel_err(again(ids), model(ids)) < FP32


def test_gemma3_multimodal_adapter_round_trips(tmp_path):
    base = tmp_path / "base"
    saved_base("gemma3_mm", base)
    model = with_lora(base)
    adapter = save_adapter(model, tmp_path / "adapter")
    keys = load_file(adapter / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    again = models.from_pretrained(base, dtype=torch.float32)
    load_adapter(again, adapter)
    ids = random_ids((1, 9), seed=2)
    with torch.no_grad():  # both through LoRA's inference path (a trainable A takes the training path)
        assert torch.equal(again(ids), model(ids))


def test_adapter_saves_its_tokenizer(tmp_path):
    from kindred.data import load_tokenizer
    from kindred.demo import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny")
    model = with_lora(folder)
    adapter = save_adapter(
        model, tmp_path / "adapter", base_model_name_or_path=str(folder), tokenizer=load_tokenizer(folder)
    )
    assert (adapter / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_merge_onto_the_quantized_base_only_when_asked(tmp_path):
    base = tmp_path / "base"
    saved_base("llama3", base)
    model = with_lora(base, quant="nf4")
    cfg = json.loads((base / "config.json").read_text())
    with pytest.raises(KindredValueError, match="allow_quantized_base"):
        save_merged(model, cfg, tmp_path / "no", base=base, onto="nf4")
    assert not (tmp_path / "no").exists()
    with pytest.warns(UserWarning, match="dequantized 4-bit"):
        out = save_merged(model, cfg, tmp_path / "nf4", base=base, onto="nf4", allow_quantized_base=True)
    ids = random_ids((2, 10), seed=5)
    # exactly what the adapter was trained against: kindred's NF4 model with its LoRA
    assert rel_err(hf_logits(load_hf(out, "llama3"), ids), model(ids)) < FP32
    assert QUANTIZED_BASE_WARNING.startswith("merging onto dequantized 4-bit")
    # a model held in 4 bits without its 16-bit folder: refused unless allowed
    with pytest.raises(KindredValueError, match="16-bit base folder"):
        save_merged(model, cfg, tmp_path / "mem", base=None)


def test_bad_input_is_refused_before_work(tmp_path):
    base = tmp_path / "base"
    saved_base("llama3", base)
    model = with_lora(base)
    adapter = save_adapter(model, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    with pytest.raises(KindredValueError, match="exists; pass --overwrite"):
        merge_adapter(adapter, base, tmp_path / "taken")
    other = tmp_path / "other"
    saved_base("qwen3", other)
    with pytest.raises(KindredFormatError, match="another base"):
        merge_adapter(adapter, other, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(KindredValueError, match="not a model folder"):
        merge_adapter(adapter, tmp_path / "nothing", tmp_path / "out")


def test_bitsandbytes_base_merges_only_when_allowed(tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    saved_base("llama3", base)
    quantized = models.from_pretrained(base, quant="nf4", dtype=torch.float32)
    bnb = tmp_path / "bnb"  # a *-bnb-4bit folder: kindred's Linear4bit state dict is bitsandbytes' layout
    bnb.mkdir()
    tensors = {k: v.clone().contiguous() for k, v in quantized.state_dict().items()}
    save_file(tensors, bnb / "model.safetensors")
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (bnb / "config.json").write_text(json.dumps(cfg))
    model = with_lora(bnb)
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(KindredValueError, match="bitsandbytes 4-bit checkpoint has no 16-bit weights"):
        merge_adapter(adapter, bnb, tmp_path / "no")
    with pytest.warns(UserWarning, match="dequantized 4-bit"):
        out = merge_adapter(adapter, bnb, tmp_path / "merged", allow_quantized_base=True)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = random_ids((2, 10), seed=6)
    assert rel_err(hf_logits(load_hf(out, "llama3"), ids), model(ids)) < FP32
