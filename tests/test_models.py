"""kindred's decoder against transformers' own models (every family, tiny random weights saved with
save_pretrained and loaded back through kindred's loader), packed sequences, sliding windows, generation."""

import pytest
import torch

from kindred import models
from kindred.errors import KindredValueError

from .model_helpers import FAMILY_CONFIGS, VOCAB, random_ids, saved_hf_model
from .tolerances import MODEL_BF16_REL_ERR, REL_ERR, rel_err

pytest.importorskip("transformers")

BACKENDS = ["sdpa", "flex"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """(transformers model, kindred model in float32) per family, built once per module."""
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            hf = saved_hf_model(name, path)
            built[name] = (hf, models.from_pretrained(path, dtype=torch.float32))
        return built[name]

    return get


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 29)], ids=str)
def test_logits_equal_transformers(family, name, shape):
    hf, model = family(name)
    ids = random_ids(shape, seed=shape[1])
    with torch.no_grad():
        ref = hf(ids).logits
    out = model(ids)
    assert out.shape == (*shape, VOCAB) and out.dtype == torch.float32
    assert rel_err(out, ref) < REL_ERR[torch.float32]


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_hidden_states_and_lm_head(family, name):
    hf, model = family(name)
    ids = random_ids((1, 17), seed=5)
    with torch.no_grad():
        ref = hf.model(ids).last_hidden_state
    hidden = model(ids, return_hidden=True)
    assert rel_err(hidden, ref) < REL_ERR[torch.float32]
    assert torch.equal(model.logits(hidden), model(ids))
    assert model.lm_head.weight.shape == (VOCAB, model.config.hidden_size)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_same_linear_names_for_every_family(family):
    """Phi's fused qkv_proj / gate_up_proj come out split: LoRA targets are the same seven everywhere."""
    for name in FAMILY_CONFIGS:
        _, model = family(name)
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert leaves == {*models.LINEAR_NAMES, "lm_head"}, name
        assert not any(p.requires_grad for p in model.parameters())


def test_phi_fused_weights_are_split_in_order(family):
    hf, model = family("phi4")
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    q, k, v = (
        model.model.layers[1].self_attn.get_submodule(p).weight for p in ("q_proj", "k_proj", "v_proj")
    )
    assert torch.equal(torch.cat([q, k, v]), attn.qkv_proj.weight)
    gate, up = model.model.layers[1].mlp.gate_proj.weight, model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(torch.cat([gate, up]), mlp.gate_up_proj.weight)


@pytest.mark.parametrize("length", [12, 40], ids=["short_factor", "long_factor"])
def test_longrope_switches_factors_like_transformers(family, length):
    hf, model = family("phi4_mini")  # original context 16: length 40 uses the long factors
    ids = random_ids((1, length), seed=length)
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(model(ids), ref) < REL_ERR[torch.float32]


def test_bfloat16_against_float64_reference(tmp_path):
    hf = saved_hf_model("gemma3", tmp_path).double()
    model = models.from_pretrained(tmp_path)  # bfloat16 by default
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = random_ids((2, 29), seed=3)
    with torch.no_grad():
        ref = hf(ids).logits
    out = model(ids)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2 * REL_ERR[torch.bfloat16]  # two layers of bf16 rounding


