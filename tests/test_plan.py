"""kindred.plan: catalogue, memory and time estimators, scoring, CLI.

Expected numbers are hand computations (written out in comments) or published/measured figures with their
source; none is copied from the implementation's output.
"""

import argparse
import dataclasses
import json

import pytest

from kindred.errors import KindredValueError
from kindred.plan import catalogue as cat
from kindred.plan import cli, gpus, memory, score

GIB = 2**30
get = cat.get_model


# ---------------------------------------------------------------- catalogue

ISSUE_MODELS = (
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-30b-a3b",
    "gemma-3-4b",
    "gemma-3-12b",
    "gemma-3-27b",
    "phi-4",
    "phi-4-mini",
    "mistral-nemo-12b",
    "llama-3.1-8b",
    "gpt-oss-20b",
    "smollm2-135m",
)


def test_catalogue_has_every_issue_model_with_all_fields():
    for model_id in ISSUE_MODELS:
        spec = get(model_id)
        for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "context"):
            assert getattr(spec, key) > 0, (model_id, key)
        assert isinstance(spec.tied_embeddings, bool)
        assert (spec.sliding_window is None) == (spec.sliding_layers == 0)
        assert {"name", "commercial_use", "terms", "url"} <= set(spec.license) and spec.license["name"]
        assert spec.chat_template
        assert {"bf16", "gguf", "awq"} <= set(spec.formats)
        assert spec.sources


def test_moe_and_sliding_fields_match_the_configs():
    # Qwen3-30B-A3B 128 experts top-8; gpt-oss-20b 32 experts top-4, window 128 on
    # alternating layers (24 / 2 = 12); Gemma 3 12B 5 local : 1 global over 48 layers -> 48 - 48 // 6 = 40
    # local.
    assert (get("qwen3-30b-a3b").experts, get("qwen3-30b-a3b").experts_per_token) == (128, 8)
    oss = get("gpt-oss-20b")
    assert (oss.experts, oss.experts_per_token, oss.sliding_window, oss.sliding_layers) == (32, 4, 128, 12)
    assert (get("gemma-3-12b").sliding_window, get("gemma-3-12b").sliding_layers) == (1024, 40)


@pytest.mark.parametrize(
    "model_id, part, published_b, tol",
    [
        ("qwen3-8b", "total", 8.2, 0.01),  # Qwen3-8B card: 8.2B, 6.95B non-embedding
        ("qwen3-8b", "non_embedding", 6.95, 0.01),
        ("qwen3-4b", "total", 4.0, 0.01),  # Qwen3-4B card: 4.0B, 3.6B non-embedding
        ("qwen3-4b", "non_embedding", 3.6, 0.015),
        ("qwen3-30b-a3b", "total", 30.5, 0.01),  # card: 30.5B total, 3.3B activated, 29.9B non-embedding
        ("qwen3-30b-a3b", "active", 3.3, 0.02),
        ("qwen3-30b-a3b", "non_embedding", 29.9, 0.01),
        ("llama-3.1-8b", "total", 8.03, 0.005),  # Meta: 8.03B
        (
            "gpt-oss-20b",
            "total",
            21.0,
            0.01,
        ),  # card: 21B total; 3.6B active (+4 %: counted without MXFP4 detail)
        ("gpt-oss-20b", "active", 3.6, 0.17),
        ("phi-4", "total", 14.7, 0.01),  # Microsoft: 14.7B
    ],
)
def test_parameter_counts_match_published(model_id, part, published_b, tol):
    assert get(model_id).param_counts()[part] / 1e9 == pytest.approx(published_b, rel=tol)


def test_unknown_model_suggests_closest():
    with pytest.raises(KindredValueError, match=r"unknown model 'qwen3-8'.*qwen3-8b"):
        get("qwen3-8")
    with pytest.raises(KindredValueError, match="gemma-3-12b"):
        get("gema-3-12b")


