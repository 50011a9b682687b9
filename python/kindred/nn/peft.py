"""PEFT LoRA adapters onto a model's modules and off them (the files: ``kindred.formats.peft``).

``peft.PeftModel.from_pretrained`` loads what ``save_adapter`` writes onto the matching transformers model,
and ``load_adapter`` loads adapters PEFT trained.
"""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..data.tokenizers import save_tokenizer_files
from ..errors import KindredFormatError, KindredValueError
from ..formats.checkpoint import FUSED_LINEARS, MULTIMODAL_TEXT_MODULE, canonical_name, fused_parts
from ..formats.peft import PREFIX, WEIGHTS_NAME, pattern_value, read_adapter, write_adapter
from ..ops.lora import lora_scaling
from .linear4bit import Linear4bit
from .lora import LoraLinear, freeze_base, lora_modules, target_names


def save_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    tokenizer=None,
) -> Path:
    """Write ``adapter_name`` of every LoraLinear in ``model`` to ``path`` (a directory) in PEFT's format,
    named as transformers' model of the checkpoint names its modules, with ``tokenizer``'s files if given.

    A Phi-3/4 model (``config.fused_checkpoint``) gets one LoRA per fused ``qkv_proj`` / ``gate_up_proj``:
    A the parts' A stacked, B block-diagonal (rank the sum of the parts', in ``rank_pattern``, with the
    ``alpha_pattern`` that keeps each part's scaling): exactly the split adapters' update. A Gemma 3
    multimodal model (``config.multimodal``) names them under transformers' ``model.language_model.``.
    """
    loras = {n: m for n, m in lora_modules(model).items() if adapter_name in m.r}
    if not loras:
        raise KindredValueError(f"model has no LoRA module with an adapter named {adapter_name!r}")
    rslora = {m.use_rslora[adapter_name] for m in loras.values()}
    if len(rslora) != 1:
        raise KindredValueError(f"adapter {adapter_name!r} mixes rsLoRA and plain scaling: PEFT has one flag")
    rs = rslora.pop()
    parts = {
        n: _Part(
            m.lora_A[adapter_name].weight,
            m.lora_B[adapter_name].weight,
            m.r[adapter_name],
            m.lora_alpha[adapter_name],
        )
        for n, m in loras.items()
    }
    config = getattr(model, "config", None)
    fused, multimodal = getattr(config, "fused_checkpoint", False), getattr(config, "multimodal", False)
    if fused:
        parts = _fuse(model, parts, rs)

    def hf(n: str) -> str:  # transformers' module path of a decoder module
        return MULTIMODAL_TEXT_MODULE + n[len("model.") :] if multimodal and n.startswith("model.") else n

    parts = {hf(n): p for n, p in parts.items()}
    # Every linear transformers' model would have, to tell whether suffixes select exactly these modules.
    linears = {hf((_fused_name(n) if fused else None) or n) for n in target_names(model, "all-linear")}
    dropout = collections.Counter(m.lora_dropout[adapter_name] for m in loras.values()).most_common(1)[0][0]
    r = collections.Counter(p.r for p in parts.values()).most_common(1)[0][0]
    alpha = collections.Counter(p.alpha for p in parts.values()).most_common(1)[0][0]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in parts})
    # (the vision tower of a multimodal model has q/k/v_proj too: whole paths there)
    exact = not multimodal and {n for n in linears if n.rsplit(".", 1)[-1] in suffixes} == set(parts)
    config_out = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": suffixes if exact else sorted(parts),
        "use_rslora": rs,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": _pattern({n: p.r for n, p in parts.items()}, r),
        "alpha_pattern": _pattern({n: p.alpha for n, p in parts.items()}, alpha),
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {n: {"lora_A": p.a, "lora_B": p.b} for n, p in parts.items()}
    # LoRA on 3-D parameters (MoE experts: kindred.models.moe), PEFT's target_parameters.
    params: list[str] = []
    for name, m in model.named_modules():
        export = getattr(m, "peft_parameter_adapters", None)
        for rel, (param, r_p, alpha_p, rslora_p, t) in (export() if callable(export) else {}).items():
            if (r_p, alpha_p, rslora_p) != (r, alpha, rs):
                raise KindredValueError(
                    f"{name}.{param}: LoRA r={r_p}, alpha={alpha_p}, rslora={rslora_p} differs from the "
                    f"adapter's r={r}, alpha={alpha}, rslora={rs}: PEFT has one of each"
                )
            tensors[hf(f"{name}.{rel}" if rel else name)] = t
            target = ".".join([*name.split(".")[-2:], param])
            if target not in params:
                params.append(target)
    if params:
        config_out["target_parameters"] = params
    out = write_adapter(path, config_out, tensors)
    if tokenizer is not None:
        save_tokenizer_files(tokenizer, out)
    return out


