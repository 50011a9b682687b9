"""Offloaded activation checkpoints (kindred/models/offload.py) on the CPU, where the host copy is a plain
copy through the same hooks: the same loss and gradients as full recomputation and as none, bit for bit,
LoRA dropout replayed, the layer inputs gone from the device until the backward and the host copies freed
after it. The CUDA side (streams, pinned memory, the peak it saves) is in test_offload_gpu.py."""

from __future__ import annotations

import weakref

import pytest
import torch

from kindred import models
from kindred.errors import KindredValueError
from kindred.nn import apply_lora

from .model_helpers import FAMILY_CONFIGS, MOE_CONFIGS, VOCAB, random_ids

POLICIES = ("none", "full", "offload")


def lora_model(name: str, dropout: float = 0.0, seed: int = 2):
    cfg = {**{**FAMILY_CONFIGS, **MOE_CONFIGS}[name], "vocab_size": VOCAB}
    model = models.from_config(cfg, quant="nf4", dtype=torch.float32, seed=seed)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=dropout)
    with torch.no_grad():  # B starts at zero: nonzero B so every LoRA path carries gradient to the input
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    model.model.embed_tokens.weight.requires_grad_(True)  # its gradient is the first layer's input's
    return model.train()


def set_policy(model, policy: str) -> None:
    model.model.gradient_checkpointing = policy != "none"
    if policy != "none":
        model.model.checkpoint_policy = policy


def step(model, policy: str, ids, rng_seed: int = 7, **kw):
    """(loss, {name: grad}) of one forward + backward under ``policy`` from the same RNG state."""
    set_policy(model, policy)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)
    loss = model(ids, **kw).logsumexp(-1).mean()
    if hasattr(model.model.layers[0].mlp, "stats"):
        loss = loss + 0.01 * model.router_aux_loss()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "qwen3_moe"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offload_gives_the_same_loss_and_gradients(name, dropout):
    model = lora_model(name, dropout)
    ids = random_ids((2, 19), seed=3)
    got = {p: step(model, p, ids) for p in POLICIES}
    loss, grads = got["full"]
    assert "model.embed_tokens.weight" in grads and any("lora_A" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora" in n), "a LoRA tensor got no gradient"
    for policy in ("none", "offload"):
        other_loss, other = got[policy]
        assert torch.equal(other_loss, loss), policy
        assert other.keys() == grads.keys(), policy
        for n in grads:
            assert torch.equal(other[n], grads[n]), (policy, n)
    if dropout:  # another RNG state draws other masks: the equality above is the state replayed
        redrawn = step(model, "offload", ids, rng_seed=8)[1]["model.embed_tokens.weight"]
        assert not torch.equal(redrawn, grads["model.embed_tokens.weight"])


def test_packed_rows_equal_full():
    model = lora_model("gemma3")
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    ids = random_ids((1, 23), seed=5)
    full, offload = (step(model, p, ids, cu_seqlens=cu) for p in ("full", "offload"))
    assert torch.equal(full[0], offload[0])
    assert all(torch.equal(full[1][n], offload[1][n]) for n in full[1])


def test_layer_inputs_leave_the_device_and_host_copies_are_freed():
    model = lora_model("qwen3")
    layers = model.model.layers
    inputs: list[weakref.ref] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(weakref.ref(a[0]))) for m in layers]
    ids = random_ids((2, 17), seed=1)
    counter = model.model.offloaded
    try:
        for policy in ("full", "offload"):
            inputs.clear()
            set_policy(model, policy)
            counter.reset_peak()
            loss = model(ids).logsumexp(-1).mean()
            alive = [r() is not None for r in inputs]
            # full keeps each layer's input for the recompute; offload keeps only its host copy
            assert alive == [policy == "full"] * len(layers), policy
            held = len(layers) * 2 * 17 * 64 * 4 if policy == "offload" else 0  # [2, 17, 64] fp32 each
            assert counter.current == counter.peak == held, policy
            loss.backward()
            assert counter.current == 0 and counter.peak == held, policy
    finally:
        for h in hooks:
            h.remove()


def test_a_retained_graph_backs_up_twice_and_a_dropped_one_frees_its_copies():
    model = lora_model("qwen3")
    ids = random_ids((2, 11), seed=4)
    set_policy(model, "offload")
    counter = model.model.offloaded
    loss = model(ids).logsumexp(-1).mean()
    loss.backward(retain_graph=True)  # the host copies stay for a second backward
    assert counter.current > 0
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert counter.current == 0
    assert all(torch.equal(first[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)
    model(ids).sum()  # a graph dropped without a backward frees its host copies too
    assert counter.current == 0


def test_no_offload_without_gradients_and_bad_policy():
    model = lora_model("qwen3")
    set_policy(model, "offload")
    with torch.no_grad():
        model(random_ids((1, 5)))
    model.eval()
    model(random_ids((1, 5))).sum().backward()  # eval mode: no checkpoints at all
    assert model.model.offloaded.peak == 0
    with pytest.raises(KindredValueError, match="checkpoint_policy must be one of full, offload, got 'cpu'"):
        model.model.checkpoint_policy = "cpu"
    assert model.model.checkpoint_policy == "offload"
