"""kindred.export: a fine-tuned model written for other tools (merged Hugging Face safetensors)."""

from .merged import save_merged

__all__ = ["save_merged"]
