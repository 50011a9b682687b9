"""kindred.plan serving, money and support: vLLM's KV pool, llama.cpp memory, prices, refused formats,
licenses, and the conversation planner's warning on impossible budgets.

Expected numbers are hand computations (written out) or the seeds' figures.
"""

import json

import numpy as np
import pytest

from kindred.data import plan_conversation
from kindred.errors import KindredValueError
from kindred.plan import catalogue as cat
from kindred.plan import gpus, memory, money, serving, support

GIB = 2**30
get = cat.get_model


def test_vllm_pool_and_slots_hand_computed():
    qwen = get("qwen3-8b")
    got = serving.vllm_kv_cache(
        qwen, 80 * GIB, "AWQ-INT4", 8192, 0.9, activation_bytes=GIB, other_bytes=GIB // 2
    )
    # budget 0.9 × 80 GiB = 72 GiB; minus the AWQ weights, 1 GiB of activations and 0.5 GiB outside torch;
    # a 16-token block holds 16 × 147,456 B (2 × 36 layers × 8 kv heads × 128 × 2 B per token)
    pool = 0.9 * 80 * GIB - memory.weight_bytes(qwen, "AWQ-INT4") - GIB - GIB // 2
    assert got["pool_bytes"] == pool
    assert got["slots"] == int(pool // (16 * 147_456))
    assert got["tokens"] == 16 * got["slots"]
    assert got["concurrent_requests"] == pytest.approx(pool / (8192 * 147_456))
    # vLLM's profiling forward over 8,192 tokens: gate/up [T, 2·ff] + act [T, ff] + 3 × [T, h] in bf16,
    # and the sampler's fp32 logits of 256 sequences with one softmax copy
    assert serving.vllm_activation_bytes(qwen) == 2 * 8192 * (3 * 12288 + 3 * 4096) + 2 * 4 * 256 * 151_936


def test_vllm_reproduces_seed_001():
    # a user report: Qwen3-8B AWQ in vLLM, 8,192 tokens of context: 12.5 GiB in use, 1,607 KV-cache slots.
    qwen = get("qwen3-8b")
    pool = 1607 * 16 * 147_456  # 1,607 blocks of 16 tokens
    assert pool / GIB == pytest.approx(3.53, abs=0.005)
    requests = 1607 * 16 / 8192  # requests of 8,192 tokens at once
    assert requests == pytest.approx(3.14, abs=0.005)
    # weights as kindred estimates them (5.68 GiB, the seed's 5.7 GB checkpoint); the rest of the 12.5 GiB is
    # the profiling activations, CUDA graphs and runtime: 12.5 − 5.68 − 3.53 = 3.29 GiB
    weights = memory.weight_bytes(qwen, "AWQ-INT4")
    assert weights / GIB == pytest.approx(5.68, abs=0.01)
    rest = 12.5 * GIB - weights - pool
    assert rest / GIB == pytest.approx(3.29, abs=0.01)
    # the formula, given the seed's 12.5 GiB as vLLM's budget and that remainder, gives back its slots
    got = serving.vllm_kv_cache(qwen, 12.5 * GIB, "AWQ-INT4", 8192, 1.0, activation_bytes=rest)
    assert (got["slots"], got["tokens"]) == (1607, 25_712)
    assert got["concurrent_requests"] == pytest.approx(3.14, abs=0.005)
    # kindred's own estimate of the profiling activations (8,192 batched tokens, 256 sequences):
    # 2 × 8,192 × (3 × 12,288 + 3 × 4,096) + 2 × 4 × 256 × 151,936 = 1,116,471,296 B = 1.04 GiB of those
    # 3.29 GiB; the rest (CUDA graphs, the runtime) is not estimated
    assert serving.vllm_activation_bytes(qwen) == 1_116_471_296


def test_gguf_table_per_type():
    qwen = get("qwen3-8b")
    rows = {r["format"]: r for r in serving.gguf_table(qwen, 4096)}
    assert list(rows) == ["Q4_K_M", "Q5_K_M", "Q8_0", "F16"]
    # the same KV cache (f16, 4,096 × 147,456 B) and compute buffer for every type; weights grow with bits
    for r in rows.values():
        assert r["kv_cache_bytes"] == 4096 * 147_456
        assert r["compute_buffer_bytes"] == 512 * 151_936 * 4 + 512 * 4096 * 32 * 4
        assert r["total_bytes"] == r["weights_bytes"] + r["kv_cache_bytes"] + r["compute_buffer_bytes"]
    assert rows["Q4_K_M"]["weights_bytes"] / 1e9 == pytest.approx(5.03, rel=0.01)  # Qwen's own file: 5.03 GB
    assert rows["F16"]["weights_bytes"] == 2 * qwen.param_counts()["total"]
    assert rows["Q4_K_M"]["weights_bytes"] < rows["Q5_K_M"]["weights_bytes"] < rows["Q8_0"]["weights_bytes"]
    assert rows["Q8_0"]["host_bytes"] == rows["Q8_0"]["weights_bytes"]  # the mapped file


def test_format_refusals_follow_each_layout():
    # gpt-oss-20b: hidden 2880 = 22.5 × 128 -> no AWQ g128 and no kindred INT4g; NF4 blocks of 64 fit
    oss = get("gpt-oss-20b")
    assert "2880 is not divisible by the AWQ group 128" in support.format_refusal(oss, "AWQ")
    assert "in_features is not a multiple of the group 128" in support.format_refusal(oss, "int4g")
    assert support.format_refusal(oss, "NF4") is None and support.format_refusal(oss, "Q4_K_M") is None
    # llama.cpp falls back for its 2880-wide rows (2880 % 256 = 64): Q4_K -> Q5_0 and Q6_K -> Q8_0
    assert any("Q4_K → Q5_0" in f for f in support.gguf_fallbacks(oss, "Q4_K_M"))
    # every other catalogue model has 128-divisible rows and 8-divisible outputs
    for spec in cat.default_catalogue():
        if spec.id not in ("gpt-oss-20b", "smollm2-135m"):
            assert support.format_refusal(spec, "AWQ") is None, spec.id
            assert support.gguf_fallbacks(spec, "Q4_K_M") == [], spec.id
    # SmolLM2: hidden 576 = 4.5 × 128 -> refused as well (its catalogue entry lists no AWQ)
    assert support.format_refusal(get("smollm2-135m"), "AWQ") is not None
    assert cat.get_model("smollm2-135m").formats["awq"] == "none" == oss.formats["awq"]


def test_kindred_support_from_the_model_families():
    from kindred.models import FAMILIES

    for spec in cat.default_catalogue():
        status, _ = support.kindred_support(spec)
        assert status == ("trainable" if spec.model_type in FAMILIES else "plan only"), spec.id
    assert support.kindred_support(get("qwen3-8b"), "full")[0] == "plan only"  # LoRA only
    assert support.kindred_support(get("qwen3-8b"), gpu=gpus.get_gpu("mi300x"))[0] == "plan only"  # ROCm


def test_license_filter():
    assert support.license_ok(get("qwen3-8b"), "permissive") and support.license_ok(
        get("phi-4"), "permissive"
    )
    assert not support.license_ok(get("gemma-3-12b"), "permissive")
    assert not support.license_ok(get("llama-3.1-8b"), "permissive")
    assert support.license_ok(get("llama-3.1-8b"), "commercial")  # commercial use, with conditions
    with pytest.raises(KindredValueError, match="unknown license filter"):
        support.license_ok(get("qwen3-8b"), "free")
    assert support.practical_context(get("gemma-3-12b")) == 65_536  # a user's notes: 128K -> ~60K per example


def test_prices_sources_and_overrides(tmp_path):
    prices = money.load_prices()
    for name in ("h100-sxm", "a10g", "mi300x", "rtx-6000-ada", "h200"):
        p = prices[gpus.get_gpu(name).id]
        assert p.usd_per_hour > 0 and p.source and p.date and p.provider
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prices": [{"gpu": "NVIDIA A10G", "usd_per_hour": 0.5, "provider": "mine"}]}))
    got = money.load_prices(path, {"h200": 2.0})
    assert (got["a10g"].usd_per_hour, got["a10g"].provider, got["h200"].usd_per_hour) == (0.5, "mine", 2.0)
    assert got["mi300x"] == prices["mi300x"]  # untouched entries stay
    path.write_text('{"prices": [{"gpu": "nope", "usd_per_hour": 1}]}')
    with pytest.raises(KindredValueError, match=r"mine\.json: prices\[0\]: unknown GPU 'nope'"):
        money.load_prices(path)
    path.write_text('{"prices": [{"gpu": "h200", "usd_per_hour": "cheap"}]}')
    with pytest.raises(KindredValueError, match="usd_per_hour must be a number"):
        money.load_prices(path)


def test_context_costs_make_seed_004_absolute():
    # 10 examples of 3,000 tokens: every context from 4K holds them; packed two per 8K row, five per 16K row
    lengths = np.full(10, 3000)
    rows = money.context_costs(
        lengths, lambda ctx: 4000.0 if ctx <= 16384 else None, 2.0, (4096, 8192, 16384, 32768)
    )
    by = {r["context"]: r for r in rows}
    assert [by[c]["relative_cost"] for c in (4096, 8192, 16384)] == [1, 2, 4]
    assert by[8192]["packed_rows"] == 5
    # 5 rows × 8,192 tokens at 4,000 tokens/s = 10.24 s = 0.002844 h, × $2/h
    assert by[8192]["hours"] == pytest.approx(5 * 8192 / 4000 / 3600)
    assert by[8192]["usd"] == pytest.approx(2 * 5 * 8192 / 4000 / 3600)
    assert by[32768]["usd"] is None  # no speed estimate for that context


def test_planner_warns_on_impossible_budgets():
    # budget 1,000 − system 500 − buffer 1,024 = −524: nothing fits (the planner printed "available −524 …
    # recommended 0–0" without a word)
    none = plan_conversation(1000, 500, 300, 1024)
    assert none.available == -524 and none.recommended == (0, 0)
    assert "no exchange fits" in none.warning and "warning:" in none.summary()
    # 2,048 − 400 − 1,024 = 624 available < one 800-token exchange
    short = plan_conversation(2048, 400, 800, 1024)
    assert short.max_exchanges == 0 and "longer than the 624 tokens available" in short.warning
    assert plan_conversation(16384, 500, 500, 1000).warning is None  # the users' example: 28 exchanges
