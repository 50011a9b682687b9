"""The trainer: config validation, schedule, a real fine-tune of a tiny model, checkpoints and exact resume
(after SIGKILL too), interrupted checkpoint writes, merged export, the out-of-memory message."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kindred
from kindred.demo import build_tiny_model
from kindred.train import checkpoint as ckpt_mod
from kindred.train import latest_checkpoint, load_config, lr_factor
from kindred.train.trainer import Trainer

from .helpers import tiny_run_config


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=1)


def config(model, out, **over) -> dict:
    return tiny_run_config(
        model,
        out,
        over,
        lora={"r": 8, "alpha": 16, "dropout": 0.1},
        data={"eval_fraction": 0.1},
        train={"max_steps": 6, "micro_batch_tokens": 512, "grad_accum": 2, "lr": 2e-2, "warmup_steps": 1},
        output={"save_every": 2, "progress": False},
    )


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "over, message",
    [
        ({"lora": {"alhpa": 8}}, "unknown key 'lora.alhpa' (did you mean 'alpha'?); allowed: r, alpha"),
        ({"quant": "fp4"}, "'quant' must be one of nf4, int4g, none; got 'fp4'"),
        ({"train": {"schedule": "step"}}, "'train.schedule' must be one of cosine, linear, constant"),
        ({"lora": {"r": "16"}}, "'lora.r' must be an integer, got '16'"),
        ({"lora": {"r": 0}}, "'lora.r' must be at least 1; got 0"),
        (
            {"train": {"micro_batch_tokens": 300}},
            "'train.micro_batch_tokens' must be a multiple of the packed row",
        ),
        ({"data": {"pack": 128}}, "'data.pack' must be at least data.budget (512)"),
        (
            {"train": {"gradient_checkpointing": "some"}},
            "'train.gradient_checkpointing' must be one of full, offload, none; got 'some'",
        ),
        ({"output": {"log_every": 0}}, "'output.log_every' must be at least 1; got 0"),
        ({"optimizer": "adam"}, "unknown key 'optimizer'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, over, message):
    cfg = config("m", tmp_path)
    for key, value in over.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    with pytest.raises(kindred.KindredValueError) as e:
        load_config(cfg)
    assert message in str(e.value)


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config("m", tmp_path / "o")) + "\n")
    cfg = load_config(path, {"train.lr": "1e-4", "lora.targets": "all-linear"})
    assert cfg.train.lr == 1e-4 and cfg.lora.targets == "all-linear" and cfg.data.budget == 512
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: [unclosed\n")
    with pytest.raises(kindred.KindredValueError, match=r"bad.yaml: not valid YAML \(line 3"):
        load_config(bad)
    with pytest.raises(kindred.KindredValueError, match="'model' is required"):
        load_config({"data": {"path": "x", "template": "chatml"}})


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "constant", 0.0) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 10, 0, "cosine", 0.1) for s in range(11)]
    assert cos[0] == 1.0 and math.isclose(cos[5], 0.1 + 0.9 * 0.5) and math.isclose(cos[10], 0.1)
    assert all(a > b for a, b in itertools.pairwise(cos))
    assert math.isclose(lr_factor(7, 10, 2, "linear", 0.0), 1 - 5 / 8)


# ---- a real fine-tune --------------------------------------------------------------------------------------
def test_finetune_learns_and_writes_everything(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = kindred.train(config(tiny_model, out, **{"train.max_steps": 10, "output.merged": True}))
    assert result.step == 10 and [r["step"] for r in result.metrics] == list(range(1, 11))
    first, last = result.metrics[0]["loss"], result.metrics[-1]["loss"]
    assert all(math.isfinite(r["loss"]) for r in result.metrics) and last < first - 0.3
    (s0, before), (s1, after) = result.eval_losses
    assert (s0, s1) == (0, 10) and after < before
    assert all(r["trainable_tokens"] > 0 and r["tokens"] >= r["trainable_tokens"] for r in result.metrics)
    for name in ("metrics.csv", "metrics.jsonl", "loss.png", "config.yaml", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-000008", "step-000010"]
    # The PEFT adapter on a freshly loaded base reproduces the trained model; the merged folder is the adapter
    # folded onto the original 16-bit base (kindred.export.merged), i.e. that base with the adapter.
    ids = torch.randint(0, 600, (1, 40), generator=torch.Generator().manual_seed(0))
    result.model.eval()
    want = result.model(ids)
    fresh = kindred.models.from_pretrained(tiny_model, quant="nf4", dtype=torch.float32)
    kindred.nn.load_adapter(fresh, out / "adapter")
    torch.testing.assert_close(fresh(ids), want, rtol=1e-5, atol=1e-5)
    merged = kindred.models.from_pretrained(result.merged_dir, dtype=torch.float32)
    dense = kindred.models.from_pretrained(tiny_model, dtype=torch.float32)
    kindred.nn.load_adapter(dense, out / "adapter")
    torch.testing.assert_close(merged(ids), dense(ids), rtol=1e-4, atol=1e-4)


def test_resume_after_sigkill_continues_bitwise(tiny_model, tmp_path):
    # Both runs single-threaded in their own processes: multi-threaded CPU libraries (MKL's dynamic threads)
    # may split a sum differently when the machine is busy, and bitwise equality is the point here.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ref_out = tmp_path / "ref"
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump(config(tiny_model, ref_out, **{"train.max_steps": 8})))
    ref = subprocess.run(
        [sys.executable, "-m", "kindred", "train", str(ref_path)], env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr
    out = tmp_path / "killed"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tiny_model, out, **{"train.max_steps": 8})))
    cmd = [sys.executable, "-m", "kindred", "train", str(cfg_path)]
    log = tmp_path / "train.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while latest_checkpoint(out) is None or latest_checkpoint(out).name < "step-000004":
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(out).name
    assert killed_at in ("step-000004", "step-000006"), killed_at  # killed mid-run, not after the end
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert losses(out) == losses(ref_out)  # bitwise: the same floats, step for step
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, ref_out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_checkpoint_never_replaces_the_last_good_one(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config(tiny_model, out, **{"train.max_steps": 6})
    real_save = ckpt_mod.save_checkpoint

    def failing_save(out_dir, step, write, keep):
        if step == 4:

            def half_write(folder):
                (folder / "adapter").mkdir()
                (folder / "adapter" / "partial").write_bytes(b"\0" * 100)
                raise OSError("disk full (simulated)")

            return real_save(out_dir, step, half_write, keep)
        return real_save(out_dir, step, write, keep)

    monkeypatch.setattr("kindred.train.trainer.save_checkpoint", failing_save)
    message = r"checkpoints: cannot write step-000004: disk full \(simulated\); the last good checkpoint"
    with pytest.raises(kindred.KindredError, match=message + r" \(step-000002\) is kept"):
        kindred.train(cfg)
    assert latest_checkpoint(out).name == "step-000002"
    monkeypatch.undo()
    result = kindred.train(cfg, resume=True)
    assert result.step == 6 and not list((out / "checkpoints").glob("*.tmp-*"))
    ref = kindred.train(config(tiny_model, tmp_path / "ref", **{"train.max_steps": 6}))
    assert [r["loss"] for r in result.metrics] == [r["loss"] for r in ref.metrics]


def test_resume_refuses_another_config(tiny_model, tmp_path):
    out = tmp_path / "run"
    kindred.train(config(tiny_model, out, **{"train.max_steps": 2}))
    with pytest.raises(
        kindred.KindredValueError, match=r"cannot resume with a different config \(lora.r: 8 -> 4\)"
    ):
        kindred.train(config(tiny_model, out, **{"train.max_steps": 4, "lora.r": 4}), resume=True)
    more = kindred.train(config(tiny_model, out, **{"train.max_steps": 4}), resume=True)
    assert [r["step"] for r in more.metrics] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "policy, hint",
    [
        ("none", "train.gradient_checkpointing: full (recompute activations) or offload"),
        ("full", "train.gradient_checkpointing: offload (layer inputs in host memory)"),
        ("offload", None),
    ],
)
def test_out_of_memory_names_the_settings(tiny_model, tmp_path, monkeypatch, policy, hint):
    trainer = Trainer(config(tiny_model, tmp_path, **{"train.gradient_checkpointing": policy}))

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_train_step", oom)
    with pytest.raises(kindred.KindredError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "out of GPU memory at step 1" in msg and "train.micro_batch_tokens (now 512" in msg
    assert "lora.r (now 8)" in msg
    assert (hint in msg) if hint else "gradient_checkpointing" not in msg


def test_offloaded_checkpoints_train_as_full(tiny_model, tmp_path):
    """The same loss curve bit for bit on the CPU (LoRA dropout 0.1: the recompute replays the RNG)."""
    curves = {}
    for policy in ("full", "offload"):
        over = {"train.max_steps": 3, "train.gradient_checkpointing": policy}
        trainer = Trainer(config(tiny_model, tmp_path / policy, **over))
        assert trainer.model.model.gradient_checkpointing
        assert trainer.model.model.checkpoint_policy == policy
        curves[policy] = [r["loss"] for r in trainer.fit().metrics]
        assert trainer.model.model.offloaded.current == 0
        assert (trainer.model.model.offloaded.peak > 0) == (policy == "offload")
    assert curves["offload"] == curves["full"]


def test_bad_model_and_data_paths(tmp_path):
    with pytest.raises(kindred.KindredValueError, match=r"model: .*neither a model folder"):
        kindred.train(config(tmp_path / "nope", tmp_path / "o"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(kindred.KindredValueError):
        kindred.train(config(tmp_path / "m", tmp_path / "o"))


@pytest.mark.gpu
def test_finetune_on_cuda_learns_and_resumes(tiny_model, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    over = {"train.max_steps": 8, "dtype": "bf16", "device": "cuda", "train.gradient_checkpointing": "full"}
    ref = kindred.train(config(tiny_model, tmp_path / "ref", **over))
    first, last = ref.metrics[0]["loss"], ref.metrics[-1]["loss"]
    assert all(math.isfinite(r["loss"]) for r in ref.metrics) and last < first - 0.3
    assert ref.eval_losses[-1][1] < ref.eval_losses[0][1] and ref.metrics[-1]["gpu_mem_gib"] > 0
    out = tmp_path / "stopped"
    real_step = Trainer._train_step

    def stop_at_5(self):
        if self.step == 4:
            raise KeyboardInterrupt  # the process stops after checkpoint step 4
        return real_step(self)

    monkeypatch.setattr(Trainer, "_train_step", stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        kindred.train(config(tiny_model, out, **over))
    monkeypatch.undo()
    resumed = kindred.train(config(tiny_model, out, **over), resume=True)
    assert [r["step"] for r in resumed.metrics] == list(range(1, 9))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in resumed.metrics]),
        torch.tensor([r["loss"] for r in ref.metrics]),
        rtol=2e-2,
        atol=0,
    )
