"""Everything the bake-off can check before a model loads: each candidate's files, tokenizer and template
(no weights read), the data read and tokenized with each candidate's template, the battery against each
model's context, the training settings, the judge. Each problem names the config key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import KindredError, KindredValueError
from .config import BakeoffConfig, Candidate


@dataclass
class Resolved:
    """A candidate with its files found and its data tokenized (no weights loaded)."""

    cand: Candidate
    source: Path  # the weights: an HF folder or a .gguf file
    catalogue_id: str | None
    template: str  # a kindred template name or a path (the model's own Jinja template)
    template_how: str
    tokenizer: str | None
    model_plan: object  # kindred.eval.models.ModelPlan
    hf_config: dict
    tokens: dict = field(default_factory=dict)  # the data's token statistics with this template

    @property
    def name(self) -> str:
        return self.cand.name


def _own_template(source: Path) -> str | None:
    """The model's own chat template, when it ships one (a path get_template loads), else None."""
    if source.is_file():
        from ..models import gguf_chat_template

        return str(source) if gguf_chat_template(source) else None
    if (source / "chat_template.jinja").is_file():
        return str(source)
    config = source / "tokenizer_config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("chat_template"):
                return str(source)
        except (OSError, ValueError):
            return None
    return None


def spec_of(r: Resolved, out: Path):
    """The plan's ModelSpec of a candidate: the catalogue's, or one read from its config (a GGUF's
    converted config is written to ``out/<candidate>/config.json``)."""
    from ..plan import get_model, spec_from_config
    from .state import write_json

    if r.catalogue_id:
        return get_model(r.catalogue_id)
    config_path = r.source / "config.json" if r.source.is_dir() else out / r.name / "config.json"
    if not r.source.is_dir() and not config_path.is_file():
        write_json(config_path, r.hf_config)
    return spec_from_config(config_path, model_id=r.name)


def hf_config_of(source: Path) -> dict:
    if source.is_file():
        from ..formats.gguf import gguf_metadata, gguf_to_hf_config, read_gguf

        reader = read_gguf(source)
        return gguf_to_hf_config(gguf_metadata(reader), {t.name for t in reader.tensors}, str(source))
    return json.loads((source / "config.json").read_text(encoding="utf-8"))


def resolve_candidate(cfg: BakeoffConfig, i: int, device: str) -> Resolved:
    from ..eval.models import resolve
    from ..plan import get_model

    c = cfg.candidates[i]
    key = f"{cfg.where}: candidates[{i}] ({c.name})"
    catalogue_id = None
    model = Path(c.model)
    if c.path:
        try:
            catalogue_id = get_model(c.model).id
        except KindredError as e:
            raise KindredValueError(f"{key}: model: {e}") from None
        model = Path(c.path)
        if not model.exists():
            raise KindredValueError(f"{key}: path: {c.path!r} does not exist (the weights of {c.model})")
    elif not model.exists():
        hint = ""
        try:
            get_model(c.model)
            hint = f"; {c.model!r} is a catalogue model: give its local weights as path:"
        except KindredError:
            pass
        raise KindredValueError(f"{key}: model: {c.model!r} is neither a model folder nor a .gguf file{hint}")
    if model.is_dir() and not (model / "config.json").is_file():
        raise KindredValueError(f"{key}: model: {model} has no config.json")
    template, how = c.template, "given"
    if not template:
        own = _own_template(model)
        template, how = (own, "the model's own chat template") if own else ("", "")
    try:
        plan = resolve(
            model,
            quant=cfg.quant,
            dtype=cfg.dtype,
            device=device,
            template=template or None,
            tokenizer=c.tokenizer or None,
            what=f"{key}: model",
        )
    except KindredError as e:
        if key in str(e):
            raise
        raise type(e)(f"{key}: {e}") from None
    if not template:
        template, how = plan.template.name, plan.template_source
    return Resolved(c, model, catalogue_id, template, how, c.tokenizer or None, plan, hf_config_of(model))


def token_stats(r: Resolved, chat, data_cfg: dict) -> dict:
    """The data tokenized with this candidate's tokenizer and template: lengths, the budget's effect."""
    from ..data import prepare

    budget = int(data_cfg.get("budget", 4096))
    prep = prepare(
        chat, r.model_plan.tokenizer, r.model_plan.template, budget, policy=data_cfg.get("policy", "truncate")
    )
    lengths = prep.tokenized.tokens
    trained = int(prep.tokenized.trainable.sum())
    return {
        "conversations": len(lengths),
        "total_tokens": int(lengths.sum()),
        "trainable_share": trained / max(1, int(lengths.sum())),
        "p95_tokens": int(np.percentile(lengths, 95)) if len(lengths) else 0,
        "max_tokens": int(lengths.max()) if len(lengths) else 0,
        "budget": budget,
        "over_budget": prep.budgeted.over if prep.budgeted else 0,
        "truncated": prep.budgeted.truncated if prep.budgeted else 0,
        "kept": len(prep.final),
    }


def train_config(cfg: BakeoffConfig, r: Resolved, device: str) -> dict:
    """The kindred.train config of one candidate: the shared data, LoRA and train settings."""
    data = {**cfg.data, "template": r.template}
    if r.tokenizer:
        data["tokenizer"] = r.tokenizer
    return {
        "model": str(r.source),
        "quant": cfg.quant,
        "dtype": "auto" if cfg.dtype == "auto" else cfg.dtype,
        "device": device,
        "lora": dict(cfg.lora),
        "data": data,
        "train": dict(cfg.train),
        "output": {"dir": str(cfg.out_dir / r.name / "run"), "progress": False, "save_every": 0},
    }


def check_train_config(cfg: BakeoffConfig, r: Resolved, device: str) -> dict:
    from ..train import load_config

    tc = train_config(cfg, r, device)
    if tc["dtype"] == "auto":
        tc["dtype"] = "bf16" if r.model_plan.device.type == "cuda" else "fp32"
    try:
        load_config(tc)
    except KindredValueError as e:
        raise KindredValueError(f"{cfg.where}: {str(e).removeprefix('config: ')}") from None
    return tc


def check_battery(cfg: BakeoffConfig, resolved: list[Resolved]):
    from ..eval import load_battery
    from ..eval.run import prepare_prompts

    try:
        battery = load_battery(cfg.battery)
    except KindredError as e:
        raise KindredValueError(f"{cfg.where}: battery: {e}") from None
    for r in resolved:
        try:
            prepare_prompts(battery, r.model_plan, cfg.eval.get("max_new_tokens"))
        except KindredError as e:
            raise KindredValueError(f"{cfg.where}: candidates ({r.name}): {e}") from None
    if battery.rubric_checks() and not battery.judge:
        raise KindredValueError(
            f"{cfg.where}: battery {cfg.battery}: rubric checks need the battery's judge:"
        )
    return battery


def check_judge(cfg: BakeoffConfig) -> None:
    if cfg.compare.judge and not Path(cfg.compare.judge).exists() and cfg.compare.judge != "smollm2":
        raise KindredValueError(
            f"{cfg.where}: compare.judge: {cfg.compare.judge!r} is not a model folder or file"
        )
