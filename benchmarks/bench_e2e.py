"""End-to-end QLoRA training step (issues 7, 19, 20): kindred's Trainer against transformers + PEFT
(+ bitsandbytes) and, with KINDRED_E2E_UNSLOTH=1, Unsloth, in the same run on the same shapes.

Random weights of the real shapes (values do not change the work): Qwen3-8B at sequence 2048 × micro-batch 4
with full recomputation (goal ≥ 10,000 tokens/s at ≤ 10 GiB), without (≥ 13,000 at ≤ 40 GiB) and offloaded
(``gradient_checkpointing: offload``, the layer inputs in host memory: ≥ 12,500 at ≤ 8.3 GiB, Unsloth's
peak) and at 16384 × 1 (the 16K rule's ceiling: ≥ 1.15× Unsloth at ≤ its peak), Gemma 3 12B at 4096 × 1
with full recomputation (≥ 2 × 2,432 tokens/s at ≤ 11 GiB) and offloaded (≥ 7,000 at ≤ 9.2 GiB); issue
20's Qwen3-30B-A3B (≤ 22 GiB, ≥ 2× the anchor) and gpt-oss-20b (≤ 16 GiB) with LoRA on attention only, and
Qwen3.5-4B, at 2048 × 4. LoRA r = 16, α = 16 on q, k, v, o, gate, up, down; 25 % of the labels −100; one step
= forward + backward + AdamW.

kindred: ``kindred.models.from_config(..., quant="nf4")`` and ``Trainer(cfg, model=..., rows=...)`` with one
sequence per packed row; ``trainer._train_step()`` is timed. Anchor, same run and shapes: transformers'
model built in bf16 on the device, its seven projections swapped for bitsandbytes NF4 ``Linear4bit`` (double
quantization, bf16 compute) when bitsandbytes imports, PEFT LoRA, gradient checkpointing, SDPA (gpt-oss:
FlexAttention), AdamW. transformers' MoE experts are 3-D parameters: they stay bf16 in the anchor.
Unsloth (``test_e2e_unsloth``, after kindred's rows are appended): it patches transformers on import, so it
runs in a subprocess per case (benchmarks/unsloth_step.py), with ``.carry/unsloth.tar.xz`` (make_carry.sh)
unpacked once and put on its PYTHONPATH after ``.carry/site``. This process writes the case's checkpoint
(transformers' model, random bf16 weights, ``save_pretrained``, a minimal WordLevel tokenizer of the config's
vocabulary) to the temp folder, or /dev/shm when the disk has no room ($KINDRED_E2E_UNSLOTH_DIR overrides),
deleted after; the subprocess loads it with ``FastLanguageModel.from_pretrained(load_in_4bit=True,
dtype=bf16)``, ``get_peft_model(r=16, lora_alpha=16, lora_dropout=0, the case's targets,
use_gradient_checkpointing="unsloth")``, AdamW(fused) at kindred's lr, the anchor's token rows, and prints one
JSON line: tokens/s, peak, the first step's seconds (compilation), load time, host RSS and pinned host bytes
(its checkpointing offloads to host memory). It is killed after $KINDRED_E2E_UNSLOTH_TIMEOUT seconds (420); a
failure is a row whose notes give the last error line (the output's tail is printed, the whole log goes to
$OUT/unsloth_<case>.log). Its row ("unsloth", the ckpt=1 shape) has the transformers anchor as baseline like
kindred's rows, and its notes give kindred's ckpt=1 tokens/s and peak as multiples of Unsloth's.
Timing: 2 warm-up steps, then ``KINDRED_E2E_STEPS`` (default 5) steps between ``torch.cuda.synchronize()``
calls; tokens/s = tokens / time. Memory: ``max_memory_allocated`` over the timed steps, i.e. the whole peak
(weights, optimizer state and the step), written to
``peak_extra_mib`` (in this file the whole peak, not the extra). Shapes say ckpt=1 (full), ckpt=0 (none) or
ckpt=offload; an offload row's notes give the host memory its offloaded layer inputs took (the model's
``offloaded.peak``: pinned bytes held at once).
With ``KINDRED_PROFILE_DIR`` set, one more kindred step per configuration runs under torch.profiler and
``$KINDRED_PROFILE_DIR/e2e_profile.txt`` gets the device time per kernel name and per op.

Run: python -m pytest benchmarks/bench_e2e.py -m benchmark -s   (KINDRED_E2E_ANCHOR=0: no transformers anchor)
pytest -k picks cases and checkpointing modes: test_e2e_train_step[qwen3-8b-full], [qwen3-8b-none],
[qwen3-8b-offload], ...,
test_e2e_unsloth[qwen3-8b] (skipped unless KINDRED_E2E_UNSLOTH=1), e.g. -k "qwen3-8b-full or unsloth and
qwen3-8b". A case's transformers anchor runs with its first selected policy; the others reuse its row.
The CPU check of the same code path on tiny models: python -m pytest benchmarks/bench_e2e.py -q
(bench_e2e_unsloth.py covers the Unsloth anchor's parts that need no Unsloth: rows, model folder, subprocess).
"""

