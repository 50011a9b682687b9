"""Training throughput on 1 and 2 GPUs through torch.distributed (issue 9): tokens/s and scaling efficiency.

Qwen3-8B shape with DDP and Gemma 3 27B shape with FSDP2, both with a 4-bit NF4 base (random weights from
kindred.models.from_config; values do not change the work), LoRA r = 16 on the seven projections, sequence
2048 × micro-batch 4 per GPU, full recomputation, bf16, random packed rows with 25 % of labels -100. The
global batch grows with the GPUs (4 rows per GPU per optimizer step), so the ideal is N× the tokens/s of one.

Each case runs as ``torchrun --nproc-per-node N -m benchmarks.bench_dist <case> <folder>`` (one process
is the plain single-GPU trainer, the baseline); the pytest benchmark launches them all and appends rows to
results/e2e.csv. NCCL_NVLS_ENABLE=0 (no NVLink multicast) is set for every launch.

    NCCL_NVLS_ENABLE=0 python -m pytest benchmarks/bench_dist.py -m benchmark -s -q
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from .harness import append, fmt
from .shapes import HF_CONFIGS

ROOT = Path(__file__).resolve().parent.parent
SEQ, MICRO, RANK = 2048, 4, 16
WARMUP, MEASURED = 2, 5  # optimizer steps: the first ones compile/allocate, then the timed ones
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {name: HF_CONFIGS[name] for name in ("qwen3-8b", "gemma3-27b")}
# (model, engine): the engine used on 2 GPUs; 1 GPU is always the single-process trainer.
CASES = {"qwen3-8b": "ddp", "gemma3-27b": "fsdp"}
# KINDRED_DIST_QUANT=none: a bf16 base (FSDP2 in torch 2.11 cannot shard the 4-bit codes: it makes every
# sharded parameter require grad, which integer tensors cannot).
QUANT = None if os.environ.get("KINDRED_DIST_QUANT", "nf4") == "none" else "nf4"


def random_packed(rows: int, length: int, vocab: int, seed: int):
    """PackedData of ``rows`` full rows, each 4 documents of random lengths, 25 % of labels -100 (and the
    first token of every document, as packing leaves it)."""
    from kindred.data.packing import PackedData

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, length), dtype=np.int32)
    labels = np.where(rng.random((rows, length)) < 0.25, -100, ids).astype(np.int32)
    positions = np.empty_like(ids)
    cu, row_seqs, ex_row, ex_start = [0], [0], [], []
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, length), 3, replace=False))
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [length]])
        for s, e in zip(starts, ends, strict=True):
            positions[r, s:e] = np.arange(e - s)
            labels[r, s] = -100
            cu.append(r * length + e)
            ex_row.append(r)
            ex_start.append(s)
        row_seqs.append(len(cu) - 1)
    return PackedData(
        input_ids=ids,
        labels=labels,
        position_ids=positions,
        cu_seqlens=np.asarray(cu, dtype=np.int32),
        seq_example=np.arange(len(cu) - 1, dtype=np.int32),
        row_seqs=np.asarray(row_seqs, dtype=np.int64),
        row_trainable=(labels != -100).sum(1).astype(np.int32),
        example_row=np.asarray(ex_row, dtype=np.int32),
        example_start=np.asarray(ex_start, dtype=np.int32),
        max_tokens=length,
    )


def worker(name: str, out: Path) -> None:
    """One rank of a case (under torchrun): build the model, train WARMUP + MEASURED steps, write the
    figures (rank 0)."""
    import kindred
    from kindred.train.parallel import init_from_env
    from kindred.train.trainer import Trainer

    created = init_from_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", torch.cuda.current_device())
    config = CONFIGS[name]
    model = kindred.models.from_config(config, quant=QUANT, dtype=torch.bfloat16, device=device, seed=0)
    steps = WARMUP + MEASURED
    packed = random_packed(steps * MICRO * world, SEQ, config["vocab_size"], seed=1)
    cfg = {
        "quant": QUANT or "none",
        "dtype": "bf16",
        "lora": {"r": RANK, "alpha": 2 * RANK, "targets": TARGETS},
        "data": {"budget": SEQ},  # the packed row length
        "train": {
            "max_steps": steps,
            "micro_batch_tokens": SEQ * MICRO,
            "lr": 1e-4,
            "gradient_checkpointing": "full",
            "distributed": CASES[name],
        },
        "output": {"dir": str(out / "run"), "progress": False, "tensorboard": False, "plot": False},
    }
    trainer = Trainer(cfg, model=model, tokenizer=None, rows=packed)
    del model  # under FSDP only the shards stay
    torch.cuda.reset_peak_memory_stats(device)  # the training peak, not the build's (whole model per rank)
    result = trainer.fit()
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**20, device=device)
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if int(os.environ.get("RANK", "0")) == 0:
        timed = result.metrics[WARMUP:]
        seconds = [
            b["elapsed_s"] - a["elapsed_s"]
            for a, b in zip(result.metrics[WARMUP - 1 : -1], timed, strict=True)
        ]
        figures = {
            "gpus": world,
            "engine": CASES[name] if world > 1 else "single",
            "step_ms": 1e3 * statistics.median(seconds),
            "tokens_per_s": sum(r["tokens"] for r in timed) / sum(seconds),
            "peak_mib": float(peak),
            "losses": [r["loss"] for r in result.metrics],
        }
        (out / "figures.json").write_text(json.dumps(figures))
    if created:
        torch.distributed.destroy_process_group()


def launch(name: str, gpus: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "4"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
        cmd += ["-m", "benchmarks.bench_dist", name, tmp]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
        return json.loads((Path(tmp) / "figures.json").read_text())


@pytest.mark.benchmark
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_scaling(name):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one, two = launch(name, 1), launch(name, 2)
    for f in (one, two):
        assert all(np.isfinite(f["losses"])), f
    efficiency = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    shape = f"model={name},seq={SEQ},micro={MICRO},r={RANK},quant={QUANT or 'none'},ckpt=full"
    rows = []
    for f in (one, two):
        eff = "" if f is one else f"; scaling efficiency {100 * efficiency:.1f} % of 2x 1 GPU"
        rows.append(
            {
                "op": "train_step",
                "impl": "kindred" if f is one else f"kindred-{f['engine']}",
                "shape": f"{shape},gpus={f['gpus']}",
                "dtype": "bf16",
                "ms": fmt(f["step_ms"]),
                "tokens_per_s": fmt(f["tokens_per_s"]),
                "peak_extra_mib": fmt(f["peak_mib"]),
                "notes": f"{f['engine']}; {f['gpus']}x{MICRO} rows/step; NCCL_NVLS_ENABLE=0{eff}",
            }
        )
    append("e2e", rows)
    print(
        f"\n{name}: 1 GPU {one['tokens_per_s']:,.0f} tok/s ({one['peak_mib'] / 1024:.1f} GiB), "
        f"2 GPUs {two['engine']} {two['tokens_per_s']:,.0f} tok/s ({two['peak_mib'] / 1024:.1f} GiB/GPU): "
        f"scaling efficiency {100 * efficiency:.1f} %"
    )


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
