"""kindred.plan: catalogue, memory and time estimators, scoring, CLI.

Expected numbers are hand computations (written out in comments) or published/measured figures with their
source; none is copied from the implementation's output.
"""

import argparse
import json

import pytest

from kindred.errors import KindredValueError
from kindred.plan import catalogue as cat
from kindred.plan import cli, gpus, memory, score, timing

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
    # pipeline-formats.md §6: Qwen3-30B-A3B 128 experts top-8; gpt-oss-20b 32 experts top-4, window 128 on
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
    # the seeds' "Qwen3-8B Q4 ≈ 5.5 GB": weights + KV at 4K context = 5.02 + 0.60 GB; the runtime part is
    # extra
    inf = memory.inference_memory(qwen, "Q4_K_M", 4096)
    assert (inf.parts["weights"] + inf.parts["kv_cache"]) / 1e9 == pytest.approx(5.5, rel=0.03)
    assert inf.parts["kv_cache"] == 147_456 * 4096


def test_gemma3_sliding_window_kv_cache():
    gemma = get("gemma-3-12b")
    # per layer per token 2 × 8 × 256 × 2 B = 8,192 B; at 32,768 tokens: 8 global layers × 8,192 × 32,768
    # + 40 local layers × 8,192 × 1,024 = 2,147,483,648 + 335,544,320 (pipeline-formats.md §7.1: 12.0 -> 2.3
    # GiB)
    assert memory.kv_cache_bytes(gemma, 32_768) == 2_483_027_968
    assert 48 * 8_192 * 32_768 / GIB == 12.0
    # q8_0 cache: 8.5/16 of bf16 at 1,000 tokens (all within the window): 48 × 8,192 × 1,000 × 8.5 / 16
    assert memory.kv_cache_bytes(gemma, 1_000, kv_dtype="q8_0") == round(48 * 8_192 * 1_000 * 8.5 / 16)


# ---------------------------------------------------------------- training memory


def test_gemma3_logits_case():
    # seed 004: 4096 tokens × 262,144 vocab × 4 bytes = 4,294,967,296 B ≈ 4.3 GB of fp32 logits
    assert memory.logits_bytes(4096, 262_144, 4) == 4_294_967_296
    assert memory.logits_bytes(4096, 262_144, 4) / 1e9 == pytest.approx(4.3, abs=0.01)
    unfused = memory.training_memory(get("gemma-3-12b"), "qlora", 4096, 1, fused_loss=False)
    fused = memory.training_memory(get("gemma-3-12b"), "qlora", 4096, 1, fused_loss=True)
    # bf16 logits + fp32 upcast + fp32 gradient: 4096 × 262,208 × (2 + 4 + 4) B
    assert unfused.parts["logits"] == 4096 * 262_208 * 10
    assert fused.parts["logits"] == 0


def test_lora_params_qwen3_8b():
    # r=16 per layer: q 16·(4096+4096) + k 16·(4096+1024) + v same + o 16·(4096+4096) + 3 × 16·(4096+12288)
    # = 131,072 + 81,920 + 81,920 + 131,072 + 786,432 = 1,212,416; × 36 = 43,646,976 (pipeline-formats §7.2:
    # 43.6 M)
    assert memory.lora_params(get("qwen3-8b"), 16) == 43_646_976


def test_training_breakdown_hand_computed(tmp_path):
    spec = cat.spec_from_config(_write_config(tmp_path, **TINY), "tiny")
    got = memory.training_memory(spec, "qlora", seq=128, batch=2, rank=8, fused_loss=False, overhead_gib=0)
    # linears per layer 256·256 + 2·256·128 + 256·256 + 3·256·512 = 589,824; × 2 layers = 1,179,648 at
    # 4.126953125
    # bits = 4,868,352 bits = 608,544 B; tied embedding 1000·256·2 = 512,000 B; norms (2·2·256 + 256)·2 =
    # 2,560 B
    assert got.parts["base_weights"] == 608_544 + 512_000 + 2_560
    # LoRA r=8 per layer: 8·(512 + 384 + 384 + 512 + 768 + 768 + 768) = 32,768; × 2 = 65,536 params;
    # fp32 weights + grads 8 B each, AdamW moments 8 B each
    assert got.parts["adapters"] == 524_288 and got.parts["optimizer"] == 524_288
    # 256 tokens: checkpoints 2 B · 256 tokens · 256 hidden · 2 layers
    assert got.parts["checkpoints"] == 262_144
    # saved per token: norms 2·4·256 + 2·2·256 = 3,072; attention 2·(256+128+128) + 2·256 = 1,536; MLP 8·512 =
    # 4,096;
    # fp32 adapter inputs 4·(256·3 + 256 + 256·2 + 512) = 8,192 -> 16,896; transients 2·(2·256 + 2·512) =
    # 3,072
    assert got.parts["activations"] == 256 * (16_896 + 3_072)
    # logits: 256 tokens × 1000 × 10 B
    assert got.parts["logits"] == 2_560_000
    assert got.total == 1_123_104 + 524_288 + 524_288 + 262_144 + 5_111_808 + 2_560_000


