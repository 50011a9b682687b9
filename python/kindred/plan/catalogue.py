"""The model catalogue: architecture numbers, license, template family and formats of each model.

Entries come from `catalogue.json` (shipped with the package, every entry with sources); `add_config` adds a
model from its own Hugging Face `config.json`. Parameter counts are derived from the architecture, never
typed in.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KindredValueError

_DATA = Path(__file__).with_name("catalogue.json")

# Gemma's decoder layers carry 4 RMSNorms (input, post-attention, pre- and post-feedforward); others carry 2.
_FOUR_NORM_TYPES = ("gemma2", "gemma3", "gemma3_text")
# Families whose attention normalizes q and k per head (Qwen3, Gemma 3).
_QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class Linear:
    """One decoder-layer projection y = x·Wᵀ, W of shape [n_out, k_in], `copies` of it (MoE experts)."""

    name: (
        str  # llama.cpp tensor role: attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, router
    )
    k_in: int
    n_out: int
    copies: int = 1
    expert: bool = False

    @property
    def params(self) -> int:
        return self.k_in * self.n_out * self.copies


@dataclass(frozen=True)
class ModelSpec:
    """A text decoder's shape plus what a user needs to choose it (license, template, formats, sources)."""

    id: str
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # per expert for MoE models
    vocab: int
    context: int
    tied_embeddings: bool
    model_type: str = ""
    sliding_window: int | None = None
    sliding_layers: int = 0
    experts: int = 0
    experts_per_token: int = 0
    qk_norm: bool = False
    norms_per_layer: int = 2
    attention_bias: bool = False
    hf_repo: str = ""
    aliases: tuple[str, ...] = ()
    license: dict = field(default_factory=dict)
    chat_template: str = ""
    formats: dict = field(default_factory=dict)
    ecosystem: dict = field(default_factory=dict)
    published_params: dict = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def layer_linears(self) -> list[Linear]:
        """The projections of one decoder layer (experts folded into `copies`)."""
        h, ff = self.hidden, self.intermediate
        attn = [
            Linear("attn_q", h, self.q_dim),
            Linear("attn_k", h, self.kv_dim),
            Linear("attn_v", h, self.kv_dim),
            Linear("attn_output", self.q_dim, h),
        ]
        n = max(self.experts, 1)
        mlp = [
            Linear("ffn_gate", h, ff, n, self.is_moe),
            Linear("ffn_up", h, ff, n, self.is_moe),
            Linear("ffn_down", ff, h, n, self.is_moe),
        ]
        router = [Linear("router", h, self.experts)] if self.is_moe else []
        return attn + mlp + router

    def layer_small_params(self) -> int:
        """Norm weights and biases of one layer: kept in 16/32 bits by every format."""
        norms = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        bias = (self.q_dim + 2 * self.kv_dim + self.hidden) if self.attention_bias else 0
        return norms + bias

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by part; `active` counts only the experts a token is routed to."""
        linears = self.layer_linears()
        embedding = self.vocab * self.hidden
        lm_head = 0 if self.tied_embeddings else embedding
        attention = self.layers * sum(t.params for t in linears if t.name.startswith("attn"))
        experts = self.layers * sum(t.params for t in linears if t.name.startswith("ffn"))
        router = self.layers * sum(t.params for t in linears if t.name == "router")
        small = self.layers * self.layer_small_params() + self.hidden  # + final norm
        total = embedding + lm_head + attention + experts + router + small
        active = total
        if self.is_moe:
            active = total - experts + experts * self.experts_per_token // self.experts
        return {
            "embedding": embedding,
            "lm_head": lm_head,
            "attention": attention,
            "mlp": experts,
            "router": router,
            "norms_biases": small,
            "total": total,
            "active": active,
            "non_embedding": total - embedding - lm_head,
        }

    def to_dict(self) -> dict:
        """Plain data for JSON output."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["aliases"], out["sources"] = list(self.aliases), list(self.sources)
        out["params"] = self.param_counts()
        return out


_ARCH_INT = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "context")


