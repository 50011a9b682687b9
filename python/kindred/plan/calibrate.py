"""Calibration of the time and memory models from benchmark results (benchmarks/results/*.csv).

``calibrate(results_dir)`` reads the end-to-end training rows (op=train_step) and the
decode rows, and returns what ``calibration.json`` holds:

- "trainers": per trainer (the CSV's impl: kindred, unsloth, transformers+peft+bitsandbytes, ...), the
  coefficients of the time model (timing.py) fitted on that trainer's own rows only, the rows used and
  their fit errors. Of repeated measurements of one configuration the newest row counts (kindred gets
  faster from commit to commit). Multi-GPU rows (kindred-ddp, kindred-fsdp) are left out.
- "memory": per trainer, from rows that recorded them (the planning benchmark's notes): torch's own
  allocations (runtime_mib), the caching allocator's reserve over the allocated peak (reserved_mib) and
  device memory beyond that reserve (device_mib): the largest ratio and context seen.
- "decode": fraction of the datasheet bandwidth reached by a batch-1 decode: kindred's generation benchmark
  (generate.csv) when it has rows, else one bf16 and one 4-bit GEMV of the 4-bit decode benchmark
  (quant.csv, M=1, 4096 → 14336, CUDA-graph replay).

Shape cells: ``model=<catalogue id>,method=qlora|lora,seq=N,batch=B|micro=B,r=R`` plus
``policy=full|offload|none`` or ``ckpt=1|0|full|offload|none``; ``quant=none`` means LoRA over a 16-bit base.
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
from itertools import product
from pathlib import Path

import numpy as np

from ..errors import KindredValueError
from .catalogue import default_catalogue
from .gpus import get_gpu
from .timing import FEATURES, decode_bytes_per_token, seconds_per_token, step_features
from .training import POLICIES

LOWER = {"gemm": 1.0, "attn": 1.0, "traffic": 0.0}  # no kind of work runs faster than the datasheet peak
MULTI_GPU = ("kindred-ddp", "kindred-fsdp")
_MiB = 1 << 20


def _fields(text: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in text.replace(";", ",").split(",") if "=" in p)


def _notes(text: str) -> dict[str, float]:
    """key=number pairs of a notes cell ("...; reserved_mib=11234; device_mib=12001")."""
    out = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            with contextlib.suppress(ValueError):
                out[key.strip()] = float(value)
    return out


def _policy(fields: dict[str, str]) -> str:
    value = fields.get("policy") or {"1": "full", "0": "none"}.get(
        fields.get("ckpt", "1"), fields.get("ckpt")
    )
    return value if value in POLICIES else "full"


def _read(path: Path):
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def load_train_rows(results_dir: str | Path, spec_lookup=None) -> list[dict]:
    """Measured training steps with their parsed configuration: per trainer and configuration the newest
    day's rows, repeated measurements of that day merged (median tokens/s and peak)."""
    lookup = spec_lookup or default_catalogue().get
    groups: dict[tuple, list[dict]] = {}
    for path in sorted(Path(results_dir).glob("*.csv")):
        for row in _read(path):
            if row.get("op") != "train_step" or row.get("impl") in MULTI_GPU:
                continue
            f = _fields(row.get("shape", ""))
            try:
                spec = lookup(f["model"])
                gpu = get_gpu(row["gpu"])
                method = "lora" if f.get("quant") == "none" else f.get("method", "qlora")
                method = "lora" if method == "lora-bf16" else method
                run = {
                    "impl": row["impl"],
                    "model": spec.id,
                    "method": method,
                    "seq": int(f["seq"]),
                    "batch": int(f.get("batch", f.get("micro", 1))),
                    "rank": int(f.get("r", 16)),
                    "policy": _policy(f),
                    "trained_share": float(f.get("trained", 1.0)),
                    "gpu": gpu.id,
                    "date": row.get("date", ""),
                    "commit": row.get("commit", ""),
                    "source": path.name,
                }
            except (KeyError, ValueError, KindredValueError):
                continue
            if row.get("tokens_per_s"):
                run["tokens_per_s"] = float(row["tokens_per_s"])
            if row.get("peak_extra_mib"):
                run["peak_mib"] = float(row["peak_extra_mib"])
            run.update({k: v for k, v in _notes(row.get("notes", "")).items() if k.endswith("_mib")})
            key = tuple(run[k] for k in ("impl", "model", "method", "seq", "batch", "rank", "policy", "gpu"))
            groups.setdefault(key, []).append(run)
    out = []
    for runs in groups.values():
        day = max(r["date"] for r in runs)
        same = [r for r in runs if r["date"] == day]
        run = dict(same[-1])
        for field in ("tokens_per_s", "peak_mib"):
            values = [r[field] for r in same if field in r]
            if values:
                run[field] = statistics.median(values)
        run["repeats"] = len(same)
        out.append(run)
    return out