def _write_config(tmp_path, **cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


TINY = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,
    "vocab_size": 1000,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


def test_config_json_dense(tmp_path):
    spec = cat.spec_from_config(_write_config(tmp_path, **TINY), "tiny")
    assert (spec.id, spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.head_dim) == (
        "tiny",
        256,
        2,
        4,
        2,
        64,
    )
    assert (spec.intermediate, spec.vocab, spec.context, spec.tied_embeddings) == (512, 1000, 1024, True)
    assert (spec.sliding_window, spec.experts) == (None, 0)


def test_config_json_moe_and_layer_types(tmp_path):
    cfg = dict(
        TINY,
        model_type="qwen3_moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    )
    spec = cat.spec_from_config(_write_config(tmp_path, **cfg))
    assert (spec.experts, spec.experts_per_token, spec.intermediate) == (8, 2, 128)
    assert (spec.sliding_window, spec.sliding_layers, spec.qk_norm) == (64, 1, True)
    # active params: total minus 6 of 8 experts' MLPs: 2 layers × 8 experts × 3 × 256 × 128 = 1,572,864 expert
    # params, of which 2/8 are active -> 1,179,648 fewer
    counts = spec.param_counts()
    assert counts["total"] - counts["active"] == 1_179_648


def test_config_json_gemma_text_config_pattern(tmp_path):
    text = dict(
        TINY, model_type="gemma3_text", num_hidden_layers=12, sliding_window=512, sliding_window_pattern=6
    )
    spec = cat.spec_from_config(_write_config(tmp_path, model_type="gemma3", text_config=text))
    # every 6th of 12 layers is global: 12 - 12 // 6 = 10 sliding; Gemma layers carry 4 norms
    assert (spec.sliding_layers, spec.norms_per_layer) == (10, 4)


def test_config_json_errors_name_file_and_key(tmp_path):
    bad = dict(TINY)
    del bad["hidden_size"]
    with pytest.raises(KindredValueError, match=r"config\.json.*hidden_size"):
        cat.spec_from_config(_write_config(tmp_path, **bad))
    with pytest.raises(KindredValueError, match=r"config\.json.*num_hidden_layers.*positive"):
        cat.spec_from_config(_write_config(tmp_path, **dict(TINY, num_hidden_layers=-2)))
    (tmp_path / "broken.json").write_text('{"hidden_size": 4,')
    with pytest.raises(KindredValueError, match=r"broken\.json: not valid JSON"):
        cat.spec_from_config(tmp_path / "broken.json")
    with pytest.raises(KindredValueError, match=r"missing\.json"):
        cat.spec_from_config(tmp_path / "missing.json")


# ---------------------------------------------------------------- GPUs


def test_gpu_lookup_and_suggestions():
    assert gpus.get_gpu("NVIDIA H100 80GB HBM3").id == "h100-sxm"  # driver name as in the CSVs
    assert gpus.get_gpu("RTX 4090").memory_gb == 24
    with pytest.raises(KindredValueError, match=r"unknown GPU 'rtx 4909'.*rtx-4090"):
        gpus.get_gpu("rtx 4909")
    with pytest.raises(KindredValueError, match="h100-pcie"):  # ambiguous: SXM or PCIe
        gpus.get_gpu("h100")
    with pytest.raises(KindredValueError, match="--vram"):
        gpus.custom_gpu(-8)


# ---------------------------------------------------------------- inference memory


def test_block_bits_per_weight():
    # NF4 + double quant: 4 + 8/64 + 32/(64·256) = 4 + 0.125 + 0.001953125; AWQ g128: 4 + 16/128 + 4/128
    assert memory.NF4_BPW == 4.126953125
    assert memory.AWQ_BPW == 4.15625


def test_use_more_bits_layers_for_32():
    # n = 32: i < 4, i >= 28, or (i - 4) % 3 == 2 -> 0-3, 6, 9, ..., 27, 28-31
    chosen = [i for i in range(32) if memory._use_more_bits(i, 32)]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize(
    "fmt, measured_gib", [("Q4_K_M", 4.58), ("Q5_K_M", 5.33), ("Q6_K", 6.14), ("Q8_0", 7.96)]
)
def test_llama3_8b_gguf_sizes_match_llama_cpp(fmt, measured_gib):
    # llama.cpp tools/quantize/quantize.cpp QUANT_OPTIONS, measured on Llama-3-8B (same shapes as Llama 3.1
    # 8B)
    assert memory.weight_bytes(get("llama-3.1-8b"), fmt) / GIB == pytest.approx(measured_gib, rel=0.01)


def test_q4_k_m_is_4_9_bits_per_weight():
    # published: Q4_K_M of an 8B ≈ 4.9 bits per weight (4.58 GiB × 2^30 × 8 / 8.03e9 = 4.90)
    assert memory.bits_per_weight(get("llama-3.1-8b"), "Q4_K_M") == pytest.approx(4.90, abs=0.02)
    assert memory.bits_per_weight(get("qwen3-8b"), "Q4_K_M") == pytest.approx(4.90, abs=0.02)


def test_qwen3_8b_q4_inference_published_figure():
    qwen = get("qwen3-8b")
    # Qwen/Qwen3-8B-GGUF: Qwen3-8B-Q4_K_M.gguf is 5.03 GB (file = tensors + ~10 MB tokenizer metadata)
    assert memory.weight_bytes(qwen, "Q4_K_M") / 1e9 == pytest.approx(5.03, rel=0.01)
    # KV per token: 2 (K,V) × 36 layers × 8 kv heads × 128 × 2 B = 147,456 B = 144 KiB
    assert memory.kv_cache_bytes(qwen, 1) == 147_456
    # the seeds' "Qwen3-8B Q4 ≈ 5.5 GB": weights + KV at 4K context = 5.02 + 0.60 GB
    inf = memory.inference_memory(qwen, "Q4_K_M", 4096)
    assert (inf.parts["weights"] + inf.parts["kv_cache"]) / 1e9 == pytest.approx(5.5, rel=0.03)
    assert inf.parts["kv_cache"] == 147_456 * 4096
    # llama.cpp's compute buffer for a 512-token micro-batch: fp32 logits 512 × 151,936 × 4 B and, without
    # flash attention, fp32 scores 512 × 4,096 keys × 32 heads × 4 B
    assert inf.parts["compute_buffer"] == 512 * 151_936 * 4 + 512 * 4096 * 32 * 4
    flash = memory.inference_memory(qwen, "Q4_K_M", 4096, flash_attention=True)
    assert flash.parts["compute_buffer"] == 512 * 151_936 * 4


def test_gemma3_sliding_window_kv_cache():
    gemma = get("gemma-3-12b")
    # per layer per token 2 × 8 × 256 × 2 B = 8,192 B; at 32,768 tokens: 8 global layers × 8,192 × 32,768
    # + 40 local layers × 8,192 × 1,024 = 2,147,483,648 + 335,544,320 (12.0 -> 2.3
    # GiB)
    assert memory.kv_cache_bytes(gemma, 32_768) == 2_483_027_968
    assert 48 * 8_192 * 32_768 / GIB == 12.0
    # q8_0 cache: 8.5/16 of bf16 at 1,000 tokens (all within the window): 48 × 8,192 × 1,000 × 8.5 / 16
    assert memory.kv_cache_bytes(gemma, 1_000, kv_dtype="q8_0") == round(48 * 8_192 * 1_000 * 8.5 / 16)


# ---------------------------------------------------------------- GPUs the seeds name


def test_seed_gpus_with_sources():
    # seeds 000-004 name the RTX 5080, RTX 6000 Ada, A10G, MI300X and an Apple M3 Max
    for name, memory_gb in (("rtx-5080", 16), ("rtx-6000-ada", 48), ("a10g", 24), ("mi300x", 192)):
        g = gpus.get_gpu(name)
        assert g.memory_gb == memory_gb and g.sources and g.bandwidth_gbs > 0 and g.bf16_tflops > 0
    # RTX 5080: 84 SMs × 2,617 MHz × 512 FLOP per SM-clock (fp32 accumulate) = 112.6 TFLOP/s
    assert gpus.get_gpu("rtx-5080").bf16_tflops == pytest.approx(84 * 2617e6 * 512 / 1e12, abs=0.05)
    m3 = gpus.get_gpu("m3-max")
    assert m3.bf16_tflops is None and m3.backend == "metal" and not m3.kindred_trains  # inference speed only
    assert not gpus.get_gpu("mi300x").kindred_trains and gpus.get_gpu("h200").kindred_trains


# ---------------------------------------------------------------- scoring


def test_weighted_score_and_context_scale():
    # (1·1 + 0·3) / (1 + 3); the criterion without data (None) is left out
    assert score.weighted_score({"a": 1.0, "b": 0.0, "c": None}, {"a": 1, "b": 3, "c": 5}) == 0.25
    # context scale log2(ctx / 4096) / 5: 131072 -> 1, 40960 -> log2(10)/5 = 0.6644
    assert score.criterion_scores(get("gemma-3-12b"), None, None, None)["context"] == 1.0
    assert score.criterion_scores(get("qwen3-8b"), None, None, 0.8)["context"] == pytest.approx(
        0.6644, abs=1e-4
    )
    assert score.criterion_scores(get("qwen3-8b"), None, None, 0.8)["capability"] == 0.8
    # quantization: Qwen3-8B Q4_K_M without fallback (1) + official AWQ (1); gpt-oss-20b: Q4_K_M with
    # fallbacks (0.5) + AWQ refused by its 2880-wide rows (0)
    assert score.criterion_scores(get("qwen3-8b"), None, None, None)["quantization"] == 1.0
    assert score.criterion_scores(get("gpt-oss-20b"), None, None, None)["quantization"] == 0.25


def test_checklist_and_bad_settings():
    s = score.PlanSettings(seq=4096, tokens_p95=5000)
    checks = score.checklist(get("qwen3-8b"), s, gpus.get_gpu("rtx-4090"), 30 * GIB)
    assert checks["context fits data p95"]["status"] == "fail"  # 5000 > seq 4096
    assert checks["training fits GPU incl. logits"]["status"] == "fail"  # 30 GiB > 24 GiB
    assert checks["token budget defined"]["status"] == "fail"
    assert checks["quantized format available"]["status"] == "pass"
    assert checks["kindred trains it"]["status"] == "pass"
    # the users' practical limit: about half the window per example; Qwen3-8B 40,960 -> 20,480 >= p95 5000
    assert checks["example within the practical context"]["status"] == "pass"
    long = score.checklist(get("phi-4"), score.PlanSettings(seq=10000), gpus.get_gpu("h200"), GIB)
    assert long["example within the practical context"]["status"] == "fail"  # 10000 > 16384 / 2
    other = dataclasses.replace(get("qwen3-30b-a3b"), model_type="deepseek_v3")  # not a kindred.models family
    checks = score.checklist(other, s, gpus.get_gpu("h200"), GIB)
    assert (
        checks["kindred trains it"]["status"] == "fail"
        and "deepseek_v3" in checks["kindred trains it"]["detail"]
    )
    moe = score.checklist(get("qwen3-30b-a3b"), s, gpus.get_gpu("h200"), GIB)
    assert moe["kindred trains it"]["status"] == "pass"
    with pytest.raises(KindredValueError, match="unknown criteria"):
        score.PlanSettings(weights={"vibes": 1})
    with pytest.raises(KindredValueError, match="seq must be positive"):
        score.PlanSettings(seq=-5)
    with pytest.raises(KindredValueError, match="unknown license filter"):
        score.PlanSettings(license="free")
    with pytest.raises(KindredValueError, match="unknown recomputation policy"):
        score.PlanSettings(policy="some")


def test_plan_records_honesty_and_license_filter():
    h200 = gpus.get_gpu("h200")
    specs = [get(m) for m in ("qwen3-8b", "gpt-oss-20b", "gemma-3-12b", "qwen3-30b-a3b")]
    rows = {r["model"]: r for r in score.plan(specs, h200, score.PlanSettings(infer_format="AWQ"))}
    # gpt-oss-20b: hidden 2880 = 22.5 × 128, so no AWQ g128 estimate
    assert rows["gpt-oss-20b"]["infer_gib"] is None and "2880" in rows["gpt-oss-20b"]["format_refused"]
    assert rows["qwen3-8b"]["kindred"] == "trainable" and rows["qwen3-8b"]["infer_gib"] > 5
    assert rows["gpt-oss-20b"]["kindred"] == rows["qwen3-30b-a3b"]["kindred"] == "trainable"
    permissive = score.plan(specs, h200, score.PlanSettings(license="permissive"))
    assert {r["model"] for r in permissive} == {"qwen3-8b", "gpt-oss-20b", "qwen3-30b-a3b"}  # no Gemma terms


# ---------------------------------------------------------------- CLI


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="kindred")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


def test_cli_json_round_trip(capsys):
    args = _parse(
        "--vram", "16", "--method", "qlora", "--seq", "2048", "--json", "--dataset-tokens", "1000000"
    )
    assert cli.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["model"]: r for r in out["models"]}
    assert set(ISSUE_MODELS) <= set(rows)
    for r in rows.values():
        assert r["fits_train"] == (r["train_gib"] <= 16)
        assert r["train_tok_s"] is None  # --vram: no bf16 rate, no time estimate
    # Gemma 3 27B cannot fit 16 GiB: its NF4 linears alone are 25.6e9 × 4.127 / 8 B = 12.3 GiB, plus the bf16
    # embedding 262,208 × 5,376 × 2 B = 2.6 GiB and 62 layers of checkpoints
    assert rows["gemma-3-27b"]["fits_train"] is False


