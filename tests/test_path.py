"""A new user's path: user errors named before the model loads (data file, template name with "did you mean",
TRL / Axolotl key names), plain progress lines off a terminal, "resumed from step N", metrics continuous
across a resume, ``--version``, ``train --help`` listing the keys without torch, no internal document names
in what kindred prints, ``kindred info`` not claiming CUDA kernels that cannot run."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kindred import KindredValueError
from kindred.demo import CALIBRATION, build_tiny_model

from .helpers import kindred_path, tiny_run_config

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "kindred"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("path") / "model", seed=2)


def config(model, out, **over) -> dict:
    return tiny_run_config(
        model,
        out,
        over,
        lora={"r": 4, "alpha": 8},
        train={"max_steps": 3, "lr": 1e-2, "gradient_checkpointing": "none"},
        output={"save_every": 3, "plot": False},
    )


def test_data_and_template_errors_come_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    import kindred.train.trainer as trainer

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the data and template were checked")

    monkeypatch.setattr(trainer, "load_model", no_loading)
    with pytest.raises(
        KindredValueError, match=r"data\.template: unknown chat template 'qwen2'; did you mean 'qwen3'"
    ):
        trainer.Trainer(config(tiny_model, tmp_path, **{"data.template": "qwen2"}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n[1,\n'
    )
    with pytest.raises(KindredValueError, match=rf"data\.path: {re.escape(str(bad))}:2: malformed JSON"):
        trainer.Trainer(config(tiny_model, tmp_path, **{"data.path": str(bad)}))
    with pytest.raises(KindredValueError, match=r"data\.path: .*missing\.jsonl: data file not found"):
        trainer.Trainer(config(tiny_model, tmp_path, **{"data.path": str(tmp_path / "missing.jsonl")}))


@pytest.mark.parametrize(
    ("section", "key", "kindred"),
    [
        ("train", "learning_rate", "train.lr"),
        ("train", "num_epochs", "train.epochs"),
        ("data", "sequence_len", "data.budget"),
        ("lora", "lora_alpha", "lora.alpha"),
        (None, "base_model", "model"),
        (None, "gradient_accumulation_steps", "train.grad_accum"),
    ],
)
def test_trl_and_axolotl_key_names_get_kindreds(section, key, kindred):
    from kindred.train import load_config

    raw = {"model": "m", "data": {"path": "d.jsonl", "template": "chatml"}}
    if section:
        raw[section] = {**raw.get(section, {}), key: 1}
    else:
        raw[key] = 1
    with pytest.raises(
        KindredValueError, match=rf"unknown key '{key}|{section}\.{key}' \(did you mean '{kindred}'"
    ):
        load_config(raw)


def test_plain_step_lines_resume_and_continuous_metrics(tiny_model, tmp_path, capsys):
    from kindred.train import train

    out = tmp_path / "run"
    train(config(tiny_model, out))
    first = capsys.readouterr().out
    steps = re.findall(
        r"kindred train: step (\d+)/3  loss [\d.]+  lr [\d.e+-]+  [\d,]+ tok/s  elapsed [\d.]+ s", first
    )
    assert steps == ["1", "2", "3"]  # stdout is not a terminal here: one plain line per logged step
    train(config(tiny_model, out, **{"train.max_steps": 5, "output.log_every": 2}), resume=True)
    second = capsys.readouterr().out
    assert "kindred train: resumed from step 3 of 5" in second
    assert re.findall(r"kindred train: step (\d+)/5", second) == ["4", "5"]  # every 2 steps and the last
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[3] > elapsed[2]  # goes on from the checkpoint's time


def _cli(*args) -> subprocess.CompletedProcess:
    code = (
        "import sys; from kindred import cli\n"
        "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')"
    )
    env = {"PYTHONPATH": kindred_path(), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_version_and_train_help_list_the_keys_without_torch():
    from kindred import __version__

    out = _cli("--version")
    assert out.stdout.splitlines()[0] == f"kindred {__version__}"
    out = _cli("train", "--help").stdout
    for line in (
        "  model = required",
        '  quant = "nf4"  (nf4 | int4g | none)',
        "  lora.r = 16",
        "  train.lr = 0.0002",
    ):
        assert line in out, line
    assert out.rstrip().endswith("no torch")
    out = _cli("bakeoff", "--help").stdout
    assert "config keys:" in out and "candidates:" in out and "save_every: 25" in out
    assert out.rstrip().endswith("no torch")


def _output_strings(path: Path):
    """The string constants of a module that are not docstrings (what it can print or raise)."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_internal_document_names_in_output():
    internal = re.compile(r"(?i)\bseed 0\d\d\b|shared/seeds|seeds/0\d\d")
    hits = [
        f"{p.relative_to(PACKAGE)}:{line}: {text[:60]!r}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for line, text in _output_strings(p)
        if internal.search(text)
    ]
    hits += [
        f"{p.relative_to(PACKAGE)}: {m.group(0)!r}"
        for p in sorted([*PACKAGE.rglob("*.json"), *PACKAGE.rglob("*.yaml")])
        for m in [internal.search(p.read_text(encoding="utf-8"))]
        if m
    ]
    assert not hits, "\n".join(hits)


def test_info_does_not_claim_kernels_without_a_device():
    import torch

    from kindred import cuda_compiled

    out = _cli("info").stdout
    if cuda_compiled() and not torch.cuda.is_available():
        assert "compiled, unused: no CUDA device here" in out
    assert "CUDA kernels compiled: True" not in out


def test_a_gguf_file_is_accepted_as_a_tokenizer(hf_tokenizer_path, tmp_path):
    gguf = pytest.importorskip("gguf")
    vocab = json.loads(Path(hf_tokenizer_path).read_text())
    tokens = sorted(vocab["model"]["vocab"], key=vocab["model"]["vocab"].get)
    added = {t["content"] for t in vocab["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["model"]["merges"]]
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from kindred.data import load_tokenizer

    with pytest.raises(KindredValueError, match=r"m\.gguf: a GGUF model file; its tokenizer loads with"):
        load_tokenizer(path)
    runs = []
    for tok in (str(hf_tokenizer_path), str(path)):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "kindred",
                "tokens",
                str(CALIBRATION),
                "--tokenizer",
                tok,
                "--template",
                "chatml",
                "--json",
            ],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": kindred_path(), "PATH": "/usr/bin:/bin"},
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        runs.append({k: v for k, v in report.items() if k != "tokenizer"})
    assert runs[0] == runs[1]  # the same counts from the GGUF's own vocabulary
