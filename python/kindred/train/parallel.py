"""Training on several processes through torch.distributed: the process group, DDP, FSDP2.

``train.distributed: ddp`` (default) wraps the model in DistributedDataParallel: the frozen base (4-bit or
not) is replicated and DDP all-reduces the gradients of the LoRA A/B only, overlapped with the backward,
once per optimizer step (the trainer runs the other micro-steps under ``no_sync``). Gradients are summed,
not averaged, because every rank's loss is already divided by the global trainable-token count.

``train.distributed: fsdp`` shards the frozen base with FSDP2 (``fully_shard`` per decoder layer, then the
root: embeddings, final norm, lm_head): each rank holds 1/world of it and all-gathers one layer at a time.
A 4-bit base is sharded too: its quantized tensors (codes, absmax, scales …) become non-trainable
parameters, which FSDP all-gathers like any other (as bytes when a layer mixes dtypes); scalars stay
replicated buffers. The LoRA A/B are left out of FSDP (``ignored_params``): they are replicated, their
fp32 master copies and AdamW state too (not sharded: for Gemma 3 27B at r = 16 that is 113 M parameters,
≈ 1.8 GB with grads and moments, next to ≈ 15 GB of NF4 base), their gradients are summed
with one all-reduce per optimizer step, and checkpoints are the same files as in one process, so a run
resumes on any number of ranks with either engine.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import KindredValueError
from ..nn.linear4bit import Linear4bit
from ..nn.lora import lora_modules


def init_from_env() -> bool:
    """Join the process group that torchrun's environment describes (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT) unless one is initialized already. With a GPU per local rank each rank binds
    cuda:LOCAL_RANK and CUDA tensors travel through NCCL, CPU tensors through gloo (a CPU run on a GPU host
    works too); without, gloo only. True when this call created the group (the caller destroys it)."""
    if "WORLD_SIZE" not in os.environ or not dist.is_available() or dist.is_initialized():
        return False
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return True


# torch 2.11's FSDP2 makes each sharded tensor a Parameter that requires grad before it copies the flag, which
# an integer tensor (the frozen 4-bit codes) cannot; 2.13 runs it (the CI suite), 2.12 is not tested.
FSDP_4BIT_TORCH = "2.12"


def check_engine(mode: str | None, quant: str) -> None:
    """Refuse, before the model loads, a sharding this torch cannot run over this base."""
    if mode == "fsdp" and quant != "none" and torch.__version__ < FSDP_4BIT_TORCH:
        raise KindredValueError(
            f"train.distributed: fsdp over a 4-bit base (quant: {quant}) needs torch >= {FSDP_4BIT_TORCH}; "
            f"this is torch {torch.__version__}, whose FSDP2 cannot shard the integer 4-bit codes: use ddp, "
            "quant: none, or a newer torch"
        )


def parallelize(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The module the trainer calls: ``model`` wrapped in DDP (``mode`` "ddp") or sharded in place with
    FSDP2 ("fsdp"). LoRA adapters must already be applied."""
    if mode == "ddp":
        return _ddp(model, device)
    if mode == "fsdp":
        return _fsdp(model, device)
    raise KindredValueError(f"train.distributed must be ddp or fsdp, got {mode!r}")


def _sum_hook(group, bucket):
    """DDP communication hook: all-reduce a gradient bucket as a plain sum (DDP's default averages)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (the 4-bit codes, rotary tables) are equal on every rank and never change: no broadcast per
    # forward. Parameters, LoRA included, are broadcast from rank 0 once, here.
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def _fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # public since torch 2.6
        raise KindredValueError(
            f"train.distributed: fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); "
            f"this is torch {torch.__version__}: use ddp"
        ) from None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    lora = [p for p in model.parameters() if p.requires_grad]  # in the same order on every rank
    for module in model.modules():
        if isinstance(module, Linear4bit):
            _quantized_as_parameters(module)
    for m in lora_modules(model).values():
        if isinstance(m.base_layer, nn.Linear):
            # The CUDA [W | B] workspace rebinds weight.data to a view of a wider buffer; under FSDP the
            # weight's storage is FSDP's (freed and re-gathered around each use), so it is not used.
            m._dense_workspace = _no_workspace
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=set(lora))
    fully_shard(model, mesh=mesh, ignored_params=set(lora))
    with torch.no_grad():  # the adapters FSDP leaves alone start from rank 0's values, as under DDP
        for p in lora:
            dist.broadcast(p, src=0)
    return model


def _no_workspace(r: int) -> None:
    return None


def _quantized_as_parameters(layer: Linear4bit) -> None:
    """Re-register the layer's quantized tensors (buffers) as frozen parameters so FSDP shards them;
    Linear4bit reads them by attribute name, so its forward is unchanged. 0-d tensors stay buffers."""
    for name, t in list(layer.named_buffers(recurse=False)):
        if name.startswith("_q_") and t.dim() > 0:
            delattr(layer, name)
            layer.register_parameter(name, nn.Parameter(t, requires_grad=False))


def allreduce_grads(tensors: list[torch.Tensor]) -> None:
    """Sum the ``.grad`` of ``tensors`` over the ranks with one all-reduce of a flat buffer."""
    grads = [t.grad for t in tensors]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    sums = flat.split([g.numel() for g in grads])
    torch._foreach_copy_(grads, [s.view_as(g) for s, g in zip(sums, grads, strict=True)])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
