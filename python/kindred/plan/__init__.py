"""Planning: which model fits a GPU, in how much memory and time, ranked by the user's weights.

From Python::

    from kindred import plan
    qwen = plan.get_model("qwen3-8b")
    plan.training_memory(qwen, "qlora", seq=2048, batch=4).to_dict()
    records = plan.plan(list(plan.default_catalogue()), plan.get_gpu("rtx-4090"), plan.PlanSettings(seq=4096),
                        plan.default_catalogue().get)
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
    lora_params,
    training_memory,
    weight_bytes,
)
from .report import plot_breakdown, to_dataframe, to_records
from .score import CRITERIA, PlanSettings, plan
from .timing import decode_tokens_per_s, train_flops_per_token, train_tokens_per_s, training_efficiency

__all__ = [
    "CRITERIA",
    "FORMATS",
    "GPU",
    "GPUS",
    "METHODS",
    "Breakdown",
    "Catalogue",
    "ModelSpec",
    "PlanSettings",
    "bits_per_weight",
    "custom_gpu",
    "decode_tokens_per_s",
    "default_catalogue",
    "get_gpu",
    "get_model",
    "inference_memory",
    "kv_cache_bytes",
    "load_catalogue",
    "logits_bytes",
    "lora_params",
    "plan",
    "plot_breakdown",
    "spec_from_config",
    "to_dataframe",
    "to_records",
    "train_flops_per_token",
    "train_tokens_per_s",
    "training_efficiency",
    "training_memory",
    "weight_bytes",
]