def _packed(lengths, seed):
    docs = [random_ids((1, n), seed=seed + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return docs, torch.cat(docs, dim=1), cu


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_equal_separate_runs(family, name, backend):
    hf, model = family(name)
    model.attn_backend = backend
    try:
        docs, packed, cu = _packed([9, 1, 14, 5], seed=11)
        out = model(packed, cu_seqlens=cu)
        for i, doc in enumerate(docs):
            part = out[:, cu[i] : cu[i + 1]]
            assert rel_err(part, model(doc)) < REL_ERR[torch.float32]
            with torch.no_grad():
                assert rel_err(part, hf(doc).logits) < REL_ERR[torch.float32]
    finally:
        model.attn_backend = "auto"


@pytest.mark.parametrize("window", [None, 4])
def test_cpu_packed_attention_runs_per_document_as_the_document_mask(window):
    """The CPU splits packed documents (Σ len² work); the same as one [T, T] product under the mask."""
    from kindred.models.attention import AttentionContext, attend, document_ids

    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 9, 10, 24, 29])
    q = torch.randn(1, 4, 29, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 29, 8, generator=g, requires_grad=True) for _ in range(2))
    doc = document_ids(cu, 29)
    split = attend(q, k, v, AttentionContext(29, 0, q.device, doc, cu_seqlens=cu), window, 0.3)
    dense = attend(q, k, v, AttentionContext(29, 0, q.device, doc), window, 0.3)
    assert rel_err(split, dense) < REL_ERR[torch.float32]
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (split, dense)]
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < REL_ERR[torch.float32]


def test_explicit_position_ids_with_cu_seqlens(family):
    _, model = family("llama3")
    docs, packed, cu = _packed([6, 10], seed=2)
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None]
    assert torch.equal(model(packed, position_ids=pos, cu_seqlens=cu), model(packed, cu_seqlens=cu))
    # Without cu_seqlens, the second document would see the first: the outputs differ.
    assert not torch.allclose(model(packed, position_ids=pos)[:, 6:], model(docs[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_is_honoured(tmp_path, backend):
    """In a one-layer all-sliding model, token t sees exactly tokens t - window + 1 .. t."""
    saved_hf_model("mistral_window", tmp_path, num_hidden_layers=1)
    model = models.from_pretrained(tmp_path, dtype=torch.float32, attn_backend=backend)
    window = model.config.sliding_window
    ids = random_ids((1, 24), seed=4)
    base = model(ids)
    t = 20
    far, near = ids.clone(), ids.clone()
    far[0, t - window] = (far[0, t - window] + 1) % VOCAB  # just outside the window of token t
    near[0, t - window + 1] = (near[0, t - window + 1] + 1) % VOCAB  # the oldest token inside it
    assert torch.equal(model(far)[0, t], base[0, t])
    assert not torch.allclose(model(near)[0, t], base[0, t])


def test_gemma_layer_kinds_and_local_rope(family):
    _, model = family("gemma3")
    assert model.config.layer_types == ("sliding_attention", "full_attention") * 2
    assert [layer.self_attn.window for layer in model.model.layers] == [6, None, 6, None]
    assert model.config.rope_local.theta == 10000.0 and model.config.rope.rope_type == "linear"
    assert model.config.attn_scale == 20**-0.5 and model.config.embed_scale == 8.0


@pytest.mark.parametrize("name", ["llama3", "gemma3", "phi4_mini", "mistral_window"])
def test_greedy_generation_matches_transformers(family, name):
    hf, model = family(name)
    prompt = random_ids((2, 5), seed=8)
    out = model.generate(prompt, max_new_tokens=20)  # stops at the config's eos, as transformers does
    eos = model.config.eos_token_id
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=eos)  # pads like kindred
    assert torch.equal(out, ref[:, : out.shape[1]]) and (ref[:, out.shape[1] :] == eos).all()


def test_generation_cache_matches_full_recompute(family):
    _, model = family("gemma3")  # windows of 6 over 25 tokens: the cache mask must slide too
    ids = random_ids((1, 4), seed=9)
    out = model.generate(ids, max_new_tokens=21, eos_token_id=[])
    seq = ids
    for _ in range(21):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generation_stops_at_eos_and_samples_reproducibly(family):
    _, model = family("llama3")
    ids = random_ids((2, 3), seed=1)
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    eos = int(greedy[0, 4])  # the second token row 0 generates
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
    assert out[0, 4] == eos and (out[0, 4:] == eos).all()
    assert out.shape[1] <= 9
    kw = dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=[])
    a = model.generate(ids, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(ids, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b) and a.shape == (2, 11)


def test_from_config_builds_every_family_and_quantizes():
    for name, cfg in FAMILY_CONFIGS.items():
        quant = "int4g" if cfg["hidden_size"] % 32 == 0 and cfg["intermediate_size"] % 32 == 0 else "nf4"
        model = models.from_config({**cfg, "vocab_size": VOCAB}, quant=quant, group_size=32, seed=1)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        out = model(random_ids((1, 7)))
        assert out.shape == (1, 7, VOCAB) and torch.isfinite(out.float()).all(), name
    with pytest.raises(
        KindredValueError, match=r"q_proj: cannot quantize to int4g: .* multiple of group_size 32"
    ):
        models.from_config(
            {**FAMILY_CONFIGS["smollm2_tied"], "vocab_size": VOCAB}, quant="int4g", group_size=32
        )
    a = models.from_config({**FAMILY_CONFIGS["qwen3"], "vocab_size": VOCAB}, dtype=torch.float32, seed=4)
    b = models.from_config({**FAMILY_CONFIGS["qwen3"], "vocab_size": VOCAB}, dtype=torch.float32, seed=4)
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, b.model.layers[1].mlp.up_proj.weight)


def test_v4_style_gemma_config_reads_like_v5():
    v4 = {
        "model_type": "gemma3",
        "text_config": {
            **{k: v for k, v in FAMILY_CONFIGS["gemma3"].items() if k != "model_type"},
            "vocab_size": VOCAB,
        },
    }
    cfg = models.load_config(v4)
    assert cfg.model_type == "gemma3_text" and cfg.tie_word_embeddings
    assert cfg.rope.theta == 1e6 and cfg.rope.factor == 8.0 and cfg.rope_local.rope_type == "default"
    assert cfg.layer_types[:2] == ("sliding_attention", "full_attention")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_size": None}, "missing required key 'hidden_size'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3"}}, "needs a 'factor'"),
        ({"layer_types": ["full_attention"]}, "layer_types must list"),
        ({"intermediate_size": -4}, "'intermediate_size' must be a positive integer"),
    ],
)
def test_bad_configs_name_the_key(change, match):
    cfg = {**FAMILY_CONFIGS["llama3"], "vocab_size": VOCAB, **change}
    with pytest.raises(KindredValueError, match=match):
        models.load_config(cfg)