from __future__ import annotations

import collections
import gc
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kindred.data.packing import PackedData
from kindred.models import from_config
from kindred.train import Trainer

from . import harness
from .harness import fmt
from .shapes import HF_CONFIGS

RUNS_ON_CPU = True  # the tiny-model check below; the benchmark itself is marked gpu
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
LR = 1e-4  # AdamW's learning rate, kindred's and the anchors'
IGNORED = 0.25  # share of labels set to -100

QWEN3_8B, GEMMA3_12B = HF_CONFIGS["qwen3-8b"], HF_CONFIGS["gemma3-12b"]
# name -> (HF config, catalogue id, seq, micro-batch rows, [(checkpointing, goal tokens/s, goal GiB)])
CASES = {
    "qwen3-8b": (
        QWEN3_8B,
        "qwen3-8b",
        2048,
        4,
        [("full", 10_000, 10), ("none", 13_000, 40), ("offload", 12_500, 8.3)],
    ),
    "gemma3-12b": (GEMMA3_12B, "gemma-3-12b", 4096, 1, [("full", 2 * 2432, 11), ("offload", 7_000, 9.2)]),
    # issue 19: the 16K rule's ceiling; its goal is relative (>= 1.15x Unsloth's tokens/s at <= its peak), so
    # only the memory a 24 GB card leaves is a goal here
    "qwen3-8b-16k": (QWEN3_8B, "qwen3-8b", 16384, 1, [("full", 0, 22), ("offload", 0, 22)]),
    # issue 20: the MoE and hybrid families at 4 × 2048. Their speed goals are relative (≥ 2× the anchor for
    # Qwen3-30B-A3B: ratio_to_baseline ≤ 0.5; ≥ 1.2× Unsloth, not run here), so only memory is a goal here.
    "qwen3-30b-a3b": (HF_CONFIGS["qwen3-30b-a3b"], "qwen3-30b-a3b", 2048, 4, [("full", 0, 22)]),
    "gpt-oss-20b": (HF_CONFIGS["gpt-oss-20b"], "gpt-oss-20b", 2048, 4, [("full", 0, 16)]),
    "qwen3.5-4b": (HF_CONFIGS["qwen3.5-4b"], "qwen3.5-4b", 2048, 4, [("full", 0, 80)]),
}
# the shape's ckpt= of each checkpointing policy (1 and 0 as the earlier rows and the anchors say)
CKPT_LABELS = {"full": "1", "none": "0", "offload": "offload"}
# MoE: LoRA r = 16 on the attention projections only (the goal shape; the experts stay frozen)
CASE_TARGETS = {"qwen3-30b-a3b": TARGETS[:4], "gpt-oss-20b": TARGETS[:4]}


