"""No run is lost and nothing runs from a checkpoint (issue 15: checkpoint security, data safety).

Hostile checkpoints (a planted pickle, malformed JSON/safetensors, LATEST pointing out of the run), links
planted in the output folder, a second run into a used folder, the run lock, resume against changed data,
a torn metrics line, the order of fsyncs and renames, re-saving a step, other processes' temporary folders,
and disk full at every write of a checkpoint and of the final outputs. The SIGKILL fault tests are in
test_reliability_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import kindred
from kindred import atomic
from kindred.demo import build_tiny_model
from kindred.formats.peft import read_adapter
from kindred.train import checkpoint as ckpt
from kindred.train import latest_checkpoint
from kindred.train.trainer import Trainer

from .helpers import with_overrides


def short_chats(path: pathlib.Path, n: int = 40) -> pathlib.Path:
    """``n`` short arithmetic conversations (a few dozen tokens each: steps of 128-token rows are fast)."""
    with path.open("w") as f:
        for i in range(n):
            a, b = i * 7 % 23, i * 5 % 17
            msgs = [
                {"role": "user", "content": f"What is {a} plus {b}? Answer briefly."},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def run_config(model, data, out, **over) -> dict:
    cfg = {
        "model": str(model),
        "quant": "nf4",
        "dtype": "fp32",
        "device": "cpu",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": str(data), "template": "chatml", "budget": 128, "eval_fraction": 0.1},
        "train": {"max_steps": 4, "micro_batch_tokens": 128, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 1},
        "output": {"dir": str(out), "save_every": 2, "progress": False, "tensorboard": False, "plot": False},
    }
    return with_overrides(cfg, over)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return build_tiny_model(root / "model", seed=2), short_chats(root / "chats.jsonl")


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4), copied per test by ``run_copy``."""
    out = tmp_path_factory.mktemp("done") / "run"
    kindred.train(run_config(*tiny, out))
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


