"""kindred.generate on the CPU: equal to DecoderLM.generate's KV-cache decode; batching, stops, sampling."""

from __future__ import annotations

import pytest
import torch

from kindred import models
from kindred.errors import KindredValueError
from kindred.generate import Completion, SamplingConfig, generate

from .model_helpers import FAMILY_CONFIGS, VOCAB, saved_hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A kindred float32 model per tiny family (random weights from transformers), built once."""
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            saved_hf_model(name, path)
            built[name] = models.from_pretrained(path, dtype=torch.float32).eval()
        return built[name]

    return get


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompt, n):
    """DecoderLM.generate (the model's own KV cache), greedy, no end token: the new ids."""
    out = model.generate(torch.tensor([prompt]), n, eos_token_id=[])
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_greedy_equals_kv_cache_reference(family, name):
    model = family(name)
    prompts = prompts_of([5, 1, 12], seed=3)
    n = 30 if name == "phi4_mini" else 20  # phi4_mini: past its original context of 16 (longrope switch)
    out = generate(model, prompts, SamplingConfig(max_new_tokens=n))
    for p, c in zip(prompts, out, strict=True):
        assert isinstance(c, Completion)
        assert c.tokens == reference(model, p, n)
        assert c.finish_reason == "length" and c.new_tokens == n and c.prompt_tokens == len(p)
        assert 0 < c.ttft_s <= c.total_s and c.tokens_per_s > 0 and c.text is None


def test_batch_equals_rows_one_by_one(family):
    model = family("qwen3")
    prompts = prompts_of([7, 2, 9, 4], seed=5)
    for cfg in (
        SamplingConfig(max_new_tokens=12),
        SamplingConfig(max_new_tokens=12, temperature=0.9, seed=4),
    ):
        batched = generate(model, prompts, cfg)
        for i in range(len(prompts)):
            # a row's draws depend on its index in the prompt list: keep it by padding with other prompts
            alone = generate(model, prompts[: i + 1], cfg, batch_size=1)[i]
            assert alone.tokens == batched[i].tokens
        assert generate(model, prompts, cfg, batch_size=3)[3].tokens == batched[3].tokens


def test_sampling_is_reproducible_and_seed_dependent(family):
    model = family("llama3")
    prompts = prompts_of([4, 4], seed=1)
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, seed=11)
    a, b = generate(model, prompts, cfg), generate(model, prompts, cfg)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    c = generate(model, prompts, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=12))
    assert [x.tokens for x in a] != [x.tokens for x in c]
    # the same prompt twice in one batch: different draws (the key holds the row index)
    assert a[0].tokens != a[1].tokens or prompts[0] != prompts[1]
    twin = generate(model, [prompts[0], prompts[0]], cfg)
    assert twin[0].tokens != twin[1].tokens


def test_sampling_follows_the_distribution():
    """The hashed Gumbel draw is a sample of softmax(logits / T) after the cuts (checked on 4000 rows)."""
    from kindred.generate.sampling import choose, row_keys

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(4000, 1)
    cfg = SamplingConfig(temperature=0.7, top_k=4, seed=2)
    picks = choose(logits, cfg, None, row_keys(cfg.seed, list(range(4000)), 0))
    freq = torch.bincount(picks, minlength=5).double() / 4000
    want = torch.softmax(logits[0, :4].double() / 0.7, -1)
    assert freq[4] == 0 and torch.allclose(freq[:4], want, atol=0.03)
    cfg = SamplingConfig(temperature=1.0, top_p=0.6, seed=2)  # 2.0 alone has 0.64 of the mass
    picks = choose(logits[:100], cfg, None, row_keys(cfg.seed, list(range(100)), 0))
    assert (picks == 0).all()
    cfg = SamplingConfig(temperature=1.0, min_p=0.3, seed=2)  # keeps p >= 0.3 · p_max: tokens 0 and 1
    picks = choose(logits[:400], cfg, None, row_keys(cfg.seed, list(range(400)), 0))
    assert set(picks.tolist()) == {0, 1}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from kindred.generate.sampling import penalize

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.equal(penalize(logits, seen, 1.3), ref)


def test_stop_tokens_loop_hook_and_streaming(family):
    model = family("llama3")
    prompts = prompts_of([3, 6], seed=2)
    full = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    stop = full[0].tokens[3]
    streamed = []
    out = generate(
        model,
        prompts,
        SamplingConfig(max_new_tokens=10),
        stop_token_ids=[stop],
        on_token=lambda row, tok: streamed.append((row, tok)),
        loop_detector=lambda toks: "five" if len(toks) == 5 else None,
    )
    first = full[0].tokens.index(stop)
    assert out[0].tokens == full[0].tokens[: first + 1] and out[0].finish_reason == "stop"
    n1 = full[1].tokens.index(stop) + 1 if stop in full[1].tokens[:5] else 5
    assert out[1].tokens == full[1].tokens[:n1]
    if n1 == 5:
        assert out[1].finish_reason == "loop" and out[1].loop_rule == "five"
    for row, c in enumerate(out):
        assert [t for r, t in streamed if r == row] == c.tokens


