"""LoraLinear: LoRA adapters over a frozen ``nn.Linear`` or ``Linear4bit`` base; ``apply_lora`` for any model.

Parameter names follow PEFT's in-memory layout (``<module>.base_layer``, ``<module>.lora_A.<adapter>.weight``
[r, K], ``<module>.lora_B.<adapter>.weight`` [N, r]); ``kindred.formats.peft`` reads and writes PEFT's files.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .._ops.matmul_4bit import decode_eligible
from ..errors import KindredValueError
from ..ops.lora import lora_linear, lora_scaling, lora_workspace
from ..weights import Int4gWeight, NF4Weight
from .linear4bit import Linear4bit


def _name_ok(name: str) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name) is not None


class LoraLinear(nn.Module):
    """y = base(x) + s·lora_B(lora_A(dropout(x))) for the active adapter, fused (kindred.ops.lora_linear).

    Several named adapters may live on one layer; one is active (``set_adapter``), and all can be switched off
    (``disable_adapters``). ``merge()`` folds the active adapter into the base: for an ``nn.Linear`` base it
    adds s·B·A to the weight in place (computed in float32, as PEFT does); for a ``Linear4bit`` base it
    replaces ``base_layer`` with a dense ``nn.Linear`` (in the 4-bit weight's dtype) holding
    dequant(W) + s·B·A and keeps the 4-bit tensors, so ``unmerge()`` restores them exactly. ``merge`` returns
    the merged base layer. Only A and B are trainable; the base stays frozen. ``row_adapter`` switches the
    adapter per row of an inference batch (base and tuned answers in one pass over the base weights).
    """

    def __init__(
        self,
        base: nn.Linear | Linear4bit,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        rslora: bool = False,
        adapter_name: str = "default",
        name: str = "",
    ):
        super().__init__()
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise KindredValueError(
                f"{name or 'LoraLinear'}: the base must be a torch.nn.Linear or kindred.nn.Linear4bit, "
                f"got {type(base).__name__}"
            )
        self.name = name
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.disabled = False
        self.merged_adapter: str | None = None
        # [rows] in x's dtype, 1 where a row runs the active adapter and 0 where it runs the base alone
        # (kindred.generate's mixed batches set it around each forward); None: every row runs it
        self.row_adapter: torch.Tensor | None = None
        self._quantized_base: Linear4bit | None = None
        self._workspace: torch.Tensor | None = None
        self._quantized_cache: tuple | None = None
        self.add_adapter(adapter_name, r, alpha, dropout, rslora)

    def _err(self, msg: str) -> KindredValueError:
        return KindredValueError(f"{self.name or 'LoraLinear'}: {msg}")

    @property
    def base_dtype(self) -> torch.dtype:
        b = self._quantized_base or self.base_layer
        return b.quantized.dtype if isinstance(b, Linear4bit) else b.weight.dtype

    @property
    def base_device(self) -> torch.device:
        b = self._quantized_base or self.base_layer
        return b._q_packed.device if isinstance(b, Linear4bit) else b.weight.device

    def add_adapter(
        self, adapter_name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        """A new adapter: A Kaiming-uniform (a = √5) and B zero, as PEFT initialises them. Not made active."""
        k, n = self.in_features, self.out_features
        if not _name_ok(adapter_name):
            raise self._err(f"adapter name must be an identifier, got {adapter_name!r}")
        if adapter_name in self.r:
            raise self._err(f"adapter {adapter_name!r} already exists")
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(k, n):
            raise self._err(f"rank r must be an int in [1, min(in, out) = {min(k, n)}], got {r!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise self._err(f"alpha must be a positive number, got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise self._err(f"dropout must be in [0, 1), got {dropout!r}")
        kw = {"device": self.base_device, "dtype": self.base_dtype}
        a, b = nn.Linear(k, r, bias=False, **kw), nn.Linear(r, n, bias=False, **kw)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, float(alpha)
        self.lora_dropout[adapter_name], self.use_rslora[adapter_name] = float(dropout), bool(rslora)
        self.scaling[adapter_name] = lora_scaling(r, float(alpha), rslora)

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.r:
            raise self._err(f"no adapter named {adapter_name!r} (have {sorted(self.r)})")

    def set_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        if self.merged_adapter is not None and self.merged_adapter != adapter_name:
            raise self._err(f"adapter {self.merged_adapter!r} is merged: unmerge() before switching")
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        if adapter_name in (self.active_adapter, self.merged_adapter):
            raise self._err(f"adapter {adapter_name!r} is active or merged; switch or unmerge first")
        for d in (self.lora_A, self.lora_B):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling):
            del d[adapter_name]

    def disable_adapters(self) -> None:
        self.disabled = True

    def enable_adapters(self) -> None:
        self.disabled = False

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """s·B·A [N, K] in float32."""
        name = adapter_name or self.active_adapter
        self._check_adapter(name)
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return self.scaling[name] * (b @ a)

    def merged_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The dense W + s·B·A (W dequantized for a 4-bit base) in the base dtype; the module is unchanged."""
        base = self._quantized_base or self.base_layer
        w = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight.float()
        return (w + self.delta_weight(adapter_name)).to(self.base_dtype)

    @torch.no_grad()
    def merge(self, adapter_name: str | None = None) -> nn.Linear:
        """Fold the adapter into the base (see the class docstring) and return the merged base layer."""
        name = adapter_name or self.active_adapter
        self._check_adapter(name)
        if self.merged_adapter is not None:
            raise self._err(f"adapter {self.merged_adapter!r} is already merged")
        if isinstance(self.base_layer, Linear4bit):
            q = self.base_layer
            dense = nn.Linear(self.in_features, self.out_features, bias=q.bias is not None)
            dense = dense.to(device=self.base_device, dtype=self.base_dtype)
            dense.weight.copy_(self.merged_weight(name))
            if q.bias is not None:
                dense.bias.copy_(q.bias)
            dense.requires_grad_(False)
            self._quantized_base, self.base_layer = q, dense
        else:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged_adapter = name
        self.active_adapter = name
        return self.base_layer

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): a 4-bit base comes back bit for bit; a dense one is W − s·B·A (rounded as PEFT)."""
        if self.merged_adapter is None:
            raise self._err("no adapter is merged")
        if self._quantized_base is not None:
            self.base_layer, self._quantized_base = self._quantized_base, None
        else:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight(self.merged_adapter)).to(w.dtype))
        self.merged_adapter = None

    def _dense_workspace(self, r: int) -> torch.Tensor | None:
        """On CUDA the dense base weight lives in the first K columns of a [N, K + r] workspace (the LoRA
        GEMMs then read [W | B] without copying W). Rebuilt after .to() or for a larger rank."""
        w = self.base_layer.weight
        ws = self._workspace
        if not w.is_cuda:
            return None
        if (
            ws is not None
            and ws.device == w.device
            and ws.dtype == w.dtype
            and ws.data_ptr() == w.data_ptr()
            and w.stride() == ws.stride()
            and ws.shape[1] >= self.in_features + r
        ):
            return ws
        ws = lora_workspace(w, r)
        self.base_layer.weight.data = ws[:, : self.in_features]
        self._workspace = ws
        return ws

    def _quantized(self, layer: Linear4bit) -> NF4Weight | Int4gWeight:
        """layer.quantized, kept between calls (building it costs host time every step) and rebuilt when the
        layer's tensors are replaced: .to() swaps the packed buffer, loading or re-quantizing the metadata."""
        if torch.compiler.is_compiling():
            return layer.quantized
        packed, meta = layer._q_packed, layer._meta
        cached = self._quantized_cache
        if cached is None or cached[0] is not packed or cached[1] is not meta:
            cached = self._quantized_cache = (packed, meta, layer.quantized)
        return cached[2]

    def _apply(self, fn, recurse=True):
        self._quantized_cache = None  # it would keep the old device's tensors alive
        return super()._apply(fn, recurse)

    def _inference(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        """No dropout and no gradients: the forward alone, as the base's own kernel plus s·(x·Aᵀ)·Bᵀ."""
        return (
            x.dtype == a.dtype
            and x.shape[-1] == self.in_features
            and not (torch.is_grad_enabled() and a.requires_grad)
            and not (self.training and self.lora_dropout[self.active_adapter] > 0)
        )

    def _serves_decode(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        """Inference on the rows the base's decode kernel serves (a 4-bit base: ``decode_eligible``; a dense
        base on the CPU: any, where torch's GEMM outruns the fused op's C++ reference loop)."""
        if not self._inference(x, a):
            return False
        if isinstance(self.base_layer, Linear4bit):
            return decode_eligible(x, x.numel() // self.in_features, self.in_features)
        return not x.is_cuda and x.dtype == self.base_layer.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged_adapter is not None:
            return self.base_layer(x)
        name = self.active_adapter
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        base_layer = self.base_layer
        bias = base_layer.bias
        if self.row_adapter is not None:
            # A batch mixing rows with the adapter (1) and without it (0): s·(x·Aᵀ) scaled row by row.
            if not self._inference(x, a):
                raise self._err("row_adapter is for inference: no gradients, no dropout, x in A's dtype")
            x2 = x.reshape(-1, self.in_features)
            xs = (x2 @ a.t()).mul_(self.row_adapter[:, None] * self.scaling[name])
            y = base_layer(x2).addmm_(xs, b.t())
            return y.reshape(*x.shape[:-1], self.out_features)
        if self._serves_decode(x, a):
            # Decoding: the base's own kernel (a 4-bit GEMV, a dense GEMM), then the small s·(x·Aᵀ)·Bᵀ on top.
            x2 = x.reshape(-1, self.in_features)
            y = base_layer(x2).addmm_(x2 @ a.t(), b.t(), alpha=self.scaling[name])
            return y.reshape(*x.shape[:-1], self.out_features)
        try:
            if isinstance(base_layer, Linear4bit):
                base, ws = self._quantized(base_layer), None
                bias = None if bias is None else bias.to(x.dtype)
            else:
                ws = self._dense_workspace(self.r[name])
                base = base_layer.weight
            return lora_linear(
                x,
                base,
                a,
                b,
                self.scaling[name],
                bias=bias,
                dropout_p=self.lora_dropout[name],
                training=self.training,
                workspace=ws,
            )
        except KindredValueError as e:
            raise self._err(str(e)) from None

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        # On CUDA the base weight is a strided view of the workspace: hand out a contiguous copy (safetensors
        # writes only contiguous tensors). Loading copies into the view as usual.
        key = prefix + "base_layer.weight"
        if not keep_vars and key in sd and not sd[key].is_contiguous():
            sd[key] = sd[key].contiguous()
        return sd

    def extra_repr(self) -> str:
        name = self.active_adapter
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters={sorted(self.r)}, "
            f"active={name!r}, r={self.r[name]}, scaling={self.scaling[name]:.4g}, "
            f"dropout={self.lora_dropout[name]}, disabled={self.disabled}, merged={self.merged_adapter!r}"
        )


def _is_output_layer(model: nn.Module, module: nn.Module, name: str) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return module is out or name.split(".")[-1] == "lm_head"


def target_names(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the linear layers ``targets`` selects, as PEFT's target_modules does: a list of names or
    name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regex string matched against
    the whole name, or ``"all-linear"`` (every linear layer except the output layer)."""
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoraLinear):
            inside.add(name)
        if not name:
            continue
        if targets == "all-linear":
            hit = isinstance(module, (nn.Linear, Linear4bit, LoraLinear)) and not _is_output_layer(
                model, module, name
            )
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            found.append(name)
    return found


def apply_lora(
    model: nn.Module,
    targets: str | list[str],
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    rslora: bool = False,
    adapter_name: str = "default",
) -> list[str]:
    """Swap each target linear of ``model`` for a LoraLinear (or add ``adapter_name`` to an existing one),
    freeze every other parameter, and return the names of the adapted modules."""
    if not isinstance(model, nn.Module):
        raise KindredValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(targets, str) or (isinstance(targets, (list, tuple)) and targets)):
        raise KindredValueError(
            f"targets must be a non-empty list of module names, a regex or 'all-linear', got {targets!r}"
        )
    names = target_names(model, targets if isinstance(targets, str) else list(targets))
    if not names:
        raise KindredValueError(f"no module of {type(model).__name__} matches targets {targets!r}")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):
            module.add_adapter(adapter_name, r, alpha, dropout, rslora)
            module.set_adapter(adapter_name)
            continue
        if not isinstance(module, (nn.Linear, Linear4bit)):
            raise KindredValueError(
                f"{name}: targets match a {type(module).__name__}, not a Linear or Linear4bit layer"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoraLinear(module, r, alpha, dropout, rslora, adapter_name, name=name)
        setattr(parent, child, lora.train(module.training))  # an eval-mode model stays in eval mode
    freeze_base(model)
    return names


def freeze_base(model: nn.Module) -> None:
    """requires_grad = False for every parameter of ``model`` that is not a LoRA A or B."""
    keep = {id(p) for m in lora_modules(model).values() for d in (m.lora_A, m.lora_B) for p in d.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    for m in lora_modules(model).values():
        m.set_adapter(adapter_name)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoraLinear by its merged base layer (dense nn.Linear, dequantized for a 4-bit base)."""
    for name, module in list(lora_modules(model).items()):
        if module.merged_adapter is None:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = module.base_layer
        if isinstance(base, nn.Linear):
            base.weight.data = base.weight.data.contiguous()
        setattr(parent, child, base)
    return model
