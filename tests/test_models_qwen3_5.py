"""Qwen3.5 (text) against transformers' own Qwen3_5ForCausalLM: gated DeltaNet linear attention (chunked,
against its token-by-token definition), gated full attention, packed documents restarting the recurrent
state, 4-bit loading, LoRA training and PEFT adapters."""

import pytest
import torch
import torch.nn.functional as F

from kindred import models
from kindred.errors import KindredValueError
from kindred.models.linear_attention import gated_delta_rule, gated_delta_rule_recurrent
from kindred.nn import apply_lora, save_adapter
from kindred.nn.linear4bit import Linear4bit

from .model_helpers import MOE_CONFIGS, VOCAB, hf_model, random_ids
from .tolerances import REL_ERR, rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

QWEN3_5 = {"vocab_size": VOCAB, **MOE_CONFIGS["qwen3_5"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5")
    hf = hf_model("qwen3_5")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def kindred_q35(saved):
    return models.from_pretrained(saved[1], dtype=torch.float32)


@pytest.mark.parametrize("shape", [(1, 1), (2, 29), (1, 150)], ids=str)  # 150: three chunks of 64
def test_logits_equal_transformers(saved, kindred_q35, shape):
    hf, _ = saved
    ids = random_ids(shape, seed=shape[1])
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(kindred_q35(ids), ref) < REL_ERR[torch.float32]


def test_config(kindred_q35):
    c = kindred_q35.config
    assert c.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert (
        c.rope.partial_rotary_factor == 0.25 and c.attn_output_gate and c.gemma_norm and not c.sandwich_norms
    )
    assert hasattr(kindred_q35.model.layers[0], "linear_attn") and hasattr(
        kindred_q35.model.layers[3], "self_attn"
    )
    multimodal = models.load_config(
        {"model_type": "qwen3_5", "text_config": QWEN3_5, "tie_word_embeddings": True}
    )
    assert multimodal.model_type == "qwen3_5_text" and multimodal.tie_word_embeddings
    with pytest.raises(KindredValueError, match=r"linear_num_value_heads \(3\) must be a multiple"):
        models.load_config({**QWEN3_5, "linear_num_value_heads": 3})


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_delta_rule_equals_the_recurrence(chunk):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 70, 2, 8, generator=g), torch.randn(2, 70, 2, 8, generator=g)
    v = torch.randn(2, 70, 4, 12, generator=g)
    decay, beta = -torch.rand(2, 70, 4, generator=g) * 2, torch.rand(2, 70, 4, generator=g)
    ref = gated_delta_rule_recurrent(q, k, v, decay, beta)
    assert rel_err(gated_delta_rule(q, k, v, decay, beta, chunk=chunk), ref) < 1e-5


def test_packed_documents_restart_the_state(saved, kindred_q35):
    hf, _ = saved
    lengths = [9, 1, 70, 5]
    docs = [random_ids((1, n), seed=40 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = kindred_q35(torch.cat(docs, dim=1), cu_seqlens=cu)
    for i, doc in enumerate(docs):
        with torch.no_grad():
            assert rel_err(out[:, cu[i] : cu[i + 1]], hf(doc).logits) < REL_ERR[torch.float32]
    with pytest.raises(KindredValueError, match="recurrent-state cache"):
        kindred_q35.generate(docs[0], max_new_tokens=2)


def test_4bit_quantizes_the_linear_attention_projections(saved):
    model = models.from_pretrained(saved[1], quant="nf4", dtype=torch.float32, blocksize=64)
    lin = model.model.layers[0].linear_attn
    assert isinstance(lin.in_proj_qkv, Linear4bit) and isinstance(lin.out_proj, Linear4bit)
    assert isinstance(lin.in_proj_a, torch.nn.Linear)  # one row per value head: kept dense
    assert torch.isfinite(model(random_ids((1, 9)))).all()


def test_lora_training_lowers_the_loss():
    model = models.from_config(QWEN3_5, quant="nf4", dtype=torch.float32, blocksize=64, seed=5)
    apply_lora(model, "all-linear", r=4, alpha=8)
    model.train()
    model.model.gradient_checkpointing = True
    ids = random_ids((2, 24), seed=9)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_adapter_reloads_through_peft(saved, tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = saved
    model = models.from_pretrained(path, dtype=torch.float32)
    names = apply_lora(model, "all-linear", r=4, alpha=8)
    assert any(n.endswith("linear_attn.in_proj_qkv") for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf_model("qwen3_5"), tmp_path / "adapter").eval()
    ids = random_ids((2, 15), seed=12)
    with torch.no_grad():
        ref = peft_model(ids).logits
        assert rel_err(hf(ids).logits, ref) > 1e-3
    assert rel_err(model(ids), ref) < REL_ERR[torch.float32]


@pytest.mark.gpu
def test_cuda_matches_cpu(saved):
    _, path = saved
    cpu = models.from_pretrained(path, dtype=torch.float32)
    gpu = models.from_pretrained(path, dtype=torch.float32, device="cuda")
    lengths = [70, 1, 130]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = random_ids((1, sum(lengths)), seed=2)
    assert rel_err(gpu(ids.cuda(), cu_seqlens=cu.cuda()), cpu(ids, cu_seqlens=cu)) < 5e-4
