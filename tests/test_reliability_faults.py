"""SIGKILL fault tests (issue 15): a tiny-model run is killed again and again — in the middle of a step, of a
checkpoint write, of the LATEST update, of a metrics append, or at a random moment — and resumed each time;
after every kill LATEST names a complete, loadable checkpoint, and the final adapter and the loss curve are
bitwise those of an uninterrupted run.

Kills at chosen points use the fault hook of kindred.atomic (KINDRED_FAULT_KILL=<point>:<n>); the others are
a SIGKILL from this process after a random delay. The CI variant kills a 24-step run 6 times (once at
each point); the full one (KINDRED_FAULT_FULL=1; KINDRED_FAULT_KILLS, KINDRED_FAULT_STEPS to change it)
kills a 2,000-step run at least 20 times.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kindred
from kindred.formats.peft import read_adapter
from kindred.train import checkpoint as ckpt
from kindred.train import latest_checkpoint

from .test_reliability_runs import run_config, short_chats

POINTS = ("step", "checkpoint-files", "checkpoint-rename", "latest", "metrics", "timer")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kindred.demo import build_tiny_model

    root = tmp_path_factory.mktemp("faults")
    return build_tiny_model(root / "model", seed=3), short_chats(root / "chats.jsonl", 48)


def _env(fault: str | None = None) -> dict:
    # Single-threaded: bitwise equality across processes must not depend on how a busy machine splits sums.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(pathlib.Path(kindred.__file__).parents[1])
    env.pop("KINDRED_FAULT_KILL", None)
    if fault:
        env["KINDRED_FAULT_KILL"] = fault
    return env


def _start(cfg: pathlib.Path, log: pathlib.Path, resume: bool, fault: str | None = None):
    cmd = [sys.executable, "-m", "kindred", "train", str(cfg)] + (["--resume"] if resume else [])
    with log.open("ab") as sink:
        return subprocess.Popen(cmd, env=_env(fault), stdout=sink, stderr=subprocess.STDOUT)


def _check_latest(out: pathlib.Path) -> int:
    """The step LATEST names, after checking that its checkpoint loads completely (0 without one)."""
    latest = latest_checkpoint(out)
    if latest is None:
        return 0
    state = ckpt.load_state(latest)
    read_adapter(latest / "adapter")
    return state["step"]


def _plan(rng: random.Random, kills: int, steps: int, save_every: int) -> list[tuple[str, float]]:
    """``kills`` (point, n or delay) pairs: every point at least once when there are enough kills; a kill
    comes after up to 2 × steps / kills steps of a process, so the kills spread over the whole run."""
    points = list(POINTS) * (kills // len(POINTS)) + rng.sample(POINTS, kills % len(POINTS))
    rng.shuffle(points)
    reach = max(2 * save_every, 2 * steps // kills)
    plan = []
    for point in points:
        if point in ("step", "metrics"):
            plan.append((point, rng.randint(1, reach)))
        elif point == "timer":  # a random point within ``reach`` steps, timed from the run's own steps
            plan.append((point, rng.uniform(0.1, 1.0) * reach))
        else:
            plan.append((point, rng.randint(1, max(2, reach // save_every))))
    return plan


def kill_and_resume(tmp_path, model, data, steps: int, save_every: int, kills: int, seed: int) -> dict:
    over = {"train.max_steps": steps, "output.save_every": save_every, "output.keep_checkpoints": 2}
    cfgs = {}
    for name in ("ref", "killed"):
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(run_config(model, data, tmp_path / name, **over)))
    t0 = time.monotonic()
    ref = _start(cfgs["ref"], tmp_path / "ref.log", resume=False)  # alongside the killed run (2 cores)
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    history = []
    for i, (point, arg) in enumerate(_plan(random.Random(seed), kills, steps, save_every)):
        before = _check_latest(out)
        if point == "timer":
            proc = _start(cfgs["killed"], log, resume=i > 0)
            # Start-up (imports, model, data) takes seconds; wait for the first step, time the next one,
            # then kill after ``arg`` steps' worth (so the kill lands inside the run on a fast or slow host).
            deadline = time.monotonic() + 120
            while proc.poll() is None and not _stepped(out, before) and time.monotonic() < deadline:
                time.sleep(0.005)
            t1 = time.monotonic()
            while proc.poll() is None and not _stepped(out, before + 1) and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(max(arg - 1, 0) * (time.monotonic() - t1))
            proc.send_signal(signal.SIGKILL)
        else:
            proc = _start(cfgs["killed"], log, resume=i > 0, fault=f"{point}:{arg}")
        code = proc.wait(timeout=600)
        if code == 0:  # the run finished before the kill point was reached
            history.append((point, arg, "finished", before, _check_latest(out)))
            break
        assert code == -signal.SIGKILL, (point, arg, code, log.read_text()[-3000:])
        history.append((point, arg, "killed", before, _check_latest(out)))
    else:
        done = _start(cfgs["killed"], log, resume=True)
        assert done.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert ref.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    seconds = time.monotonic() - t0
    losses = [
        [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (out, tmp_path / "ref")
    ]
    assert len(losses[1]) == steps and losses[0] == losses[1]  # the same floats, step for step
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, tmp_path / "ref"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    left = os.listdir(out) + os.listdir(out / "checkpoints")
    assert not [name for name in left if ".tmp-" in name or ".old-" in name], left
    return {"kills": sum(h[2] == "killed" for h in history), "history": history, "seconds": seconds}


def _stepped(out: pathlib.Path, after: int) -> bool:
    """Whether metrics.jsonl already has a row past step ``after`` (the run is training)."""
    try:
        lines = (out / "metrics.jsonl").read_bytes().splitlines()
    except OSError:
        return False
    return bool(lines) and lines[-1].startswith(b"{") and len(lines) > after


@pytest.mark.slow
def test_killed_six_times_resumes_bitwise(tiny, tmp_path):
    result = kill_and_resume(tmp_path, *tiny, steps=24, save_every=4, kills=6, seed=15)
    print(f"\nfault test (CI): {result['kills']} kills, {result['seconds']:.1f} s: {result['history']}")
    assert result["kills"] == 6


@pytest.mark.skipif(os.environ.get("KINDRED_FAULT_FULL") != "1", reason="set KINDRED_FAULT_FULL=1 (minutes)")
def test_killed_twenty_times_in_2000_steps_resumes_bitwise(tiny, tmp_path):
    kills = int(os.environ.get("KINDRED_FAULT_KILLS", "24"))
    steps = int(os.environ.get("KINDRED_FAULT_STEPS", "2000"))
    result = kill_and_resume(tmp_path, *tiny, steps=steps, save_every=25, kills=kills, seed=2000)
    print(f"\nfault test (full): {result['kills']} kills of {steps} steps, {result['seconds']:.1f} s")
    for h in result["history"]:
        print("  ", h)
    assert result["kills"] >= min(kills, 20)
