"""Qwen3 MoE against transformers' own Qwen3MoeForCausalLM: logits (both checkpoint layouts), packing, 4-bit
experts, the grouped GEMM's dX, the router's load-balancing loss, LoRA training and adapters through PEFT."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kindred import models
from kindred.errors import KindredFormatError, KindredValueError
from kindred.models.moe import ExpertWeight, apply_expert_lora, grouped_mm
from kindred.nn import apply_lora, save_adapter

from .model_helpers import MOE_CONFIGS, VOCAB, hf_model, random_ids, router_aux_loss_pair
from .tolerances import MODEL_BF16_REL_ERR, REL_ERR, rel_err

transformers = pytest.importorskip("transformers")
# transformers' own deprecation notices (is_gradient_checkpointing …) are not kindred's concern here.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

QWEN3_MOE = {"vocab_size": VOCAB, **MOE_CONFIGS["qwen3_moe"]}


def hf_moe(seed=0, **overrides):
    return hf_model("qwen3_moe", seed, **overrides)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """transformers' model and its directory (save_pretrained: the hub's per-expert tensors)."""
    path = tmp_path_factory.mktemp("qwen3_moe")
    hf = hf_moe()
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def kindred_moe(saved):
    return models.from_pretrained(saved[1], dtype=torch.float32)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 29)], ids=str)
def test_logits_equal_transformers(saved, kindred_moe, shape):
    hf, _ = saved
    ids = random_ids(shape, seed=shape[1])
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(kindred_moe(ids), ref) < REL_ERR[torch.float32]


def test_fused_v5_layout_loads_the_same(saved, kindred_moe, tmp_path):
    """transformers v5's in-memory layout (experts.gate_up_proj [E, 2I, H]) stored as is."""
    hf, path = saved
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    fused = models.from_pretrained(tmp_path, dtype=torch.float32)
    experts = fused.model.layers[0].mlp.experts
    assert torch.equal(
        experts.gate_up_proj.weight, kindred_moe.model.layers[0].mlp.experts.gate_up_proj.weight
    )
    ids = random_ids((1, 11), seed=2)
    assert torch.equal(fused(ids), kindred_moe(ids))


def test_config_reads_the_moe_fields(kindred_moe):
    c = kindred_moe.config
    assert (c.num_experts, c.experts_per_token, c.moe_intermediate_size) == (7, 3, 40)
    assert c.moe_layers == (True, False, True) and c.norm_topk_prob and c.qk_norm
    assert isinstance(kindred_moe.model.layers[1].mlp, models.decoder.MLP)
    hub = models.load_config(
        {**QWEN3_MOE, "num_experts": 128, "num_experts_per_tok": 8, "mlp_only_layers": []}
    )
    assert hub.num_experts == 128 and hub.moe_layers == (True,) * 3
    with pytest.raises(
        KindredValueError, match=r"num_experts_per_tok \(9\) must not exceed num_experts \(7\)"
    ):
        models.load_config({**QWEN3_MOE, "num_experts_per_tok": 9})
    with pytest.raises(KindredValueError, match="mlp_only_layers must list layer indices in"):
        models.load_config({**QWEN3_MOE, "mlp_only_layers": [3]})


def test_packed_sequences_equal_separate_runs(saved, kindred_moe):
    hf, _ = saved
    lengths = [9, 1, 14, 5]
    docs = [random_ids((1, n), seed=20 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = kindred_moe(torch.cat(docs, dim=1), cu_seqlens=cu)
    for i, doc in enumerate(docs):
        with torch.no_grad():
            assert rel_err(out[:, cu[i] : cu[i + 1]], hf(doc).logits) < REL_ERR[torch.float32]


@pytest.mark.parametrize("quant", ["nf4", "int4g"])
def test_4bit_experts_equal_their_dequantized_weights(tmp_path, quant):
    """The grouped path on 4-bit experts computes exactly what the dense experts they decode to compute."""
    hf_moe(moe_intermediate_size=32, intermediate_size=64).save_pretrained(tmp_path)  # INT4g: K % 32 == 0
    q = models.from_pretrained(tmp_path, quant=quant, dtype=torch.float32, group_size=32, blocksize=64)
    dense = models.from_pretrained(tmp_path, dtype=torch.float32)
    for layer_q, layer_d in zip(q.model.layers, dense.model.layers, strict=True):
        for name, module in layer_q.named_modules():
            if isinstance(module, ExpertWeight):
                assert module.quant == quant and module.weight is None
                target = layer_d.get_submodule(name)
                target.weight.data = module.dense(torch.float32).clone()
            elif hasattr(module, "dequantize"):  # Linear4bit
                layer_d.get_submodule(name).weight.data = module.dequantize(torch.float32)
    ids = random_ids((2, 13), seed=6)
    assert rel_err(q(ids), dense(ids)) < REL_ERR[torch.float32]


def test_grouped_gemm_dx_equals_autograd_reference():
    torch.manual_seed(0)
    e, n, k = 5, 24, 16
    w = torch.randn(e, n, k)
    weight = ExpertWeight(w.clone(), e)
    counts = torch.tensor([3, 0, 7, 1, 4])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), k, requires_grad=True)
    dy = torch.randn(x.shape[0], n)
    from kindred.models.moe import _ExpertsLinear

    _ExpertsLinear.apply(x, offsets, weight).backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    groups = torch.repeat_interleave(torch.arange(e), counts)
    ref = torch.einsum("tk,tnk->tn", x_ref, w[groups])
    ref.backward(dy)
    assert rel_err(_ExpertsLinear.apply(x, offsets, weight), ref) < 1e-6
    assert rel_err(x.grad, x_ref.grad) < 1e-6
    assert grouped_mm(x[:0], w.transpose(1, 2), torch.zeros(e, dtype=torch.int32)).shape == (0, n)


