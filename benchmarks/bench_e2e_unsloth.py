"""The Unsloth anchor of bench_e2e.py (test_e2e_unsloth): Unsloth's step in a subprocess per case
(unsloth_step.py), with the carried Unsloth site (.carry/unsloth.tar.xz, make_carry.sh) unpacked once onto its
PYTHONPATH, killed with its whole process group after a timeout or when this process is stopped; and the
tests of those parts that need neither Unsloth nor a GPU (rows, the model folder, the subprocess plumbing).
bench_e2e.py's docstring describes the procedure.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from . import harness, unsloth_step
from .bench_e2e import (
    CASE_TARGETS,
    CASES,
    LR,
    QWEN3_8B,
    RANK,
    TARGETS,
    _free,
    _numbers,
    _tiny,
    anchor_rows,
    case_shape,
    packed_rows,
    set_baseline,
)

RUNS_ON_CPU = True  # the tests below; the anchor itself runs from bench_e2e.py's gpu benchmark

ROOT = Path(__file__).resolve().parent.parent
UNSLOTH_SCRIPT = Path(__file__).with_name("unsloth_step.py")
_unsloth_site: Path | None = None


def unsloth_carry() -> Path:
    """The packed Unsloth site (benchmarks/make_carry.sh): $KINDRED_UNSLOTH_CARRY or .carry/unsloth.tar.xz."""
    return Path(os.environ.get("KINDRED_UNSLOTH_CARRY") or ROOT / ".carry" / "unsloth.tar.xz")


def unsloth_site() -> Path:
    """``unsloth_carry()`` unpacked once per process into a temporary folder, removed at exit."""
    global _unsloth_site
    if _unsloth_site is None:
        tar = unsloth_carry()
        if not tar.is_file():
            raise FileNotFoundError(f"{tar} is missing: benchmarks/make_carry.sh builds it; carry it")
        folder = Path(tempfile.mkdtemp(prefix="kindred-unsloth-site-"))
        atexit.register(shutil.rmtree, folder, True)
        with tarfile.open(tar) as t:
            t.extractall(folder, filter="data")
        _unsloth_site = folder
    return _unsloth_site


def unsloth_env(site: Path) -> dict:
    """The subprocess's environment: PYTHONPATH = ours (.carry/site first) + the Unsloth site; offline."""
    env = dict(os.environ)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    carried = ROOT / ".carry" / "site"
    if carried.is_dir() and not any(Path(p).resolve() == carried.resolve() for p in path):
        path.insert(0, str(carried))
    env["PYTHONPATH"] = os.pathsep.join([*path, str(site)])
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",  # its usage ping downloads from the hub
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def unsloth_model_dirs() -> list[str]:
    """Where the random checkpoint may go (the first with room): $KINDRED_E2E_UNSLOTH_DIR (a list split on
    os.pathsep) or the temp folder, then /dev/shm (host memory) for MoE checkpoints the disk cannot hold."""
    given = os.environ.get("KINDRED_E2E_UNSLOTH_DIR")
    return given.split(os.pathsep) if given else [tempfile.gettempdir(), "/dev/shm"]


