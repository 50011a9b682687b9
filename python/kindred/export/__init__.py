"""kindred.export: a fine-tuned model written for other tools (merged Hugging Face safetensors, AWQ W4A16
as compressed-tensors or AutoAWQ GEMM for vLLM), each checked by the quality gate, with a manifest.

    from kindred.export import merge_adapter, quantize_awq, save_w4a16
    merge_adapter("run/adapter", "base-folder", "merged")          # streamed onto the 16-bit base
    quantize_awq(model, calibration_ids); save_w4a16(model, hf_config, "awq", base="base-folder")

From the shell: ``kindred export merged|awq SOURCE --out DIR``.
"""

from ..lazy import lazy_exports

# Names load from their modules on first use (the CLI's parser imports no torch).
_EXPORTS = {
    "AWQSettings": "awq",
    "agreement": "quality",
    "merge_adapter": "merged",
    "quantize_awq": "awq",
    "round_to_nearest": "awq",
    "run_gate": "gate",
    "save_merged": "merged",
    "save_w4a16": "w4a16",
    "write_manifest": "gate",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
