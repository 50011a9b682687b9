"""`kindred eval` from the shell (run, report, validate; files not overwritten silently) and the pass rate
flowing into `kindred plan --eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kindred.cli import main
from kindred.plan.score import rubric_check

from .eval_helpers import SMALL_BATTERY, build_model_and_adapter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder, adapter = build_model_and_adapter(root)
    battery = root / "small.yaml"
    battery.write_text(SMALL_BATTERY)
    out = root / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [
        sys.executable,
        "-m",
        "kindred",
        "eval",
        str(battery),
        "--model",
        str(folder),
        "--adapter",
        f"tuned={adapter}",
        "--quant",
        "none",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--plan-id",
        "qwen3-8b",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    return root, out, proc.stdout, again


def test_eval_run_writes_everything_and_prints_the_tables(run_dir):
    _, out, stdout, again = run_dir
    for name in ("results.json", "samples.jsonl", "results.csv", "report.html"):
        assert (out / name).is_file()
    assert "kindred eval · small" in stdout and "per model" in stdout and "base → tuned" in stdout
    data = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in data["models"]] == ["base", "tuned"] and data["models"][0][
        "plan_id"
    ] == "qwen3-8b"
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_report_and_validate(run_dir, capsys, tmp_path):
    root, out, _, _ = run_dir
    assert main(["eval", "report", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").read_text().count("<svg") == 2
    assert (
        main(["eval", "validate", "ethics16", "--model", str(root / "tiny-model"), "--template", "chatml"])
        == 0
    )
    assert "16 tests in 6 categories" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "tests:\n  - id: a\n    category: c\n    prompt: hi\n    checks:\n      - {regex: '(unclosed'}\n"
    )
    assert main(["eval", "validate", str(bad)]) == 2
    assert (
        f"{bad}:6: tests[0].checks[0].regex: the regular expression does not compile"
        in capsys.readouterr().err
    )


def test_the_pass_rate_feeds_the_plan(run_dir, capsys):
    _, out, _, _ = run_dir
    data = json.loads((out / "results.json").read_text())
    rate = data["summary"]["base"]["pass_rate"]
    assert (
        main(["plan", "--vram", "24", "--model", "qwen3-8b", "--eval", str(out / "results.json"), "--json"])
        == 0
    )
    (record,) = json.loads(capsys.readouterr().out)["models"]
    assert record["scores"]["capability"] == rate and record["capability_source"] == "rubric pass rate"
    item = record["checklist"]["base model evaluated on your rubric"]
    assert item["status"] == "pass" and f"{100 * rate:.0f} % passed" in item["detail"]
    assert (
        main(["plan", "--vram", "24", "--model", "qwen3-8b", "--eval", f"qwen3-8b={out / 'results.json'}"])
        == 0
    )
    text = capsys.readouterr().out
    assert "rubric: qwen3-8b passed" in text and "base model evaluated on your rubric" in text
    assert main(["plan", "--vram", "24", "--model", "qwen3-8b", "--eval", str(out / "samples.jsonl")]) == 2
    assert "not a readable results.json" in capsys.readouterr().err


def test_the_advice_thresholds():
    assert rubric_check(None)["status"] == "unknown" and "kindred eval" in rubric_check(None)["detail"]
    assert "fine-tuning may not be needed" in rubric_check(0.75)["detail"]
    assert "should help significantly" in rubric_check(0.4)["detail"]
    assert "between 50 % and 70 %" in rubric_check(0.6)["detail"]
    assert rubric_check(0.7)["detail"].startswith("70 % passed, between")