def run_logged(cmd: list[str], env: dict, cwd: Path, timeout: float, log: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group, output to ``log``; killed (the whole group) after ``timeout``
    seconds. Returns (exit status or None when killed, the output)."""
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )

        def kill():
            with contextlib.suppress(ProcessLookupError, PermissionError):  # its compile workers too
                os.killpg(proc.pid, signal.SIGKILL)

        def on_term(signum, frame):  # run_gpu.sh's step limit stops pytest: the group must not outlive it
            kill()
            raise KeyboardInterrupt(f"signal {signum} while {cmd[-2]} ran")

        previous = None
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            previous = signal.signal(signal.SIGTERM, on_term)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill()
            proc.wait()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return rc, log.read_text(errors="replace")


def _error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line
    return lines[-1] if lines else "no output"


def _unsloth_notes(r: dict, wrote: str, kindred: dict | None) -> str:
    before, after = r.get("host_before", {}), r.get("host_after", {})
    host = ""
    if "rss_mib" in after:
        grew = after["rss_mib"] - before.get("rss_mib", 0)
        host = f"host RSS {after['rss_mib']:.0f} MiB ({grew:+.0f} over the timed steps"
        host += f", peak {r['max_rss_mib']:.0f})" if "max_rss_mib" in r else ")"
    if "pinned_mib" in after:
        host += f", pinned host {after['pinned_mib']:.0f} MiB (peak {after.get('pinned_peak_mib', 0):.0f})"
    notes = (
        f"Unsloth {r.get('unsloth')}: {r.get('n_4bit')} bitsandbytes NF4 linears, {r.get('attn')}, "
        f'use_gradient_checkpointing="unsloth", AdamW(fused); first step {r["first_step_s"]:.1f} s, '
        f"load {r['load_s']:.1f} s (import {r.get('import_s', 0):.1f} s); {r.get('live_mib', 0):.0f} MiB "
        f"live before the step, {r.get('peak_reserved_mib', 0):.0f} MiB reserved at peak; {host}; {wrote}; "
        f"loss {r['loss']:.4f}"
    )
    if kindred and kindred.get("tokens_per_s") and r.get("tokens_per_s"):
        speed = float(kindred["tokens_per_s"]) / float(r["tokens_per_s"])
        notes += f"; kindred ckpt=1: {speed:.3f}x Unsloth's tokens/s"
        if kindred.get("peak_extra_mib") and r.get("peak_mib"):
            notes += f" at {float(kindred['peak_extra_mib']) / float(r['peak_mib']):.3f}x its peak"
    return notes


def run_unsloth(
    name: str,
    hf: dict,
    seq: int,
    batch: int,
    device: torch.device,
    warmup: int,
    steps: int,
    earlier: list[dict] | tuple = (),
    timeout: float | None = None,
    script: Path = UNSLOTH_SCRIPT,
) -> tuple[dict, str, list[str]]:
    """The CSV row of Unsloth's step on ``name``'s shape (unsloth_step.py in a subprocess, killed after
    ``timeout`` s, default $KINDRED_E2E_UNSLOTH_TIMEOUT or 420), the tail of its output and the errors.
    ``earlier``: this run's rows of the case; its transformers anchor becomes the baseline (ratio = Unsloth's
    ms / the anchor's, as for kindred's rows) and its kindred ckpt=1 row is compared in the notes. The random
    checkpoint is written here (transformers, this process), deleted after."""
    if timeout is None:
        timeout = float(os.environ.get("KINDRED_E2E_UNSLOTH_TIMEOUT", "420"))
    row = {"op": "train_step", "impl": "unsloth", "dtype": "bf16"}
    row["shape"] = case_shape(name, seq, batch, "qlora", 1)
    errors, out, folder = [], "", None
    work = Path(tempfile.mkdtemp(prefix="kindred-unsloth-run-"))  # spec, rows, log, unsloth_compiled_cache/
    try:
        site = unsloth_site()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            folder, nbytes = unsloth_step.write_model_folder(hf, device, unsloth_model_dirs())
        wrote = f"checkpoint {nbytes / 2**30:.1f} GiB written to {folder.parent}"
        wrote += f" in {time.perf_counter() - t0:.0f} s"
        _free(device)
        data = anchor_rows(seq, batch, hf["vocab_size"])
        unsloth_step.write_rows(work / "rows.npz", data.input_ids, data.labels)
        spec = {
            "model": str(folder),
            "rows": str(work / "rows.npz"),
            "seq": seq,
            "targets": list(CASE_TARGETS.get(name, TARGETS)),
            "rank": RANK,
            "lr": LR,
            "warmup": warmup,
            "steps": steps,
        }
        (work / "spec.json").write_text(json.dumps(spec))
        logs = Path(os.environ["OUT"]) if os.environ.get("OUT") else work
        log = logs / f"unsloth_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.log"
        cmd = [sys.executable, "-X", "faulthandler", str(script), str(work / "spec.json")]
        rc, out = run_logged(cmd, unsloth_env(site), work, timeout, log)
        result = unsloth_step.parse_result(out)
        if result is None:
            why = f"killed after {timeout:.0f} s" if rc is None else f"exit status {rc}"
            row["notes"] = f"failed ({why}): {_error_line(out)[:300]}"
            errors.append(f"{row['shape']}: unsloth {row['notes']}")
        else:
            row.update(_numbers(result))
            same = [r for r in earlier if r["impl"] == "kindred" and r["shape"] == row["shape"]]
            kindred = same[-1] if same else None
            row["notes"] = _unsloth_notes(result, wrote, kindred)
            if not math.isfinite(result["loss"]):
                errors.append(f"{row['shape']}: unsloth loss {result['loss']}")
    except torch.OutOfMemoryError as e:
        row["notes"] = f"out of memory writing the checkpoint: {str(e)[:150]}"
        errors.append(f"{row['shape']}: unsloth {row['notes']}")
    except Exception as e:  # no carry, no room for the checkpoint, transformers refusing the config: say so
        row["notes"] = f"unavailable: {type(e).__name__}: {str(e)[:250]}"
        errors.append(f"{row['shape']}: unsloth {row['notes']}")
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        _free(device)
    set_baseline([row], next((r for r in earlier if r["impl"].startswith("transformers")), None))
    return row, unsloth_step.tail(out), errors


# ---- the Unsloth anchor's parts that run without Unsloth (or a GPU) ----------------------------------------
def test_unsloth_rows_and_result_line(tmp_path):
    """The rows file holds the anchors' rows (packed_rows's rule, seed 1); the result line is the last tagged
    JSON object of the output."""
    data = anchor_rows(24, 3, 100)
    ref = packed_rows(3, 24, 100, seed=1)
    assert (data.input_ids == ref.input_ids).all() and (data.labels == ref.labels).all()
    unsloth_step.write_rows(tmp_path / "rows.npz", data.input_ids, data.labels)
    back = np.load(tmp_path / "rows.npz")
    assert back["input_ids"].dtype == np.int64 and back["input_ids"].shape == (3, 24)
    assert (back["input_ids"] == ref.input_ids).all() and (back["labels"] == ref.labels).all()
    ignored = (back["labels"] == -100).sum(axis=1)
    assert (back["labels"][:, 0] == -100).all() and ((ignored >= 6) & (ignored <= 7)).all()

    tag = unsloth_step.RESULT_TAG
    text = f'==((====))==  Unsloth\n{tag}{{"ms": 1}}\nnoise\n{tag}{{"ms": 2.5, "loss": 3}}\nwarning: x\n'
    assert unsloth_step.parse_result(text) == {"ms": 2.5, "loss": 3}
    assert unsloth_step.parse_result("Traceback ...\nValueError: x\n") is None
    assert unsloth_step.parse_result(f"{tag}{{bad json\n") is None
    assert unsloth_step.parse_result(f"{tag}[1, 2]\n") is None
    assert unsloth_step.tail("a\nb\nc\n", 2) == "b\nc"


def test_unsloth_model_folder(tmp_path):
    """Every case's tiny config: the random bf16 checkpoint and the minimal tokenizer load back with
    transformers' Auto classes (what Unsloth's loader calls), special ids agreeing with the config."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cpu = torch.device("cpu")
    for name, (hf, *_) in CASES.items():
        tiny = _tiny(hf)
        dirs = [str(tmp_path / "missing"), str(tmp_path)]
        folder, nbytes = unsloth_step.write_model_folder(tiny, cpu, dirs)
        assert folder.parent == tmp_path and (folder / "config.json").is_file(), name
        assert (folder / "tokenizer.json").is_file() and list(folder.glob("*.safetensors")), name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        assert model.config.model_type == tiny["model_type"] and model.config.vocab_size == 512, name
        assert unsloth_step.state_bytes(model) == nbytes, name
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, name
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) == 512, name
        specials = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
        assert len(set(specials)) == 4 and max(specials) < 8, (name, specials)
        config = model.config
        assert specials[:3] == [config.pad_token_id, config.bos_token_id, config.eos_token_id], name
        assert tok("t7 t9 t511", add_special_tokens=False)["input_ids"] == [7, 9, 511], name
        logits = model(input_ids=torch.tensor([[7, 9, 11, 13]])).logits
        assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all(), name
        del model
        shutil.rmtree(folder)
    with pytest.raises(RuntimeError, match="fits in none of"):
        unsloth_step.pick_folder(2**62, [str(tmp_path)])


