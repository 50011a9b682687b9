"""Held-out evaluation during training: the loss every ``output.eval_every`` steps (and before and at the
end, never twice at a step), a greedy sample reply at each (samples.jsonl, the log), training untouched by
it (bitwise), both continuing across a resume, the config keys and the loss plot."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

import kindred
from kindred.data import get_template
from kindred.demo import build_tiny_model
from kindred.generate import SamplingConfig, generate, stop_token_ids
from kindred.train import load_config
from kindred.train.config import config_keys
from kindred.train.heldout import sample_prompt
from kindred.train.metrics import loss_figure
from kindred.train.parallel import FSDP_4BIT_TORCH
from kindred.train.trainer import Trainer

from .helpers import tiny_run_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("evalevery") / "model", seed=3)


def config(model, out, **over) -> dict:
    return tiny_run_config(
        model,
        out,
        over,
        lora={"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: training draws random numbers
        data={"eval_fraction": 0.1},
        train={"max_steps": 7, "micro_batch_tokens": 512, "lr": 2e-2, "gradient_checkpointing": "none"},
        output={"save_every": 2, "eval_every": 3, "plot": False},
    )


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tiny_model, tmp_path_factory):
    """7 steps with an evaluation every 3: (trainer, result, what it printed)."""
    out = tmp_path_factory.mktemp("evaluated") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # not a terminal: plain lines
        trainer = Trainer(config(tiny_model, out, **{"output.progress": True}))
        result = trainer.fit()
    return trainer, result, printed.getvalue()


def test_evaluations_at_every_eval_every_steps_and_the_end(evaluated):
    trainer, result, printed = evaluated
    assert [s for s, _ in result.eval_losses] == [0, 3, 6, 7]
    samples = rows(result.out_dir / "samples.jsonl")
    assert [r["step"] for r in samples] == [0, 3, 6, 7]
    assert [r["held_out_loss"] for r in samples] == [v for _, v in result.eval_losses]
    for step, loss in result.eval_losses:
        line = f"kindred train: step {step}: held-out loss {loss:.4f}  sample: "
        assert printed.count(line) == 1, (line, printed)
    # The prompt is the first held-out conversation's last question, as the run's template renders it.
    conversation = trainer.eval_prepared.chat.conversations[0]
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    messages = conversation[:last]
    assert all(r["prompt"] == messages[-1]["content"] for r in samples)
    tpl, tok = get_template("chatml"), trainer.tokenizer
    ids = tok.encode(tpl.render_text(messages) + tpl.generation_prompt())
    assert trainer._sample.ids == ids
    short = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=len(ids), eos_token_ids=()))
    assert sample_prompt(trainer.eval_prepared, short) is None  # no room for a reply: no sample
    # The last reply is kindred.generate's greedy reply of the trained model, decoded by its tokenizer.
    config = SamplingConfig(max_new_tokens=48)
    (want,) = generate(
        result.model, [ids], config, stop_token_ids=stop_token_ids(tok, "chatml"), tokenizer=tok
    )
    assert want.new_tokens > 0 and want.text.strip() and samples[-1]["reply"] == want.text


def test_evaluations_leave_training_bitwise_unchanged(tiny_model, evaluated, tmp_path):
    _, result, _ = evaluated
    over = {"output.eval_every": 0, "output.sample_tokens": 0}
    plain = kindred.train(config(tiny_model, tmp_path / "plain", **over))
    assert [r["loss"] for r in plain.metrics] == [r["loss"] for r in result.metrics]  # the same floats
    assert [s for s, _ in plain.eval_losses] == [0, 7] and plain.eval_losses[-1] == result.eval_losses[-1]
    assert not (tmp_path / "plain" / "samples.jsonl").exists()  # sample_tokens 0: no replies


def test_evaluations_and_samples_continue_across_a_resume(tiny_model, evaluated, tmp_path, monkeypatch):
    _, ref, _ = evaluated
    out = tmp_path / "run"
    real_step = Trainer._train_step

    def stop_after_3(self):
        if self.step == 3:
            raise KeyboardInterrupt  # after the evaluation of step 3; the last checkpoint is step 2's
        return real_step(self)

    monkeypatch.setattr(Trainer, "_train_step", stop_after_3)
    with pytest.raises(KeyboardInterrupt):
        kindred.train(config(tiny_model, out))
    monkeypatch.undo()
    assert [r["step"] for r in rows(out / "samples.jsonl")] == [0, 3]
    with (out / "samples.jsonl").open("a") as f:
        f.write('{"step": 4, "held_out_loss": 6.1, "pro')  # a kill in the middle of an append
    resumed = kindred.train(config(tiny_model, out), resume=True)
    # Step 3's row (after the checkpoint) and the torn line are dropped, step 3 evaluated again: one row
    # per evaluation, the same as the uninterrupted run's.
    assert rows(out / "samples.jsonl") == rows(ref.out_dir / "samples.jsonl")
    assert resumed.eval_losses == ref.eval_losses
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == list(range(1, 8))
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in ref.metrics]


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_samples_append_is_repaired_on_resume(tiny_model, evaluated, tmp_path):
    _, ref, _ = evaluated
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model, tmp_path / "run")))
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(kindred.__file__).parents[1])}
    cmd = [sys.executable, "-m", "kindred", "train", str(path)]
    killed = subprocess.run(cmd, env={**env, "KINDRED_FAULT_KILL": "samples:3"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    torn = (tmp_path / "run" / "samples.jsonl").read_bytes()
    assert not torn.endswith(b"\n") and torn.count(b"\n") == 2  # step 6's row half written
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kindred train: resumed from step 4 of 7" in done.stdout
    got, want = rows(tmp_path / "run" / "samples.jsonl"), rows(ref.out_dir / "samples.jsonl")
    assert [r["step"] for r in got] == [0, 3, 6, 7]  # every line whole, one per evaluation
    assert [r["prompt"] for r in got] == [r["prompt"] for r in want]
    for a, b in zip(got, want, strict=True):  # another process (threads may split sums otherwise): close
        assert math.isclose(a["held_out_loss"], b["held_out_loss"], rel_tol=1e-5)


def test_no_held_out_data_no_evaluation_said_once(tiny_model, tmp_path, capsys):
    over = {"data.eval_fraction": 0.0, "train.max_steps": 2, "output.progress": True}
    result = kindred.train(config(tiny_model, tmp_path / "run", **over))
    printed = capsys.readouterr().out
    assert printed.count("kindred train: no held-out data (data.eval_path or data.eval_fraction)") == 1
    assert "held-out loss " not in printed and result.eval_losses == []
    assert not (tmp_path / "run" / "samples.jsonl").exists()


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"eval_every": -1},
            "'output.eval_every' must be >= 0 (0: only before training and at the end); got -1",
        ),
        ({"eval_every": 2.5}, "'output.eval_every' must be an integer, got 2.5"),
        ({"sample_tokens": -3}, "'output.sample_tokens' must be >= 0 (0: no sample replies); got -3"),
        ({"eval_steps": 10}, "unknown key 'output.eval_steps' (did you mean 'output.eval_every'?"),
    ],
)
def test_config_errors_name_the_key(over, message):
    raw = {"model": "m", "data": {"path": "d.jsonl", "template": "chatml"}, "output": over}
    with pytest.raises(kindred.KindredValueError) as e:
        load_config(raw)
    assert message in str(e.value)


def test_the_trl_key_eval_steps_names_kindreds():
    with pytest.raises(
        kindred.KindredValueError, match=r"unknown key 'eval_steps' \(did you mean 'output.eval"
    ):
        load_config({"model": "m", "data": {"path": "d.jsonl", "template": "chatml"}, "eval_steps": 5})
    keys = {key: default for key, default, _ in config_keys()}  # what `kindred train --help` lists
    assert keys["output.eval_every"] == 0 and keys["output.sample_tokens"] == 48


def test_the_loss_plot_draws_every_evaluation():
    train = [{"step": s, "loss": 5.0 - 0.01 * s} for s in range(1, 101)]
    evals = [(s, 5.1 - 0.01 * s) for s in range(0, 101, 5)]
    fig = loss_figure(train, evals)
    if fig is None:
        pytest.skip("matplotlib is not installed")
    (ax,) = fig.axes
    curve, held = ax.get_lines()
    assert list(curve.get_xdata()) == list(range(1, 101)) and curve.get_linestyle() == "-"
    assert list(held.get_xdata()) == [s for s, _ in evals] and list(held.get_ydata()) == [v for _, v in evals]
    assert held.get_linestyle() == "--" and held.get_marker() == "o"  # a line through all 21 points


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_evaluations_on_two_ranks(tiny_model, tmp_path, engine):
    # Rank 0 writes the rows; every rank evaluates (FSDP's forward needs them all); only DDP samples replies.
    path = tmp_path / "cfg.yaml"
    over = {"train.distributed": engine, "train.max_steps": 4, "output.eval_every": 2}
    over["output.progress"] = True
    if engine == "fsdp" and torch.__version__ < FSDP_4BIT_TORCH:  # refused over 4-bit there (test_train_dist)
        over["quant"] = "none"
    path.write_text(yaml.safe_dump(config(tiny_model, tmp_path / "run", **over)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pathlib.Path(kindred.__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*cmd, "-m", "kindred", "train", str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [int(s) for s in re.findall(r"kindred train: step (\d+): held-out loss", done.stdout)]
    assert steps == [0, 2, 4]  # printed once each (rank 0)
    samples = tmp_path / "run" / "samples.jsonl"
    if engine == "ddp":
        assert [r["step"] for r in rows(samples)] == [0, 2, 4] and "sample: " in done.stdout
    else:
        assert not samples.exists() and "held-out loss without sample replies" in done.stdout
