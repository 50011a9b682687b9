"""Training on several processes (gloo on the CPU, launched by torchrun): the loss curve of W ranks with
grad_accum k equals one process with grad_accum k·W; master weights stay bitwise equal across ranks; a run
killed after a checkpoint resumes on 1 or 3 ranks (and under FSDP); FSDP2 gives DDP's curve (4-bit base
too)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kindred
from kindred.demo import CALIBRATION, build_tiny_model
from kindred.train import latest_checkpoint, load_config
from kindred.train.parallel import FSDP_4BIT_TORCH

from .helpers import with_overrides
from .tolerances import rel_err

OLD_FSDP = torch.__version__ < FSDP_4BIT_TORCH  # fsdp over a 4-bit base is refused on this torch
GLOBAL_ROWS = 6  # rows per optimizer step, all ranks together (one 512-token row per micro-step)
STEPS = 6

# Runs the trainer on every rank and checks after each optimizer step that all ranks hold the same fp32
# master weights, bit for bit; rank 0 writes the steps it checked to checked.json in the output folder.
WORKER = """
import json, os, sys
import torch, torch.distributed as dist
from kindred.train.parallel import init_from_env
from kindred.train.trainer import Trainer

class Checked(Trainer):
    def _train_step(self):
        row = super()._train_step()
        flat = torch.cat([m.detach().reshape(-1) for m in self.master])
        every = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(every, flat)
        if not all(torch.equal(every[0], f) for f in every):
            raise SystemExit(f"step {self.step}: master weights differ across ranks")
        self.checked.append(self.step)
        return row

assert init_from_env()
trainer = Checked(sys.argv[1])
trainer.checked = []
if "--mask-even-rows" in sys.argv:  # micro-steps without a trained token, on some ranks only
    trainer.rows_data.labels[::2] = -100
trainer.fit(resume="--resume" in sys.argv)
if trainer.rank == 0:
    (trainer.out / "checked.json").write_text(json.dumps({"world": trainer.world, "steps": trainer.checked}))
dist.destroy_process_group()
# Leave without the interpreter's teardown: under load, gloo's threads have aborted it once ("terminate
# called without an active exception") after every check above had passed and every file was written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def config(model, out, world: int, **over) -> dict:
    cfg = {
        "model": str(model),
        "quant": "nf4",
        "dtype": "fp32",
        "device": "cpu",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(CALIBRATION), "template": "chatml", "budget": 512},
        "train": {
            "max_steps": STEPS,
            "micro_batch_tokens": 512,
            "grad_accum": GLOBAL_ROWS // world,
            "lr": 2e-2,
            "warmup_steps": 1,
            "gradient_checkpointing": "full",  # as on the GPU: recomputation under DDP and FSDP
        },
        "output": {"dir": str(out), "save_every": 2, "progress": False, "tensorboard": False, "plot": False},
    }
    return with_overrides(cfg, over)


