"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
(the adapter name is not in the key). ``peft.PeftModel.from_pretrained`` loads what ``save_adapter`` writes
onto the matching transformers model, and ``load_adapter`` loads adapters PEFT trained. Supported: plain
LoRA on linear layers with per-module ranks/alphas (``rank_pattern`` / ``alpha_pattern``) and rsLoRA;
anything else in a config (DoRA, lora_bias, trained biases, modules_to_save, fan_in_fan_out, …) is refused
with a KindredFormatError rather than silently dropped.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import KindredFormatError, KindredValueError
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear, freeze_base, lora_modules, target_names

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


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write ``adapter_name`` of every LoraLinear in ``model`` to ``path`` (a directory) in PEFT's format."""
    modules = {n: m for n, m in lora_modules(model).items() if adapter_name in m.r}
    if not modules:
        raise KindredValueError(f"model has no LoRA module with an adapter named {adapter_name!r}")
    ranks = {n: m.r[adapter_name] for n, m in modules.items()}
    alphas = {n: m.lora_alpha[adapter_name] for n, m in modules.items()}
    rslora = {m.use_rslora[adapter_name] for m in modules.values()}
    if len(rslora) != 1:
        raise KindredValueError(f"adapter {adapter_name!r} mixes rsLoRA and plain scaling: PEFT has one flag")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    dropout = collections.Counter(m.lora_dropout[adapter_name] for m in modules.values()).most_common(1)[0][0]
    # Suffixes are shorter and what PEFT users write, but only exact when they select no other module.
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in modules})
    targets = suffixes if set(target_names(model, suffixes)) == set(modules) else sorted(modules)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "use_rslora": rslora.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {rf"{re.escape(n)}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {rf"{re.escape(n)}": v for n, v in alphas.items() if v != alpha},
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {}
    for name, m in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name].weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name].weight.detach().cpu().contiguous()
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


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str = "default", trainable: bool = False
) -> list[str]:
    """Load a PEFT LoRA adapter from ``path`` onto ``model`` (wrapping its target linears in LoraLinear, or
    adding ``adapter_name`` to existing ones) and make it active; returns the adapted module names.

    The adapter must fit the model: every tensor must name a linear layer of the model with matching
    shapes, and every module the config targets must have its tensors (otherwise it is an adapter for
    another base), else KindredFormatError naming the module and tensor.
    """
    config, tensors = read_adapter(path)
    weights_file = Path(path) / WEIGHTS_NAME
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    plan = {}
    for name, parts in sorted(tensors.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KindredFormatError(
                f"{weights_file}: module '{name}' (tensor '{PREFIX}{name}.lora_A.weight') is not in "
                f"{type(model).__name__}: an adapter for another base?"
            ) from None
        if not isinstance(module, (nn.Linear, Linear4bit, LoraLinear)):
            raise KindredFormatError(
                f"{weights_file}: '{name}' is a {type(module).__name__}, not a linear layer"
            )
        r = _pattern_value(rank_pattern, name, r_default)
        k, n = module.in_features, module.out_features
        expected = {"lora_A": (r, k), "lora_B": (n, r)}
        for part, shape in expected.items():
            got = tuple(parts[part].shape)
            if got != shape:
                raise KindredFormatError(
                    f"{weights_file}: {name}.{part}.weight has shape {list(got)}, the model's {name} "
                    f"(in={k}, out={n}) with r={r} needs {list(shape)}"
                )
        plan[name] = (module, r, _pattern_value(alpha_pattern, name, alpha_default))
    targets = config.get("target_modules")
    if targets:
        wanted = set(target_names(model, targets))
        missing = sorted(wanted - set(plan))
        if missing:
            raise KindredFormatError(
                f"{weights_file}: the config targets '{missing[0]}' ({len(missing)} module(s) in all) but "
                f"the file has no lora_A/lora_B for it: an adapter for another base?"
            )
    dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))
    for name, (module, r, alpha) in plan.items():
        if isinstance(module, LoraLinear):
            module.add_adapter(adapter_name, r, alpha, dropout, rslora)
            module.set_adapter(adapter_name)
            lora = module
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            lora = LoraLinear(module, r, alpha, dropout, rslora, adapter_name, name=name)
            setattr(parent, child, lora.train(module.training))  # an eval-mode model stays in eval mode
        with torch.no_grad():
            for part, dest in (("lora_A", lora.lora_A), ("lora_B", lora.lora_B)):
                w = dest[adapter_name].weight
                w.copy_(tensors[name][part].to(device=w.device, dtype=w.dtype))
                w.requires_grad_(trainable)
    freeze_base(model)
    return sorted(plan)
