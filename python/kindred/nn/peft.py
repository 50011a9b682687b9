"""PEFT LoRA adapters onto a model's modules and off them (the files: ``kindred.formats.peft``).

``peft.PeftModel.from_pretrained`` loads what ``save_adapter`` writes onto the matching transformers model,
and ``load_adapter`` loads adapters PEFT trained.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import KindredFormatError, KindredValueError
from ..formats.peft import PREFIX, WEIGHTS_NAME, pattern_value, read_adapter, write_adapter
from .linear4bit import Linear4bit
from .lora import LoraLinear, freeze_base, lora_modules, target_names


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
    parts = {
        name: {"lora_A": m.lora_A[adapter_name].weight, "lora_B": m.lora_B[adapter_name].weight}
        for name, m in modules.items()
    }
    # LoRA on 3-D parameters (MoE experts: kindred.models.moe), PEFT's target_parameters.
    params: list[str] = []
    for name, m in model.named_modules():
        export = getattr(m, "peft_parameter_adapters", None)
        for rel, (param, r_p, alpha_p, rslora_p, tensors) in (export() if callable(export) else {}).items():
            if (r_p, alpha_p, rslora_p) != (r, alpha, config["use_rslora"]):
                raise KindredValueError(
                    f"{name}.{param}: LoRA r={r_p}, alpha={alpha_p}, rslora={rslora_p} differs from the "
                    f"adapter's r={r}, alpha={alpha}, rslora={config['use_rslora']}: PEFT has one of each"
                )
            parts[f"{name}.{rel}" if rel else name] = tensors
            target = ".".join([*name.split(".")[-2:], param])
            if target not in params:
                params.append(target)
    if params:
        config["target_parameters"] = params
    return write_adapter(path, config, parts)


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
        r = pattern_value(rank_pattern, name, r_default)
        k, n = module.in_features, module.out_features
        expected = {"lora_A": (r, k), "lora_B": (n, r)}
        for part, shape in expected.items():
            got = tuple(parts[part].shape)
            if got != shape:
                raise KindredFormatError(
                    f"{weights_file}: {name}.{part}.weight has shape {list(got)}, the model's {name} "
                    f"(in={k}, out={n}) with r={r} needs {list(shape)}"
                )
        plan[name] = (module, r, pattern_value(alpha_pattern, name, alpha_default))
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
