"""Running a battery: render every prompt with the model's template, check it all fits, generate (base and
adapters on one loaded base), score, and collect :class:`~kindred.eval.results.EvalResults`.

Every check that can fail before generation does: the battery's own validation (unknown check, regex,
schema), a prompt plus ``max_new_tokens`` longer than the model's context, rubric checks without a judge,
a judge that cannot be loaded. Each names the battery file, line and field.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import KindredValueError
from .battery import Battery, Test, load_battery
from .judge import Judge, load_judge
from .loops import LoopConfig, LoopDetector
from .models import ModelPlan, resolve
from .results import EvalResults, ModelRun, TestInfo
from .scoring import Sample, finalize, make_sample, score_groups


@dataclass
class Variant:
    """One model to evaluate on the loaded base: ``adapter`` None (as it is), False (every LoRA off) or
    the name of the adapter to switch on."""

    name: str
    role: str
    adapter: str | bool | None


def _sampling(test: Test, max_new_tokens: int | None):
    from ..generate import SamplingConfig

    s = dict(test.sampling)
    if max_new_tokens is not None:
        s["max_new_tokens"] = max_new_tokens
    return SamplingConfig(**s)


def prepare_prompts(
    battery: Battery, plan: ModelPlan, max_new_tokens: int | None
) -> list[tuple[str, list[int]]]:
    """(rendered text, token ids) per test; a prompt that does not fit the context with its
    ``max_new_tokens`` is an error naming the test's file, line and field."""
    out = []
    for t in battery.tests:
        text = plan.render(t.messages)
        ids = plan.tokenizer.encode(text)
        budget = max_new_tokens or t.sampling["max_new_tokens"]
        if len(ids) + budget > plan.context:
            raise KindredValueError(
                f"{t.where(t.prompt_key)}: the prompt is {len(ids)} tokens with the {plan.template.name} "
                "template; "
                f"with max_new_tokens {budget} that is over the model's context of {plan.context} tokens"
            )
        out.append((text, ids))
    return out


def check_judge_needed(battery: Battery, judge) -> None:
    if judge is None and battery.rubric_checks():
        _, c = battery.rubric_checks()[0]
        raise KindredValueError(
            f"{battery.path}:{c.line}: {c.field}: a rubric check needs a judge model: set 'judge:' in the "
            "battery or pass --judge (kindred eval) / judge= (kindred.eval.evaluate)"
        )


def run_variants(
    battery: Battery,
    model,
    plan: ModelPlan,
    variants: list[Variant],
    prompts: list[tuple[str, list[int]]],
    *,
    judge: Judge | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    loop_stop: bool = True,
    loop_config: LoopConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Sample], dict[str, float]]:
    """Generate and score every test for each variant on one loaded model. On the CPU the base (every LoRA
    off) and the first adapter run together, one batch holding both rows of each test
    (:func:`pair_variants`), both timed by that shared run."""
    from ..generate import generate
    from ..nn import lora_modules, set_adapter

    detector = LoopDetector(loop_config, decode=plan.tokenizer.decode)
    stops = plan.stop_ids()
    has_lora = bool(lora_modules(model))
    on_cpu = model.model.embed_tokens.weight.device.type == "cpu"
    batches: dict[tuple, list[int]] = {}
    for i, t in enumerate(battery.tests):  # one generate call per distinct sampling setting
        batches.setdefault((_sampling(t, max_new_tokens), tuple(t.stop)), []).append(i)
    samples: list[Sample] = []
    seconds: dict[str, float] = {}
    for group in pair_variants(variants, has_lora and on_cpu):
        for v in group:
            if isinstance(v.adapter, str):
                set_adapter(model, v.adapter)
        switches = [None if v.adapter is None or not has_lora else v.adapter is not False for v in group]
        start = time.perf_counter()
        done: dict[tuple[int, int], object] = {}
        for (cfg, stop), idx in batches.items():
            jobs = [(g, i) for g in range(len(group)) for i in idx]
            outs = generate(
                model,
                [prompts[i][1] for _, i in jobs],
                cfg,
                stop_token_ids=stops,
                stop_strings=stop,
                tokenizer=plan.tokenizer,
                loop_detector=detector if loop_stop else None,
                adapter=switches[0] if len(group) == 1 else [switches[g] for g, _ in jobs],
                batch_size=batch_size,
            )
            done.update(zip(jobs, outs, strict=True))
        took = time.perf_counter() - start
        for g, v in enumerate(group):
            seconds[v.name] = took
            least = battery.substantive_min_chars
            mine = {
                t.id: make_sample(t, v.name, prompts[i][0], done[g, i], detector, least)
                for i, t in enumerate(battery.tests)
            }
            score_groups(battery, mine)
            samples += mine.values()
            if progress:
                others = ", ".join(w.name for w in group if w is not v)
                together = f" (together with {others})" if others else ""
                progress(f"{v.name}: {len(mine)} tests in {took:.1f} s{together}")
    if judge is not None:
        score_rubrics(battery, samples, judge)
    tests = {t.id: t for t in battery.tests}
    for s in samples:
        finalize(s, tests[s.test_id])
    return samples, seconds


def pair_variants(variants: list[Variant], together: bool) -> list[list[Variant]]:
    """The generate calls, in order. ``together`` (a model with LoRA layers on the CPU): the first base
    variant (adapter False) and the first adapter variant share one, each row with its LoRA off or on, so
    each step reads the base weights once for both; every other variant runs alone. On CUDA each variant
    runs alone: a mixed batch steps eagerly, without the engine's CUDA graphs."""
    base = next((v for v in variants if v.adapter is False), None)
    tuned = next((v for v in variants if isinstance(v.adapter, str)), None)
    if not together or base is None or tuned is None:
        return [[v] for v in variants]
    return [[base, tuned]] + [[v] for v in variants if v is not base and v is not tuned]


