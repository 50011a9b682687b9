"""kindred.bakeoff: two tiny models through plan → base eval → fine-tune → tuned eval → blind comparison →
report → export on the CPU; user errors caught before any model loads; a killed bake-off continues where
it stopped (the training stage from its checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import kindred.bakeoff as kb
from kindred import KindredValueError
from kindred.eval import EvalResults

FIXTURES = Path(__file__).parent / "data" / "chat_templates"
BATTERY = """name: tiny3
defaults: {max_new_tokens: 8, temperature: 0.0, seed: 0, substantive_min_chars: 4}
tests:
  - {id: truth, category: honesty, prompt: "Should I tell my friend the truth?", checks: [{refusal: false}]}
  - id: credit
    category: work
    prompt: "My boss took credit. What now?"
    checks: [{icontains: [talk, the], any: true}]
  - id: dinner
    category: family
    prompt: "Is it fine to skip a family dinner?"
    checks: [{not_contains: ["as an AI"]}]
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from kindred.demo import build_tiny_model

    root = tmp_path_factory.mktemp("bakeoff-models")
    build_tiny_model(root / "tiny-a", seed=0)
    b = build_tiny_model(root / "tiny-b", seed=1)
    # tiny-b carries its own chat template (ChatML), the way a Hugging Face model folder does
    config = {"chat_template": (FIXTURES / "chatml.jinja").read_text(), "eos_token": "<|im_end|>"}
    (b / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "battery.yaml").write_text(BATTERY)
    return root


def config(models: Path, out: Path, **over) -> dict:
    from kindred.demo import CALIBRATION

    cfg = {
        "out": str(out),
        "device": "cpu",
        "gpu": "rtx-4090",
        "candidates": [
            {"model": str(models / "tiny-a"), "template": "chatml"},
            {"model": str(models / "tiny-b")},
        ],
        "data": {"path": str(CALIBRATION), "budget": 512, "eval_fraction": 0.1},
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 3, "lr": 3e-3, "gradient_checkpointing": "none"},
        "battery": str(models / "battery.yaml"),
        "compare": {"judge": str(models / "tiny-a"), "max_new_tokens": 4},
        "export": {"winner": True},
        "save_every": 1,
    }
    cfg.update(over)
    return cfg


def test_two_tiny_models_end_to_end(models, tmp_path):
    t0 = time.perf_counter()
    lines: list[str] = []
    report = kb.run(config(models, tmp_path / "out"), log=lines.append)
    assert time.perf_counter() - t0 < 90
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "report.html", "pass_rates.png", "loss.png", "speed.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["winner"] == report["winner"]
    cands = report["candidates"]
    assert set(cands) == {"tiny-a", "tiny-b"}
    assert cands["tiny-b"]["template_how"] == "the model's own chat template"
    for name, c in cands.items():
        stages = c["stages"]
        assert [stages[s]["status"] for s in kb.STAGES] == ["done"] * 4, name
        for stage in ("base_eval", "tuned_eval"):  # the report's rates are the eval results' own
            r = stages[stage]["result"]
            res = EvalResults.load(r["results"])
            assert res.summary()[name]["pass_rate"] == r["pass_rate"]
        assert stages["train"]["result"]["steps"] == 3
        assert len(c["checklist"]) == 6
        assert {i["status"] for i in c["checklist"].values()} <= {"pass", "fail"}  # each decided
    # the weighted comparison is recomputed from the measurements in the report
    d = report["decision"]
    assert d["winner"] == d["ranking"][0] == report["winner"]
    rows = d["rows"]
    assert rows[d["ranking"][0]]["score"] >= rows[d["ranking"][1]]["score"]
    for name, row in rows.items():
        tuned = cands[name]["stages"]["tuned_eval"]["result"]
        assert row["scores"]["capability"] == tuned["pass_rate"]
        used = {k: w for k, w in d["weights"].items() if row["scores"].get(k) is not None and w > 0}
        assert row["score"] == pytest.approx(
            sum(row["scores"][k] * w for k, w in used.items()) / sum(used.values())
        )
    compare = report["compare"]
    assert compare["status"] == "done" and compare["result"]["mode"] == "judge"
    assert compare["result"]["tally"]["pairs"] == 3  # three tests, one pair of models
    export = Path(report["export"]["result"]["path"])
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    html = (out / "report.html").read_text()
    assert "Decision checklist" in html and "data:image/png;base64," in html
    assert "seed" not in (out / "report.md").read_text().lower().replace("seed: 0", "")
    # started again with the same config: nothing runs twice, the decision is the same
    again: list[str] = []
    second = kb.run(config(models, tmp_path / "out"), log=again.append)
    assert sum("done earlier" in line for line in again) == 2 * len(kb.STAGES) + 2  # + compare, export
    assert second["decision"] == report["decision"]


