"""gpt-oss against transformers' own GptOssForCausalLM: logits (sinks, alternating sliding / full attention,
YaRN, biased clamped-SwiGLU experts), MXFP4 checkpoints, generation, LoRA training and PEFT adapters."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kindred import models
from kindred.errors import KindredFormatError
from kindred.formats.mxfp4 import dequantize_mxfp4
from kindred.models.moe import apply_expert_lora
from kindred.nn import apply_lora, save_adapter

from .model_helpers import MOE_CONFIGS, VOCAB, hf_model, random_ids, router_aux_loss_pair
from .tolerances import REL_ERR, rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

GPT_OSS = {"vocab_size": VOCAB, **MOE_CONFIGS["gpt_oss"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    hf = hf_model("gpt_oss")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def kindred_oss(saved):
    return models.from_pretrained(saved[1], dtype=torch.float32)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 29)], ids=str)
def test_logits_equal_transformers(saved, kindred_oss, shape, backend):
    hf, _ = saved
    ids = random_ids(shape, seed=shape[1])
    with torch.no_grad():
        ref = hf(ids).logits
    kindred_oss.attn_backend = backend
    try:
        assert rel_err(kindred_oss(ids), ref) < REL_ERR[torch.float32]
    finally:
        kindred_oss.attn_backend = "auto"


def test_config_and_layout(kindred_oss):
    c = kindred_oss.config
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert c.rope.rope_type == "yarn" and c.rope.factor == 32.0 and not c.rope.truncate
    assert c.attention_sinks and c.gpt_oss_moe and c.attention_bias and c.moe_layers == (True,) * 3
    mlp = kindred_oss.model.layers[0].mlp
    assert mlp.router.bias is not None and mlp.experts.gate_up_proj.shape == (5, 128, 64)
    assert kindred_oss.model.layers[0].self_attn.sinks.shape == (4,)


def test_packed_sequences_equal_separate_runs(saved, kindred_oss):
    hf, _ = saved
    lengths = [9, 1, 14]
    docs = [random_ids((1, n), seed=30 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = kindred_oss(torch.cat(docs, dim=1), cu_seqlens=cu)
    for i, doc in enumerate(docs):
        with torch.no_grad():
            assert rel_err(out[:, cu[i] : cu[i + 1]], hf(doc).logits) < REL_ERR[torch.float32]


def test_greedy_generation_matches_transformers(saved, kindred_oss):
    hf, _ = saved
    prompt = random_ids((2, 5), seed=8)
    out = kindred_oss.generate(prompt, max_new_tokens=12, eos_token_id=[])
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)


def _mxfp4_checkpoint(hf, path, tmp_path):
    """hf's checkpoint with its experts replaced by random MXFP4 blocks and scales (the hub's gpt-oss layout);
    hf's experts set to what transformers' own MXFP4 decoder makes of them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for name, param in hf.named_parameters():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        e, k, n = param.shape  # transformers holds [E, in, out]; the blocks are [E, out, in / 32, 16]
        blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(118, 123, (e, n, k // 32), generator=g, dtype=torch.uint8)
        del tensors[name]
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    return tensors


def test_mxfp4_checkpoint_loads_dense_and_4bit(tmp_path):
    hf = hf_model("gpt_oss", seed=3)
    hf.save_pretrained(tmp_path / "bf16")
    tensors = _mxfp4_checkpoint(hf, tmp_path / "bf16", tmp_path)
    blocks = tensors["model.layers.0.mlp.experts.down_proj_blocks"]
    ours = dequantize_mxfp4(blocks, tensors["model.layers.0.mlp.experts.down_proj_scales"], torch.float32)
    assert torch.equal(
        ours.transpose(1, 2), hf.model.layers[0].mlp.experts.down_proj
    )  # transformers' decoder
    model = models.from_pretrained(tmp_path, dtype=torch.float32)
    ids = random_ids((2, 19), seed=4)
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(model(ids), ref) < REL_ERR[torch.float32]
    nf4 = models.from_pretrained(tmp_path, quant="nf4", dtype=torch.float32, blocksize=64)
    held = nf4.model.layers[0].mlp.experts.down_proj
    assert held.quant == "nf4" and held.weight is None
    assert rel_err(held.dense(torch.float32), ours) < 0.15  # NF4 of the decoded weights: a 4-bit error
    assert torch.isfinite(nf4(ids)).all()


def test_mxfp4_scales_missing_or_misshaped_are_named(saved, tmp_path):
    _, path = saved
    tensors = _mxfp4_checkpoint(hf_model("gpt_oss"), path, tmp_path)
    del tensors["model.layers.1.mlp.experts.gate_up_proj_scales"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        KindredFormatError,
        match=r"missing tensors: model\.layers\.1\.mlp\.experts\.gate_up_proj_scales \[5, 128, 2\]",
    ):
        models.from_pretrained(tmp_path)
    tensors["model.layers.1.mlp.experts.gate_up_proj_scales"] = torch.zeros(5, 128, 3, dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(KindredFormatError, match=r"gate_up_proj_scales: has shape \[5, 128, 3\], its blocks"):
        models.from_pretrained(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 4}))
    with pytest.raises(
        KindredFormatError, match=r"gate_up_proj_blocks: checkpoint \[5, 128, 2, 16\] vs model"
    ):
        models.from_pretrained(tmp_path)


def test_lora_training_lowers_the_loss():
    model = models.from_config(GPT_OSS, quant="nf4", dtype=torch.float32, blocksize=64, seed=2)
    apply_lora(model, "all-linear", r=4, alpha=8)
    apply_expert_lora(model, r=4, alpha=8)
    model.train()
    ids = random_ids((2, 20), seed=9)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss = loss + model.config.router_aux_loss_coef * model.router_aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_router_aux_loss_equals_transformers(saved, kindred_oss):
    hf, _ = saved
    loss, ref = router_aux_loss_pair(hf, kindred_oss)
    assert rel_err(loss, ref) < 1e-6


def test_adapter_reloads_through_peft(saved, tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = saved
    model = models.from_pretrained(path, dtype=torch.float32)
    apply_lora(model, "all-linear", r=4, alpha=8)
    apply_expert_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf_model("gpt_oss"), tmp_path / "adapter").eval()
    ids = random_ids((2, 15), seed=12)
    with torch.no_grad():
        ref = peft_model(ids).logits
        assert rel_err(hf(ids).logits, ref) > 1e-3
    assert rel_err(model(ids), ref) < REL_ERR[torch.float32]


@pytest.mark.gpu
def test_cuda_flex_sinks_match_cpu(saved):
    """FlexAttention's logsumexp form of the sinks (compiled, CUDA) against the explicit softmax (CPU)."""
    _, path = saved
    cpu = models.from_pretrained(path, dtype=torch.float32, attn_backend="sdpa")
    gpu = models.from_pretrained(path, dtype=torch.float32, device="cuda", attn_backend="flex")
    lengths = [70, 1, 130, 55]
    docs = [random_ids((1, n), seed=i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = torch.cat(docs, dim=1)
    assert rel_err(gpu(packed.cuda(), cu_seqlens=cu.cuda()), cpu(packed, cu_seqlens=cu)) < 5e-4
