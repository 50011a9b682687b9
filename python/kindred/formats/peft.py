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
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


def read_adapter(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module path: {"lora_A": A, "lora_B": B}}) of a PEFT LoRA adapter directory, checked."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise KindredFormatError(f"{path}: no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise KindredFormatError(f"{cfg_file}: not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise KindredFormatError(f"{cfg_file}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise KindredFormatError(f"{cfg_file}: {key}={config[key]!r} is not supported by kindred")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key, 8), (int, float)) or config.get(key, 8) <= 0:
            raise KindredFormatError(f"{cfg_file}: {key} must be a positive number, got {config.get(key)!r}")
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