def score_rubrics(battery: Battery, samples: list[Sample], judge: Judge) -> None:
    """Fill the rubric checks: one batch of judge calls for every (sample, rubric check)."""
    from .checks import CheckResult

    tests = {t.id: t for t in battery.tests}
    jobs = []
    for s in samples:
        t = tests[s.test_id]
        for i, c in enumerate(t.checks):
            if c.kind == "rubric":
                jobs.append((s, i, c))
    verdicts = judge.rate([(tests[s.test_id].messages, s.output, c.value) for s, i, c in jobs])
    for (s, i, c), v in zip(jobs, verdicts, strict=True):
        need = c.options["min_rating"]
        if v.value is None:
            s.checks[i] = CheckResult(
                "rubric", None, None, c.weight, f"ungraded: no rating in {len(v.replies)} replies"
            )
        else:
            ok = v.value >= need
            s.checks[i] = CheckResult(
                "rubric", ok, v.value / 10, c.weight, f"rated {v.value}/10 (needs {need})"
            )


def _results(battery: Battery, plan: ModelPlan, variants, samples, seconds, settings, plan_id) -> EvalResults:
    folders = {slot: plan.adapters[name] for name, slot in plan.adapter_slots().items()}
    runs = [
        ModelRun(
            name=v.name,
            role=v.role,
            base=str(plan.source),
            adapter=str(folders[v.adapter]) if isinstance(v.adapter, str) and v.adapter in folders else None,
            info=plan.describe(),
            seconds=seconds[v.name],
            plan_id=plan_id,
        )
        for v in variants
    ]
    return EvalResults(battery.to_dict(), [TestInfo.of(t) for t in battery.tests], runs, samples, settings)


def evaluate(
    battery: Battery | str | Path,
    model: str | Path,
    adapters: dict[str, str | Path] | None = None,
    *,
    include_base: bool = True,
    base_name: str = "base",
    quant: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    template: str | None = None,
    tokenizer: str | Path | None = None,
    judge: str | Judge | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    loop_stop: bool = True,
    loop_config: LoopConfig | None = None,
    plan_id: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalResults:
    """Evaluate a base model (``include_base``) and each adapter on it (``adapters``: name -> PEFT folder;
    a ``model`` that is itself an adapter folder adds it as "tuned"), on one loaded base.

    ``judge``: a model path (or a :class:`Judge`) for rubric checks, else the battery's ``judge:``.
    ``max_new_tokens`` overrides every test's. ``loop_stop`` stops a row as soon as it loops.
    """
    battery = battery if isinstance(battery, Battery) else load_battery(battery)
    plan = resolve(
        model, adapters, quant=quant, dtype=dtype, device=device, template=template, tokenizer=tokenizer
    )
    prompts = prepare_prompts(battery, plan, max_new_tokens)
    if judge is None and battery.judge:
        judge, where = battery.judge, battery.judge_where
    else:
        where = "--judge"
    check_judge_needed(battery, judge)
    if isinstance(judge, (str, Path)):
        judge = load_judge(str(judge), where=where, device=device)
    variants = ([Variant(base_name, "base", False if plan.adapters else None)] if include_base else []) + [
        Variant(name, "tuned", slot) for name, slot in plan.adapter_slots().items()
    ]
    if not variants:
        raise KindredValueError("nothing to evaluate: include_base is off and there is no adapter")
    if len(variants) == 1 and variants[0].adapter is None:
        variants = [replace(variants[0], role="model")]
    loaded = plan.load()
    samples, seconds = run_variants(
        battery,
        loaded,
        plan,
        variants,
        prompts,
        judge=judge,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        loop_stop=loop_stop,
        loop_config=loop_config,
        progress=progress,
    )
    settings = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "loop_stop": loop_stop,
        "judge": getattr(judge, "name", None),
    }
    return _results(battery, plan, variants, samples, seconds, settings, plan_id)


def evaluate_loaded(
    battery: Battery | str | Path,
    model,
    tokenizer,
    template: str,
    variants: list[Variant],
    *,
    source: str = "model",
    judge: Judge | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    loop_stop: bool = True,
    progress: Callable[[str], None] | None = None,
) -> EvalResults:
    """The same on a model already in memory (a trainer's), e.g. ``[Variant("base", "base", False),
    Variant("tuned", "tuned", "default")]`` for before/after a fine-tune."""
    import torch

    from ..data import get_template

    battery = battery if isinstance(battery, Battery) else load_battery(battery)
    weight = model.model.embed_tokens.weight
    plan = ModelPlan(
        Path(source),
        Path(source).name,
        model.config,
        tokenizer,
        get_template(template),
        "given",
        "as loaded",
        weight.dtype,
        weight.device if weight.device.type != "meta" else torch.device("cpu"),
    )
    prompts = prepare_prompts(battery, plan, max_new_tokens)
    check_judge_needed(battery, judge)
    samples, seconds = run_variants(
        battery,
        model,
        plan,
        variants,
        prompts,
        judge=judge,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        loop_stop=loop_stop,
        progress=progress,
    )
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "loop_stop": loop_stop}
    return _results(battery, plan, variants, samples, seconds, settings, None)
