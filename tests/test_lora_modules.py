"""LoraLinear, apply_lora and the PEFT adapter format: against PEFT's own LoRA Linear, named adapters,
enable/disable, merge/unmerge over dense and 4-bit bases, and adapters moving both ways between kindred and
PEFT on a tiny seeded Llama."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import kindred
from kindred.errors import KindredFormatError, KindredValueError
from kindred.formats import read_adapter
from kindred.nn import Linear4bit, LoraLinear, apply_lora, load_adapter, merge_lora, save_adapter

from .helpers import randn
from .tolerances import rel_err

# transformers' own deprecation notices (is_gradient_checkpointing …) are not kindred's concern here.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def seeded_linear(k, n, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def randomize_b(module: LoraLinear, seed: int, adapter="default"):
    with torch.no_grad():
        module.lora_B[adapter].weight.copy_(randn(module.lora_B[adapter].weight.shape, seed=seed, scale=0.1))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("m", [1, 3, 117])
def test_matches_peft_lora_linear(m, rslora):
    peft_lora = pytest.importorskip("peft.tuners.lora")
    from peft import LoraConfig

    base = seeded_linear(48, 40)
    ours = LoraLinear(copy.deepcopy(base), r=8, alpha=16, rslora=rslora)
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=rslora)
    theirs = peft_lora.Linear(copy.deepcopy(base), "default", cfg, r=8, lora_alpha=16, use_rslora=rslora)
    randomize_b(ours, 1)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    assert theirs.scaling["default"] == ours.scaling["default"]
    x = randn((m, 48), seed=m, scale=1.0)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    dy = randn(yo.shape, seed=7, scale=1.0)
    yo.backward(dy)
    yt.backward(dy)
    assert rel_err(yo.detach(), yt.detach()) < 1e-5
    assert rel_err(xo.grad, xt.grad) < 1e-5
    for part in ("lora_A", "lora_B"):
        g_ours = getattr(ours, part)["default"].weight.grad
        g_theirs = getattr(theirs, part)["default"].weight.grad
        assert rel_err(g_ours, g_theirs) < 1e-5, part
    assert ours.base_layer.weight.grad is None


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_inference_path_and_row_adapter_match_peft(quant):
    """No gradients (a generate step): the base's kernel plus s·(x·Aᵀ)·Bᵀ, equal to PEFT's forward;
    row_adapter runs the adapter on the rows marked 1 and the base alone on those marked 0."""
    peft_lora = pytest.importorskip("peft.tuners.lora")
    from peft import LoraConfig

    base = seeded_linear(64, 40, seed=3)
    ours = LoraLinear(copy.deepcopy(base) if quant is None else Linear4bit.from_linear(base, quant), r=8)
    theirs = peft_lora.Linear(copy.deepcopy(base), "default", LoraConfig(r=8), r=8, lora_alpha=8)
    randomize_b(ours, 2)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
        if quant is not None:  # the same base weights: PEFT's over the dequantized 4-bit weight
            theirs.base_layer.weight.copy_(ours.base_layer.dequantize(torch.float32))
    x = randn((2, 5, 64), seed=4, scale=1.0)
    with torch.no_grad():
        y, ref = ours(x), theirs(x)
        assert rel_err(y, ref) < 1e-5
        mask = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
        ours.row_adapter = mask
        mixed = ours(x).reshape(10, 40)
        ours.row_adapter = None
        alone = theirs.base_layer(x).reshape(10, 40)
    want = torch.where(mask[:, None] > 0, ref.reshape(10, 40), alone)
    assert rel_err(mixed, want) < 1e-5
    ours.row_adapter = mask
    with pytest.raises(KindredValueError, match="row_adapter is for inference"):
        ours(x.requires_grad_())


def test_init_is_peft_s_and_only_a_b_train():
    layer = LoraLinear(seeded_linear(64, 32), r=4, alpha=8)
    b = layer.lora_B["default"].weight
    a = layer.lora_A["default"].weight
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
    assert float(a.detach().abs().max()) <= 1 / 8 + 1e-6  # kaiming_uniform(a=√5) bound is 1/√in_features
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A.default.weight",
        "lora_B.default.weight",
    }
    x = randn((5, 64), scale=1.0)
    with torch.no_grad():
        assert rel_err(layer(x), layer.base_layer(x)) < 1e-6  # B = 0: the adapter starts as a no-op


def test_named_adapters_enable_disable_merge_unmerge():
    layer = LoraLinear(seeded_linear(32, 24), r=4, alpha=8, adapter_name="one")
    layer.add_adapter("two", r=8, alpha=4, rslora=True)
    randomize_b(layer, 1, "one")
    randomize_b(layer, 2, "two")
    x = randn((7, 32), scale=1.0)
    w, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()

    def expected(name):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        return x @ w.T + bias + layer.scaling[name] * (x @ a.T) @ b.T

    with torch.no_grad():
        assert layer.active_adapter == "one" and rel_err(layer(x), expected("one")) < 1e-5
        layer.set_adapter("two")
        assert layer.scaling["two"] == 4 / 8**0.5
        assert rel_err(layer(x), expected("two")) < 1e-5
        layer.disable_adapters()
        assert torch.equal(layer(x), layer.base_layer(x))
        layer.enable_adapters()
        before = layer(x)
        merged = layer.merge()
        assert merged is layer.base_layer
        assert rel_err(layer(x), before) < 1e-5
        layer.unmerge()
        assert rel_err(layer.base_layer.weight, w) < 1e-6
    with pytest.raises(KindredValueError, match="no adapter named 'three'"):
        layer.set_adapter("three")
    with pytest.raises(KindredValueError, match="adapter 'one' already exists"):
        layer.add_adapter("one", 4, 8)
    with pytest.raises(KindredValueError, match="is active or merged"):
        layer.delete_adapter("two")
    layer.delete_adapter("one")
    assert sorted(layer.r) == ["two"] and "one" not in layer.lora_A


@pytest.mark.parametrize("quant", ["nf4", "int4g"])
def test_4bit_base_forward_and_merge(quant):
    base = Linear4bit.from_linear(seeded_linear(128, 48), quant=quant)
    layer = LoraLinear(base, r=8, alpha=16)
    randomize_b(layer, 3)
    x = randn((9, 128), scale=1.0)
    wq = base.dequantize(torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        ref = x @ wq.T + base.bias + 2.0 * (x @ a.T) @ b.T
        assert rel_err(layer(x), ref) < 1e-5
        packed = base.quantized.packed.clone()
        merged = layer.merge()
        # Merging into a 4-bit base gives a dense nn.Linear holding dequant(W) + s·B·A ...
        assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
        assert rel_err(merged.weight, wq + 2.0 * b @ a) < 1e-6
        assert rel_err(layer(x), ref) < 1e-5
        # ... and unmerging restores the 4-bit tensors exactly.
        layer.unmerge()
        assert layer.base_layer is base and torch.equal(base.quantized.packed, packed)
        # The module keeps the base's quantized tensors between calls: a load of other weights is seen.
        other = Linear4bit.from_linear(seeded_linear(128, 48, seed=5), quant=quant)
        base.load_state_dict(other.state_dict())
        ref = x @ other.dequantize(torch.float32).T + other.bias + 2.0 * (x @ a.T) @ b.T
        assert rel_err(layer(x), ref) < 1e-5


def test_apply_lora_targets_and_merge_lora():
    model = nn.Sequential(
        nn.ModuleDict({"q_proj": nn.Linear(16, 16), "v_proj": nn.Linear(16, 16), "norm": nn.LayerNorm(16)})
    )
    names = apply_lora(model, ["q_proj"], r=4, alpha=8)
    assert names == ["0.q_proj"] and isinstance(model[0]["q_proj"], LoraLinear)
    assert isinstance(model[0]["v_proj"], nn.Linear)
    assert apply_lora(model, r"0\.v_proj", r=2, alpha=2) == ["0.v_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"0.{m}.{p}.default.weight" for m in ("q_proj", "v_proj") for p in ("lora_A", "lora_B")
    }
    with pytest.raises(KindredValueError, match="no module of Sequential matches"):
        apply_lora(model, ["o_proj"])
    with pytest.raises(KindredValueError, match=r"0.norm: targets match a LayerNorm"):
        apply_lora(model, ["norm"])
    with pytest.raises(
        KindredValueError, match=r"0.q_proj: rank r must be an int in \[1, min\(in, out\) = 16\], got 17"
    ):
        apply_lora(model, ["q_proj"], r=17, adapter_name="big")
    with pytest.raises(KindredValueError, match=r"0.q_proj: rank r must be an int"):
        apply_lora(model, ["q_proj"], r=0, adapter_name="zero")
    randomize_b(model[0]["q_proj"], 4)
    x = randn((3, 16), scale=1.0)
    with torch.no_grad():
        before = model[0]["q_proj"](x)
        merge_lora(model)
        assert isinstance(model[0]["q_proj"], nn.Linear) and rel_err(model[0]["q_proj"](x), before) < 1e-5
    layer = LoraLinear(nn.Linear(16, 8), r=4)
    with pytest.raises(
        KindredValueError, match=r"LoraLinear: base has dtype torch.float32 but x has torch.float64"
    ):
        layer(torch.zeros(2, 16, dtype=torch.float64))


# ---- the PEFT format, both directions on a tiny seeded Llama --------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(hidden=32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_a_kindred_adapter(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    ours = copy.deepcopy(base)
    apply_lora(ours, TARGETS[:4], r=4, alpha=8, rslora=rslora)
    apply_lora(ours, ["down_proj"], r=2, alpha=3, rslora=rslora)  # a per-module rank and alpha
    for i, m in enumerate(kindred.nn.lora_modules(ours).values()):
        randomize_b(m, 10 + i)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is rslora
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 2)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    out_ours, out_theirs = logits(ours, ids), logits(theirs, ids)
    assert rel_err(out_ours, logits(base, ids)) > 1e-3  # the adapter changes the model
    assert rel_err(out_ours, out_theirs) < 1e-5


def test_kindred_loads_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=TARGETS,
        use_rslora=True,
        rank_pattern={"k_proj": 2},
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    names = load_adapter(ours, tmp_path)
    assert len(names) == 2 * len(TARGETS)
    assert ours.model.layers[0].self_attn.k_proj.r["default"] == 2
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    assert rel_err(logits(ours, ids), logits(theirs, ids)) < 1e-5
    # Round trip: kindred writes back what it read.
    save_adapter(ours, tmp_path / "again")
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "again")
    assert torch.equal(logits(again, ids), logits(ours, ids))


def test_adapters_for_another_base_are_refused(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(
        KindredFormatError, match=r"q_proj.lora_A.weight has shape \[4, 32\], the model's .*needs \[4, 48\]"
    ):
        load_adapter(tiny_llama(hidden=48), tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    renamed = {k.replace("q_proj", "query"): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(KindredFormatError, match=r"module 'model.layers.0.self_attn.query' .* another base"):
        load_adapter(copy.deepcopy(base), tmp_path / "a")
    only_v = {k: v for k, v in tensors.items() if "v_proj" in k}
    save_file(only_v, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(KindredFormatError, match=r"the config targets 'model.layers.0.self_attn.q_proj'"):
        load_adapter(copy.deepcopy(base), tmp_path / "a")
    half = {k: v for k, v in tensors.items() if "lora_B" not in k}
    save_file(half, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(KindredFormatError, match=r"has no lora_B.weight"):
        read_adapter(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(KindredFormatError, match="use_dora=True is not supported"):
        read_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(KindredFormatError, match="peft_type must be 'LORA'"):
        read_adapter(tmp_path / "a")
    with pytest.raises(KindredFormatError, match=r"no adapter_config.json"):
        read_adapter(tmp_path / "missing")
    with pytest.raises(KindredValueError, match="no LoRA module with an adapter named 'other'"):
        save_adapter(model, tmp_path / "b", adapter_name="other")


# ---- CUDA: the module's workspace path ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "nf4", "int4g"])
def test_cuda_module_matches_cpu(quant):
    cpu_base = seeded_linear(256, 512, dtype=torch.bfloat16)
    base = Linear4bit.from_linear(cpu_base, quant=quant) if quant else cpu_base
    cpu = LoraLinear(base, r=16, alpha=32)
    randomize_b(cpu, 8)
    with torch.no_grad():
        cpu.lora_B["default"].weight.copy_(cpu.lora_B["default"].weight.bfloat16())
        cpu(randn((3, 256), torch.bfloat16))  # a call before the move: nothing of it may stay on the CPU
    gpu = copy.deepcopy(cpu).cuda()
    x = randn((2, 65, 256), torch.bfloat16, scale=1.0)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    dy = randn(yc.shape, torch.bfloat16, seed=3, scale=1.0)
    yc.backward(dy)
    yg.backward(dy.cuda())
    assert rel_err(yg.detach(), yc.detach()) < 1e-2 and rel_err(xg.grad, xc.grad) < 1e-2
    for part in ("lora_A", "lora_B"):
        assert (
            rel_err(getattr(gpu, part)["default"].weight.grad, getattr(cpu, part)["default"].weight.grad)
            < 1e-2
        )
    if quant is None:
        # The dense base lives in the module's [W | B] workspace; its state dict stays contiguous and equal.
        assert gpu._workspace is not None
        assert gpu.base_layer.weight.data_ptr() == gpu._workspace.data_ptr()
        sd = gpu.state_dict()
        assert sd["base_layer.weight"].is_contiguous()
        assert torch.equal(sd["base_layer.weight"].cpu(), cpu.base_layer.weight)