def test_router_aux_loss_equals_transformers(saved, kindred_moe):
    hf, _ = saved
    loss, ref = router_aux_loss_pair(hf, kindred_moe)
    assert rel_err(loss, ref) < 1e-6 and loss > 0
    assert kindred_moe.config.router_aux_loss_coef == hf.config.router_aux_loss_coef


def test_lora_training_lowers_the_loss_with_experts_adapted():
    model = models.from_config(QWEN3_MOE, quant="nf4", dtype=torch.float32, blocksize=64, seed=3)
    attn = apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8)
    experts = apply_expert_lora(model, r=4, alpha=8)
    assert len(attn) == 12 and experts == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 2) for p in ("gate_up_proj", "down_proj")
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * (12 + 4)
    model.train()
    ids = random_ids((2, 24), seed=9)
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    for _ in range(6):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss = loss + model.config.router_aux_loss_coef * model.router_aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    gate_up = model.model.layers[0].mlp.experts.lora["gate_up_proj"]
    assert gate_up.lora_B.abs().sum() > 0  # the expert adapters trained too


@pytest.mark.parametrize("experts", [False, True], ids=["attention", "attention+experts"])
def test_adapter_reloads_through_peft(saved, tmp_path, experts):
    peft = pytest.importorskip("peft")
    hf, path = saved
    model = models.from_pretrained(path, dtype=torch.float32)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8)
    if experts:
        apply_expert_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config.get("target_parameters") == (
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None
    )
    peft_model = peft.PeftModel.from_pretrained(hf_moe(), tmp_path / "adapter").eval()
    ids = random_ids((2, 15), seed=12)
    with torch.no_grad():
        ref = peft_model(ids).logits
        assert rel_err(hf(ids).logits, ref) > 1e-3  # the adapter changes the output
    assert rel_err(model(ids), ref) < REL_ERR[torch.float32]


def test_checkpoint_with_other_expert_count_names_the_tensors(saved, tmp_path):
    _, path = saved
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 8}))
    with pytest.raises(
        KindredFormatError,
        match=r"missing tensors: model\.layers\.0\.mlp\.experts\.7\.gate_proj\.weight \[40, 64\]",
    ):
        models.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 6}))
    with pytest.raises(
        KindredFormatError,
        match=r"model\.layers\.0\.mlp\.gate\.weight: checkpoint \[7, 64\] vs model \[6, 64\].*"
        r"unexpected tensors: model\.layers\.0\.mlp\.experts\.6\.down_proj\.weight",
    ):
        models.from_pretrained(tmp_path)


@pytest.mark.gpu
def test_cuda_grouped_gemm_forward_and_dx_match_the_reference():
    """torch._grouped_mm (bf16, Hopper) against a float32 per-row reference, forward and dX."""
    from kindred.models.moe import _ExpertsLinear

    g = torch.Generator().manual_seed(0)
    e, n, k = 6, 256, 128
    w = (torch.randn(e, n, k, generator=g) * 0.05).to(torch.bfloat16)
    counts = torch.tensor([37, 0, 5, 128, 1, 50])
    offsets = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(int(counts.sum()), k, generator=g).to(torch.bfloat16).cuda().requires_grad_(True)
    dy = torch.randn(x.shape[0], n, generator=g).to(torch.bfloat16).cuda()
    y = _ExpertsLinear.apply(x, offsets, ExpertWeight(w.cuda(), e))
    y.backward(dy)
    groups = torch.repeat_interleave(torch.arange(e), counts).cuda()
    ref = torch.einsum("tk,tnk->tn", x.detach().float(), w.cuda().float()[groups])
    dx_ref = torch.einsum("tn,tnk->tk", dy.float(), w.cuda().float()[groups])
    assert rel_err(y, ref) < REL_ERR[torch.bfloat16] and rel_err(x.grad, dx_ref) < REL_ERR[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_cuda_moe_matches_cpu(tmp_path, quant):
    """Both sides in bf16: against float32, a tiny random router flips the expert set of 4–9 % of the
    tokens (CPU bf16 against CPU float32 differs by as much as the GPU did, 0.093), so the float32 model is
    no reference here. The router is sharpened ×10 so that rounding order alone flips none."""
    hf = hf_moe(moe_intermediate_size=64, intermediate_size=128, hidden_size=128)
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(10)
    hf.save_pretrained(tmp_path)
    cpu = models.from_pretrained(tmp_path, quant=quant, dtype=torch.bfloat16, blocksize=64)
    gpu = models.from_pretrained(tmp_path, quant=quant, device="cuda", blocksize=64)  # bf16: grouped mm
    ids = random_ids((2, 40), seed=1)
    assert rel_err(gpu(ids.cuda()), cpu(ids)) < MODEL_BF16_REL_ERR
    gpu.train()
    apply_lora(gpu, ["q_proj", "v_proj"], r=16, alpha=16)
    apply_expert_lora(gpu, r=16, alpha=16)
    loss = gpu(ids.cuda()).float().logsumexp(-1).mean() + gpu.router_aux_loss()
    loss.backward()
    lora = gpu.model.layers[0].mlp.experts.lora["down_proj"]
    assert lora.lora_B.grad is not None and torch.isfinite(lora.lora_B.grad).all()