def _features(run: dict, lookup) -> dict[str, float]:
    spec = lookup(run["model"])
    return step_features(
        spec, run["method"], run["seq"], run["batch"], run["rank"], run["policy"], run["trained_share"]
    )


def _design(runs: list[dict], lookup) -> tuple[np.ndarray, list]:
    """Rows of the relative-error least squares: each run's work terms over its measured time."""
    gpus = {}
    z = []
    for run in runs:
        gpu = gpus.setdefault(run["gpu"], get_gpu(run["gpu"]))
        feats = _features(run, lookup)
        unit = [
            feats["gemm"] / (gpu.bf16_tflops * 1e12),
            feats["attn"] / (gpu.bf16_tflops * 1e12),
            feats["traffic"] / (gpu.bandwidth_gbs * 1e9),
        ]
        z.append(np.array(unit) * run["tokens_per_s"])  # divided by the measured seconds per token
    return np.array(z), list(gpus.values())


def _bounded_fit(z: np.ndarray, free: tuple[str, ...]) -> dict[str, float]:
    """min Σ (z·θ − 1)² with θ ≥ LOWER over the terms in ``free``; a term left out is tied to the GEMM rate
    (attention) or 0 (traffic). Every choice of terms held at their bound is tried; the best feasible wins."""
    cols = {
        "gemm": z[:, 0] + (0 if "attn" in free else z[:, 1]),
        "attn": z[:, 1],
        "traffic": z[:, 2],
    }
    best, best_res = None, float("inf")
    for at_bound in product((False, True), repeat=len(free)):
        theta = {k: LOWER[k] for k, b in zip(free, at_bound, strict=True) if b}
        solve = [k for k in free if k not in theta]
        rhs = np.ones(len(z)) - sum((theta[k] * cols[k] for k in theta), np.zeros(len(z)))
        if solve:
            sol, *_ = np.linalg.lstsq(np.stack([cols[k] for k in solve], axis=1), rhs, rcond=None)
            theta.update(zip(solve, sol.tolist(), strict=True))
        if any(theta[k] < LOWER[k] - 1e-12 for k in solve):
            continue
        coef = {"gemm": theta["gemm"]}
        coef["attn"] = theta.get("attn", theta["gemm"])
        coef["traffic"] = theta.get("traffic", 0.0)
        res = float(np.sum((z @ np.array([coef[k] for k in FEATURES]) - 1) ** 2))
        if res < best_res:
            best, best_res = coef, res
    return best


def fit_trainer(runs: list[dict], lookup=None) -> dict:
    """Time-model coefficients for one trainer's measured runs (see the module docstring)."""
    lookup = lookup or default_catalogue().get
    runs = [r for r in runs if r.get("tokens_per_s")]
    if not runs:
        raise KindredValueError("no measured training rows to calibrate on")
    z, _ = _design(runs, lookup)
    free = (
        ("gemm", "attn", "traffic")
        if len(runs) >= 6
        else ("gemm", "traffic")
        if len(runs) >= 4
        else ("gemm",)
    )
    coef = _bounded_fit(z, free)
    errors = (z @ np.array([coef[k] for k in FEATURES])) ** -1 - 1  # predicted / measured tokens/s − 1
    return {
        "coef": coef,
        "terms": list(free),
        "rows": len(runs),
        "models": sorted({r["model"] for r in runs}),
        "gpus": sorted({r["gpu"] for r in runs}),
        "commits": sorted({r["commit"] for r in runs if r["commit"]}),
        "max_abs_error": float(np.max(np.abs(errors))),
        "runs": [
            {k: r[k] for k in ("model", "method", "seq", "batch", "policy", "gpu", "tokens_per_s", "commit")}
            | {"error": float(e)}
            for r, e in zip(runs, errors, strict=True)
        ],
    }


def _memory(runs: list[dict]) -> dict | None:
    """Measured runtime allocations, allocator slack and context of one trainer (rows that recorded them)."""
    rows = [r for r in runs if r.get("peak_mib") and r.get("reserved_mib") and r.get("device_mib")]
    if not rows:
        return None
    runtime = [r["runtime_mib"] for r in rows if r.get("runtime_mib") is not None]
    return {
        "runtime_allocated_bytes": statistics.median(runtime) * _MiB if runtime else 0,
        "reserved_over_allocated": max(r["reserved_mib"] / r["peak_mib"] for r in rows),
        "context_bytes": max(r["device_mib"] - r["reserved_mib"] for r in rows) * _MiB,
        "rows": len(rows),
        "source": ", ".join(sorted({r["source"] for r in rows})),
    }