def _spec_from_entry(entry: dict, where: str) -> ModelSpec:
    try:
        arch = dict(entry["architecture"])
        spec = ModelSpec(
            id=entry["id"],
            name=entry["name"],
            hf_repo=entry.get("hf_repo", ""),
            aliases=tuple(entry.get("aliases", ())),
            license=entry["license"],
            chat_template=entry["chat_template"],
            formats=entry["formats"],
            ecosystem=entry.get("ecosystem", {}),
            published_params=entry.get("published_params", {}),
            sources=tuple(entry["sources"]),
            **{k: arch[k] for k in _ARCH_INT},
            tied_embeddings=bool(arch["tied_embeddings"]),
            model_type=arch.get("model_type", ""),
            sliding_window=arch.get("sliding_window"),
            sliding_layers=arch.get("sliding_layers", 0),
            experts=arch.get("experts", 0),
            experts_per_token=arch.get("experts_per_token", 0),
            qk_norm=bool(arch.get("qk_norm", False)),
            norms_per_layer=arch.get("norms_per_layer", 2),
            attention_bias=bool(arch.get("attention_bias", False)),
        )
    except KeyError as e:
        raise KindredValueError(
            f"{where}: catalogue entry {entry.get('id', '?')!r} lacks key {e.args[0]!r}"
        ) from None
    _check_spec(spec, where)
    return spec


def _check_spec(spec: ModelSpec, where: str) -> None:
    for key in _ARCH_INT:
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise KindredValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    if spec.heads % spec.kv_heads:
        raise KindredValueError(
            f"{where}: num_attention_heads {spec.heads} is not a multiple of "
            f"num_key_value_heads {spec.kv_heads}"
        )
    if not 0 <= spec.sliding_layers <= spec.layers:
        raise KindredValueError(f"{where}: sliding layers {spec.sliding_layers} outside 0..{spec.layers}")
    if spec.is_moe and not 0 < spec.experts_per_token <= spec.experts:
        raise KindredValueError(
            f"{where}: experts per token {spec.experts_per_token} outside 1..{spec.experts}"
        )


class Catalogue:
    """Models by id; lookups accept ids, display names, hub repos and aliases, case-insensitively."""

    def __init__(self, specs: list[ModelSpec]):
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: ModelSpec) -> ModelSpec:
        self._specs[spec.id] = spec
        return spec

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def ids(self) -> list[str]:
        return list(self._specs)

    def _names(self) -> dict[str, str]:
        names = {}
        for spec in self._specs.values():
            for name in (spec.id, spec.name, spec.hf_repo, *spec.aliases):
                if name:
                    names[name.lower()] = spec.id
        return names

    def get(self, name: str) -> ModelSpec:
        names = self._names()
        key = name.strip().lower()
        if key in names:
            return self._specs[names[key]]
        close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.4)
        hint = ", ".join(dict.fromkeys(names[c] for c in close)) or ", ".join(self.ids())
        raise KindredValueError(
            f"unknown model {name!r}; closest known: {hint} (or pass the model's config.json to add it)"
        )

    def add_config(self, path: str | Path, model_id: str | None = None) -> ModelSpec:
        """Add the model described by a Hugging Face config.json and return its spec."""
        return self.add(spec_from_config(path, model_id))


