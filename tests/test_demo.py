"""``kindred demo`` (the README's first command) on the tiny model with a few steps: what it prints and
the outputs folder it leaves."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console

from kindred.demo import run_demo
from kindred.models import from_pretrained
from kindred.nn import load_adapter


def test_demo_on_the_tiny_model(tmp_path):
    out = tmp_path / "demo"
    buf = io.StringIO()
    summary = run_demo(out, device="cpu", model="tiny", steps=4, console=Console(file=buf, width=120))
    text = buf.getvalue()
    for heading in ("1. token report", "2. QLoRA fine-tune", "3. held-out loss", "4. sample", "5. eval"):
        assert heading in text
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["device"] == "cpu"
    losses = [
        summary[k] for k in ("eval_loss_before", "eval_loss_after", "train_loss_first", "train_loss_last")
    ]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]  # four steps at lr 3e-3 already help
    assert f"{summary['eval_loss_before']:.4f}" in text and f"{summary['eval_loss_after']:.4f}" in text
    assert summary["sample_prompt"] and isinstance(summary["sample_after"], str)

    # the before/after eval on the shipped battery: the same base, adapter off then on
    evaluation = summary["eval"]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["before", "after"]
    assert [results["summary"][k]["passed"] for k in ("before", "after")] == [
        evaluation["before"]["passed"],
        evaluation["after"]["passed"],
    ]
    assert len(results["samples"]) == 32 and (out / "eval" / "report.html").is_file()
    assert all(s["new_tokens"] <= 96 for s in results["samples"])
    # Both variants answered every test. (The tiny model's greedy answers can repeat one token before and
    # after four steps; the adapter's effect is the held-out loss checked above.)
    for variant in ("before", "after"):
        ids = sorted(s["test_id"] for s in results["samples"] if s["model"] == variant)
        assert len(ids) == 16 and len(set(ids)) == 16
    assert "ethics16 pass rate" in text and "before → after" in text

    report = json.loads((out / "token_report.json").read_text())
    assert report["examples"] > 0 and 0 < report["trainable"] < report["total"]
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["loss"] == summary["train_loss_first"]

    # the adapter is a real PEFT folder that loads back onto the base model
    adapter = out / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    model = from_pretrained(out / "tiny-model", quant="nf4", dtype=torch.float32)
    names = load_adapter(model, adapter)
    assert len(names) == 2 * 7  # two layers, seven projections
    trained_b = [m.lora_B["default"].weight for _, m in model.named_modules() if hasattr(m, "lora_B")]
    assert len(trained_b) == 14 and all(b.abs().max() > 0 for b in trained_b)  # B starts at zero


@pytest.mark.gpu
def test_demo_on_cuda(tmp_path):
    """The same command on a GPU: bf16, two 1,024-token rows per step, memory reported per step."""
    summary = run_demo(
        tmp_path / "demo", device="cuda", model="tiny", steps=4, console=Console(file=io.StringIO())
    )
    assert summary["device"].startswith("cuda") and summary["steps"] == 4
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    metrics = [
        json.loads(line) for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(m["gpu_mem_gib"] > 0 and math.isfinite(m["loss"]) for m in metrics)
    assert max(m["tokens"] for m in metrics) > 1024  # two packed rows per step