def write_config(cfg: dict, path) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def torchrun(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def env() -> dict:
    # One thread per rank (the CI machine has 2 cores); the one-process references run with the same.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_worker(tmp_path, cfg: dict, nproc: int, *flags: str) -> dict:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    path = write_config(cfg, tmp_path / f"cfg-{nproc}-{time.monotonic_ns()}.yaml")
    done = subprocess.run(
        torchrun(nproc, str(worker), path, *flags), env=env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((tmp_path / cfg["output"]["dir"] / "checked.json").read_text())


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def curve(rows: list[dict]) -> list[tuple[float, float]]:
    """(loss, gradient norm) per step: the norm tells summed gradients from averaged ones; AdamW hides it."""
    return [(r["loss"], r["grad_norm"]) for r in rows]


def logged(out) -> list[tuple[float, float]]:
    return curve([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])


def adapter(out) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_curve(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)


def assert_same_adapter(a: dict, b: dict) -> None:
    """Norm-wise per tensor: AdamW turns last-bit gradient differences of near-zero-gradient elements (other
    summation orders across ranks) into visible elementwise ones, while the tensors agree to 1e-4."""
    assert a.keys() == b.keys()
    for k in a:
        assert rel_err(a[k], b[k]) < 1e-4, k


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One process, grad_accum = GLOBAL_ROWS: (losses, adapter) for an nf4 and a dense (quant none) base."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    runs = {}
    try:
        for quant in ("nf4", "none"):
            out = tmp_path_factory.mktemp(f"ref-{quant}")
            result = kindred.train(config(tiny_model, out, 1, quant=quant))
            runs[quant] = (curve(result.metrics), adapter(out))
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("nproc", [2, 3])
def test_ddp_curve_equals_one_process(tiny_model, reference, tmp_path, nproc):
    cfg = config(tiny_model, tmp_path / "run", nproc)
    checked = run_worker(tmp_path, cfg, nproc)
    assert checked == {"world": nproc, "steps": list(range(1, STEPS + 1))}
    want_curve, want_adapter = reference["nf4"]
    assert_same_curve(logged(tmp_path / "run"), want_curve)
    assert_same_adapter(adapter(tmp_path / "run"), want_adapter)


def test_ddp_with_untrained_micro_steps(tiny_model, tmp_path):
    # Every other packed row has no trained token: a rank whose micro-batch is empty still runs it (zero
    # loss) so DDP's all-reduce pairs up; one process skips it. Same curve either way.
    from kindred.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Trainer(config(tiny_model, tmp_path / "ref", 1))
        ref.rows_data.labels[::2] = -100
        want = curve(ref.fit().metrics)
    finally:
        torch.set_num_threads(threads)
    cfg = config(tiny_model, tmp_path / "run", 2)
    assert run_worker(tmp_path, cfg, 2, "--mask-even-rows")["steps"] == list(range(1, STEPS + 1))
    assert_same_curve(logged(tmp_path / "run"), want)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fsdp_curve_equals_ddp(tiny_model, reference, tmp_path, quant):
    # DDP's curve is the one-process curve (test above), so FSDP is compared to that.
    cfg = config(tiny_model, tmp_path / "run", 2, quant=quant, **{"train.distributed": "fsdp"})
    if quant != "none" and OLD_FSDP:
        pytest.skip(f"torch {torch.__version__}: fsdp over a 4-bit base is refused (the test below)")
    checked = run_worker(tmp_path, cfg, 2)
    assert checked["steps"] == list(range(1, STEPS + 1))
    want_curve, want_adapter = reference[quant]
    assert_same_curve(logged(tmp_path / "run"), want_curve)
    assert_same_adapter(adapter(tmp_path / "run"), want_adapter)


@pytest.mark.parametrize("engine, quant", [("ddp", "nf4"), ("fsdp", "none")])
def test_offloaded_checkpoints_under_ddp_and_fsdp(tiny_model, reference, tmp_path, engine, quant):
    # the layer inputs in host memory change nothing the engines see: the one-process curve of full
    over = {"train.gradient_checkpointing": "offload", "train.distributed": engine}
    cfg = config(tiny_model, tmp_path / "run", 2, quant=quant, **over)
    assert run_worker(tmp_path, cfg, 2)["steps"] == list(range(1, STEPS + 1))
    want_curve, want_adapter = reference[quant]
    assert_same_curve(logged(tmp_path / "run"), want_curve)
    assert_same_adapter(adapter(tmp_path / "run"), want_adapter)


def test_killed_run_resumes_on_other_rank_counts(tiny_model, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = torchrun(2, "-m", "kindred", "train", write_config(config(tiny_model, out, 2), tmp_path / "c.yaml"))
    log = tmp_path / "train.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env(), stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while latest_checkpoint(out) is None:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = children(proc.pid)  # torchrun starts each rank in its own session: kill them by id
    assert len(workers) == 2, workers
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while not all(gone(pid) for pid in workers):  # SIGKILL is asynchronous
        time.sleep(0.01)
    killed_at = latest_checkpoint(out).name
    assert killed_at in ("step-000002", "step-000004"), killed_at  # killed mid-run, not after the end
    want_curve, want_adapter = reference["nf4"]

    one = tmp_path / "one"  # resume on 1 process (grad_accum 6: the same global batch)
    shutil.copytree(out, one)
    result = kindred.train(config(tiny_model, one, 1), resume=True)
    assert result.step == STEPS
    assert_same_curve(logged(one), want_curve)
    assert_same_adapter(adapter(one), want_adapter)

    for engine in ("ddp",) if OLD_FSDP else ("ddp", "fsdp"):  # resume on 3 ranks (grad_accum 2)
        three = tmp_path / f"three-{engine}"
        shutil.copytree(out, three)
        checked = run_worker(
            tmp_path, config(tiny_model, three, 3, **{"train.distributed": engine}), 3, "--resume"
        )
        assert checked["world"] == 3 and checked["steps"] == list(range(int(killed_at[-6:]) + 1, STEPS + 1))
        assert_same_curve(logged(three), want_curve)
        assert_same_adapter(adapter(three), want_adapter)


def test_fsdp_over_4_bit_on_an_old_torch_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    from kindred.train import parallel

    monkeypatch.setattr(parallel, "FSDP_4BIT_TORCH", "999.0")  # this torch, as if it were too old
    from kindred.train import trainer

    monkeypatch.setattr(trainer, "distributed", lambda: (0, 2))  # rank 0 of 2, without a process group
    cfg = config(tmp_path / "no-model-here", tmp_path / "run", 2, **{"train.distributed": "fsdp"})
    with pytest.raises(kindred.KindredValueError, match=r"fsdp over a 4-bit base \(quant: nf4\) needs torch"):
        trainer.Trainer(cfg)
    parallel.check_engine("fsdp", "none")  # a 16-bit base shards on any supported torch
    parallel.check_engine("ddp", "nf4")


def test_resume_with_another_global_batch_names_grad_accum(tiny_model, tmp_path):
    out = tmp_path / "run"
    kindred.train(config(tiny_model, out, 1, **{"train.max_steps": 2}))
    with pytest.raises(kindred.KindredValueError, match=r"set train.grad_accum to 6 to resume"):
        kindred.train(config(tiny_model, out, 2, **{"train.max_steps": 4}), resume=True)


def test_distributed_key_is_validated():
    with pytest.raises(kindred.KindredValueError, match=r"'train\.distributed' must be one of ddp, fsdp"):
        load_config(
            {"model": "m", "data": {"path": "x", "template": "chatml"}, "train": {"distributed": "zero"}}
        )
    cfg = load_config({"model": "m", "data": {"path": "x", "template": "chatml"}})
    assert cfg.train.distributed == "ddp"