def test_bad_forward_arguments_are_named(family):
    _, model = family("llama3")
    ids = random_ids((1, 8))
    with pytest.raises(KindredValueError, match="input_ids must be a 2-D"):
        model(ids[0])
    with pytest.raises(KindredValueError, match="input_ids must hold integer"):
        model(ids.float())
    with pytest.raises(KindredValueError, match="position_ids must have shape"):
        model(ids, position_ids=torch.arange(7)[None])
    with pytest.raises(KindredValueError, match="cu_seqlens must rise from 0"):
        model(ids, cu_seqlens=torch.tensor([0, 5, 7]))
    with pytest.raises(KindredValueError, match="input_ids must be \\[1, T\\]"):
        model(random_ids((2, 8)), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(KindredValueError, match=r"max_seqlen must be an integer in \[1, 8\], got 9"):
        model(ids, cu_seqlens=torch.tensor([0, 8]), max_seqlen=9)
    with pytest.raises(KindredValueError, match="cu_seqlens must be int32 or int64"):
        model(ids, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(KindredValueError, match="attn_backend must be one of"):
        models.DecoderLM(model.config, attn_backend="xformers")
    with pytest.raises(KindredValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=-1)
    with pytest.raises(KindredValueError, match="top_p"):
        model.generate(ids, max_new_tokens=1, temperature=1.0, top_p=1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama3", "gemma3", "phi4_mini"])
def test_cuda_flex_packed_matches_cpu(tmp_path, name):
    saved_hf_model(name, tmp_path)
    cpu = models.from_pretrained(tmp_path, dtype=torch.float32)
    gpu = models.from_pretrained(tmp_path, dtype=torch.float32, device="cuda")
    _, packed, cu = _packed([70, 1, 130, 55], seed=1)
    ref = cpu(packed, cu_seqlens=cu)
    for backend in BACKENDS:
        gpu.attn_backend = backend
        out = gpu(packed.cuda(), cu_seqlens=cu.cuda())
        assert rel_err(out, ref) < 5e-4, backend  # tf32 / fused-kernel reassociation


@pytest.mark.gpu
def test_cuda_bf16_generation_runs(tmp_path):
    saved_hf_model("gemma3", tmp_path)
    model = models.from_pretrained(tmp_path, quant="nf4", device="cuda")
    cpu = models.from_pretrained(tmp_path, quant="nf4")
    prompt = random_ids((1, 5))
    out = model.generate(prompt.cuda(), max_new_tokens=12, eos_token_id=[])
    assert out.shape == (1, 17) and out.is_cuda
    assert rel_err(model(out), cpu(out.cpu())) < MODEL_BF16_REL_ERR


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = {**FAMILY_CONFIGS["gemma3"], "vocab_size": VOCAB}
    model = models.from_config(cfg, quant="nf4", dtype=torch.float32, seed=2)
    model.train()
    norm = model.model.layers[0].post_feedforward_layernorm.weight
    norm.requires_grad_(True)
    _, packed, cu = _packed([9, 14], seed=3)
    grads = []
    for ckpt in (False, True):
        model.model.gradient_checkpointing = ckpt
        norm.grad = None
        model(packed, cu_seqlens=cu).logsumexp(-1).mean().backward()
        grads.append(norm.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_qwen3_vl_text_decoder_equals_transformers_and_keeps_the_vision_tower_aside(tmp_path):
    """Qwen3-VL's language model on text alone (M-RoPE with equal positions on its three sections)."""
    transformers = pytest.importorskip("transformers")
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 4, 4]},
    )
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0], num_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision)
    hf = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.model_type == "qwen3" and model.config.qk_norm
    ids = random_ids((2, 29), seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert rel_err(model(ids), ref) < REL_ERR[torch.float32]
    visual = {n for n in hf.state_dict() if n.startswith("model.visual.")}
    assert set(model.kept_aside) == visual and all(
        f.endswith(".safetensors") for f in model.kept_aside.values()
    )


def test_backend_choice():
    """auto: varlen on CUDA where a mask is needed and the layers allow it, else flex; sdpa on the CPU, with
    no mask, and for cached decoding; an explicit varlen the caller cannot take falls back as auto does."""
    from kindred.models.attention import HAVE_FLEX, pick_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    flex = "flex" if HAVE_FLEX else "sdpa"
    assert pick_backend("auto", cuda, True, False, varlen=None) == "varlen"
    assert pick_backend("auto", cuda, True, False, varlen="sinks") == flex
    assert pick_backend("auto", cuda, True, False) == flex  # a caller that does not pass varlen
    assert pick_backend("auto", cuda, False, False, varlen=None) == "sdpa"
    assert pick_backend("auto", cpu, True, False, varlen=None) == "sdpa"
    assert pick_backend("auto", cuda, True, True, varlen=None) == "sdpa"
    assert pick_backend("varlen", cuda, False, False, varlen=None) == "varlen"
    assert pick_backend("varlen", cuda, True, False, varlen="a cache") == flex
    assert pick_backend("varlen", cuda, True, True, varlen=None) == "sdpa"
    assert pick_backend("flex", cuda, True, False, varlen=None) == "flex"


def test_models_take_varlen_for_wide_heads_and_keep_flex_for_narrow_ones():
    """The forward's choice on CUDA (decided without a device): varlen for heads wider than
    FLEX_MAX_HEAD_DIM (Gemma 3's 256), FlexAttention for Qwen3's 128 under "auto"; asked for, varlen runs
    at any head size it takes, and a model it cannot take is refused."""
    from kindred.models.attention import FLEX_MAX_HEAD_DIM, HAVE_VARLEN, pick_backend, varlen_reason

    if not HAVE_VARLEN:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    cuda, bf16 = torch.device("cuda"), torch.bfloat16

    def chosen(requested, head_dim, dtype=bf16, sinks=False):
        why = varlen_reason(requested, cuda, dtype, head_dim, sinks, False)
        return pick_backend(requested, cuda, True, False, varlen=why)

    assert FLEX_MAX_HEAD_DIM == 128
    assert chosen("auto", 256) == "varlen" and chosen("auto", 128) == "flex"
    assert chosen("varlen", 128) == "varlen" and chosen("varlen", 64) == "varlen"
    assert chosen("auto", 256, sinks=True) == "flex" and chosen("auto", 256, torch.float32) == "flex"
    with pytest.raises(KindredValueError, match="cannot run this model: attention sinks"):
        chosen("varlen", 64, sinks=True)


def test_varlen_is_refused_with_the_reason(family):
    from kindred.models.attention import HAVE_VARLEN, varlen_supported

    if not HAVE_VARLEN:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    cuda = torch.device("cuda")
    assert varlen_supported(cuda, torch.bfloat16, 256, False) is None
    assert "float16 or bfloat16" in varlen_supported(cuda, torch.float32, 128, False)
    assert "multiple of 8 up to 256" in varlen_supported(cuda, torch.bfloat16, 512, False)
    assert "sinks" in varlen_supported(cuda, torch.float16, 64, True)
    _, model = family("llama3")
    model.attn_backend = "varlen"
    try:
        with pytest.raises(
            KindredValueError, match="attn_backend='varlen' cannot run this model: it runs on CUDA"
        ):
            model(random_ids((1, 8)))
    finally:
        model.attn_backend = "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma3", "mistral_window", "qwen3_5"])