def test_cli_model_breakdown_serving_and_plot(capsys, tmp_path):
    png = tmp_path / "mem.png"
    args = _parse("--gpu", "rtx-4090", "--model", "qwen3-8b", "--seq", "4096", "--plot", str(png))
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    for part in ("training memory", "host memory", "decision checklist", "vLLM AWQ", "Q5_K_M", "time model"):
        assert part in text, part
    assert "what unsloth would take" in text  # Unsloth was measured on Qwen3-8B
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prices_and_cost(capsys, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"prices": [{"gpu": "RTX 4090", "usd_per_hour": 0.5}]}))
    base = ("--gpu", "rtx-4090", "--model", "qwen3-8b", "--dataset-tokens", "3000000", "--json")
    for extra, rate in ((("--prices", str(prices)), 0.5), (("--price", "rtx-4090=0.25"), 0.25)):
        assert cli.run(_parse(*base, *extra)) == 0
        (row,) = json.loads(capsys.readouterr().out)["models"]
        # the cost of the fine-tune is its hours at the overriding rate
        assert row["serve_usd_per_hour"] == rate
        assert row["train_usd"] == pytest.approx(row["train_hours"] * rate)
        assert row["train_hours"] == pytest.approx(3_000_000 / row["train_tok_s"] / 3600)