def load_catalogue(path: str | Path = _DATA) -> Catalogue:
    """Read the catalogue data file (the packaged one by default)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise KindredValueError(f"{path}: cannot read catalogue ({e})") from None
    return Catalogue([_spec_from_entry(entry, str(path)) for entry in data["models"]])


def _get(cfg: dict, keys: tuple[str, ...], path: Path, default=None, required: bool = True):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if required and default is None:
        raise KindredValueError(f"{path}: config.json lacks key {keys[0]!r}")
    return default


def _int(cfg: dict, keys: tuple[str, ...], path: Path, default: int | None = None) -> int:
    value = _get(cfg, keys, path, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise KindredValueError(f"{path}: config key {keys[0]!r} must be an integer, got {value!r}")
    if value <= 0:
        raise KindredValueError(f"{path}: config key {keys[0]!r} must be positive, got {value}")
    return value


def spec_from_config(path: str | Path, model_id: str | None = None) -> ModelSpec:
    """A ModelSpec from a config.json (multimodal: its `text_config`), MoE and sliding window included."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KindredValueError(f"{path}: cannot read config.json ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise KindredValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise KindredValueError(f"{path}: config.json must hold a JSON object")
    cfg = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    model_type = str(cfg.get("model_type", raw.get("model_type", "")))
    hidden = _int(cfg, ("hidden_size", "n_embd", "d_model"), path)
    heads = _int(cfg, ("num_attention_heads", "n_head"), path)
    layers = _int(cfg, ("num_hidden_layers", "n_layer"), path)
    experts = _get(cfg, ("num_experts", "num_local_experts", "n_routed_experts"), path, 0, required=False)
    moe = isinstance(experts, int) and experts > 0
    ff_keys = ("moe_intermediate_size", "intermediate_size") if moe else ("intermediate_size", "n_inner")
    sliding_window, sliding_layers = _sliding(cfg, layers, path)
    spec = ModelSpec(
        id=model_id or str(raw.get("_name_or_path") or path.parent.name or "custom").split("/")[-1].lower(),
        name=str(raw.get("_name_or_path") or model_id or path.parent.name),
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=_int(cfg, ("num_key_value_heads",), path, heads),
        head_dim=_int(cfg, ("head_dim",), path, hidden // heads),
        intermediate=_int(cfg, ff_keys, path),
        vocab=_int(cfg, ("vocab_size",), path),
        context=_int(cfg, ("max_position_embeddings", "n_positions", "max_sequence_length"), path),
        tied_embeddings=bool(raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        model_type=model_type,
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        experts=experts if moe else 0,
        experts_per_token=_int(
            cfg, ("num_experts_per_tok", "experts_per_token", "num_experts_per_token"), path
        )
        if moe
        else 0,
        qk_norm=model_type in _QK_NORM_TYPES,
        norms_per_layer=4 if model_type in _FOUR_NORM_TYPES else 2,
        attention_bias=bool(cfg.get("attention_bias", False)),
        hf_repo=str(raw.get("_name_or_path", "")),
        license={"name": "unknown (read the model card)", "commercial_use": None, "terms": "", "url": ""},
        chat_template="",
        formats={"bf16": True, "gguf": [], "awq": "unknown", "notes": ""},
        sources=(str(path),),
    )
    _check_spec(spec, str(path))
    return spec


def _sliding(cfg: dict, layers: int, path: Path) -> tuple[int | None, int]:
    """(window, number of sliding-window layers) from layer_types / pattern / use_sliding_window."""
    window = cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return None, 0
    if not isinstance(window, int) or window <= 0:
        raise KindredValueError(
            f"{path}: config key 'sliding_window' must be a positive integer, got {window!r}"
        )
    types = cfg.get("layer_types")
    if isinstance(types, list):
        if len(types) != layers:
            raise KindredValueError(
                f"{path}: config key 'layer_types' has {len(types)} entries for {layers} layers"
            )
        count = sum(1 for t in types if "sliding" in str(t))
    elif isinstance(cfg.get("sliding_window_pattern"), int) and cfg["sliding_window_pattern"] > 0:
        count = (
            layers - layers // cfg["sliding_window_pattern"]
        )  # every pattern-th layer is global (Gemma 2/3)
    else:
        count = layers  # e.g. Mistral 7B v0.1: every layer slides
    if window >= _int(cfg, ("max_position_embeddings", "n_positions"), path, 1):
        return None, 0  # a window as long as the context never applies (Phi-4-mini's 262144)
    return (window, count) if count else (None, 0)


_DEFAULT: Catalogue | None = None


def default_catalogue() -> Catalogue:
    """The packaged catalogue, loaded once; `add_config` on it adds models for the session."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_catalogue()
    return _DEFAULT


def get_model(name: str) -> ModelSpec:
    """Look a model up in the packaged catalogue (closest names suggested when unknown)."""
    return default_catalogue().get(name)