def test_adapter_switch_serves_base_and_tuned(tmp_path):
    from kindred.nn import apply_lora, lora_modules

    saved_hf_model("smollm2_tied", tmp_path)
    model = models.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = prompts_of([5, 3], seed=4)
    base = generate(model, prompts, SamplingConfig(max_new_tokens=8))
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    tuned = generate(model, prompts, SamplingConfig(max_new_tokens=8), adapter=True)
    off = generate(model, prompts, SamplingConfig(max_new_tokens=8), adapter=False)
    assert [c.tokens for c in off] == [c.tokens for c in base]
    assert [c.tokens for c in tuned] != [c.tokens for c in base]
    assert [c.tokens for c in tuned] == [reference(model, p, 8) for p in prompts]  # restored: enabled
    assert not any(m.disabled for m in lora_modules(model).values())


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_mixed_adapter_rows_equal_separate_calls(tmp_path, quant):
    """adapter=[...]: base and tuned rows in one batch give each row's tokens of its own call, rows
    finishing at different steps (stop tokens) and leaving the batch."""
    from kindred.nn import apply_lora, lora_modules

    saved_hf_model("qwen3", tmp_path)
    model = models.from_pretrained(tmp_path, quant=quant, dtype=torch.float32).eval()
    apply_lora(model, ["q_proj", "v_proj", "gate_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    prompts = prompts_of([5, 3, 9, 1], seed=8)
    cfg = SamplingConfig(max_new_tokens=14)
    base = generate(model, prompts, cfg, adapter=False)
    tuned = generate(model, prompts, cfg, adapter=True)
    assert [c.tokens for c in tuned] != [c.tokens for c in base]
    stops = sorted({c.tokens[k] for c in base + tuned for k in (3, 9)})  # rows stop at different steps
    base = generate(model, prompts, cfg, adapter=False, stop_token_ids=stops)
    tuned = generate(model, prompts, cfg, adapter=True, stop_token_ids=stops)
    flags = [True, False, False, True, True, False, True, False]
    both = prompts + prompts
    mixed = generate(model, both, cfg, adapter=flags, stop_token_ids=stops)
    for i, (flag, c) in enumerate(zip(flags, mixed, strict=True)):
        ref = (tuned if flag else base)[i % len(prompts)]
        assert c.tokens == ref.tokens and c.finish_reason == ref.finish_reason
    assert len({c.new_tokens for c in mixed}) > 1
    assert all(m.row_adapter is None and not m.disabled for m in lora_modules(model).values())
    with pytest.raises(KindredValueError, match="one True/False per prompt"):
        generate(model, prompts, cfg, adapter=[True])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
        (dict(prompts=[[1, VOCAB]]), r"prompts\[0\]\[1\]"),
        (dict(config={"max_new_tokens": 3}), "config"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_strings=["x"]), "tokenizer"),
        (dict(stop_strings="x"), "stop_strings"),
        (dict(on_token=3), "on_token"),
        (dict(loop_detector="x"), "loop_detector"),
        (dict(adapter=True), "LoRA"),
        (dict(adapter="yes"), "adapter"),
        (dict(batch_size=0), "batch_size"),
        (dict(config=SamplingConfig(max_new_tokens=10_000)), "max_position_embeddings"),
    ],
)
def test_bad_arguments_are_named(family, kwargs, match):
    model = family("llama3")
    args = {"prompts": [[1, 2, 3]], **kwargs}
    with pytest.raises(KindredValueError, match=match):
        generate(model, **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_sampling_config_is_named(kwargs, match):
    with pytest.raises(KindredValueError, match=match):
        SamplingConfig(**kwargs)


def test_padded_buckets_equal_the_exact_step(family):
    """The shapes CUDA graphs run (batch padded to a power of two, attention over a length bucket, the
    packed prefill padded), here eagerly on the CPU: the same tokens as the exact shapes."""
    from kindred.generate.runner import Engine

    model = family("gemma3")  # sliding windows: the per-row mask must slide in the padded step too
    prompts = prompts_of([4, 19, 7, 2, 11], seed=6)
    cfg = SamplingConfig(max_new_tokens=140)  # past the first length bucket (128)
    full = generate(model, prompts, cfg)
    stops = [full[0].tokens[30], full[3].tokens[2]]
    exact = generate(model, prompts, cfg, stop_token_ids=stops)
    assert len({c.new_tokens for c in exact}) > 1  # rows finish at different steps: the batch shrinks
    engine = Engine.for_model(model)
    engine.padded = True
    try:
        padded = generate(model, prompts, cfg, stop_token_ids=stops)
    finally:
        engine.padded = False
        engine.release()
    assert [c.tokens for c in padded] == [c.tokens for c in exact]
    assert [c.finish_reason for c in padded] == [c.finish_reason for c in exact]