def test_cli_optimizer(capsys):
    base = ("--gpu", "rtx-4090", "--model", "qwen3-8b", "--seq", "2048", "--batch", "4", "--json")
    gib = {}
    for optimizer in ("adamw", "adamw8bit"):
        assert cli.run(_parse(*base, "--optimizer", optimizer)) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["settings"]["optimizer"] == optimizer
        gib[optimizer] = out["models"][0]["train_gib"]
    assert 0.2 < gib["adamw"] - gib["adamw8bit"] < 0.3  # 43.6 M LoRA parameters: 6 bytes each fewer
    with pytest.raises(SystemExit):
        _parse(*base, "--optimizer", "sgd")


def test_cli_config_model(capsys, tmp_path):
    path = _write_config(tmp_path, **TINY)
    assert cli.run(_parse("--gpu", "l40s", "--model", str(path), "--seq", "512", "--json")) == 0
    (row,) = json.loads(capsys.readouterr().out)["models"]
    assert row["context"] == 1024 and row["kindred"] == "trainable"


def test_cli_bad_input(tmp_path):
    with pytest.raises(KindredValueError, match="longer than"):
        cli.run(_parse("--gpu", "h100-sxm", "--model", "phi-4", "--seq", "20000"))
    with pytest.raises(KindredValueError, match="closest known"):
        cli.run(_parse("--gpu", "h100-sxm", "--model", "lama-3.1-8b"))
    with pytest.raises(KindredValueError, match="--weights: expected NAME=NUMBER"):
        cli.run(_parse("--gpu", "h100-sxm", "--weights", "context"))
    with pytest.raises(KindredValueError, match="tokenizer"):
        cli.run(_parse("--gpu", "h100-sxm", "--data", "chats.jsonl"))
    with pytest.raises(KindredValueError, match="--price h100-sxm=-1"):
        cli.run(_parse("--gpu", "h100-sxm", "--price", "h100-sxm=-1"))
    bad = tmp_path / "p.json"
    bad.write_text('{"prices": [{"gpu": "h100-sxm"}]}')
    with pytest.raises(KindredValueError, match=r"p\.json: prices\[0\]: needs 'gpu' and 'usd_per_hour'"):
        cli.run(_parse("--gpu", "h100-sxm", "--prices", str(bad)))
    with pytest.raises(KindredValueError, match="--results"):
        cli.run(_parse("--gpu", "h100-sxm", "--results", str(tmp_path / "nowhere")))


def test_cli_data_cost_by_context(capsys, hf_tokenizer_path):
    from kindred.data.samples import calibration_path

    data = ("--data", str(calibration_path()), "--tokenizer", str(hf_tokenizer_path), "--template", "llama3")
    assert cli.run(_parse("--gpu", "h200", "--model", "qwen3-8b", "--seq", "4096", *data)) == 0
    text = capsys.readouterr().out
    # the users' relative costs (4K = 1× ... 64K = 16×) in hours and dollars at the H200's listed rate
    assert "cost by context for your data" in text and "16×" in text and "$" in text