# ---- checkpoint security -----------------------------------------------------------------------------------
class Boom:
    """A pickle payload: unpickling it creates the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_state_pt_is_never_unpickled(tiny, run_copy, tmp_path):
    marker = tmp_path / "pwned"
    latest = latest_checkpoint(run_copy)
    torch.save({"step": Boom(marker)}, latest / "state.pt")  # next to a valid state: ignored
    resumed = kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 6}), resume=True)
    assert resumed.step == 6 and not marker.exists()
    only_pickle = latest_checkpoint(run_copy)  # a checkpoint that has only the pickle is refused
    (only_pickle / "state.json").unlink()
    torch.save({"step": Boom(marker)}, only_pickle / "state.pt")
    with pytest.raises(kindred.KindredFormatError, match=r"holds state.pt, a pickle .* never loaded"):
        kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 8}), resume=True)
    assert not marker.exists()


def _mutations():
    return {
        "not json": lambda d: b"\x80\x81 not json",
        "deep nesting": lambda d: ("[" * 200_000 + "]" * 200_000).encode(),
        "wrong format": lambda d: json.dumps({**d, "format": "other"}).encode(),
        "step is a string": lambda d: _set(d, ["step"], "4"),
        "negative cursor": lambda d: _set(d, ["cursor"], -1),
        "master not a list": lambda d: _set(d, ["master"], {"dict": {}}),
        "missing tensor": lambda d: _set(d, ["master", 0], {"tensor": "nope"}),
        "odd object": lambda d: _set(d, ["rng", "torch"], {"__reduce__": "os.system"}),
        "bad rng": lambda d: _set(d, ["rng", "python"], [3, [1, 2], None]),
        "bad numpy rng": lambda d: _set(d, ["rng", "numpy"], ["MT19937", [1], 0, 0, 0.0]),
        "bad optimizer": lambda d: _set(d, ["optimizer", "param_groups"], "x"),
        "bad eval losses": lambda d: _set(d, ["eval_losses"], [[1]]),
    }


def _set(doc: dict, path: list, value) -> bytes:
    node = doc["state"]["dict"]
    for key in path[:-1]:
        node = node[key]["dict"] if isinstance(node[key], dict) and "dict" in node[key] else node[key]
    node[path[-1]] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_a_hostile_state_json_is_a_format_error(tiny, run_copy, name):
    latest = latest_checkpoint(run_copy)
    doc = json.loads((latest / "state.json").read_text())
    (latest / "state.json").write_bytes(_mutations()[name](doc))
    with pytest.raises(kindred.KindredFormatError, match=r"state\.json"):
        kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 6}), resume=True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b"\xff" * 8 + b[8:],
        lambda b: (2**62).to_bytes(8, "little") + b[8:],
    ],
)
def test_a_damaged_state_safetensors_is_a_format_error(tiny, run_copy, damage):
    blob = latest_checkpoint(run_copy) / "state.safetensors"
    blob.write_bytes(damage(blob.read_bytes()))
    with pytest.raises(kindred.KindredFormatError, match=r"state\.safetensors"):
        kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 6}), resume=True)


def test_wrong_tensor_shapes_in_a_checkpoint_are_refused(tiny, run_copy):
    from safetensors.torch import save_file

    blob = latest_checkpoint(run_copy) / "state.safetensors"
    tensors = load_file(blob)
    original = dict(tensors)
    key = next(k for k in tensors if k.startswith("state.master"))
    tensors[key] = torch.zeros(3)
    save_file(tensors, blob)
    with pytest.raises(kindred.KindredError, match="LoRA tensors that do not match"):
        kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 6}), resume=True)
    save_file({**original, "state.optimizer.state.0.exp_avg": torch.zeros(2, 2)}, blob)
    with pytest.raises(kindred.KindredFormatError, match=r"optimizer state 0\.exp_avg has shape \(2, 2\)"):
        kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 6}), resume=True)


@pytest.mark.parametrize(
    "pointer", ["step-000002/../../../elsewhere", "/etc", "../run", "step-2", "step-000002\x00", ""]
)
def test_latest_is_confined_to_the_run(run_copy, pointer):
    (run_copy / "checkpoints" / "LATEST").write_text(pointer + "\n")
    with pytest.raises(kindred.KindredFormatError, match="LATEST"):
        latest_checkpoint(run_copy)


def test_checkpoint_links_out_of_the_run_are_refused(run_copy, tmp_path):
    import shutil

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(latest_checkpoint(run_copy), elsewhere / "step-000009")
    (run_copy / "checkpoints" / "step-000009").symlink_to(elsewhere / "step-000009")
    (run_copy / "checkpoints" / "LATEST").write_text("step-000009\n")
    with pytest.raises(kindred.KindredFormatError, match="not a checkpoint folder of the run"):
        latest_checkpoint(run_copy)
    (run_copy / "checkpoints" / "LATEST").unlink()
    (run_copy / "checkpoints" / "LATEST").symlink_to(elsewhere / "LATEST")
    with pytest.raises(kindred.KindredFormatError, match="is a symbolic link"):
        latest_checkpoint(run_copy)


def test_writes_never_follow_links_planted_in_the_output_folder(tiny, run_copy, tmp_path):
    victim_file, victim_dir = tmp_path / "victim.txt", tmp_path / "victim_dir"
    victim_file.write_text("precious\n")
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("precious\n")
    import shutil

    shutil.rmtree(run_copy / "adapter")
    (run_copy / "config.yaml").unlink()
    (run_copy / "config.yaml").symlink_to(victim_file)
    (run_copy / "adapter").symlink_to(victim_dir, target_is_directory=True)
    (run_copy / "loss.png").symlink_to(victim_file)
    result = kindred.train(
        run_config(*tiny, run_copy, **{"train.max_steps": 6, "output.plot": True}), resume=True
    )
    assert victim_file.read_text() == "precious\n" and sorted(os.listdir(victim_dir)) == ["keep.txt"]
    for name in ("config.yaml", "adapter", "loss.png"):
        assert not (run_copy / name).is_symlink(), name
    assert read_adapter(result.adapter_dir)[0]["r"] == 4
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(victim_file)
    with pytest.raises(kindred.KindredError, match=r"metrics.jsonl is a symbolic link"):
        kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 8}), resume=True)
    assert victim_file.read_text() == "precious\n"


def test_atomic_write_replaces_a_link_and_never_writes_through_it(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    atomic.write_text(link, "new")
    assert target.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"
    planted = tmp_path / "log.jsonl"
    planted.symlink_to(target)
    with pytest.raises(kindred.KindredError, match=r"log\.jsonl is a symbolic link"):
        atomic.append_bytes(planted, b"x\n")
    assert target.read_text() == "keep"


# ---- the run folder ----------------------------------------------------------------------------------------
def test_a_fresh_run_into_a_used_folder_refuses_and_keeps_it(tiny, run_copy):
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    with pytest.raises(
        kindred.KindredError, match=r"holds another run \(checkpoints, adapter.*--resume.*--overwrite"
    ):
        kindred.train(run_config(*tiny, run_copy))
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before
    (run_copy / "notes.txt").write_text("mine")
    again = kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 2}), overwrite=True)
    assert again.step == 2 and (run_copy / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["LATEST", "step-000002"]


def test_the_cli_names_resume_and_overwrite(tiny, run_copy, tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_config(*tiny, run_copy)))
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(kindred.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "kindred", "train", str(cfg)], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and "--resume" in out.stderr and "--overwrite" in out.stderr


def test_the_run_lock_refuses_a_second_run_and_takes_over_a_stale_one(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / "kindred.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(kindred.KindredError, match=rf"another kindred run \(pid {holder.pid}\)"):
            kindred.train(run_config(*tiny, out))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    (out / "kindred.lock").write_text("999999999\n")  # left by a killed run: nobody holds it
    assert kindred.train(run_config(*tiny, out, **{"train.max_steps": 2})).step == 2


def test_resume_names_changed_data(tiny, tmp_path):
    model, _ = tiny
    data = short_chats(tmp_path / "data.jsonl", 40)
    out = tmp_path / "run"
    kindred.train(run_config(model, data, out, **{"train.max_steps": 2}))
    short_chats(data, 20)  # the same path, fewer conversations
    with pytest.raises(kindred.KindredValueError, match=r"prepared training data differ.*36 -> 18 examples"):
        kindred.train(run_config(model, data, out, **{"train.max_steps": 4}), resume=True)
    with pytest.raises(kindred.KindredValueError, match=r"different config \(lora.r: 4 -> 8\)"):
        kindred.train(run_config(model, data, out, **{"lora.r": 8}), resume=True)


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(*tiny, out, **{"train.max_steps": 2})
    kindred.train(cfg)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "epoch": 0.1, "lo')  # the process died in the middle of this append
    resumed = kindred.train(run_config(*tiny, out, **{"train.max_steps": 4}), resume=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4] == [r["step"] for r in resumed.metrics]
    lines.insert(1, "{not json")
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(kindred.KindredFormatError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        kindred.train(run_config(*tiny, out, **{"train.max_steps": 6}), resume=True)


# ---- the order of a save -----------------------------------------------------------------------------------
def test_every_file_and_folder_is_fsynced_before_the_rename_and_latest_after(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(
        os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1]
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1]
    )
    kindred.train(run_config(*tiny, out, **{"train.max_steps": 2}))
    final = out / "checkpoints" / "step-000002"
    rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for sub in (
        "",
        "/adapter",
        "/adapter/adapter_model.safetensors",
        "/adapter/adapter_config.json",
        "/state.json",
    ):
        assert tmp + sub in synced, sub
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("/LATEST"))
    parent_sync = [i for i, e in enumerate(events) if e == ("fsync", str(out / "checkpoints"))]
    assert rename < min(parent_sync) < latest and max(parent_sync) > latest  # LATEST durable too
    final_adapter = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out / "adapter"))
    assert any(
        e[0] == "fsync" and e[1].endswith("/adapter_model.safetensors") for e in events[latest:final_adapter]
    )


def test_resaving_a_step_keeps_the_old_folder_until_the_new_one_is_in(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(run_config(*tiny, out, **{"train.max_steps": 2}))
    trainer.fit()
    first = load_file(out / "checkpoints" / "step-000002" / "state.safetensors")

    def failing(folder):
        (folder / "adapter").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(kindred.KindredError, match=r"no space left on device.*step-000002.*is kept"):
        ckpt.save_checkpoint(out, 2, failing, keep=3)
    assert latest_checkpoint(out).name == "step-000002"
    kept = load_file(out / "checkpoints" / "step-000002" / "state.safetensors")
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in kept)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename path too
    for _ in range(2):
        trainer.save()
        assert ckpt.load_state(latest_checkpoint(out))["step"] == 2
    assert sorted(os.listdir(out / "checkpoints")) == ["LATEST", "step-000002"]


def test_temp_clean_up_removes_only_its_own_and_dead_processes(tiny, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        names = {
            "live": f".step-000002.tmp-{host}.{live.pid}.abcd0001",
            "other host": f".step-000002.tmp-elsewhere.example.{live.pid}.abcd0002",
            "dead": f".step-000002.tmp-{host}.{dead.pid}.abcd0003",
            "mine": f".step-000002.tmp-{host}.{os.getpid()}.abcd0004",
        }
        for name in names.values():
            (root / name).mkdir()
            (root / name / "state.json").write_text("{}")
        ckpt.save_checkpoint(out, 2, lambda folder: (folder / "x").write_text("1"), keep=3)
        left = set(os.listdir(root))
        assert names["live"] in left and names["other host"] in left
        assert names["dead"] not in left and names["mine"] not in left
    finally:
        live.kill()
        live.wait()


# ---- disk full at every write ------------------------------------------------------------------------------
class DiskFull:
    """Fails the ``fail_at``-th write-like call (kindred.atomic's writes, fsync, mkdir, the PEFT adapter's
    safetensors and JSON writes) with ENOSPC; counts them all when ``fail_at`` is None."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, self.where = 0, fail_at, None
        import kindred.formats.peft as peft

        for owner, name in (
            (atomic, "_write_all"),
            (os, "fsync"),
            (os, "mkdir"),
            (peft, "save_file"),
            (pathlib.Path, "write_text"),
        ):
            monkeypatch.setattr(
                owner, name, self._wrap(getattr(owner, name), f"{getattr(owner, '__name__', owner)}.{name}")
            )

    def _wrap(self, fn, label):
        def call(*args, **kwargs):
            if label == "os.mkdir" and os.path.exists(args[0]):
                return fn(*args, **kwargs)  # EEXIST comes first: a full disk does not change that
            self.calls += 1
            if self.calls == self.fail_at:
                self.where = label
                raise OSError(errno.ENOSPC, "No space left on device")
            return fn(*args, **kwargs)

        return call