def test_cuda_varlen_equals_flex_in_bf16(tmp_path, name):
    """Packed documents and sliding windows through varlen flash attention: logits and LoRA-free input
    gradients (through the embeddings' output) as FlexAttention's within bf16 noise; rows without cu_seqlens
    as separate documents; max_seqlen only sizes the grid."""
    saved_hf_model(name, tmp_path)
    model = models.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    _, packed, cu = _packed([70, 1, 130, 55], seed=1)
    packed, cu = packed.cuda(), cu.cuda()
    outs = {}
    for backend in ("flex", "varlen"):
        model.attn_backend = backend
        model.zero_grad()
        logits = model(packed, cu_seqlens=cu)
        weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits)
        (logits.float() * weight).sum().backward()
        grad = model.model.embed_tokens.weight.grad.clone()
        outs[backend] = (logits.detach(), grad)
    assert rel_err(outs["varlen"][0], outs["flex"][0]) < MODEL_BF16_REL_ERR
    assert rel_err(outs["varlen"][1], outs["flex"][1]) < MODEL_BF16_REL_ERR
    model.attn_backend = "varlen"
    with torch.no_grad():
        assert torch.equal(model(packed, cu_seqlens=cu, max_seqlen=130), outs["varlen"][0])
        rows = random_ids((2, 96), seed=5).cuda()
        got = model(rows)
        model.attn_backend = "sdpa"
        assert rel_err(got, model(rows)) < MODEL_BF16_REL_ERR
        model.attn_backend = "varlen"
        with pytest.raises(KindredValueError, match="max_seqlen must be an integer in"):
            model(packed, cu_seqlens=cu, max_seqlen=0)
    model.attn_backend = "auto"
    assert model(packed, cu_seqlens=cu).shape == outs["varlen"][0].shape
