"""kindred.export: a fine-tuned model written for other tools (merged Hugging Face safetensors, AWQ W4A16
as compressed-tensors or AutoAWQ GEMM for vLLM), each checked by the quality gate, with a manifest."""

from .merged import merge_adapter, save_merged

__all__ = ["merge_adapter", "save_merged"]
