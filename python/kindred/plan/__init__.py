"""Planning: which model fits a GPU, in how much memory, time and money, ranked by the user's weights.

From Python::

    from kindred import plan
    qwen = plan.get_model("qwen3-8b")
    plan.trainer_memory(qwen, "qlora", seq=2048, batch=4).to_dict()   # kindred's trainer, part by part
    plan.train_tokens_per_s(qwen, plan.get_gpu("h200"), "qlora", 2048, 4)
    records = plan.plan(list(plan.default_catalogue()), plan.get_gpu("rtx-4090"), plan.PlanSettings(seq=4096))
    plan.to_dataframe(records)   # a pandas DataFrame when pandas is installed, else plain records
"""

from .catalogue import Catalogue, ModelSpec, default_catalogue, get_model, load_catalogue, spec_from_config
from .gpus import GPU, GPUS, custom_gpu, get_gpu
from .memory import (
    FORMATS,
    METHODS,
    Breakdown,
    bits_per_weight,
    inference_memory,
    kv_cache_bytes,
    logits_bytes,
    weight_bytes,
)
from .money import Price, context_costs, load_prices
from .report import plot_breakdown, to_dataframe, to_records
from .score import CRITERIA, PlanSettings, plan
from .serving import gguf_memory, gguf_table, vllm_kv_cache
from .support import format_refusal, kindred_support, license_ok
from .timing import (
    decode_tokens_per_s,
    load_calibration,
    step_features,
    train_flops_per_token,
    train_tokens_per_s,
)
from .training import (
    POLICIES,
    Policy,
    layer_activations,
    register_policy,
    trainer_memory,
    training_host_memory,
)

__all__ = [
    "CRITERIA",
    "FORMATS",
    "GPU",
    "GPUS",
    "METHODS",
    "POLICIES",
    "Breakdown",
    "Catalogue",
    "ModelSpec",
    "PlanSettings",
    "Policy",
    "Price",
    "bits_per_weight",
    "context_costs",
    "custom_gpu",
    "decode_tokens_per_s",
    "default_catalogue",
    "format_refusal",
    "get_gpu",
    "get_model",
    "gguf_memory",
    "gguf_table",
    "inference_memory",
    "kindred_support",
    "kv_cache_bytes",
    "layer_activations",
    "license_ok",
    "load_calibration",
    "load_catalogue",
    "load_prices",
    "logits_bytes",
    "plan",
    "plot_breakdown",
    "register_policy",
    "spec_from_config",
    "step_features",
    "to_dataframe",
    "to_records",
    "train_flops_per_token",
    "train_tokens_per_s",
    "trainer_memory",
    "training_host_memory",
    "vllm_kv_cache",
    "weight_bytes",
]