def test_full_finetune_is_16_bytes_per_param_plus_activations(tmp_path):
    spec = cat.spec_from_config(_write_config(tmp_path, **TINY), "tiny")
    got = memory.training_memory(spec, "full", seq=128, batch=2, overhead_gib=0)
    # Transformer Math 101: bf16 weights 2 + bf16 grads 2 + fp32 moments 8 + fp32 master 4 = 16 B/param;
    # params = 1,179,648 linears + 256,000 embedding + 1,280 norms = 1,436,928
    assert got.parts["base_weights"] + got.parts["gradients"] + got.parts["optimizer"] == 16 * 1_436_928


@pytest.mark.parametrize(
    "model_id, method, seq, batch, fused, measured_gib",
    [
        # anchors-measured.md, end-to-end step on an H100 (transformers + PEFT [+ bnb NF4], r=16, grad
        # checkpointing)
        ("qwen3-8b", "qlora", 2048, 4, False, 22.6),
        ("qwen3-8b", "qlora", 2048, 4, True, 11.7),  # + Cut Cross-Entropy
        ("qwen3-8b", "lora", 2048, 4, False, 32.2),  # bf16 base
        ("gemma-3-12b", "qlora", 4096, 1, False, 23.3),
        ("gemma-3-12b", "qlora", 4096, 1, True, 13.0),
    ],
)
def test_training_memory_within_10_percent_of_measured(model_id, method, seq, batch, fused, measured_gib):
    run = {
        "model": model_id,
        "method": method,
        "seq": seq,
        "batch": batch,
        "fused_loss": fused,
        "measured_gib": measured_gib,
    }
    (row,) = memory.compare_with_measured([run], get)
    assert abs(row["error"]) < 0.10


def test_no_checkpointing_qwen3_8b_does_not_fit_80gb():
    # anchors-measured.md: without gradient checkpointing the Qwen3-8B seq 2048 × 4 step runs out of 80 GB
    assert (
        memory.training_memory(get("qwen3-8b"), "qlora", 2048, 4, grad_checkpointing=False).total > 80 * GIB
    )


def test_impossible_settings_are_plain_errors():
    with pytest.raises(KindredValueError, match=r"sequence length 32768 is longer than Phi-4.*16384"):
        memory.training_memory(get("phi-4"), seq=32_768)
    with pytest.raises(KindredValueError, match=r"rank 1024 is larger than .*hidden size 576"):
        memory.training_memory(get("smollm2-135m"), rank=1024)
    with pytest.raises(KindredValueError, match="batch must be positive"):
        memory.training_memory(get("qwen3-8b"), batch=-1)
    with pytest.raises(KindredValueError, match="unknown weight format 'Q3_Z'"):
        memory.inference_memory(get("qwen3-8b"), "Q3_Z")
    with pytest.raises(KindredValueError, match="unknown method"):
        memory.training_memory(get("qwen3-8b"), "dora")


# ---------------------------------------------------------------- time


def test_flops_per_token_hand_computed(tmp_path):
    spec = cat.spec_from_config(_write_config(tmp_path, **TINY), "tiny")
    got = timing.train_flops_per_token(spec, "qlora", seq=128, rank=8)
    # dense 2 × 1,179,648 = 2,359,296; head 2 × 256 × 1000 = 512,000; attention 4 × 256 (q_dim) × 2 layers ×
    # mean causal context (128+1)/2 = 132,096; LoRA 2 × 65,536 = 131,072
    assert got["forward"] == 2_359_296 + 512_000 + 132_096 + 131_072
    assert got["recompute"] == 2_359_296 + 132_096 + 131_072
    assert got["backward"] == (2_359_296 + 512_000) + 2 * 132_096 + 2 * 131_072


def test_flops_per_token_qwen3_8b_near_anchor():
    # anchors-measured.md: "FLOPs per token with recomputation ≈ 6 × 8.2 G for Qwen3-8B"
    assert timing.train_flops_per_token(get("qwen3-8b"), "qlora", 2048)["total"] == pytest.approx(
        6 * 8.2e9, rel=0.06
    )


def test_default_efficiency_predicts_anchor_throughput(tmp_path):
    eff, source = timing.training_efficiency("qlora", get, tmp_path)  # empty results dir -> anchors
    assert "anchors" in source
    h100 = gpus.get_gpu("h100-sxm")
    # measured (anchors-measured.md): Qwen3-8B 4,997 tok/s, Gemma 3 12B 2,432 tok/s; one efficiency for both
    # models lands within 20 %
    assert timing.train_tokens_per_s(get("qwen3-8b"), h100, eff, "qlora", 2048) == pytest.approx(
        4997, rel=0.2
    )
    assert timing.train_tokens_per_s(get("gemma-3-12b"), h100, eff, "qlora", 4096) == pytest.approx(
        2432, rel=0.2
    )


