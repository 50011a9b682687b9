"""Relative-error bounds ‖out − ref‖ / ‖ref‖ against a float64 reference, by compute dtype."""

import torch

REL_ERR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# A whole bf16 decoder (CPU vs CUDA, different GEMM paths): every layer rounds its output in bf16 on both
# sides, so the logits' relative error grows with depth (8-layer test models: 1.5-1.7 % measured on H200).
MODEL_BF16_REL_ERR = 3e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖; the absolute error where the reference is exactly zero (all tokens ignored)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out64).any(), "NaN in output"
    diff, scale = float((out64 - ref64).norm()), float(ref64.norm())
    return diff / scale if scale > 0 else diff