class _Part(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor
    r: int
    alpha: float


def _fused_name(name: str) -> str | None:
    for fused, members in FUSED_LINEARS.items():
        for m in members:
            if name.endswith("." + m):
                return name[: -len(m)] + fused
    return None


def _fuse(model: nn.Module, parts: dict[str, _Part], rslora: bool) -> dict[str, _Part]:
    """Phi-3/4: the split parts' adapters as one exact LoRA per fused linear (see save_adapter)."""
    out = {n: p for n, p in parts.items() if _fused_name(n) is None}
    groups = sorted({_fused_name(n) for n in parts} - {None})
    for fused in groups:
        members = fused_parts(fused)
        present = [parts[m] for m in members if m in parts]
        ref = lora_scaling(present[0].r, present[0].alpha, rslora)
        rank = sum(p.r for p in present)
        rows = [model.get_submodule(m).out_features for m in members]
        a = torch.cat([p.a.detach().float() for p in present])
        b = torch.zeros(sum(rows), rank, dtype=torch.float32, device=a.device)
        row = col = 0
        for m, n_rows in zip(members, rows, strict=True):
            p = parts.get(m)
            if p is not None:
                ratio = lora_scaling(p.r, p.alpha, rslora) / ref
                b[row : row + n_rows, col : col + p.r] = p.b.detach().float() * ratio
                col += p.r
            row += n_rows
        dtype = present[0].a.dtype
        alpha = ref * (math.sqrt(rank) if rslora else rank)
        out[fused] = _Part(a.to(dtype), b.to(dtype), rank, alpha)
    return out


def _pattern(values: dict[str, float], default: float) -> dict:
    """PEFT's rank/alpha pattern for the modules whose value is not ``default``: by suffix where one suffix
    has one value throughout, else by the module's whole (escaped) name."""
    by_suffix = collections.defaultdict(set)
    for n, v in values.items():
        by_suffix[n.rsplit(".", 1)[-1]].add(v)
    out = {}
    for n, v in values.items():
        suffix = n.rsplit(".", 1)[-1]
        if v == default:
            continue
        if by_suffix[suffix] == {v}:
            out[suffix] = v
        else:
            out[re.escape(n)] = v
    return out


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str = "default", trainable: bool = False
) -> list[str]:
    """Load a PEFT LoRA adapter from ``path`` onto ``model`` (wrapping its target linears in LoraLinear, or
    adding ``adapter_name`` to existing ones) and make it active; returns the adapted module names.

    Names as transformers gives them are accepted: Gemma 3's multimodal ``model.language_model.`` prefix,
    and Phi-3/4's fused ``qkv_proj`` / ``gate_up_proj``, whose LoRA becomes one per part (A shared, B the
    part's rows, columns that are zero for the part dropped: exact, and the rank of a kindred-saved part).
    The adapter must fit the model: every tensor must name a linear layer of the model with matching
    shapes, and every module the config targets must have its tensors (otherwise it is an adapter for
    another base), else KindredFormatError naming the module and tensor.
    """
    config, tensors = read_adapter(path)
    weights_file = Path(path) / WEIGHTS_NAME
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))
    plan = {}
    for name, parts in sorted(tensors.items()):
        canon = canonical_name(name) or name
        members = fused_parts(canon)
        if members is not None and not _has(model, canon) and all(_has(model, m) for m in members):
            targets = [(m, model.get_submodule(m)) for m in members]
        elif _has(model, canon):
            targets = [(canon, model.get_submodule(canon))]
        else:
            raise KindredFormatError(
                f"{weights_file}: module '{name}' (tensor '{PREFIX}{name}.lora_A.weight') is not in "
                f"{type(model).__name__}: an adapter for another base?"
            )
        for _, module in targets:
            if not isinstance(module, (nn.Linear, Linear4bit, LoraLinear)):
                raise KindredFormatError(
                    f"{weights_file}: '{name}' is a {type(module).__name__}, not a linear layer"
                )
        r = pattern_value(rank_pattern, name, r_default)
        alpha = pattern_value(alpha_pattern, name, alpha_default)
        k, n = targets[0][1].in_features, sum(m.out_features for _, m in targets)
        expected = {"lora_A": (r, k), "lora_B": (n, r)}
        for part, shape in expected.items():
            got = tuple(parts[part].shape)
            if got != shape:
                raise KindredFormatError(
                    f"{weights_file}: {name}.{part}.weight has shape {list(got)}, the model's {name} "
                    f"(in={k}, out={n}) with r={r} needs {list(shape)}"
                )
        a, b = parts["lora_A"], parts["lora_B"]
        if len(targets) == 1:
            plan[targets[0][0]] = (targets[0][1], r, alpha, a, b)
            continue
        scaling, row = lora_scaling(r, alpha, rslora), 0
        for part_name, module in targets:
            rows = b[row : row + module.out_features]
            row += module.out_features
            cols = torch.nonzero(rows.abs().sum(0)).flatten()
            cols = cols if cols.numel() else torch.zeros(1, dtype=torch.long)
            rank = int(cols.numel())
            part_alpha = scaling * (math.sqrt(rank) if rslora else rank)
            plan[part_name] = (module, rank, part_alpha, a[cols], rows[:, cols])
    targets = config.get("target_modules")
    if targets:
        wanted = set(target_names(model, targets))
        missing = sorted(wanted - set(plan))
        if missing:
            raise KindredFormatError(
                f"{weights_file}: the config targets '{missing[0]}' ({len(missing)} module(s) in all) but "
                f"the file has no lora_A/lora_B for it: an adapter for another base?"
            )
    for name, (module, r, alpha, a, b) in plan.items():
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
            for src, dest in ((a, lora.lora_A), (b, lora.lora_B)):
                w = dest[adapter_name].weight
                w.copy_(src.to(device=w.device, dtype=w.dtype))
                w.requires_grad_(trainable)
    freeze_base(model)
    return sorted(plan)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
