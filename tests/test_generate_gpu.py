"""kindred.generate on CUDA: the engine (packed prefill, static cache, CUDA graphs) against the eager
KV-cache reference, graph replay against the eager step, no re-capture in a steady run, LoRA on the
4-bit decode kernel."""

from __future__ import annotations

import pytest
import torch

from kindred import models
from kindred.generate import SamplingConfig, generate
from kindred.generate.runner import Engine

from .model_helpers import FAMILY_CONFIGS, VOCAB, saved_hf_model

pytestmark = pytest.mark.gpu

# in_features multiples of 128: every projection takes the 4-bit decode kernel
DECODE_CONFIG = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=2048,
)


def prompts_of(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_same_greedy(got: list[int], model, prompt: list[int]) -> None:
    """got equals DecoderLM.generate's greedy tokens, except that at a bf16 near-tie of the reference's
    two best logits the paths may part (then the rest is not compared)."""
    ref = model.generate(torch.tensor([prompt], device="cuda"), len(got), eos_token_id=[])
    ref = ref[0, len(prompt) :].tolist()
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        if a != b:
            seq = torch.tensor([prompt + ref[:i]], device="cuda")
            logits = model(seq)[0, -1].float()
            gap = (logits[b] - logits[a]).item()
            assert gap <= 0.02 * logits.abs().max().item(), (i, a, b, gap)
            return


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            saved_hf_model(name, path)
            built[name] = models.from_pretrained(path, dtype=torch.bfloat16, device="cuda").eval()
        return built[name]

    return get


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_bf16_greedy_tokens_equal_reference(family, name):
    model = family(name)
    prompts = prompts_of([6, 1, 13], seed=2)
    new = min(64, model.config.max_position_embeddings - 13)  # phi4_mini's tiny config holds 64 positions
    out = generate(model, prompts, SamplingConfig(max_new_tokens=new))
    for p, c in zip(prompts, out, strict=True):
        assert c.new_tokens == new
        assert_same_greedy(c.tokens, model, p)


@pytest.mark.parametrize("quant", ["nf4", "int4g"])
def test_graph_replay_equals_eager_step(quant):
    model = models.from_config(DECODE_CONFIG, quant=quant, device="cuda").eval()
    engine = Engine.for_model(model)
    prompts = prompts_of([5, 9, 3, 17], seed=3, vocab=512)
    cfg = SamplingConfig(max_new_tokens=40)
    engine.use_graphs = False
    eager = generate(model, prompts, cfg)
    engine.use_graphs = True
    graphs = generate(model, prompts, cfg)
    assert engine.captures > 0
    assert [c.tokens for c in graphs] == [c.tokens for c in eager]
    for p, c in zip(prompts, graphs, strict=True):
        assert_same_greedy(c.tokens, model, p)


def test_no_graph_is_recaptured_in_a_steady_run():
    model = models.from_config(DECODE_CONFIG, quant="nf4", device="cuda").eval()
    engine = Engine.for_model(model)
    prompts = prompts_of([4, 30, 11, 2, 8], seed=4, vocab=512)
    cfg = SamplingConfig(max_new_tokens=300)  # crosses length buckets 128, 256, ...
    stop = [7]  # rows finish at different steps: the batch buckets shrink
    first = generate(model, prompts, cfg, stop_token_ids=stop)
    captured = engine.captures
    assert captured >= 3
    for _ in range(2):
        again = generate(model, prompts, cfg, stop_token_ids=stop)
        assert [c.tokens for c in again] == [c.tokens for c in first]
    sampled = SamplingConfig(max_new_tokens=300, temperature=0.8, top_p=0.9, seed=1)
    a = generate(model, prompts[:2], sampled)
    b = generate(model, prompts[:2], sampled)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    steady = engine.captures
    generate(model, prompts[:2], sampled)
    generate(model, prompts, cfg, stop_token_ids=stop)
    assert engine.captures == steady


def test_lora_serves_through_the_decode_kernel_and_switches_per_call():
    from kindred.nn import LoraLinear, apply_lora, lora_modules

    model = models.from_config(DECODE_CONFIG, quant="int4g", device="cuda").eval()
    prompts = prompts_of([6, 10], seed=5, vocab=512)
    cfg = SamplingConfig(max_new_tokens=48)
    base = generate(model, prompts, cfg)
    apply_lora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], r=8, alpha=16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.2)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoraLinear)
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        w = layer.merged_weight().float()
    assert layer.base_layer._decode_meta is not None  # the decode layout was built and used
    ref = x.float() @ w.t()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2
    engine = Engine.for_model(model)
    tuned = generate(model, prompts, cfg, adapter=True)
    off = generate(model, prompts, cfg, adapter=False)
    assert [c.tokens for c in off] == [c.tokens for c in base]
    assert [c.tokens for c in tuned] != [c.tokens for c in base]
    steady = engine.captures
    assert [c.tokens for c in generate(model, prompts, cfg, adapter=True)] == [c.tokens for c in tuned]
    assert [c.tokens for c in generate(model, prompts, cfg, adapter=False)] == [c.tokens for c in off]
    assert engine.captures == steady  # base and tuned graphs both kept
    engine.use_graphs = False
    assert [c.tokens for c in generate(model, prompts, cfg, adapter=True)] == [c.tokens for c in tuned]
    assert not any(m.disabled for m in lora_modules(model).values())