def packed_rows(n_rows: int, seq: int, vocab: int, seed: int = 0) -> PackedData:
    """Random token rows, one sequence per row; labels = the ids with 25 % (and each row's first token,
    whose target would belong to the previous row) set to -100."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n_rows, seq), dtype=np.int32)
    labels = ids.copy()
    for r in range(n_rows):
        labels[r, rng.choice(seq, size=round(IGNORED * seq), replace=False)] = -100
    labels[:, 0] = -100
    rows = np.arange(n_rows, dtype=np.int32)
    return PackedData(
        input_ids=ids,
        labels=labels,
        position_ids=np.tile(np.arange(seq, dtype=np.int32), (n_rows, 1)),
        cu_seqlens=np.arange(n_rows + 1, dtype=np.int32) * seq,
        seq_example=rows,
        row_seqs=np.arange(n_rows + 1, dtype=np.int64),
        row_trainable=(labels != -100).sum(axis=1).astype(np.int32),
        example_row=rows,
        example_start=np.zeros(n_rows, dtype=np.int32),
        max_tokens=seq,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Time ``step()`` (returns (tokens, loss)) over ``steps`` calls after ``warmup``; peak memory in MiB."""
    for _ in range(warmup):
        step()
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        n, loss = step()
        tokens += n
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "ms": 1e3 * seconds / steps,
        "tokens_per_s": tokens / seconds,
        "peak_mib": peak,
        "loss": float(loss),
    }


