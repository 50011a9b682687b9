"""Plan a set of candidate models on one GPU: estimates, weighted comparison and the decision checklist.

Criteria (each scored 0-1, then averaged with the user's weights; a criterion without data is left out):
- context: log2 scale from 4K (0) to 128K tokens (1);
- capability: the user's rubric pass rate when given, else a proxy: log10 of total parameters from 100M (0)
  to 30B (1);
- quantization: mean of "GGUF Q4_K_M without K-quant fallback" (1, 0.5 with fallback) and AWQ (official 1,
  community 0.5, none 0);
- speed: predicted batch-1 decode tokens/s relative to the fastest candidate;
- community: share of [TRL ships a training template, official GGUF release, official AWQ release].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import KindredValueError
from .catalogue import ModelSpec
from .gpus import GIB, GPU
from .memory import inference_memory, training_memory
from .timing import decode_tokens_per_s, train_tokens_per_s, training_efficiency, training_seconds

CRITERIA = ("context", "capability", "quantization", "speed", "community")


@dataclass
class PlanSettings:
    method: str = "qlora"
    seq: int = 2048
    batch: int = 1
    rank: int = 16
    grad_checkpointing: bool = True
    fused_loss: bool = True
    infer_format: str = "Q4_K_M"
    infer_context: int | None = None  # defaults to seq
    epochs: float = 1.0
    tokens_p95: int | None = None
    dataset_tokens: int | None = None
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CRITERIA, 1.0))
    pass_rates: dict[str, float] = field(default_factory=dict)
    results_dir: str | None = "benchmarks/results"

    def __post_init__(self):
        unknown = set(self.weights) - set(CRITERIA)
        if unknown:
            raise KindredValueError(f"unknown criteria {sorted(unknown)}; known: {', '.join(CRITERIA)}")
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise KindredValueError(f"criterion weights must be >= 0 and not all 0, got {self.weights}")
        for name, rate in self.pass_rates.items():
            if not 0 <= rate <= 1:
                raise KindredValueError(f"pass rate of {name!r} must be within 0..1, got {rate}")
        for name in ("seq", "batch", "rank", "epochs"):
            if not getattr(self, name) > 0:
                raise KindredValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("tokens_p95", "dataset_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise KindredValueError(f"{name} must be positive, got {value}")


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, x))


def criterion_scores(
    spec: ModelSpec, decode_tps: float | None, best_tps: float | None, pass_rate: float | None
) -> dict[str, float | None]:
    """Scores 0-1 of one model (see the module docstring for each scale)."""
    gguf = spec.formats.get("gguf", [])
    gguf_ok = (1.0 if spec.hidden % 256 == 0 else 0.5) if "Q4_K_M" in gguf else 0.0
    awq = {"official": 1.0, "community": 0.5}.get(spec.formats.get("awq"), 0.0)
    eco = spec.ecosystem
    community = (
        bool(eco.get("trl_training_template"))
        + bool(eco.get("official_gguf"))
        + (spec.formats.get("awq") == "official")
    ) / 3
    capability = (
        pass_rate
        if pass_rate is not None
        else _clamp((math.log10(spec.param_counts()["total"]) - 8) / (math.log10(3e10) - 8))
    )
    return {
        "context": _clamp(math.log2(spec.context / 4096) / 5),
        "capability": capability,
        "quantization": (gguf_ok + awq) / 2,
        "speed": decode_tps / best_tps if decode_tps and best_tps else None,
        "community": community,
    }


def weighted_score(scores: dict[str, float | None], weights: dict[str, float]) -> float:
    used = {k: w for k, w in weights.items() if scores.get(k) is not None and w > 0}
    if not used:
        return 0.0
    return sum(scores[k] * w for k, w in used.items()) / sum(used.values())


def _check(ok: bool | None, detail: str) -> dict:
    return {"status": "unknown" if ok is None else ("pass" if ok else "fail"), "detail": detail}


def rubric_check(rate: float | None) -> dict:
    """The checklist item "base model evaluated on your rubric", with what its pass rate suggests."""
    if rate is None:
        return _check(
            None, "not evaluated: kindred eval BATTERY --model BASE, then kindred plan --eval results.json"
        )
    if rate > 0.7:
        advice = "above 70 %: fine-tuning may not be needed"
    elif rate < 0.5:
        advice = "below 50 %: fine-tuning should help significantly"
    else:
        advice = "between 50 % and 70 %: fine-tuning should help; compare the tuned model on the same battery"
    return _check(True, f"{100 * rate:.0f} % passed, {advice}")


def checklist(spec: ModelSpec, s: PlanSettings, gpu: GPU, train_bytes: int | None) -> dict[str, dict]:
    """The decision checklist, evaluated where the inputs allow."""
    p95 = s.tokens_p95
    quant = [f for f in ("Q4_K_M",) if f in spec.formats.get("gguf", [])] + (
        ["AWQ"] if spec.formats.get("awq") in ("official", "community") else []
    )
    return {
        "sequence fits context": _check(s.seq <= spec.context, f"seq {s.seq} vs context {spec.context}"),
        "context fits data p95": _check(
            None if p95 is None else p95 <= min(s.seq, spec.context),
            "no token report" if p95 is None else f"p95 {p95} vs seq {s.seq}",
        ),
        "quantized format available": _check(bool(quant), ", ".join(quant) or "no Q4_K_M GGUF or AWQ"),
        "training fits GPU incl. logits": _check(
            None if train_bytes is None else train_bytes <= gpu.memory_bytes,
            "not estimated"
            if train_bytes is None
            else f"{train_bytes / GIB:.1f} of {gpu.memory_gb:g} GiB"
            + ("" if s.fused_loss else " (unfused loss: full logits counted)"),
        ),
        "token budget defined": _check(
            s.dataset_tokens is not None,
            f"{s.dataset_tokens} tokens" if s.dataset_tokens else "no dataset token count",
        ),
        "base model evaluated on your rubric": rubric_check(s.pass_rates.get(spec.id)),
    }


def plan(specs: list[ModelSpec], gpu: GPU, settings: PlanSettings, spec_lookup) -> list[dict]:
    """One record per model: memory, fit, speed, time, scores, checklist; sorted by weighted score."""
    s = settings
    efficiency, eff_source = training_efficiency(s.method, spec_lookup, s.results_dir)
    context = s.infer_context or s.seq
    rows = []
    for spec in specs:
        row = {
            "model": spec.id,
            "name": spec.name,
            "params_b": spec.param_counts()["total"] / 1e9,
            "active_b": spec.param_counts()["active"] / 1e9,
            "context": spec.context,
            "license": spec.license.get("name", ""),
            "commercial": spec.license.get("commercial_use"),
            "template": spec.chat_template,
            "error": None,
        }
        train = infer = None
        try:
            train = training_memory(
                spec, s.method, s.seq, s.batch, s.rank, s.grad_checkpointing, s.fused_loss
            )
        except KindredValueError as e:
            row["error"] = str(e)
        try:
            infer = inference_memory(spec, s.infer_format, min(context, spec.context))
        except KindredValueError as e:
            row["error"] = row["error"] or str(e)
        row["train_gib"] = train.total_gib if train else None
        row["fits_train"] = bool(train and train.total <= gpu.memory_bytes)
        row["infer_gib"] = infer.total_gib if infer else None
        row["fits_infer"] = bool(infer and infer.total <= gpu.memory_bytes)
        tps = (
            train_tokens_per_s(spec, gpu, efficiency, s.method, s.seq, s.rank, s.grad_checkpointing)
            if train
            else None
        )
        row["train_tok_s"] = tps
        row["train_hours"] = (
            training_seconds(s.dataset_tokens, s.epochs, tps) / 3600 if tps and s.dataset_tokens else None
        )
        row["decode_tok_s"] = decode_tokens_per_s(spec, gpu, s.infer_format, min(context, spec.context))
        row["checklist"] = checklist(spec, s, gpu, train.total if train else None)
        row["breakdown"] = {
            "training": train.to_dict() if train else None,
            "inference": infer.to_dict() if infer else None,
        }
        rows.append(row)
    best = max((r["decode_tok_s"] for r in rows if r["decode_tok_s"]), default=None)
    for row, spec in zip(rows, specs, strict=True):
        row["scores"] = criterion_scores(spec, row["decode_tok_s"], best, s.pass_rates.get(spec.id))
        row["capability_source"] = "rubric pass rate" if spec.id in s.pass_rates else "proxy: parameter count"
        row["score"] = weighted_score(row["scores"], s.weights)
        row["efficiency"] = efficiency
        row["efficiency_source"] = eff_source
    return sorted(rows, key=lambda r: (r["fits_train"], r["score"]), reverse=True)
