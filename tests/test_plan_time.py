"""kindred.plan timing and calibration: FLOPs, work terms, per-trainer fits, the packaged calibration, decode.

Expected numbers are hand computations (written out) or measured figures with their source.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from kindred.errors import KindredValueError
from kindred.plan import calibrate as calib
from kindred.plan import catalogue as cat
from kindred.plan import gpus, timing

get = cat.get_model
HEADER = [
    *(
        "date",
        "commit",
        "gpu",
        "family",
        "op",
        "impl",
        "shape",
        "dtype",
        "ms",
        "baseline_impl",
        "baseline_ms",
    ),
    *("ratio_to_baseline", "tflops", "gbps", "tokens_per_s", "peak_extra_mib", "notes"),
]
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


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return cat.spec_from_config(path, "tiny")


def test_flops_per_token_hand_computed(tiny):
    got = timing.train_flops_per_token(tiny, "qlora", seq=128, rank=8, trained_share=0.5)
    # dense 2 × 1,179,648 = 2,359,296; lm_head on half the tokens 2 × 256 × 1000 × 0.5 = 256,000; LoRA
    # 2 × 65,536 = 131,072; attention 4 × 256 (q_dim) × 2 layers × mean causal context (128 + 1) / 2
    dense, head, lora, attn = 2_359_296, 256_000, 131_072, 132_096
    assert got["forward"] == dense + head + lora + attn
    assert got["recompute"] == dense + lora + attn  # full recomputation repeats the layers, not the head
    assert got["backward"] == (dense + head) + 2 * lora + 2 * attn  # frozen base: dX only
    assert (got["gemm"], got["attn"]) == (3 * dense + 2 * head + 4 * lora, 4 * attn)
    none = timing.train_flops_per_token(tiny, "qlora", seq=128, rank=8, policy="none")
    assert none["recompute"] == 0


def test_flops_per_token_qwen3_8b():
    # forward + recomputation + backward of a frozen 8.2 B model ≈ 3 × 2 × 8.2 G = 6 × 8.2 G per token
    assert timing.train_flops_per_token(get("qwen3-8b"), "qlora", 2048)["total"] == pytest.approx(
        6 * 8.2e9, rel=0.06
    )


def test_step_features_traffic_hand_computed(tiny):
    got = timing.step_features(tiny, "lora", seq=128, batch=2, rank=8, policy="none")
    # a 16-bit base dequantizes nothing: the traffic is the saved activations, 2 layers × 7,304 B per token,
    # written, read and matched by gradients (3 passes without recomputation)
    assert got["traffic"] == 2 * 7_304 * 3
    nf4 = timing.step_features(tiny, "qlora", seq=128, batch=2, rank=8, policy="full")
    # + the 4-bit base dequantized 3 times per step (forward, recomputation, backward): per layer 318,464 B
    # of NF4 read and 589,824 weights × 2 B written, over the step's 256 tokens
    acts = 2 * 7_304 * 4 + 3 * 2 * (318_464 + 2 * 589_824) / 256
    assert nf4["traffic"] == pytest.approx(acts)


def _run(model, seq, batch, policy, tps):
    fields = {"model": model, "method": "qlora", "seq": seq, "batch": batch, "rank": 16, "policy": policy}
    return fields | {"trained_share": 1.0, "gpu": "h200", "tokens_per_s": tps, "commit": "x"}


def _synthetic(coef, configs):
    """Runs whose tokens/s the time model with ``coef`` gives exactly."""
    h200 = gpus.get_gpu("h200")
    out = []
    for m, s, b, p in configs:
        feats = timing.step_features(get(m), "qlora", s, b, 16, p)
        out.append(_run(m, s, b, p, 1 / timing.seconds_per_token(feats, coef, h200)))
    return out


CONFIGS = [
    ("qwen3-8b", 2048, 4, "full"),
    ("qwen3-8b", 2048, 4, "none"),
    ("qwen3-8b", 16384, 1, "full"),
    ("qwen3-4b", 8192, 1, "none"),
    ("gemma-3-12b", 4096, 1, "full"),
    ("qwen3-4b", 16384, 1, "full"),
]


def test_fit_recovers_known_coefficients():
    coef = {"gemm": 1.6, "attn": 2.4, "traffic": 5.0}
    fit = calib.fit_trainer(_synthetic(coef, CONFIGS))
    assert fit["terms"] == ["gemm", "attn", "traffic"] and fit["rows"] == 6
    for k, v in coef.items():
        assert fit["coef"][k] == pytest.approx(v, rel=1e-6)
    assert fit["max_abs_error"] < 1e-9
    # fewer rows: fewer terms (attention tied to the GEMM rate, then no traffic term)
    assert calib.fit_trainer(_synthetic(coef, CONFIGS[:4]))["terms"] == ["gemm", "traffic"]
    one = calib.fit_trainer(_synthetic(coef, CONFIGS[:1]))
    assert one["terms"] == ["gemm"] and one["max_abs_error"] < 1e-9  # one row is reproduced exactly


def test_fit_respects_the_peak_rate():
    # a trainer that would run GEMMs faster than the datasheet peak is held at the bound (coefficient 1)
    fit = calib.fit_trainer(_synthetic({"gemm": 0.5, "attn": 0.5, "traffic": 0.0}, CONFIGS))
    assert fit["coef"]["gemm"] >= 1.0 and fit["coef"]["attn"] >= 1.0
    with pytest.raises(KindredValueError, match="no measured training rows"):
        calib.fit_trainer([])


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" for k in HEADER} | r)


def test_calibrate_keeps_trainers_apart_and_takes_the_newest(tmp_path):
    base = {"gpu": "NVIDIA H200", "op": "train_step", "family": "e2e"}
    shape = "model=qwen3-8b,method=qlora,seq=2048,batch=4,r=16,ckpt=1"
    old = base | {"date": "2026-11-01", "commit": "old", "shape": shape}
    new = base | {"date": "2026-11-02", "commit": "new", "shape": shape}
    notes = "runtime_mib=64; reserved_mib=11025; device_mib=11900"
    rows = [
        old | {"impl": "kindred", "tokens_per_s": "5000"},
        new | {"impl": "kindred", "tokens_per_s": "9000", "peak_extra_mib": "10500", "notes": notes},
        new | {"impl": "unsloth", "tokens_per_s": "11000"},
        new | {"impl": "kindred-ddp", "tokens_per_s": "18000"},
        new | {"impl": "kindred", "shape": "model=nope,seq=1", "tokens_per_s": "1"},
    ]
    _write(tmp_path / "e2e.csv", rows)
    cal = calib.calibrate(tmp_path)
    assert set(cal["trainers"]) == {"kindred", "unsloth"}  # multi-GPU and unknown models left out
    k, u = cal["trainers"]["kindred"], cal["trainers"]["unsloth"]
    assert (k["rows"], k["commits"], u["rows"]) == (1, ["new"], 1)
    h200 = gpus.get_gpu("h200")
    # one row each: each trainer's own figure comes back, not a mixture
    for trainer, tps in (("kindred", 9000), ("unsloth", 11000)):
        got = timing.train_tokens_per_s(
            get("qwen3-8b"), h200, "qlora", 2048, 4, trainer=trainer, calibration=cal
        )
        assert got == pytest.approx(tps, rel=1e-9)
    mem = cal["memory"]["kindred"]
    assert mem["runtime_allocated_bytes"] == 64 * 2**20
    assert mem["reserved_over_allocated"] == pytest.approx(11025 / 10500)
    assert mem["context_bytes"] == (11900 - 11025) * 2**20
    assert timing.train_tokens_per_s(get("qwen3-8b"), h200, trainer="nobody", calibration=cal) is None


def test_decode_calibration_from_generation_then_gemv(tmp_path):
    gemv = {"date": "2026-11-30", "commit": "c", "gpu": "NVIDIA H200", "op": "matmul_4bit"}
    gemv |= {"shape": "K=4096,N=14336,M=1", "notes": "decode graph"}
    rows = [
        gemv | {"impl": "torch-bf16", "gbps": "3840"},
        gemv | {"impl": "kindred-int4g-decode", "gbps": "2400"},
    ]
    _write(tmp_path / "matmul_4bit.csv", rows)
    dec = calib.calibrate(tmp_path)["decode"]
    assert (dec["bf16"], dec["quantized"]) == (3840 / 4800, 2400 / 4800) and "GEMV" in dec["source"]
    # kindred's own generation rows win once they exist (as bench_generate writes them; batch 64 is not
    # batch 1): tokens/s × bytes per token at the mean filled cache (32 + 512 / 2) / bandwidth
    per = timing.decode_bytes_per_token(get("qwen3-8b"), "NF4", 288)
    gen = {"date": "2026-12-02", "commit": "g", "gpu": "NVIDIA H200", "op": "decode", "impl": "kindred-nf4"}
    gen |= {"shape": "model=qwen3-8b,batch=1,prompt=32,new=512", "tokens_per_s": "200"}
    batched = gen | {"shape": "model=qwen3-8b,batch=64,prompt=32,new=512", "tokens_per_s": "4400"}
    anchor = gen | {"impl": "transformers-bf16-static-compile", "tokens_per_s": "90"}
    _write(tmp_path / "generate.csv", [gen, batched, anchor])
    dec = calib.calibrate(tmp_path)["decode"]
    assert dec["quantized"] == pytest.approx(200 * per / 4800e9) and "generate.csv" in dec["source"]
    assert "bf16" not in dec  # no kindred bf16 rows: the GEMV figure is not mixed in
    # the decode estimate is bandwidth × that efficiency / bytes per token
    got = timing.decode_tokens_per_s(get("qwen3-8b"), gpus.get_gpu("h200"), "NF4", 288, {"decode": dec})
    assert got == pytest.approx(200)


def test_apple_decode_from_its_own_measurement():
    # a user's notes measured Gemma 3 12B at 31.5 tok/s on an M3 Max; its size table (7B ~50, 12B ~30, 27B ~15
    # tok/s) then follows from bandwidth and bytes per token
    m3 = gpus.get_gpu("m3-max")
    assert timing.decode_tokens_per_s(get("gemma-3-12b"), m3, "Q4_K_M", 4096) == pytest.approx(31.5)
    assert timing.decode_tokens_per_s(get("llama-3.1-8b"), m3, "Q4_K_M", 4096) == pytest.approx(50, rel=0.15)
    assert timing.decode_tokens_per_s(get("gemma-3-27b"), m3, "Q4_K_M", 4096) == pytest.approx(15, rel=0.15)
    assert timing.train_tokens_per_s(get("gemma-3-12b"), m3) is None  # inference speed only


def test_packaged_calibration_is_kindreds_own_and_within_20_percent():
    cal = timing.load_calibration()
    fit = cal["trainers"]["kindred"]
    # generated from the repository's results: every run it lists is a kindred row of benchmarks/results
    rows = calib.load_train_rows(Path(__file__).parents[1] / "benchmarks" / "results")
    listed = {
        (r["model"], r["seq"], r["batch"], r["policy"], r["tokens_per_s"])
        for r in rows
        if r["impl"] == "kindred"
    }
    for run in fit["runs"]:
        assert (run["model"], run["seq"], run["batch"], run["policy"], run["tokens_per_s"]) in listed
        assert abs(run["error"]) < 0.20, run
    assert {"unsloth", "transformers+peft+bitsandbytes"} <= set(cal["trainers"])  # anchors, fitted apart
    assert np.isfinite(list(fit["coef"].values())).all()


def test_load_calibration_from_a_folder(tmp_path):
    assert timing.load_calibration(tmp_path)["trainers"] == {}
    with pytest.raises(KindredValueError, match="not a folder"):
        timing.load_calibration(tmp_path / "missing")