_FAKE_STEP = """
import json, os, sys, time
import numpy as np
import kindred_fake_unsloth  # from the unpacked carry: PYTHONPATH reaches it
spec = json.load(open(sys.argv[1]))
rows = np.load(spec["rows"])
assert rows["input_ids"].shape == rows["labels"].shape == (2, spec["seq"]), rows["input_ids"].shape
assert os.path.isfile(os.path.join(spec["model"], "config.json")), spec["model"]
assert os.path.isfile(os.path.join(spec["model"], "tokenizer.json")), spec["model"]
assert os.environ["HF_HUB_OFFLINE"] == "1" and os.getcwd() == os.path.dirname(spec["rows"])
print("==((====))==  Unsloth (a stand-in)", flush=True)
mode = os.environ["KINDRED_FAKE_UNSLOTH"]
if mode == "fail":
    raise ValueError("no kernel image is available for execution on the device")
if mode == "hang":
    time.sleep(60)
result = dict(ms=50.0, tokens_per_s=640.0, peak_mib=25.0, peak_reserved_mib=30.0, live_mib=10.0, loss=6.25,
              first_step_s=1.5, load_s=2.5, import_s=0.5, unsloth="fake", n_4bit=14, attn="sdpa",
              targets=spec["targets"], host_before={"rss_mib": 100.0},
              host_after={"rss_mib": 110.0, "pinned_mib": 4.0, "pinned_peak_mib": 5.0}, max_rss_mib=120.0)
print("KINDRED_UNSLOTH_RESULT " + json.dumps(result))
"""