def test_disk_full_at_every_checkpoint_write_keeps_the_last_good_one(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(run_config(*tiny, out, **{"train.max_steps": 3}))
    trainer.fit()  # checkpoints at steps 2 and 3
    trainer.step = 4  # the next save: step-000004
    with monkeypatch.context() as m:
        counter = DiskFull(m)
        trainer.save()
    total = counter.calls
    ckpt.remove_tree(out / "checkpoints" / "step-000004")
    (out / "checkpoints" / "LATEST").write_text("step-000003\n")
    assert total >= 10
    for k in range(1, total + 1):
        with monkeypatch.context() as m:
            fail = DiskFull(m, fail_at=k)
            with pytest.raises(kindred.KindredError) as e:
                trainer.save()
        msg = str(e.value)
        assert str(out / "checkpoints") in msg and "no space left on device" in msg, (k, fail.where, msg)
        if latest_checkpoint(out).name == "step-000004":  # failed after LATEST was replaced: only an fsync
            assert fail.where == "os.fsync", (k, fail.where)
            (out / "checkpoints" / "LATEST").write_text("step-000003\n")
        else:
            assert "step-000003) is kept" in msg, (k, msg)
        assert ckpt.load_state(latest_checkpoint(out))["step"] == 3
        assert not [p for p in os.listdir(out / "checkpoints") if ".tmp-" in p], k
    resumed = kindred.train(run_config(*tiny, out, **{"train.max_steps": 4}), resume=True)
    assert resumed.step == 4


def test_disk_full_at_every_final_write_names_the_folder_and_keeps_the_old_outputs(
    tiny, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    trainer = Trainer(run_config(*tiny, out, **{"train.max_steps": 2, "output.plot": True}))
    trainer.fit()
    adapter_before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    config_before = (out / "config.yaml").read_text()
    from kindred.train.metrics import MetricsLog

    log = MetricsLog(out, 2, False)
    with monkeypatch.context() as m:
        counter = DiskFull(m)
        trainer._finish(log)
    for k in range(1, counter.calls + 1):
        with monkeypatch.context() as m:
            fail = DiskFull(m, fail_at=k)
            with pytest.raises(kindred.KindredError) as e:
                trainer._finish(log)
        assert str(out) in str(e.value) and "no space left on device" in str(e.value), (k, fail.where)
        assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before
        assert (out / "config.yaml").read_text() == config_before
        assert not [p for p in os.listdir(out) if ".tmp-" in p], k


def test_a_resumed_run_removes_what_a_killed_one_left_half_written(tiny, run_copy):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{socket.gethostname()}.{dead.pid}.abcd0005"
    (run_copy / f".adapter.tmp-{tag}").mkdir()
    (run_copy / f".adapter.tmp-{tag}" / "adapter_config.json").write_text("{")
    (run_copy / f".config.yaml.tmp-{tag}").write_text("half")
    kindred.train(run_config(*tiny, run_copy, **{"train.max_steps": 6}), resume=True)
    assert not [p for p in os.listdir(run_copy) if ".tmp-" in p]
