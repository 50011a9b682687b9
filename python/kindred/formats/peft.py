"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``, as tensors.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
(the adapter name is not in the key). Supported: plain LoRA on linear layers with per-module ranks/alphas
(``rank_pattern`` / ``alpha_pattern``) and rsLoRA; anything else in a config (DoRA, lora_bias, trained biases,
modules_to_save, fan_in_fan_out, …) is refused with a KindredFormatError rather than silently dropped.
Putting an adapter onto a model's modules, and taking one off: ``kindred.nn.load_adapter`` / ``save_adapter``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..bounded import check_float, check_int, json_object
from ..errors import KindredFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Config fields whose non-default values change the model in ways kindred does not implement.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, []),
}
MAX_RANK = 1 << 16
MAX_ALPHA = 1e6


def pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def write_adapter(path: str | Path, config: dict, modules: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write ``config`` and {module path: {"lora_A": A, "lora_B": B}} to the directory ``path``."""
    tensors = {}
    for name, parts in modules.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{name}.{part}.weight"] = parts[part].detach().cpu().contiguous()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _regex(pattern, where: str) -> str:
    if not isinstance(pattern, str) or len(pattern) > 1000:
        raise KindredFormatError(
            f"{where} must be a regex string of at most 1000 characters, got {pattern!r}"
        )
    try:  # alone, and as pattern_value embeds it (a "(?i)" inside the pattern is an error there)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FutureWarning "possible nested set": a valid regex today
            re.compile(pattern)
            re.compile(rf"(.*\.)?({pattern})$")
    except (re.error, RecursionError, OverflowError) as e:
        raise KindredFormatError(f"{where}: {pattern!r} is not a valid regex ({e})") from None
    return pattern


def check_config(config: dict, where: str) -> dict:
    """``config`` (an adapter_config.json object) if every field kindred reads has the right type and range:
    a positive integer r, finite positive lora_alpha, lora_dropout in [0, 1), target_modules a regex or a
    list of names, rank_pattern / alpha_pattern objects of {regex: value}, a boolean use_rslora."""
    if config.get("peft_type") != "LORA":
        raise KindredFormatError(f"{where}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise KindredFormatError(f"{where}: {key}={config[key]!r} is not supported by kindred")
    check_int(config.get("r", 8), f"{where}: 'r'", 1, MAX_RANK)
    check_float(config.get("lora_alpha", 8), f"{where}: 'lora_alpha'", 0.0, MAX_ALPHA, lo_open=True)
    dropout = config.get("lora_dropout") or 0.0
    if check_float(dropout, f"{where}: 'lora_dropout'", 0.0, 1.0) >= 1.0:
        raise KindredFormatError(f"{where}: 'lora_dropout' must be below 1, got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise KindredFormatError(f"{where}: 'use_rslora' must be true or false, got {config['use_rslora']!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _regex(targets, f"{where}: 'target_modules'")
    elif targets is not None and (
        not isinstance(targets, list) or len(targets) > 10_000 or not all(isinstance(t, str) for t in targets)
    ):
        raise KindredFormatError(
            f"{where}: 'target_modules' must be a regex string or a list of module names, got {targets!r:.80}"
        )
    for key, check in (
        ("rank_pattern", lambda v, w: check_int(v, w, 1, MAX_RANK)),
        ("alpha_pattern", lambda v, w: check_float(v, w, 0.0, MAX_ALPHA, lo_open=True)),
    ):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise KindredFormatError(
                f"{where}: '{key}' must be an object {{regex: value}}, got {pattern!r:.80}"
            )
        for name, value in pattern.items():
            _regex(name, f"{where}: '{key}' key")
            check(value, f"{where}: '{key}'['{name}']")
    return config


def read_adapter(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module path: {"lora_A": A, "lora_B": B}}) of a PEFT LoRA adapter directory, checked."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise KindredFormatError(f"{path}: no {CONFIG_NAME}")
    config = check_config(json_object(cfg_file, limit=1 << 20, max_depth=8), str(cfg_file))
    if not weights_file.is_file():
        raise KindredFormatError(f"{path}: no {WEIGHTS_NAME}")
    try:
        flat = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise KindredFormatError(f"{weights_file}: not a readable safetensors file ({e})") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise KindredFormatError(
                f"{weights_file}: tensor '{key}' is not a LoRA A/B weight of a linear layer"
            )
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    for name, parts in modules.items():
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise KindredFormatError(f"{weights_file}: module '{name}' has no {part}.weight")
    return config, modules