def test_unsloth_anchor_plumbing(tmp_path, monkeypatch):
    """run_unsloth with a stand-in for unsloth_step.py: the carry unpacked onto PYTHONPATH, the checkpoint
    and rows written and then deleted, the result parsed into a row whose ratio columns point at the
    transformers anchor; a failing and a hanging step each give a row saying why (and the hang is killed)."""
    pytest.importorskip("transformers")
    module = tmp_path / "kindred_fake_unsloth.py"
    module.write_text("MARK = 1\n")
    with tarfile.open(tmp_path / "unsloth.tar.xz", "w:xz") as t:
        t.add(module, arcname=module.name)
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("KINDRED_UNSLOTH_CARRY", str(tmp_path / "unsloth.tar.xz"))
    monkeypatch.setenv("KINDRED_E2E_UNSLOTH_DIR", str(models))
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys.modules[__name__], "_unsloth_site", None)
    script = tmp_path / "fake_step.py"
    script.write_text(_FAKE_STEP)
    shape = case_shape("qwen3-8b", 16, 2, "qlora", 1)
    earlier = [
        {"impl": "kindred", "shape": shape, "ms": "40", "tokens_per_s": "800", "peak_extra_mib": "50"},
        {"impl": "kindred", "shape": case_shape("qwen3-8b", 16, 2, "qlora", 0), "ms": "30"},
        {"impl": "transformers+peft", "shape": shape, "ms": "100", "tokens_per_s": "320"},
    ]
    cpu, tiny = torch.device("cpu"), _tiny(QWEN3_8B)

    monkeypatch.setenv("KINDRED_FAKE_UNSLOTH", "ok")
    row, out, errors = run_unsloth("qwen3-8b", tiny, 16, 2, cpu, 1, 2, earlier, timeout=120, script=script)
    assert not errors, (errors, out)
    assert row["impl"] == "unsloth" and row["shape"] == shape and row["ms"] == "50", row
    assert row["tokens_per_s"] == "640" and row["peak_extra_mib"] == "25", row
    assert row["baseline_impl"] == "transformers+peft" and row["baseline_ms"] == "100", row
    assert row["ratio_to_baseline"] == "0.5", row
    assert "kindred ckpt=1: 1.250x Unsloth's tokens/s at 2.000x its peak" in row["notes"], row["notes"]
    assert "first step 1.5 s" in row["notes"] and "pinned host 4 MiB (peak 5)" in row["notes"], row["notes"]
    assert "(+10 over the timed steps, peak 120)" in row["notes"] and "loss 6.2500" in row["notes"]
    assert list(models.iterdir()) == [], "the checkpoint folder must be deleted"
    site = _unsloth_site
    assert (site / module.name).is_file()
    harness.append("e2e", [row])
    with (tmp_path / "results" / "e2e.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["impl"] for r in csv_rows] == ["unsloth"] and csv_rows[0]["ratio_to_baseline"] == "0.5"

    monkeypatch.setenv("KINDRED_FAKE_UNSLOTH", "fail")
    row, out, errors = run_unsloth("qwen3-8b", tiny, 16, 2, cpu, 1, 2, earlier, timeout=120, script=script)
    assert errors and row["notes"].startswith("failed (exit status 1): ValueError: no kernel image"), row
    assert "Unsloth (a stand-in)" in out and "Traceback" in out and not row.get("ms")
    assert "ratio_to_baseline" not in row and list(models.iterdir()) == []
    assert _unsloth_site == site  # unpacked once

    monkeypatch.setenv("KINDRED_FAKE_UNSLOTH", "hang")
    t0 = time.perf_counter()
    row, out, errors = run_unsloth("qwen3-8b", tiny, 16, 2, cpu, 1, 2, earlier, timeout=3, script=script)
    assert time.perf_counter() - t0 < 30 and errors, row
    assert row["notes"].startswith("failed (killed after 3 s): ==((====))==  Unsloth"), row
    assert list(models.iterdir()) == []

    monkeypatch.setenv("KINDRED_UNSLOTH_CARRY", str(tmp_path / "absent.tar.xz"))
    monkeypatch.setattr(sys.modules[__name__], "_unsloth_site", None)
    row, out, errors = run_unsloth("qwen3-8b", tiny, 16, 2, cpu, 1, 2, earlier, timeout=3, script=script)
    assert errors and row["notes"].startswith("unavailable: FileNotFoundError"), row


def test_run_logged_dies_with_its_parent(tmp_path):
    """A SIGTERM to this process (run_gpu.sh's step limit) while a subprocess runs kills the subprocess's
    whole group first; the previous handler is restored."""
    import threading

    script = tmp_path / "sleeper.py"
    script.write_text("import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        run_logged([sys.executable, str(script), "-"], dict(os.environ), tmp_path, 30, tmp_path / "log")
    timer.join()
    assert time.perf_counter() - t0 < 20 and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)
    hello = [sys.executable, "-c", "print('hi')", "-"]
    rc, out = run_logged(hello, dict(os.environ), tmp_path, 30, tmp_path / "l")
    assert rc == 0 and out == "hi\n"