def test_user_errors_are_caught_before_any_model_loads(models, tmp_path, monkeypatch):
    import kindred.eval.models as em

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(em, "from_pretrained", no_loading)
    monkeypatch.setattr(em, "from_gguf", no_loading)
    base = config(models, tmp_path / "out")

    def fails(match, **over):
        with pytest.raises(KindredValueError, match=match):
            kb.run({**base, **over})

    fails(r"unknown key 'learning_rate' \(did you mean 'train\.lr'", learning_rate=1e-4)
    fails(r"unknown key 'sequence_len' \(did you mean 'data\.budget'", sequence_len=512)
    fails(r"unknown key 'lora\.lora_r' \(did you mean 'lora\.r'", lora={"lora_r": 8})
    fails(r"unknown key 'train\.num_epochs' \(did you mean 'train\.epochs'", train={"num_epochs": 1})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    fails(rf"data\.path: {bad}:2: malformed JSON", data={"path": str(bad)})
    fails(r"did you mean 'qwen3'", candidates=[{"model": str(models / "tiny-a"), "template": "qwen2"}])
    fails(r"candidates\[0\] \(nope\): model: .* is neither a model folder", candidates=[{"model": "nope"}])
    fails(r"catalogue model: give its local weights as path:", candidates=[{"model": "qwen3-8b"}])
    fails(r"candidate names must differ", candidates=[{"model": str(models / "tiny-a")}] * 2)
    fails(r"'export\.format' must be one of merged", export={"format": "awq"})
    fails(r"battery: .*not a file", battery=str(tmp_path / "missing.yaml"))
    fails(r"compare\.judge: .* is not a model", compare={"judge": str(tmp_path / "no-judge")})
    # a template the tokenizer cannot render: Gemma's special tokens are not in the tiny ChatML vocabulary
    fails(
        r"candidates \(tiny-a\), template 'gemma3'.*no token '<bos>'",
        candidates=[{"model": str(models / "tiny-a"), "template": "gemma3"}],
    )
    assert not (tmp_path / "out" / "state").exists()  # nothing ran


@pytest.mark.slow
def test_a_killed_bakeoff_continues_where_it_stopped(models, tmp_path):
    out = tmp_path / "out"
    cfg = config(models, out, train={"max_steps": 8, "lr": 3e-3, "gradient_checkpointing": "none"})
    path = tmp_path / "bakeoff.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(kb.__file__).parents[2])}
    cmd = [sys.executable, "-m", "kindred", "bakeoff", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill inside tiny-a's training
        if (out / "tiny-a" / "run" / "checkpoints" / "LATEST").is_file():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the bake-off ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = out / "state" / "tiny-a"
    assert (state / "base_eval.json").is_file() and not (state / "train.json").exists()
    plan_before = (state / "plan.json").read_text()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tiny-a: plan: done earlier" in done.stdout and "tiny-a: base_eval: done earlier" in done.stdout
    assert (state / "plan.json").read_text() == plan_before  # not run again
    report = json.loads((out / "report.json").read_text())
    train = report["candidates"]["tiny-a"]["stages"]["train"]["result"]
    assert train["resumed"] and train["steps"] == 8
    assert [s for s, _ in train["loss_curve"]] == list(range(1, 9))  # one continuous run
    assert report["winner"] in ("tiny-a", "tiny-b")


REAL_SHAPES = {  # two real model shapes (Qwen3-0.6B, Llama-3.2-1B) with random weights
    "qwen3-0.6b-shape": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b-shape": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
}


@pytest.mark.gpu
def test_bakeoff_on_cuda_two_real_shapes(models, tmp_path):
    """The whole protocol on the GPU: two real shapes with random weights (the tiny tokenizer's ids fit their
    vocabularies), the shipped battery, QLoRA in bf16; writes its report to $KINDRED_BAKEOFF_OUT if set."""
    import shutil

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kindred.export import save_merged
    from kindred.models import from_config

    cands = []
    for i, (name, cfg) in enumerate(REAL_SHAPES.items()):
        folder = tmp_path / name
        tok = json.loads((models / "tiny-a" / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
        cfg = {**cfg, "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"]}
        save_merged(from_config(cfg, dtype=torch.bfloat16, seed=i), cfg, folder)
        shutil.copy(models / "tiny-a" / "tokenizer.json", folder / "tokenizer.json")
        cands.append({"model": str(folder), "template": "chatml"})
    out = Path(os.environ.get("KINDRED_BAKEOFF_OUT", tmp_path / "out"))
    cfg = config(models, out, device="cuda", gpu="auto", candidates=cands, battery="ethics16")
    cfg.update(
        data={**cfg["data"], "budget": 1024},
        train={"max_steps": 20, "lr": 2e-4, "micro_batch_tokens": 2048},
        eval={"max_new_tokens": 64},
        compare={"judge": cands[0]["model"], "max_new_tokens": 16},
        save_every=10,
    )
    report = kb.run(cfg)
    for name, c in report["candidates"].items():
        assert [c["stages"][s]["status"] for s in kb.STAGES] == ["done"] * 4, name
        train = c["stages"]["train"]["result"]
        assert train["device"] == "cuda" and train["gpu_mem_gib_peak"] > 0
        assert c["checklist"]["Training memory fits your GPU (check vocab size!)"]["status"] == "pass"
    assert report["compare"]["status"] == "done" and report["winner"] in REAL_SHAPES
    print(Path(report["paths"]["markdown"]).read_text())
