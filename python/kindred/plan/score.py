"""Plan a set of candidate models on one GPU: estimates, weighted comparison and the decision checklist.

Criteria (each scored 0-1, then averaged with the user's weights; a criterion without data is left out):
- context: log2 scale from 4K (0) to 128K tokens (1);
- capability: the user's rubric pass rate when given, else a proxy: log10 of total parameters from 100M (0)
  to 30B (1);
- quantization: mean of "GGUF Q4_K_M without K-quant fallback" (1, 0.5 with fallback) and AWQ (official 1,
  community 0.5, none or refused by the architecture 0);
- speed: predicted batch-1 decode tokens/s relative to the fastest candidate;
- community: share of [TRL ships a training template, official GGUF release, official AWQ release].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import KindredValueError
from .catalogue import ModelSpec
from .gpus import GIB, GPU
from .memory import inference_memory
from .support import LICENSES, format_refusal, gguf_fallbacks, kindred_support, license_ok, practical_context
from .timing import decode_tokens_per_s, load_calibration, train_tokens_per_s, training_seconds
from .training import get_policy, trainer_memory, training_host_memory

CRITERIA = ("context", "capability", "quantization", "speed", "community")


@dataclass
class PlanSettings:
    method: str = "qlora"
    seq: int = 2048
    batch: int = 1
    rank: int = 16
    policy: str = "full"
    fused_loss: bool = True
    optimizer: str = "adamw"  # the trainer's train.optimizer
    infer_format: str = "Q4_K_M"
    infer_context: int | None = None  # defaults to seq
    epochs: float = 1.0
    tokens_p95: int | None = None
    dataset_tokens: int | None = None
    trained_share: float = 1.0  # tokens with a label (the token report's trainable share)
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CRITERIA, 1.0))
    pass_rates: dict[str, float] = field(default_factory=dict)
    license: str = "any"
    calibration: dict | None = None  # None: the packaged calibration.json
    prices: dict = field(default_factory=dict)  # gpu id -> money.Price

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
        get_policy(self.policy)
        if self.license not in LICENSES:
            raise KindredValueError(f"unknown license filter {self.license!r}; known: {', '.join(LICENSES)}")


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, x))


def criterion_scores(
    spec: ModelSpec, decode_tps: float | None, best_tps: float | None, pass_rate: float | None
) -> dict[str, float | None]:
    """Scores 0-1 of one model (see the module docstring for each scale)."""
    gguf = spec.formats.get("gguf", [])
    gguf_ok = (0.5 if gguf_fallbacks(spec, "Q4_K_M") else 1.0) if "Q4_K_M" in gguf else 0.0
    awq_refused = format_refusal(spec, "AWQ-INT4") is not None
    awq = 0.0 if awq_refused else {"official": 1.0, "community": 0.5}.get(spec.formats.get("awq"), 0.0)
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


def checklist(spec: ModelSpec, s: PlanSettings, gpu: GPU, train_bytes: int | None, support=None) -> dict:
    """The decision checklist, evaluated where the inputs allow."""
    p95 = s.tokens_p95
    example = p95 or s.seq
    half = practical_context(spec)
    quant = [f for f in ("Q4_K_M",) if f in spec.formats.get("gguf", [])]
    quant += (
        ["AWQ"]
        if spec.formats.get("awq") in ("official", "community") and not format_refusal(spec, "AWQ-INT4")
        else []
    )
    trains, why = support or kindred_support(spec, s.method, gpu)
    return {
        "sequence fits context": _check(s.seq <= spec.context, f"seq {s.seq} vs context {spec.context}"),
        "example within the practical context": _check(
            example <= half,
            f"{'p95' if p95 else 'seq'} {example} vs ~half the window ({half}): long examples train poorly",
        ),
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
        "kindred trains it": _check(trains == "trainable", why),
        "token budget defined": _check(
            s.dataset_tokens is not None and s.seq <= 16384,
            (f"{s.dataset_tokens} tokens" if s.dataset_tokens else "no dataset token count")
            + f", seq {s.seq} (≤ 16K per example recommended)",
        ),
        "base model evaluated on your rubric": rubric_check(s.pass_rates.get(spec.id)),
    }


def _anchor_times(spec, gpu, s: PlanSettings, cal: dict) -> dict:
    """What other trainers would take, for the models they were measured on (their own calibration)."""
    out = {}
    for trainer, fit in cal.get("trainers", {}).items():
        if trainer == "kindred" or spec.id not in fit["models"]:
            continue
        tps = train_tokens_per_s(
            spec, gpu, s.method, s.seq, s.batch, s.rank, "full", trainer=trainer, calibration=cal
        )
        if tps is None:  # a GPU without a bf16 rate
            continue
        hours = training_seconds(s.dataset_tokens, s.epochs, tps) / 3600 if tps and s.dataset_tokens else None
        out[trainer] = {"tokens_per_s": tps, "hours": hours, "rows": fit["rows"]}
    return out


def plan(specs: list[ModelSpec], gpu: GPU, settings: PlanSettings, spec_lookup=None) -> list[dict]:
    """One record per model (those the license filter keeps): memory, fit, speed, time, money, scores,
    checklist; sorted by fit, then weighted score."""
    s = settings
    cal = s.calibration or load_calibration()
    measured = cal.get("memory", {}).get("kindred")
    price = s.prices.get(gpu.id)
    context = s.infer_context or s.seq
    rows = []
    for spec in (sp for sp in specs if license_ok(sp, s.license)):
        support = kindred_support(spec, s.method, gpu)
        row = {
            "model": spec.id,
            "name": spec.name,
            "params_b": spec.param_counts()["total"] / 1e9,
            "active_b": spec.param_counts()["active"] / 1e9,
            "context": spec.context,
            "license": spec.license.get("name", ""),
            "commercial": spec.license.get("commercial_use"),
            "kindred": support[0],
            "kindred_why": support[1],
            "template": spec.chat_template,
            "error": None,
        }
        train = infer = None
        try:
            train = trainer_memory(
                spec,
                s.method,
                s.seq,
                s.batch,
                s.rank,
                s.policy,
                fused_loss=s.fused_loss,
                measured=measured,
                optimizer=s.optimizer,
            )
        except KindredValueError as e:
            row["error"] = str(e)
        refused = format_refusal(spec, s.infer_format)
        try:
            infer = None if refused else inference_memory(spec, s.infer_format, min(context, spec.context))
        except KindredValueError as e:
            row["error"] = row["error"] or str(e)
        row["format_refused"] = refused
        row["train_gib"] = train.total_gib if train else None
        row["fits_train"] = bool(train and train.total <= gpu.memory_bytes)
        row["infer_gib"] = infer.total_gib if infer else None
        row["fits_infer"] = bool(infer and infer.total <= gpu.memory_bytes)
        tps = None
        if train and support[0] == "trainable":
            tps = train_tokens_per_s(
                spec,
                gpu,
                s.method,
                s.seq,
                s.batch,
                s.rank,
                s.policy,
                calibration=cal,
                trained_share=s.trained_share,
            )
        row["train_tok_s"] = tps
        hours = training_seconds(s.dataset_tokens, s.epochs, tps) / 3600 if tps and s.dataset_tokens else None
        row["train_hours"] = hours
        row["train_usd"] = hours * price.usd_per_hour if hours is not None and price else None
        row["serve_usd_per_hour"] = price.usd_per_hour if price else None
        row["anchors"] = _anchor_times(spec, gpu, s, cal) if train else {}
        row["decode_tok_s"] = (
            None
            if refused
            else decode_tokens_per_s(spec, gpu, s.infer_format, min(context, spec.context), cal)
        )
        row["checklist"] = checklist(spec, s, gpu, train.total if train else None, support)
        host = training_host_memory(
            spec, s.method, s.seq, s.batch, s.rank, s.policy, dataset_tokens=s.dataset_tokens
        )
        row["breakdown"] = {
            "training": train.to_dict() if train else None,
            "inference": infer.to_dict() if infer else None,
            "host": host.to_dict(),
        }
        rows.append(row)
    best = max((r["decode_tok_s"] for r in rows if r["decode_tok_s"]), default=None)
    kept = [sp for sp in specs if license_ok(sp, s.license)]
    for row, spec in zip(rows, kept, strict=True):
        row["scores"] = criterion_scores(spec, row["decode_tok_s"], best, s.pass_rates.get(spec.id))
        row["capability_source"] = "rubric pass rate" if spec.id in s.pass_rates else "proxy: parameter count"
        row["score"] = weighted_score(row["scores"], s.weights)
    return sorted(rows, key=lambda r: (r["fits_train"], r["score"]), reverse=True)