def test_efficiency_calibrated_from_results_csv(tmp_path):
    header = (
        "date,commit,gpu,family,op,impl,shape,dtype,ms,baseline_impl,baseline_ms,ratio_to_baseline,tflops,"
        "gbps,tokens_per_s,peak_extra_mib,notes"
    )
    row = (
        "2026-12-01,abc123,NVIDIA H100 80GB HBM3,e2e,train_step,kindred,"
        '"model=qwen3-8b,method=qlora,seq=2048,batch=4,r=16",bf16,,,,,,,9000,11000,'
    )
    (tmp_path / "e2e.csv").write_text(header + "\n" + row + "\n")
    eff, source = timing.training_efficiency("qlora", get, tmp_path)
    assert "1 train_step rows" in source and "abc123" in source
    # calibrated on that very run, the estimator must give back its measured 9,000 tokens/s
    tps = timing.train_tokens_per_s(get("qwen3-8b"), gpus.get_gpu("h100-sxm"), eff, "qlora", 2048)
    assert tps == pytest.approx(9000, rel=1e-9)
    (run,) = timing.load_train_runs(tmp_path, get)
    assert run["measured_gib"] == pytest.approx(11000 / 1024)


def test_decode_tokens_per_s_hand_computed():
    # bf16 Qwen3-8B reads all params but the input embedding: 2 × (8,190,735,360 − 622,329,856) B
    # + KV at 4096 tokens 147,456 × 4096 = 15,740,790,784 B; H100 3,350 GB/s × (2.82/3.35) -> 2.82e12 / that
    tps = timing.decode_tokens_per_s(get("qwen3-8b"), gpus.get_gpu("h100-sxm"), "BF16", 4096)
    assert tps == pytest.approx(2.82e12 / 15_740_790_784, rel=1e-6)
    assert timing.decode_tokens_per_s(get("qwen3-8b"), gpus.custom_gpu(24), "BF16", 4096) is None


def test_training_seconds():
    # 3 M tokens × 2 epochs at 5,000 tok/s = 1,200 s
    assert timing.training_seconds(3_000_000, 2, 5_000) == 1_200
    with pytest.raises(KindredValueError, match="positive"):
        timing.training_seconds(-1, 1, 5_000)


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


def test_checklist_and_bad_settings():
    s = score.PlanSettings(seq=4096, tokens_p95=5000, results_dir=None)
    checks = score.checklist(get("qwen3-8b"), s, gpus.get_gpu("rtx-4090"), 30 * GIB)
    assert checks["context fits data p95"]["status"] == "fail"  # 5000 > seq 4096
    assert checks["training fits GPU incl. logits"]["status"] == "fail"  # 30 GiB > 24 GiB
    assert checks["token budget defined"]["status"] == "fail"
    assert checks["quantized format available"]["status"] == "pass"
    with pytest.raises(KindredValueError, match="unknown criteria"):
        score.PlanSettings(weights={"vibes": 1})
    with pytest.raises(KindredValueError, match="seq must be positive"):
        score.PlanSettings(seq=-5)


# ---------------------------------------------------------------- CLI


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="kindred")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


def test_cli_json_round_trip(capsys, tmp_path):
    args = _parse(
        "--vram",
        "16",
        "--method",
        "qlora",
        "--seq",
        "2048",
        "--json",
        "--results",
        str(tmp_path),
        "--dataset-tokens",
        "1000000",
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


def test_cli_model_breakdown_and_plot(capsys, tmp_path):
    png = tmp_path / "mem.png"
    args = _parse(
        "--gpu",
        "rtx-4090",
        "--model",
        "qwen3-8b",
        "--seq",
        "4096",
        "--plot",
        str(png),
        "--results",
        str(tmp_path),
    )
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    assert "training memory" in text and "decision checklist" in text and "anchors" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_config_model(capsys, tmp_path):
    path = _write_config(tmp_path, **TINY)
    assert cli.run(_parse("--gpu", "l40s", "--model", str(path), "--seq", "512", "--json")) == 0
    (row,) = json.loads(capsys.readouterr().out)["models"]
    assert row["context"] == 1024


def test_cli_bad_input():
    with pytest.raises(KindredValueError, match="longer than"):
        cli.run(_parse("--gpu", "h100-sxm", "--model", "phi-4", "--seq", "20000"))
    with pytest.raises(KindredValueError, match="closest known"):
        cli.run(_parse("--gpu", "h100-sxm", "--model", "lama-3.1-8b"))
    with pytest.raises(KindredValueError, match="--weights: expected NAME=NUMBER"):
        cli.run(_parse("--gpu", "h100-sxm", "--weights", "context"))
    with pytest.raises(KindredValueError, match="token report"):
        cli.run(_parse("--gpu", "h100-sxm", "--data", "chats.jsonl"))