def kindred_trainer(
    hf: dict, seq: int, batch: int, ckpt: str, device: torch.device, out: str, targets=TARGETS
) -> Trainer:
    """kindred's Trainer over an NF4 model of ``hf``'s shape with random rows (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = from_config(hf, quant="nf4", dtype=dtype, device=device, seed=0)
    cfg = {
        "quant": "nf4",
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "device": str(device),
        "lora": {"r": RANK, "alpha": RANK, "dropout": 0.0, "targets": list(targets)},
        "data": {"budget": seq, "pack": seq},
        "train": {
            "max_steps": 1000,
            "micro_batch_tokens": seq * batch,
            "grad_accum": 1,
            "lr": LR,
            "schedule": "constant",
            "gradient_checkpointing": ckpt,
        },
        "output": {"dir": out, "progress": False, "plot": False, "tensorboard": False},
    }
    trainer = Trainer(cfg, model=model, tokenizer=None, rows=packed_rows(2 * batch, seq, hf["vocab_size"]))
    trainer.model.train()  # fit() does this; the benchmark calls _train_step directly
    return trainer


def kindred_step(trainer: Trainer):
    def step():
        r = trainer._train_step()
        return r["tokens"], r["loss"]

    return step


def anchor_attention(hf: dict, device: torch.device) -> str:
    """SDPA; gpt-oss's sinks are not in transformers' SDPA path: FlexAttention on CUDA, eager on the CPU."""
    if hf["model_type"] != "gpt_oss":
        return "sdpa"
    return "flex_attention" if device.type == "cuda" else "eager"


def anchor_model(hf: dict, device: torch.device, quantize: bool, targets=TARGETS):
    """transformers' model of ``hf``'s shape (random bf16 weights built on ``device``), projections in
    bitsandbytes NF4 when ``quantize``, PEFT LoRA on TARGETS, gradient checkpointing.
    Returns (the PEFT model, the number of NF4 linears)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{**hf, "use_cache": False})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=anchor_attention(hf, device))
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    n_4bit = _to_bnb_nf4(model) if quantize else 0
    ckpt_kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    lora = LoraConfig(
        r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    model.train()
    return model, n_4bit


def _to_bnb_nf4(model: nn.Module) -> None:
    """Swap every TARGETS nn.Linear for a bitsandbytes NF4 Linear4bit (double quant, bf16 compute), one
    at a time so the dense weights are freed as they go; quantized when moved to the device. Returns the
    number swapped."""
    import bitsandbytes as bnb

    count = 0

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in TARGETS or not isinstance(child, nn.Linear):
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(parent, name, q.to(device))
            del child
            count += 1
    return count


def anchor_rows(seq: int, batch: int, vocab: int) -> PackedData:
    """The anchors' token rows (transformers + PEFT and Unsloth alike): ``packed_rows``'s rule, seed 1."""
    return packed_rows(batch, seq, vocab, seed=1)


def anchor_step(model, seq: int, batch: int, vocab: int, device: torch.device):
    data = anchor_rows(seq, batch, vocab)
    ids = torch.from_numpy(data.input_ids).long().to(device)
    labels = torch.from_numpy(data.labels).long().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ids.numel(), loss.detach()

    return step


def have_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken bitsandbytes build raises more than ImportError
        return False
    return True


# ---- profile ----------------------------------------------------------------------------------------------
_BUCKETS = [  # kernel-name substrings -> what the time is spent on (first match wins)
    ("flex attention", ("flex", "triton_tem")),
    ("sdpa / flash attention", ("flash", "fmha", "attention")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "nvjet", "cutlass", "xmma", "sm90_")),
    ("4-bit dequant / matmul", ("nf4", "dequant", "int4", "4bit")),
    ("cross-entropy", ("cross_entropy", "lce", "softmax", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copies / casts", ("copy", "cast", "cat", "fill")),
]


def profile_step(step, device: torch.device, title: str) -> str:
    """One ``step()`` under torch.profiler: device time per kernel name (top 30), per bucket, per op."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0)
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == kind and (kind == DeviceType.CUDA or e.cpu_parent is None):
            per_name[e.name][0] += e.time_range.elapsed_us() / 1e3
            per_name[e.name][1] += 1
    total = sum(ms for ms, _ in per_name.values())
    lines = [f"== {title}: one step, {wall_ms:.1f} ms wall, {total:.1f} ms summed {kind.name} time =="]
    buckets: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in per_name.items():
        low = name.lower()
        buckets[next((b for b, keys in _BUCKETS if any(k in low for k in keys)), "other")] += ms
    lines.append("by kind (kernel-name heuristics):")
    for b, ms in sorted(buckets.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {ms:9.2f} ms {100 * ms / max(total, 1e-9):5.1f} %  {b}")
    lines.append("top kernels by total time (ms, count, name):")
    for name, (ms, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"  {ms:9.2f} {n:6d}  {name[:160]}")
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines.append("by op:")
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    return "\n".join(lines) + "\n"


def _profile_or_error(trainer: Trainer, device: torch.device, title: str) -> str:
    """The profile of one more step; a profiler failure is written instead of failing the measurement."""
    try:
        with warnings.catch_warnings():  # profiler notices must not fail the measurement either
            warnings.simplefilter("default")
            return profile_step(kindred_step(trainer), device, title)
    except Exception as e:
        return f"== {title}: profiler failed: {type(e).__name__}: {e} ==\n"


_profile_started = False


def write_profile(text: str) -> Path | None:
    """Append to $KINDRED_PROFILE_DIR/e2e_profile.txt (truncated by this process's first write)."""
    global _profile_started
    folder = os.environ.get("KINDRED_PROFILE_DIR")
    if not folder:
        return None
    path = Path(folder) / "e2e_profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if _profile_started else "w") as f:
        f.write(text)
    _profile_started = True
    return path


# ---- one model: kindred's configurations and the anchor ---------------------------------------------------
def run_case(name: str, hf: dict, seq: int, batch: int, ckpts, device, warmup: int, steps: int, anchor: bool):
    """CSV rows for ``name`` (kindred per checkpointing policy, then the anchor) and kindred's errors."""
    rows, errors = [], []
    targets = CASE_TARGETS.get(name, TARGETS)

    def shape(impl_method: str, ckpt: int | str) -> str:
        return case_shape(name, seq, batch, impl_method, ckpt)

    for ckpt, goal_tps, goal_gib in ckpts:
        row = {"op": "train_step", "impl": "kindred", "shape": shape("qlora", CKPT_LABELS[ckpt])}
        row["dtype"] = "bf16" if device.type == "cuda" else "fp32"
        with tempfile.TemporaryDirectory() as out:
            trainer = None
            try:
                trainer = kindred_trainer(hf, seq, batch, ckpt, device, out, targets)
                live = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
                m = measure(kindred_step(trainer), device, warmup, steps)
                host = trainer.model.model.offloaded.peak
                if os.environ.get("KINDRED_PROFILE_DIR"):
                    write_profile(_profile_or_error(trainer, device, row["shape"]))
            except torch.OutOfMemoryError as e:
                m, note = None, f"out of memory: {str(e)[:150]}"
            except Exception as e:  # record it, free the memory, run the other configurations, fail below
                m, note = None, f"failed: {type(e).__name__}: {str(e)[:200]}"
                errors.append(f"{row['shape']}: {note}")
            del trainer
            _free(device)
        if m is not None:
            met = m["tokens_per_s"] >= goal_tps and (m["peak_mib"] or 0) <= goal_gib * 1024
            note = f"goal >= {goal_tps} tok/s at <= {goal_gib} GiB: {'met' if met else 'missed'}; "
            if live is not None:
                note += f"{live:.0f} MiB live before the step (weights, LoRA, fp32 masters); "
            if ckpt == "offload":
                note += f"host memory for offloaded activations {fmt(host / 2**20)} MiB at peak (pinned); "
            note += f"loss {m['loss']:.4f}"
            if not math.isfinite(m["loss"]):
                errors.append(f"{row['shape']}: loss {m['loss']}")
            row.update(_numbers(m))
        row["notes"] = note
        rows.append(row)
        print(_line(row), flush=True)

    if anchor:
        quant = have_bnb()
        impl = "transformers+peft+bitsandbytes" if quant else "transformers+peft"
        row = {"op": "train_step", "impl": impl, "dtype": "bf16"}
        row["shape"] = shape("qlora" if quant else "lora-bf16", 1)
        model = None
        try:
            with warnings.catch_warnings():  # third-party deprecation notices must not stop the anchor
                warnings.simplefilter("default")
                model, n_4bit = anchor_model(hf, device, quant, targets)
                m = measure(anchor_step(model, seq, batch, hf["vocab_size"], device), device, warmup, steps)
            row.update(_numbers(m))
            base = f"{n_4bit} bitsandbytes NF4 linears" if quant else "bf16 base"
            attn = anchor_attention(hf, device)
            row["notes"] = f"{base}, {attn}, gradient checkpointing, AdamW; loss {m['loss']:.4f}"
        except torch.OutOfMemoryError as e:
            row["notes"] = f"out of memory: {str(e)[:150]}"
        except Exception as e:  # transformers / PEFT / bitsandbytes missing or changed: say so in the CSV
            row["notes"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
        del model
        _free(device)
        rows.append(row)
        print(_line(row), flush=True)
        set_baseline(rows[:-1], row)
    return rows, errors


def case_shape(name: str, seq: int, batch: int, method: str, ckpt: int | str) -> str:
    return f"model={name},method={method},seq={seq},batch={batch},r={RANK},ckpt={ckpt}"


def set_baseline(rows: list[dict], anchor: dict | None) -> None:
    """Point each measured row at the transformers anchor: baseline_impl, baseline_ms and ratio_to_baseline =
    the row's ms / the anchor's ms (below 1: faster than the anchor)."""
    if not anchor or not anchor.get("ms"):
        return
    for r in rows:
        if r.get("ms"):
            r.update(baseline_impl=anchor["impl"], baseline_ms=anchor["ms"])
            r["ratio_to_baseline"] = fmt(float(r["ms"]) / float(anchor["ms"]))


def _numbers(m: dict) -> dict:
    return {
        "ms": fmt(m["ms"]),
        "tokens_per_s": fmt(m["tokens_per_s"], 5),
        "peak_extra_mib": fmt(m["peak_mib"]),
    }


def _line(row: dict) -> str:
    return (
        f"{row['impl']:32s} {row['shape']:62s} {row.get('tokens_per_s', ''):>7s} tok/s "
        f"{row.get('peak_extra_mib', ''):>7s} MiB  {row.get('notes', '')}"
    )


# ---- the benchmark: pytest -k picks cases and checkpointing modes (test_e2e_train_step[qwen3-8b-full]) ----
WARMUP = 2
_PARAMS = [pytest.param(n, c[0], id=f"{n}-{c[0]}") for n, case in CASES.items() for c in case[4]]
_appended: dict[str, list[dict]] = {}  # case -> the rows this process appended (anchors compare with them)


def _steps() -> int:
    return int(os.environ.get("KINDRED_E2E_STEPS", "5"))


@pytest.mark.benchmark
@pytest.mark.gpu
@pytest.mark.parametrize(("name", "ckpt"), _PARAMS)
def test_e2e_train_step(name, ckpt):
    """kindred with one checkpointing policy; the transformers anchor with the case's first selected policy
    (the others reuse its row as their baseline)."""
    hf, _, seq, batch, ckpts = CASES[name]
    earlier = _appended.setdefault(name, [])
    anchor_row = next((r for r in earlier if r["impl"].startswith("transformers")), None)
    anchor = os.environ.get("KINDRED_E2E_ANCHOR", "1") != "0" and anchor_row is None
    torch.manual_seed(0)
    chosen = [c for c in ckpts if c[0] == ckpt]
    rows, errors = run_case(name, hf, seq, batch, chosen, torch.device("cuda"), WARMUP, _steps(), anchor)
    set_baseline(rows, anchor_row)
    path = harness.append("e2e", rows)
    earlier.extend(rows)
    print(f"\n{name}: {len(rows)} rows appended to {path}")
    for row in rows:
        print("  " + _line(row))
    assert not errors, errors
    assert any(r.get("tokens_per_s") for r in rows if r["impl"] == "kindred")


@pytest.mark.benchmark
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_e2e_unsloth(name):
    """Unsloth on the case's shape, after kindred's rows (KINDRED_E2E_UNSLOTH=1, .carry/unsloth.tar.xz)."""
    if os.environ.get("KINDRED_E2E_UNSLOTH", "0") != "1":
        pytest.skip("the Unsloth anchor runs with KINDRED_E2E_UNSLOTH=1")
    hf, _, seq, batch, _ = CASES[name]
    earlier = _appended.setdefault(name, [])
    from .bench_e2e_unsloth import run_unsloth  # that module builds on this one

    row, out, errors = run_unsloth(name, hf, seq, batch, torch.device("cuda"), WARMUP, _steps(), earlier)
    path = harness.append("e2e", [row])
    earlier.append(row)
    print(f"\n{name}: Unsloth row appended to {path}\n  {_line(row)}")
    if errors:
        print(f"-- the last lines of Unsloth's output --\n{out}")
    assert not errors, errors


# ---- the same code path on the CPU, tiny models ----------------------------------------------------------
def _tiny(hf: dict) -> dict:
    small = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    if hf["model_type"] == "gemma3_text":
        small.update(num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16)
        small["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"]
    elif hf["model_type"] == "gpt_oss":
        small.update(num_hidden_layers=2, sliding_window=8, num_local_experts=4, num_experts_per_tok=2)
        small["layer_types"] = ["sliding_attention", "full_attention"]
    elif hf["model_type"] == "qwen3_moe":
        small.update(num_hidden_layers=2, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    elif hf["model_type"] == "qwen3_5_text":
        small.update(num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4)
        small.update(linear_key_head_dim=16, linear_value_head_dim=16)
    else:
        small["num_hidden_layers"] = 2
    return {**hf, **small}


def test_shapes_match_the_catalogue():

    import kindred.plan

    path = Path(kindred.plan.__file__).parent / "catalogue.json"
    arch = {m["id"]: m["architecture"] for m in json.loads(path.read_text())["models"]}
    keys = [  # catalogue key -> HF key (a MoE's catalogue intermediate is its experts' width)
        ("hidden", "hidden_size"),
        ("intermediate", "moe_intermediate_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("kv_heads", "num_key_value_heads"),
        ("head_dim", "head_dim"),
        ("vocab", "vocab_size"),
        ("tied_embeddings", "tie_word_embeddings"),
        ("sliding_window", "sliding_window"),
    ]
    for hf, cat_id, *_ in CASES.values():
        a = arch[cat_id]
        hf = {"moe_intermediate_size": hf["intermediate_size"], **hf}
        assert [hf.get(k) for _, k in keys] == [a[k] for k, _ in keys], cat_id
        sliding = sum(t == "sliding_attention" for t in hf.get("layer_types", []))
        assert sliding == a["sliding_layers"], cat_id


def test_packed_rows_layout():
    p = packed_rows(3, 40, 100, seed=2)
    assert p.rows == 3 and p.real_tokens == 120 and p.fill == 1.0
    assert (p.labels[:, 0] == -100).all()
    ignored = (p.labels == -100).mean(axis=1)
    assert ((ignored >= 0.25) & (ignored <= 0.25 + 1 / 40 + 1e-9)).all()
    kept = p.labels != -100
    assert (p.labels[kept] == p.input_ids[kept]).all()
    b = p.batch([2, 0])
    assert b["cu_seqlens"].tolist() == [0, 40, 80] and b["input_ids"].shape == (2, 40)


def test_e2e_code_path_on_cpu(tmp_path, monkeypatch):
    """Every configuration of the benchmark, anchor included, on tiny models: rows, profile and CSV."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("KINDRED_PROFILE_DIR", str(tmp_path / "profile"))
    cpu = torch.device("cpu")
    for name, (hf, _, _, _, ckpts) in CASES.items():
        rows, errors = run_case(name, _tiny(hf), 16, 2, ckpts, cpu, 1, 2, anchor=True)
        assert not errors, errors
        assert [r["impl"] for r in rows][: len(ckpts)] == ["kindred"] * len(ckpts)
        anchor = rows[-1]
        assert anchor["impl"].startswith("transformers+peft"), anchor
        assert anchor.get("ms"), anchor["notes"]  # the anchor ran
        layers = _tiny(hf)["num_hidden_layers"]
        if anchor["impl"].endswith("bitsandbytes") and hf["model_type"] in ("qwen3", "gemma3_text"):
            assert anchor["notes"].startswith(f"{7 * layers} bitsandbytes NF4 linears")
        for r, (ckpt, *_) in zip(rows[:-1], ckpts, strict=True):
            assert float(r["tokens_per_s"]) > 0 and "loss" in r["notes"]
            assert r["baseline_impl"] == anchor["impl"] and float(r["ratio_to_baseline"]) > 0
            assert r["shape"].endswith(f",ckpt={CKPT_LABELS[ckpt]}")
            offloaded = "host memory for offloaded activations" in r["notes"]
            assert offloaded == (ckpt == "offload") and " 0 MiB" not in r["notes"], r["notes"]
        harness.append("e2e", rows)
    csv = (tmp_path / "results" / "e2e.csv").read_text().splitlines()
    assert csv[0] == ",".join(harness.HEADER) and len(csv) == 1 + sum(len(c[4]) + 1 for c in CASES.values())
    assert "model=qwen3-8b,method=qlora,seq=16,batch=2,r=16,ckpt=1" in csv[1]
    profile = (tmp_path / "profile" / "e2e_profile.txt").read_text()
    runs = sum(len(c[4]) for c in CASES.values())
    assert profile.count("== model=") == runs and "top kernels" in profile and "by op:" in profile


def test_benchmark_selection():
    """pytest -k picks a case and a checkpointing mode: one parameter per (case, policy)."""
    ids = [p.id for p in _PARAMS]
    want = ["qwen3-8b-full", "qwen3-8b-none", "qwen3-8b-offload", "gemma3-12b-full", "gemma3-12b-offload"]
    assert ids[:5] == want
    assert len(ids) == sum(len(c[4]) for c in CASES.values()) == len(set(ids))
