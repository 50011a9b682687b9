"""The training forward through kindred's kernels on CUDA (RMSNorm, rotary and SwiGLU with their backward,
varlen flash attention) against torch's ops with FlexAttention, the path they replaced.

"Within bf16 noise" is measured, not assumed: a float32 run of torch's path is the reference, and the kernels'
bf16 result may differ from it by no more than torch's own bf16 result does (times a small slack for the
reductions' order)."""

from __future__ import annotations

import pytest
import torch

import kindred
from kindred import models
from kindred.demo import build_tiny_model
from kindred.models import decoder
from kindred.nn import apply_lora

from .helpers import tiny_run_config
from .model_helpers import saved_hf_model
from .test_models import _packed
from .tolerances import rel_err

pytestmark = pytest.mark.gpu
SLACK = 1.5


def lora_grads(path, dtype, backend: str, dropout: float = 0.0) -> dict[str, torch.Tensor]:
    """The loss and LoRA gradients by name of one recomputed step on packed documents."""
    model = models.from_pretrained(path, quant="nf4", dtype=dtype, device="cuda", attn_backend=backend)
    torch.manual_seed(0)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=dropout)  # r <= Qwen3.5's 4-wide in_proj_b
    with torch.no_grad():  # nonzero B: every LoRA path carries gradient back to the layer inputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    model.model.gradient_checkpointing = True
    _, packed, cu = _packed([70, 1, 130, 55], seed=1)
    torch.manual_seed(11)
    logits = model(packed.cuda(), cu_seqlens=cu.cuda())
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return {**grads, "loss": loss.detach()[None]}


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma3", "mistral_window", "phi4_mini", "qwen3_5"])
def test_lora_gradients_within_bf16_noise_of_torch_ops(tmp_path, name, monkeypatch):
    saved_hf_model(name, tmp_path)
    ours = lora_grads(tmp_path, torch.bfloat16, "varlen")
    monkeypatch.setattr(decoder, "on_kernels", lambda x: False)
    theirs, exact = lora_grads(tmp_path, torch.bfloat16, "flex"), lora_grads(tmp_path, torch.float32, "flex")
    assert ours.keys() == theirs.keys() == exact.keys() and len(ours) > 2
    for key in exact:
        err, noise = rel_err(ours[key], exact[key]), rel_err(theirs[key], exact[key])
        assert err <= SLACK * noise + 1e-6, (key, err, noise)


def test_40_step_loss_curve_within_bf16_noise_of_torch_ops(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path / "model", seed=1)

    def curve(name: str, dtype: str, backend: str) -> torch.Tensor:
        over = {"train.max_steps": 40, "dtype": dtype, "device": "cuda", "attn_backend": backend}
        cfg = tiny_run_config(
            model,
            tmp_path / name,
            {**over, "train.gradient_checkpointing": "full"},
            lora={"r": 8, "alpha": 16, "dropout": 0.1},
            train={"micro_batch_tokens": 512, "grad_accum": 2, "lr": 2e-2, "warmup_steps": 1},
            output={"progress": False, "plot": False},
        )
        return torch.tensor([r["loss"] for r in kindred.train(cfg).metrics])

    ours = curve("kernels", "bf16", "varlen")
    monkeypatch.setattr(decoder, "on_kernels", lambda x: False)
    theirs, exact = curve("torch", "bf16", "flex"), curve("fp32", "fp32", "flex")
    assert len(ours) == 40 and ours[-1] < ours[0] - 0.3
    noise = (theirs - exact).abs().max()
    assert (ours - exact).abs().max() <= SLACK * noise, (ours, theirs, exact)