_GENERATE_FORMATS = {"nf4": "NF4", "int4g": "AWQ-INT4", "bf16": "BF16"}  # generate.csv's impl suffixes


def _decode(results_dir: Path, lookup) -> dict:
    """Batch-1 decode efficiency: kindred's generation benchmark, else two GEMVs of matmul_4bit.csv."""
    gen = results_dir / "generate.csv"
    eff: dict[str, list[float]] = {"bf16": [], "quantized": []}
    if gen.is_file():
        for row in _read(gen):  # impl kindred-<nf4|int4g|bf16>; shape model=…,batch=…,prompt=…,new=…
            f = _fields(row.get("shape", ""))
            impl, _, quant = row.get("impl", "").partition("-")
            fmt = _GENERATE_FORMATS.get(quant)
            if impl != "kindred" or fmt is None or not row.get("tokens_per_s") or int(f.get("batch", 1)) != 1:
                continue
            try:
                spec, gpu = lookup(f["model"]), get_gpu(row["gpu"])
                ctx = int(f["prompt"]) + int(f["new"]) // 2  # the KV cache at its mean filled length
                per = decode_bytes_per_token(spec, fmt, ctx)
            except (KeyError, ValueError, KindredValueError):
                continue
            kind = "bf16" if fmt == "BF16" else "quantized"
            eff[kind].append(float(row["tokens_per_s"]) * per / (gpu.bandwidth_gbs * 1e9))
        if eff["bf16"] or eff["quantized"]:
            out = {k: statistics.median(v) for k, v in eff.items() if v}
            out["source"] = f"kindred's batch-1 generation rows in {gen.name}"
            return out
    quant = results_dir / "matmul_4bit.csv"
    best: dict[str, tuple[str, float, str]] = {}
    if quant.is_file():
        for row in _read(quant):
            if row.get("op") != "matmul_4bit" or "graph" not in row.get("notes", ""):
                continue
            if _fields(row.get("shape", "")) != {"K": "4096", "N": "14336", "M": "1"} or not row.get("gbps"):
                continue
            kind = "bf16" if row["impl"] == "torch-bf16" else "quantized"
            if kind == "quantized" and not row["impl"].startswith("kindred"):
                continue
            try:
                e = float(row["gbps"]) / get_gpu(row["gpu"]).bandwidth_gbs
            except (KindredValueError, TypeError, ZeroDivisionError):
                continue
            prev = best.get(kind)
            if prev is None or row["date"] > prev[0] or (row["date"] == prev[0] and e > prev[1]):
                best[kind] = (row["date"], e, f"{row['impl']} {row['commit']}")
    if not best:
        return {}
    out = {k: v[1] for k, v in best.items()}
    out["source"] = (
        "one batch-1 GEMV (4096 → 14336, matmul_4bit.csv: "
        + "; ".join(f"{k} {v[2]}" for k, v in best.items())
        + "), an upper bound for a whole decode step"
    )
    return out


def calibrate(results_dir: str | Path, spec_lookup=None) -> dict:
    """The calibration dict for ``results_dir`` (see the module docstring)."""
    lookup = spec_lookup or default_catalogue().get
    results_dir = Path(results_dir)
    runs = load_train_rows(results_dir, lookup)
    out = {"about": __doc__.split("\n\n")[0], "trainers": {}, "memory": {}}
    for impl in sorted({r["impl"] for r in runs}):
        mine = [r for r in runs if r["impl"] == impl]
        if any(r.get("tokens_per_s") for r in mine):
            out["trainers"][impl] = fit_trainer(mine, lookup)
        mem = _memory(mine)
        if mem:
            out["memory"][impl] = mem
    out["decode"] = _decode(results_dir, lookup)
    return out


def predicted_tokens_per_s(run: dict, fit: dict, lookup=None) -> float:
    """A fitted trainer's prediction for one parsed run (for reports)."""
    lookup = lookup or default_catalogue().get
    return 1.0 / seconds_per_token(_features(run, lookup), fit["coef"], get_gpu(run["gpu"]))


def write_calibration(results_dir: str | Path, path: str | Path) -> Path:
    """Write ``calibrate(results_dir)`` as JSON to ``path`` (atomically)."""
    data = calibrate(results_dir)
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
