"""kindred.generate: batched generation from a DecoderLM (greedy or seeded sampling, per-row stopping).

from kindred.generate import SamplingConfig, generate
out = generate(model, [ids_a, ids_b], SamplingConfig(max_new_tokens=128, temperature=0.7, top_p=0.9),
               stop_token_ids=stop_token_ids(tokenizer, "qwen3"), tokenizer=tokenizer)
out[0].text, out[0].finish_reason, out[0].tokens_per_s
"""

from .config import FINISH_REASONS, Completion, SamplingConfig


def __getattr__(name: str):
    # The engine needs torch: imported on first use, so the CLI's parser stays torch-free.
    if name in ("generate", "stop_token_ids"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'kindred.generate' has no attribute {name!r}")


__all__ = ["FINISH_REASONS", "Completion", "SamplingConfig", "generate", "stop_token_ids"]
