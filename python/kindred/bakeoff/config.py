"""The bake-off's configuration (YAML or dict), checked key by key before anything loads.

    out: bakeoff-out                  # output folder: state/, one folder per candidate, report.*
    device: auto                      # auto (CUDA when present) | cpu | cuda
    dtype: auto                       # auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp32
    quant: nf4                        # the base during training and evaluation: nf4 | int4g | none
    gpu: auto                         # the planning target: a GPU id or name, a size in GB, or auto
    save_every: 25                    # training checkpoints, in optimizer steps (where a killed run resumes)
    candidates:
      - model: path/to/hf-folder      # an HF folder, a .gguf file, or a catalogue id with path:
        name: small                   # default: the folder / file / catalogue name
        template: qwen3               # default: the model's own Jinja template, else kindred's by tokenizer
      - {model: qwen3-8b, path: /models/Qwen3-8B}
    data: {path: chats.jsonl, budget: 2048, eval_fraction: 0.1}   # any kindred.data.read_chat format
    lora: {r: 16, alpha: 32, dropout: 0.05}                          # the same for every candidate
    train: {max_steps: 100, lr: 2.0e-4}                              # kindred.train's train section
    battery: ethics16                  # a shipped battery name or a battery file
    eval: {max_new_tokens: 256}
    compare: {judge: path/to/judge-model}   # blind comparison of the tuned models (none: a person, on a tty)
    weights: {capability: 2, speed: 1, preference: 1}
    checklist: {min_tokens_per_s: 20, max_example_tokens: 16384}
    export: {winner: true, format: merged}

Unknown keys name the nearest known one, and the TRL / Axolotl spelling of a key names kindred's.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KindredValueError

CRITERIA = ("context", "capability", "quantization", "speed", "community", "preference")
EXPORT_FORMATS = ("merged",)
RESERVED = ("state", "export", "compare-input", "_all")  # folders of the output that are not candidates


@dataclass
class Candidate:
    model: str
    name: str = ""
    path: str = ""  # the weights of a catalogue model
    template: str = ""
    tokenizer: str = ""


@dataclass
class CompareSection:
    judge: str = ""
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class ChecklistSection:
    min_tokens_per_s: float = 20.0  # decode speed the use case needs
    max_example_tokens: int = 16384  # the per-example token budget recommended


@dataclass
class ExportSection:
    winner: bool = False
    format: str = "merged"


@dataclass
class BakeoffConfig:
    candidates: list[Candidate]
    data: dict
    battery: str = "ethics16"
    out: str = "bakeoff-out"
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "nf4"
    gpu: str = "auto"
    save_every: int = 25  # training checkpoints (optimizer steps): where a killed bake-off resumes training
    lora: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    compare: CompareSection = field(default_factory=CompareSection)
    weights: dict = field(default_factory=lambda: dict.fromkeys(CRITERIA, 1.0))
    checklist: ChecklistSection = field(default_factory=ChecklistSection)
    export: ExportSection = field(default_factory=ExportSection)
    where: str = "<config>"

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


_TOP = (
    "candidates",
    "data",
    "battery",
    "out",
    "device",
    "dtype",
    "quant",
    "gpu",
    "save_every",
    "lora",
    "train",
)
_TOP += ("eval",)
_TOP += ("compare", "weights", "checklist", "export")
# Keys other fine-tuning tools use: kindred.train's names for them (train.config.FOREIGN_KEYS), with the
# bake-off's own layout on top.
BAKEOFF_KEYS = {
    "lr": "train.lr",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "output_dir": "out",
    "base_model": "candidates[].model",
    "models": "candidates",
    "chat_template": "candidates[].template",
    "eval_battery": "battery",
}
EVAL_KEYS = ("max_new_tokens", "batch_size", "loop_stop")


def unknown_key(key: str, allowed, where: str) -> KindredValueError:
    """An unknown key, with kindred's name for a TRL / Axolotl key or the nearest allowed one."""
    from ..train.config import FOREIGN_KEYS  # imported here: kindred.train loads torch

    known = {**FOREIGN_KEYS, **BAKEOFF_KEYS}
    leaf = key.rpartition(".")[2]
    if leaf in known:
        hint = f" (did you mean '{known[leaf]}'? kindred's name for it)"
    else:
        close = difflib.get_close_matches(leaf, list(allowed), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    return KindredValueError(f"{where}: unknown key '{key}'{hint}; allowed: {', '.join(allowed)}")


def _mapping(value, key: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KindredValueError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
    return value


def _dataclass(cls, value, key: str, where: str):
    raw = _mapping(value, key, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        if k not in fields:
            raise unknown_key(f"{key}.{k}", fields, where)
        want = fields[k].type
        ok = {
            "str": isinstance(v, (str, Path)) or v is None,
            "int": isinstance(v, int) and not isinstance(v, bool),
            "float": isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": isinstance(v, bool),
        }[str(want)]
        if not ok:
            raise KindredValueError(f"{where}: '{key}.{k}' must be {want}, got {v!r}")
        kwargs[k] = "" if v is None else (str(v) if str(want) == "str" else v)
    return cls(**kwargs)


def load_config(source, overrides: dict | None = None) -> BakeoffConfig:
    """A checked BakeoffConfig from a YAML file, a dict or a BakeoffConfig (``overrides``: dotted keys)."""
    if isinstance(source, BakeoffConfig):
        return source
    where = "<config>"
    if isinstance(source, (str, Path)):
        import yaml

        path = Path(source)
        if not path.is_file():
            raise KindredValueError(f"{path}: bake-off config not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise KindredValueError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        where = str(path)
    else:
        raw = source
    raw = dict(_mapping(raw, "the config", where))
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if rest:
            raw[head] = {**_mapping(raw.get(head), head, where), rest: value}
        else:
            raw[head] = value
    for key in raw:
        if key not in _TOP:
            raise unknown_key(key, _TOP, where)
    cands = raw.get("candidates")
    if not isinstance(cands, list) or not cands:
        raise KindredValueError(f"{where}: 'candidates' must be a non-empty list of models")
    candidates = []
    for i, c in enumerate(cands):
        if isinstance(c, str):
            c = {"model": c}
        cand = _dataclass(Candidate, c, f"candidates[{i}]", where)
        if not cand.model:
            raise KindredValueError(f"{where}: 'candidates[{i}].model' is required")
        cand.name = cand.name or _default_name(cand)
        candidates.append(cand)
    names = [c.name for c in candidates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise KindredValueError(
            f"{where}: candidate names must differ; repeated: {', '.join(dup)} (set name:)"
        )
    bad = [n for n in names if not n or any(ch in n for ch in "/\\:") or n.startswith(".") or n in RESERVED]
    if bad:
        raise KindredValueError(f"{where}: candidate name {bad[0]!r} cannot be a folder name (set name:)")
    data = _mapping(raw.get("data"), "data", where)
    if not data.get("path"):
        raise KindredValueError(f"{where}: 'data.path' is required (a chat data file)")
    for key in ("template", "tokenizer"):
        if key in data:
            raise KindredValueError(f"{where}: 'data.{key}' is set per candidate (candidates[].{key})")
    ev = _mapping(raw.get("eval"), "eval", where)
    for k in ev:
        if k not in EVAL_KEYS:
            raise unknown_key(f"eval.{k}", EVAL_KEYS, where)
    weights = {**dict.fromkeys(CRITERIA, 1.0), **_mapping(raw.get("weights"), "weights", where)}
    for k, w in weights.items():
        if k not in CRITERIA:
            raise unknown_key(f"weights.{k}", CRITERIA, where)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise KindredValueError(f"{where}: 'weights.{k}' must be a number >= 0, got {w!r}")
    if not any(weights.values()):
        raise KindredValueError(f"{where}: 'weights' are all 0")
    export = _dataclass(ExportSection, raw.get("export"), "export", where)
    if export.format not in EXPORT_FORMATS:
        raise KindredValueError(
            f"{where}: 'export.format' must be one of {', '.join(EXPORT_FORMATS)} (what kindred.export "
            f"writes in this version), got {export.format!r}"
        )
    cfg = BakeoffConfig(
        candidates=candidates,
        data=dict(data),
        battery=str(raw.get("battery", "ethics16")),
        out=str(raw.get("out", "bakeoff-out")),
        device=str(raw.get("device", "auto")),
        dtype=str(raw.get("dtype", "auto")),
        quant=str(raw.get("quant", "nf4")),
        gpu=str(raw.get("gpu", "auto")),
        save_every=raw.get("save_every", 25),
        lora=dict(_mapping(raw.get("lora"), "lora", where)),
        train=dict(_mapping(raw.get("train"), "train", where)),
        eval=dict(ev),
        compare=_dataclass(CompareSection, raw.get("compare"), "compare", where),
        weights={k: float(v) for k, v in weights.items()},
        checklist=_dataclass(ChecklistSection, raw.get("checklist"), "checklist", where),
        export=export,
        where=where,
    )
    if isinstance(cfg.save_every, bool) or not isinstance(cfg.save_every, int) or cfg.save_every < 1:
        raise KindredValueError(
            f"{where}: 'save_every' must be a whole number of steps >= 1, got {cfg.save_every!r}"
        )
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise KindredValueError(f"{where}: 'dtype' must be auto, bf16, fp16 or fp32, got {cfg.dtype!r}")
    return cfg


def _default_name(c: Candidate) -> str:
    p = Path(c.model)
    return p.stem if p.suffix == ".gguf" else (p.name or c.model)


def to_dict(cfg: BakeoffConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
