"""DecoderConfig: one description of every supported dense decoder family, read from a HF ``config.json``.

Supported ``model_type`` values: llama (Llama 3.x, SmolLM2), mistral (Mistral, Mistral NeMo), qwen3, phi3
(Phi-3, Phi-4, Phi-4-mini), gemma3_text (or gemma3, whose ``text_config`` is used), qwen3_vl (its
``text_config``: the text decoder is a Qwen3) and the mixtures of experts qwen3_moe (Qwen3-30B-A3B,
Qwen3-Coder-30B-A3B) and gpt_oss (gpt-oss-20b). Keys a config.json may
omit take the defaults of the family's transformers configuration class, so a config written by any
transformers version (``rope_theta``/``rope_scaling`` of v4 or ``rope_parameters`` of v5) reads the same.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..bounded import check_float, check_int, json_object
from ..errors import KindredFormatError, KindredValueError

FAMILIES = ("llama", "mistral", "qwen3", "phi3", "gemma3_text", "qwen3_moe", "gpt_oss", "qwen3_5_text")
MOE_FAMILIES = ("qwen3_moe", "gpt_oss")
# The seven projection linears every family exposes (Phi's fused ones are split on load).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The linears quantized on load: those seven and Qwen3.5's large linear-attention projections (its
# in_proj_a / in_proj_b, one row per value head, stay dense).
QUANTIZED_NAMES = (*LINEAR_NAMES, "in_proj_qkv", "in_proj_z", "out_proj")
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"
# Upper bounds of config.json numbers, far above any released model (Llama 3.1 405B: 126 layers, hidden
# 16384; Gemma 3: vocabulary 262144), checked before anything is built from them.
LIMITS = {
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "head_dim": 4096,
    "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 27,
    "sliding_window": 1 << 27,
}

# Defaults of each family's transformers config class for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "sliding_window": None,
    },
    "mistral": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
    },
    "qwen3": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "head_dim": 128},
    "qwen3_moe": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "router_aux_loss_coef": 0.001,
    },
    "gpt_oss": {
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_theta": 150000.0,
        "head_dim": 64,
        "sliding_window": 128,
        "attention_bias": True,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
        "router_aux_loss_coef": 0.001,
    },
    "qwen3_5_text": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "head_dim": 256,
        "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
    },
    "phi3": {
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "sliding_window": None,
    },
    "gemma3_text": {
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "hidden_activation": "gelu_pytorch_tanh",
    },
}
# transformers' GptOssConfig default when a config names no rope scaling
_GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind: θ, the scaling rule and the rotated fraction of a head."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, longrope, yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    attention_factor: float | None = None  # longrope, yarn: scales cos and sin
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    partial_rotary_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything the decoder needs; build with :meth:`from_hf` or :func:`load_config`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope: RopeConfig
    rope_local: RopeConfig  # sliding-window layers (Gemma 3's local base); equals `rope` elsewhere
    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before the rotation
    gemma_norm: bool = False  # Gemma: (1 + w) RMSNorm in float32, four norms per layer
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is its -1/2 power
    final_logit_softcapping: float | None = None
    fused_checkpoint: bool = False  # Phi-3/4 store qkv_proj and gate_up_proj fused
    multimodal: bool = False  # Gemma 3 with vision (model_type gemma3): the decoder is its language model
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (0 experts: dense). moe_layers[i]: layer i's MLP is a routed block of experts.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    norm_topk_prob: bool = False  # Qwen3 MoE: the k routing weights renormalized to sum to 1
    router_aux_loss_coef: float = 0.0
    # gpt-oss: router and expert biases, softmax over the k largest router logits, SwiGLU with clamped
    # inputs, (up + 1) and x·σ(alpha·x), gate and up interleaved in gate_up_proj; a learned sink per head.
    gpt_oss_moe: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_sinks: bool = False
    # Qwen3.5: (1 + w) norms without Gemma's sandwich, a sigmoid gate on the attention output (q_proj emits
    # it beside each head's query), and linear-attention layers (gated DeltaNet, linear_attention.py).
    sandwich_norms: bool = False  # Gemma: four norms per layer
    attn_output_gate: bool = False
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config") -> DecoderConfig:
        """Parse a transformers ``config.json`` dict; errors name ``source`` and the offending key."""
        return _parse(cfg, source)

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def load_config(config: dict[str, Any] | str | Path) -> DecoderConfig:
    """A DecoderConfig from a config dict, a config.json path or a model directory."""
    if isinstance(config, DecoderConfig):
        return config
    if isinstance(config, dict):
        return DecoderConfig.from_hf(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise KindredValueError(f"{path}: no config.json here")
    return DecoderConfig.from_hf(json_object(path, limit=1 << 20), str(path))


def _parse(cfg: dict[str, Any], source: str) -> DecoderConfig:
    if not isinstance(cfg, dict):
        raise KindredValueError(f"{source}: a config must be a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise KindredValueError(f"{source}: 'model_type' must be a string, got {model_type!r}")
    multimodal = model_type == "gemma3"
    if multimodal:  # the multimodal checkpoint: its language model is the text decoder
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise KindredValueError(f"{source}: model_type 'gemma3' needs a 'text_config' object")
        cfg = {**text, "model_type": "gemma3_text"}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            cfg.setdefault(k, None)
        model_type = "gemma3_text"
    if model_type == "qwen3_vl":  # Qwen3-VL: its text decoder is a Qwen3 (text-only M-RoPE is plain RoPE)
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise KindredValueError(f"{source}: model_type 'qwen3_vl' needs a 'text_config' object")
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        cfg = {**text, "model_type": "qwen3", "tie_word_embeddings": tie}
        model_type = "qwen3"
    if model_type == "qwen3_5":  # the multimodal checkpoint: its language model is the text decoder
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise KindredValueError(f"{source}: model_type 'qwen3_5' needs a 'text_config' object")
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        cfg = {**text, "model_type": "qwen3_5_text", "tie_word_embeddings": tie}
        model_type = "qwen3_5_text"
    if model_type not in FAMILIES:
        raise KindredValueError(
            f"{source}: model_type {model_type!r} is not supported; supported: {FAMILIES}"
        )
    c = {**_DEFAULTS[model_type], **cfg}

    def need(key: str) -> Any:
        if key not in c or c[key] is None:
            raise KindredValueError(f"{source}: missing required key '{key}' for model_type {model_type!r}")
        return c[key]

    def positive_int(key: str, value: Any = None) -> int:
        v = need(key) if value is None else value
        hi = LIMITS.get(key, 1 << 20)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= hi:
            raise KindredFormatError(
                f"{source}: '{key}' must be a positive integer ≤ {hi:,}, got {_short(v)}"
            )
        return v

    def flag(key: str, default: bool = False) -> bool:
        v = c.get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise KindredFormatError(f"{source}: '{key}' must be true or false, got {_short(v)}")
        return v

    hidden, heads = positive_int("hidden_size"), positive_int("num_attention_heads")
    kv_heads = positive_int("num_key_value_heads", c.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise KindredValueError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    if kv_heads > heads:
        raise KindredFormatError(
            f"{source}: num_key_value_heads ({kv_heads}) exceeds num_attention_heads ({heads})"
        )
    head_dim = positive_int("head_dim", c.get("head_dim") or max(hidden // heads, 1))
    layers = positive_int("num_hidden_layers")
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if not isinstance(act, str):
        raise KindredFormatError(f"{source}: 'hidden_act' must be a string, got {_short(act)}")
    act = {"swish": "silu", "gelu_tanh": "gelu_pytorch_tanh"}.get(act, act)
    if act not in ACTIVATIONS:
        raise KindredValueError(f"{source}: hidden_act {act!r} is not supported; supported: {ACTIVATIONS}")
    if c.get("attn_logit_softcapping") is not None:
        raise KindredValueError(
            f"{source}: attn_logit_softcapping={c['attn_logit_softcapping']} is not supported (Gemma 2); "
            "kindred's decoder covers Gemma 3, which has none"
        )
    if c.get("use_bidirectional_attention"):
        raise KindredValueError(
            f"{source}: use_bidirectional_attention is not supported (causal decoders only)"
        )
    gemma = model_type == "gemma3_text"
    max_pos = positive_int("max_position_embeddings", c.get("max_position_embeddings") or 131072)
    window, layer_types = _layer_types(c, model_type, layers, source)
    rope, rope_local = _ropes(c, model_type, source)
    if int(head_dim * rope.partial_rotary_factor) % 2:
        raise KindredValueError(f"{source}: partial_rotary_factor gives an odd number of rotary dimensions")
    softcap = _number(c, "final_logit_softcapping", source, 1e-3, 1e6, lo_open=False)
    vocab = positive_int("vocab_size")
    eps = check_float(need("rms_norm_eps"), f"{source}: 'rms_norm_eps'", 0.0, 1.0, lo_open=True)
    scalar = _number(c, "query_pre_attn_scalar", source, 1e-6, 1e9) if gemma else None
    if gemma and scalar is None:
        raise KindredValueError(f"{source}: missing required key 'query_pre_attn_scalar'")
    tokens = {k: _token_ids(c, k, vocab, source) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    moe = _moe(c, model_type, layers, positive_int, source)
    if model_type == "qwen3_5_text":
        moe = {
            "attn_output_gate": True,
            "linear_key_heads": positive_int("linear_num_key_heads"),
            "linear_value_heads": positive_int("linear_num_value_heads"),
            "linear_key_head_dim": positive_int("linear_key_head_dim"),
            "linear_value_head_dim": positive_int("linear_value_head_dim"),
            "linear_conv_kernel": positive_int("linear_conv_kernel_dim"),
        }
        if moe["linear_value_heads"] % moe["linear_key_heads"]:
            raise KindredValueError(
                f"{source}: linear_num_value_heads ({moe['linear_value_heads']}) must be a multiple of "
                f"linear_num_key_heads ({moe['linear_key_heads']})"
            )
    return DecoderConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=positive_int("intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        hidden_act=act,
        tie_word_embeddings=flag("tie_word_embeddings"),
        max_position_embeddings=max_pos,
        rope=rope,
        rope_local=rope_local,
        layer_types=layer_types,
        sliding_window=window,
        attention_bias=flag("attention_bias"),
        mlp_bias=flag("mlp_bias"),
        qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe", "qwen3_5_text"),
        gemma_norm=gemma or model_type == "qwen3_5_text",
        sandwich_norms=gemma,
        embed_scale=math.sqrt(hidden) if gemma else None,
        query_pre_attn_scalar=scalar,
        final_logit_softcapping=softcap,
        fused_checkpoint=model_type == "phi3",
        multimodal=multimodal,
        **tokens,
        **moe,
    )


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _number(c: dict, key: str, source: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    """The optional number ``c[key]`` (None when absent or null), finite and in range."""
    v = c.get(key)
    return None if v is None else check_float(v, f"{source}: '{key}'", lo, hi, lo_open=lo_open)


def _token_ids(c: dict, key: str, vocab: int, source: str) -> int | tuple[int, ...] | None:
    """A special token id (eos_token_id may be a list), each in [0, vocab_size) — or absent."""
    v = c.get(key)
    if v is None or (key == "pad_token_id" and v == -1):  # some configs write -1 for "no pad token"
        return None
    if key == "eos_token_id" and isinstance(v, list):
        if len(v) > 64:
            raise KindredFormatError(f"{source}: '{key}' lists {len(v)} ids; kindred reads at most 64")
        return tuple(check_int(t, f"{source}: '{key}'", 0, vocab - 1) for t in v)
    return check_int(v, f"{source}: '{key}'", 0, vocab - 1)


def _moe(c: dict, model_type: str, layers: int, positive_int, source: str) -> dict[str, Any]:
    """The routed-experts fields of a MoE family (Qwen3 MoE: every decoder_sparse_step-th layer not listed
    in mlp_only_layers), checked against each other."""
    if model_type not in MOE_FAMILIES:
        return {}
    # transformers v5 writes num_local_experts, the hub's configs num_experts
    named = "num_local_experts" if c.get("num_local_experts") is not None else "num_experts"
    experts, k = positive_int(named), positive_int("num_experts_per_tok")
    if k > experts:
        raise KindredValueError(
            f"{source}: num_experts_per_tok ({k}) must not exceed num_experts ({experts})"
        )
    step = positive_int("decoder_sparse_step")
    dense = c.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(not isinstance(i, int) or not 0 <= i < layers for i in dense):
        raise KindredValueError(
            f"{source}: mlp_only_layers must list layer indices in [0, {layers}), got {dense!r}"
        )
    fields = {
        "num_experts": experts,
        "experts_per_token": k,
        "moe_layers": tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)),
        "router_aux_loss_coef": float(c.get("router_aux_loss_coef") or 0.0),
    }
    if model_type == "gpt_oss":  # every layer routed; intermediate_size is the experts' width
        return {
            **fields,
            "moe_intermediate_size": positive_int("intermediate_size"),
            "gpt_oss_moe": True,
            "swiglu_alpha": float(c["swiglu_alpha"]),
            "swiglu_limit": float(c["swiglu_limit"]),
            "attention_sinks": True,
        }
    return {
        **fields,
        "moe_intermediate_size": positive_int("moe_intermediate_size"),
        "norm_topk_prob": bool(c.get("norm_topk_prob")),
    }


def _layer_types(c: dict, model_type: str, layers: int, source: str) -> tuple[int | None, tuple[str, ...]]:
    """The sliding window and each layer's attention kind, as the family's transformers model decides them."""
    window = c.get("sliding_window")
    if model_type in ("qwen3", "qwen3_moe") and not c.get("use_sliding_window", False):
        window = None
    types = c.get("layer_types")
    if types is None and model_type == "qwen3_moe":  # one mask for all layers: sliding when configured
        types = [SLIDING if window is not None else FULL] * layers
    if types is None and model_type == "gpt_oss":  # sliding and full attention alternate
        types = [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
    if types is None and model_type == "qwen3_5_text":  # three linear-attention layers, then a full one
        every = int(c.get("full_attention_interval") or 4)
        types = [LINEAR if (i + 1) % every else FULL for i in range(layers)]
    if types is None:
        if model_type == "gemma3_text":
            pattern = check_int(
                c.get("sliding_window_pattern") or 6, f"{source}: 'sliding_window_pattern'", 1, 1 << 20
            )
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        elif model_type == "qwen3":
            first = check_int(c.get("max_window_layers", 28), f"{source}: 'max_window_layers'", 0, 1 << 20)
            types = [SLIDING if window is not None and i >= first else FULL for i in range(layers)]
        else:  # Mistral and Phi-3 slide in every layer when a window is configured
            types = [SLIDING if window is not None else FULL] * layers
    kinds = (FULL, SLIDING, LINEAR) if model_type == "qwen3_5_text" else (FULL, SLIDING)
    if not isinstance(types, list | tuple) or len(types) != layers or any(t not in kinds for t in types):
        raise KindredFormatError(
            f"{source}: layer_types must list one of {kinds} for each of the {layers} layers, "
            f"got {_short(types)}"
        )
    types = tuple(types)
    limit = LIMITS["sliding_window"]
    if SLIDING in types and (
        isinstance(window, bool) or not isinstance(window, int) or not 0 < window <= limit
    ):
        raise KindredFormatError(
            f"{source}: sliding layers need a positive integer sliding_window ≤ {limit:,}, "
            f"got {_short(window)}"
        )
    return (window if SLIDING in types else None), types


def _ropes(c: dict, model_type: str, source: str) -> tuple[RopeConfig, RopeConfig]:
    params = c.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            raise KindredFormatError(f"{source}: '{key}' must be an object, got {_short(c[key])}")
    partial = check_float(
        c.get("partial_rotary_factor") or 1.0, f"{source}: 'partial_rotary_factor'", 0.0, 1.0, lo_open=True
    )
    if model_type == "gemma3_text":
        if isinstance(params, dict) and FULL in params:  # transformers v5: one entry per layer kind
            full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
            if not isinstance(full, dict) or not isinstance(local, dict):
                raise KindredFormatError(f"{source}: 'rope_parameters' entries must be objects")
            full, local = dict(full), dict(local)
        else:  # v4: rope_theta and rope_scaling for global layers, rope_local_base_freq for local ones
            full = {**(c.get("rope_scaling") or {}), "rope_theta": c["rope_theta"]}
            local = {"rope_type": "default", "rope_theta": c["rope_local_base_freq"]}
        full.setdefault("rope_theta", c["rope_theta"])
        local.setdefault("rope_theta", c["rope_local_base_freq"])
        return _rope(full, c, partial, source), _rope(local, c, partial, source)
    merged = {**(c.get("rope_scaling") or {}), **(params or {})}
    if model_type == "gpt_oss" and merged.get("rope_type", merged.get("type", "default")) == "default":
        merged = {**merged, **_GPT_OSS_ROPE}
    merged.setdefault("rope_theta", c["rope_theta"])
    rope = _rope(merged, c, partial, source)
    return rope, rope


def _rope(p: dict, c: dict, partial: float, source: str) -> RopeConfig:
    rope_type = p.get("rope_type", p.get("type", "default"))
    rope_type = {"su": "longrope"}.get(rope_type, rope_type) if isinstance(rope_type, str) else rope_type
    if rope_type not in ROPE_TYPES:
        raise KindredValueError(
            f"{source}: rope type {_short(rope_type)} is not supported; supported: {ROPE_TYPES}"
        )

    def num(key: str, default: float | None, hi: float = 1e12, lo_open: bool = True) -> float | None:
        v = p.get(key, default)
        return None if v is None else check_float(v, f"{source}: rope '{key}'", 0.0, hi, lo_open=lo_open)

    partial = num("partial_rotary_factor", partial, hi=1.0)
    original = c.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
    if rope_type in ("llama3", "longrope", "yarn") and original is None:
        original = c.get("max_position_embeddings")
    if original is not None:
        original = check_int(
            original, f"{source}: 'original_max_position_embeddings'", 1, LIMITS["max_position_embeddings"]
        )
    factor = num("factor", None, hi=1e6)
    if factor is None and rope_type in ("longrope", "yarn") and original:
        factor = (c.get("max_position_embeddings") or original) / original
    if rope_type in ("linear", "llama3", "yarn") and factor is None:
        raise KindredValueError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    if rope_type == "longrope" and not (p.get("short_factor") and p.get("long_factor")):
        raise KindredValueError(
            f"{source}: rope type 'longrope' needs 'short_factor' and 'long_factor' lists"
        )

    def factors(key: str) -> tuple[float, ...] | None:
        v = p.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) > 4096:
            raise KindredFormatError(f"{source}: rope '{key}' must be a list of numbers, got {_short(v)}")
        return tuple(check_float(x, f"{source}: rope '{key}' entry", 0.0, 1e12, lo_open=True) for x in v)

    truncate = p.get("truncate", True)
    if not isinstance(truncate, bool):
        raise KindredFormatError(f"{source}: rope 'truncate' must be true or false, got {_short(truncate)}")
    return RopeConfig(
        theta=num("rope_theta", None) or _missing_theta(source),
        rope_type=rope_type,
        factor=1.0 if factor is None else float(factor),
        low_freq_factor=num("low_freq_factor", 1.0),
        high_freq_factor=num("high_freq_factor", 4.0),
        original_max_position_embeddings=original,
        short_factor=factors("short_factor"),
        long_factor=factors("long_factor"),
        attention_factor=num("attention_factor", None),
        beta_fast=num("beta_fast", None) or 32.0,
        beta_slow=num("beta_slow", None) or 1.0,
        mscale=num("mscale", None, lo_open=False),
        mscale_all_dim=num("mscale_all_dim", None, lo_open=False),
        truncate=truncate,
        partial_rotary_factor=partial,
    )


def _missing_theta(source: str) -> float:
    raise KindredFormatError(f"{source}: the rope needs a 'rope_theta'")
