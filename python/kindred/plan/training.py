"""Peak GPU memory of one step of kindred's trainer (``kindred.train``), part by part as it allocates.

Read from the code the step runs: the trainer (kindred/train/trainer.py), the decoder
(kindred/models/decoder.py), the LoRA op (kindred/ops/lora.py, kindred/_ops_lora.py) and the fused loss
(kindred/ops/loss.py). The checks against measured steps are in benchmarks/results/plan_grid.md.

Persistent (allocated before the step, kept after it):
- the frozen linears as kindred stores them: NF4 codes, u8 absmax, nested fp32 absmax, dynamic map and offset
  per tensor, or INT4g codes, fp16 scales and u8 zeros (sized by kindred.ops.quantize_* on the meta device),
  or, for LoRA over a 16-bit base, each weight inside its [N, K + r] workspace (kindred.ops.lora_workspace);
- bf16 embeddings and lm_head (one tensor when tied) and the norm weights;
- LoRA A and B in bf16 (what the layers compute with), their fp32 masters and AdamW's two fp32 moments;
- one dequantization scratch, [N, K + r] bf16 of the largest adapted 4-bit linear, shared by every layer;
- MoE (kindred/models/moe.py): every expert's 4-bit weights resident (one tensor of E · out rows per
  projection), the router in fp32, and one bf16 workspace the size of the largest expert projection of a
  layer ([E · out, in]), shared by every layer, that each grouped GEMM dequantizes into.
Per token of the step (T = seq × batch; the trainer flattens a micro-batch into one packed row):
- what each decoder layer's ops save for the backward (``layer_activations`` lists them by name);
- a recomputation policy decides which of them stay from the forward to the backward (``POLICIES``);
- while a layer's backward runs, its saved tensors (recomputed or kept) and the gradients in flight.
The step's phases: mask (FlexAttention's dense [T, T] mask while the block mask is built), loss (end of the
forward: kept activations, the final norm's input, the hidden states and the dH the fused loss computes with
the loss, its chunk buffers), backward (first layer's backward, the largest working set), optimizer (fp32
gradients of the masters). The peak is the largest phase. Allocator slack (reserved − allocated) and the CUDA
context (device memory − reserved) are not tensors: they come from measurements (calibration.json), and are
left out, and said so, where none were made.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..errors import KindredValueError
from ..models.config import FAMILIES, LINEAR_NAMES
from .catalogue import ModelSpec
from .memory import GIB, METHODS, Breakdown, check_sequence, logits_bytes

# Catalogue tensor roles of the seven projections, in kindred's (transformers') module names.
ROLE = dict(
    zip(
        LINEAR_NAMES,
        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
        strict=True,
    )
)
QUANTS = ("nf4", "int4g")
# kindred's fused loss (the chunk plan in kindred/_ops_loss.py): blocks of at most 1024 trained rows, fp32
# logits chunks of at most 32 MiB, [rows, D] buffers (fp32 dH accumulator + gathered bf16 rows) of at most
# 24 MiB; per token while it runs: the targets rebuilt (int64) and as int32, the valid mask, the listed rows,
# per-row loss, lse and hit and their expansion to every token (44 B).
LOSS_BLOCK_ROWS = 1024
LOSS_LOGITS_BUDGET = 32 << 20
LOSS_ROWS_BUDGET = 24 << 20
LOSS_ROW_BYTES = 44
# Device tensors per token of a micro-batch: input_ids, position_ids, labels, targets (int64), document ids.
INPUT_BYTES_PER_TOKEN = 5 * 8
# Logits of an unfused loss (not kindred's trainer; transformers' default): bf16 logits + fp32 upcast + fp32
# gradient per (token, vocab) element.
LOGITS_BYTES_UNFUSED = 2 + 4 + 4
# FlexAttention's create_block_mask evaluates the mask over every (query, key) pair of a packed row: bool
# [T, T] tensors and, to sum blocks, an int64 copy of the padded mask (torch's profiler on the CPU: a peak of
# 10 bytes per pair, with and without a sliding window).
MASK_BYTES_PER_PAIR = 10
_BLOCK = 512  # the caching allocator rounds every allocation up to 512 bytes


# train.optimizer's choices (train/config.py stays free of torch and of this module; a test keeps them equal)
OPTIMIZERS = ("adamw", "adamw8bit")


def _rounded(nbytes: int) -> int:
    return -(-nbytes // _BLOCK) * _BLOCK


def loss_chunk_bytes(rows: int, d: int, v: int) -> int:
    """The fused loss's buffers for ``rows`` trained tokens of width ``d`` over a vocabulary of ``v``."""
    t = max(1, min(rows, LOSS_BLOCK_ROWS, max(128, LOSS_ROWS_BUDGET // (6 * d) // 128 * 128)))
    c = min(v, max(128, LOSS_LOGITS_BUDGET // (4 * t) // 128 * 128))
    return 4 * t * c + 6 * t * d + 28 * t  # logits chunk, dH accumulator + gathered rows, row state


@dataclass(frozen=True)
class Saved:
    """A tensor a layer's op saves for the backward: bytes per token, and the block it belongs to."""

    name: str
    bytes: int
    block: str  # "attn" or "mlp"


@dataclass(frozen=True)
class LayerActivations:
    """Per token of one decoder layer: its bf16 input, what its ops save, and its backward working sets."""

    input_bytes: int  # the layer's bf16 input (a checkpoint under recomputation)
    input_saved: bool  # the first norm saves that bf16 input itself (non-Gemma norms)
    saved: tuple[Saved, ...]  # forward order, the input excluded
    mlp_backward: int  # gradients in flight at the MLP's largest backward node, minus what is freed by then
    attn_backward: int  # the same at the attention's backward
    recompute_tail: int  # gradient of the layer output + the last recomputed output

    @property
    def total(self) -> int:
        return sum(s.bytes for s in self.saved)

    def block_total(self, block: str) -> int:
        return sum(s.bytes for s in self.saved if s.block == block)

    def names(self) -> list[str]:
        return [s.name for s in self.saved]

    @property
    def working(self) -> int:
        """Bytes per token while the layer's backward runs, beyond its input: the largest of its phases."""
        return max(
            self.total + self.mlp_backward,
            self.block_total("attn") + self.attn_backward,
            self.total + self.recompute_tail,
        )


@dataclass(frozen=True)
class Policy:
    """A recomputation policy: which saved tensors stay on the GPU from the forward to the backward.

    ``keep`` None: nothing is recomputed, every saved tensor stays (policy "none"). Otherwise each layer's
    input stays as a checkpoint (in host memory when ``offload_input``) plus the saved tensors named in
    ``keep``; the rest is recomputed in the backward, which runs ``recompute_share`` of the layer's forward
    FLOPs again. New policies (selective, offloaded) are added with ``register_policy``.
    """

    name: str
    description: str
    keep: frozenset[str] | None
    recompute_share: float
    offload_input: bool = False

    def kept(self, acts: LayerActivations) -> int:
        """Bytes per token one layer keeps on the GPU between its forward and its backward."""
        if self.keep is None:
            return acts.total + (acts.input_bytes if acts.input_saved else 0)
        unknown = self.keep - set(acts.names())
        if unknown:
            raise KindredValueError(
                f"policy {self.name!r} keeps {sorted(unknown)}, which this layer does not save; "
                f"it saves {acts.names()}"
            )
        stays = sum(s.bytes for s in acts.saved if s.name in self.keep)
        return stays + (0 if self.offload_input else acts.input_bytes)

    def host(self, acts: LayerActivations) -> int:
        """Bytes per token one layer keeps in host memory (offloaded checkpoints)."""
        return acts.input_bytes if self.keep is not None and self.offload_input else 0

    def live_in_backward(self, acts: LayerActivations) -> int:
        """Bytes per token of the layer whose backward runs: its input (when present) + working set, and
        with ``offload_input`` the layer before's input, brought back meanwhile (kindred prefetches one)."""
        present = self.keep is not None or acts.input_saved
        prefetched = acts.input_bytes if self.keep is not None and self.offload_input else 0
        return (acts.input_bytes if present else 0) + prefetched + acts.working


POLICIES: dict[str, Policy] = {}


def register_policy(policy: Policy) -> Policy:
    """Make ``policy`` known to the estimators (and to ``kindred plan --policy``) under its name."""
    POLICIES[policy.name] = policy
    return policy


register_policy(
    Policy("full", "each layer's input is kept; the layer is recomputed in the backward", frozenset(), 1.0)
)
register_policy(
    Policy(
        "offload",
        "each layer's input is kept in host memory; the layer is recomputed in the backward",
        frozenset(),
        1.0,
        offload_input=True,
    )
)
register_policy(Policy("none", "every saved tensor is kept from the forward to the backward", None, 0.0))


def get_policy(name: str | Policy) -> Policy:
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise KindredValueError(f"unknown recomputation policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]


def supported(spec: ModelSpec) -> bool:
    """Whether kindred's decoder (kindred.models.FAMILIES) can load and train this model type."""
    return spec.model_type in FAMILIES


def _targets(spec: ModelSpec, method: str, targets) -> set[str]:
    """The adapted (LoRA) or trained (full) projections; MoE experts are frozen (the catalogue's rule)."""
    names = set(LINEAR_NAMES if targets is None else targets)
    unknown = names - set(LINEAR_NAMES)
    if unknown:
        raise KindredValueError(f"unknown LoRA targets {sorted(unknown)}; known: {', '.join(LINEAR_NAMES)}")
    if method == "full":
        names = set(LINEAR_NAMES)
    if spec.is_moe:
        names -= {"gate_proj", "up_proj", "down_proj"}
    return names


@functools.cache
def _workspace_width(k: int, r: int) -> int:
    """Row width of kindred's LoRA workspace [N, K + r] (kindred.ops.lora_workspace on the meta device)."""
    import torch

    from ..ops import lora_workspace

    return lora_workspace(torch.empty(r, k, dtype=torch.bfloat16, device="meta"), r).shape[1]


@functools.cache
def quantized_bytes(quant: str, n: int, k: int) -> int:
    """Device bytes of one [N, K] weight quantized by kindred (each tensor rounded up to 512 B)."""
    import torch

    from ..ops import INT4G_DEFAULT_GROUP, NF4_DEFAULT_BLOCKSIZE, quantize_int4g, quantize_nf4

    if quant not in QUANTS:
        raise KindredValueError(f"unknown quantization {quant!r}; known: {', '.join(QUANTS)}")
    # the quantizers' own shape rules (checked by their CPU and CUDA paths, not on the meta device)
    if quant == "nf4" and (n * k) % NF4_DEFAULT_BLOCKSIZE:
        raise KindredValueError(
            f"a [{n}, {k}] weight cannot be quantized to nf4: its size is not a multiple of the block "
            f"{NF4_DEFAULT_BLOCKSIZE}"
        )
    if quant == "int4g" and k % INT4G_DEFAULT_GROUP:
        raise KindredValueError(
            f"a [{n}, {k}] weight cannot be quantized to int4g: in_features is not a multiple of the group "
            f"{INT4G_DEFAULT_GROUP}"
        )
    w = torch.empty(n, k, dtype=torch.bfloat16, device="meta")
    q = quantize_nf4(w) if quant == "nf4" else quantize_int4g(w)
    return sum(_rounded(t.numel() * t.element_size()) for t in q.tensors().values())


def layer_activations(
    spec: ModelSpec, method: str = "qlora", rank: int = 16, targets=None
) -> LayerActivations:
    """What one decoder layer of kindred's model saves for the backward, per token (bytes).

    Saved, in forward order (bf16 = 2 B, fp32 = 4 B): the first norm's rstd (and, Gemma, the fp32 copy of
    its input: Gemma's (1 + w) norms run in fp32); its output when q/k/v read it through LoRA (a LoRA linear
    saves its input x and xs = s·x·Aᵀ, [T, r]); q and k before the per-head q/k norms (Qwen3, Gemma 3; fp32
    copies for Gemma); the rotated q and k and v (FlexAttention's inputs), its output (o_proj's input is a
    view of it: FlexAttention lays the output out like q) and fp32 logsumexp per head; the residual h + attn
    (the second norm's input; Gemma: fp32 copies of the attention output and of the residual); the second
    norm's output; the MLP's gate output (activation input), activation output and up output (the product's
    operands) and the product (down_proj's input); Gemma: fp32 copy of the MLP output. MoE (kindred's
    routed block, kindred/models/moe.py): the router's fp32 probabilities, the int64 token and order indices
    of each routed row, the gated MLP's rows per selected expert and the experts' output rows (the operand
    of the routing-weight product); the grouped GEMMs save no input (experts frozen), the product is not
    saved.

    Backward working sets: at the MLP's product node the layer output's gradient (2h), down_proj's dX
    buffer ([T, ff + r], the LoRA backward writes dX and s·dY·B in one GEMM), and the product's two input
    gradients are alive while the product (and, Gemma, the fp32 MLP output) are freed; at the attention's
    backward the residual gradient, o_proj's dX, a contiguous copy of dout and dq, dk, dv.
    """
    if method not in METHODS:
        raise KindredValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    h, q, kv, ff = spec.hidden, spec.q_dim, spec.kv_dim, spec.intermediate
    gemma = spec.norms_per_layer == 4
    trained = _targets(spec, method, targets)
    r = 0 if method == "full" else rank
    xs = 2 * r  # a LoRA linear's saved s·x·Aᵀ
    norm_copy = 4 if gemma else 2  # a norm saves its input: Gemma's fp32 copy, or the bf16 tensor itself
    s: list[Saved] = []

    def add(name, nbytes, block):
        s.append(Saved(name, nbytes, block))

    if gemma:
        add("attn_norm.input_fp32", 4 * h, "attn")
    add("attn_norm.rstd", 4, "attn")
    if trained & {"q_proj", "k_proj", "v_proj"}:
        add("attn_norm.out", 2 * h, "attn")
    for t in ("q_proj", "k_proj", "v_proj"):
        if t in trained and r:
            add(f"{t}.xs", xs, "attn")
    if spec.qk_norm:
        add("q_norm.input", norm_copy * q, "attn")
        add("q_norm.rstd", 4 * spec.heads, "attn")
        add("k_norm.input", norm_copy * kv, "attn")
        add("k_norm.rstd", 4 * spec.kv_heads, "attn")
    add("attn.q", 2 * q, "attn")
    add("attn.k", 2 * kv, "attn")
    add("attn.v", 2 * kv, "attn")
    add("attn.out", 2 * q, "attn")
    add("attn.lse", 4 * spec.heads, "attn")
    if "o_proj" in trained and r:
        add("o_proj.xs", xs, "attn")
    if gemma:
        add("post_attn_norm.input_fp32", 4 * h, "mlp")
        add("post_attn_norm.rstd", 4, "mlp")
        add("ffn_norm.input_fp32", 4 * h, "mlp")
    else:
        add("ffn_norm.input", 2 * h, "mlp")
    add("ffn_norm.rstd", 4, "mlp")
    k_routed = spec.experts_per_token if spec.is_moe else 1
    if trained & {"gate_proj", "up_proj"}:
        add("ffn_norm.out", 2 * h, "mlp")
    for t in ("gate_proj", "up_proj"):
        if t in trained and r:
            add(f"{t}.xs", xs, "mlp")
    if spec.is_moe:
        add("router.probs_fp32", 4 * spec.experts, "mlp")
        add("experts.indices", 2 * 8 * k_routed, "mlp")
        add("experts.output", 2 * h * k_routed, "mlp")
    add("mlp.gate", 2 * ff * k_routed, "mlp")
    add("mlp.act", 2 * ff * k_routed, "mlp")
    add("mlp.up", 2 * ff * k_routed, "mlp")
    product = "down_proj" in trained
    if product:
        add("mlp.product", 2 * ff, "mlp")
        if r:
            add("down_proj.xs", xs, "mlp")
    if gemma:
        add("post_ffn_norm.input_fp32", 4 * h, "mlp")
        add("post_ffn_norm.rstd", 4, "mlp")
    dx_down = 2 * (_workspace_width(ff, r) if product and r else ff) * k_routed
    freed = (2 * ff if product else 0) + (4 * h + 4 if gemma else 0)
    mlp_backward = 2 * h + dx_down + 2 * 2 * ff * k_routed - freed
    dx_o = 2 * (_workspace_width(q, r) if "o_proj" in trained and r else q)
    attn_backward = 2 * h + dx_o + 2 * q + (2 * q + 4 * kv) + 4 * spec.heads
    return LayerActivations(
        input_bytes=2 * h,
        input_saved=not gemma,
        saved=tuple(s),
        mlp_backward=mlp_backward,
        attn_backward=attn_backward,
        recompute_tail=4 * h,
    )


def lora_shapes(spec: ModelSpec, rank: int, targets=None) -> list[tuple[int, int]]:
    """(A numel, B numel) of every LoRA adapter of the model (all layers)."""
    out = []
    for lin in spec.layer_linears():
        name = next((n for n, role in ROLE.items() if role == lin.name), None)
        if name in _targets(spec, "qlora", targets) and not lin.expert:
            out += [(rank * lin.k_in, lin.n_out * rank)] * spec.layers
    return out


def _base_bytes(spec: ModelSpec, method: str, quant: str, rank: int, trained: set[str]) -> tuple[int, int]:
    """(device bytes of the frozen linears, bytes of the largest dequantization scratch)."""
    total, scratch = 0, 0
    for lin in spec.layer_linears():
        name = next((n for n, role in ROLE.items() if role == lin.name), None)
        if lin.name == "router":  # kindred routes in float32 (never quantized)
            total += spec.layers * _rounded(4 * lin.params)
            continue
        adapted = name in trained and method != "full"
        if method == "qlora" and lin.expert:  # all experts of a projection: one [E · out, in] tensor
            per = quantized_bytes(quant, lin.n_out * lin.copies, lin.k_in)
        elif method == "qlora":
            per = quantized_bytes(quant, lin.n_out, lin.k_in) * lin.copies
            if adapted:
                scratch = max(scratch, lin.n_out * _workspace_width(lin.k_in, rank) * 2)
        elif adapted:  # a dense weight lives in the first K columns of its LoRA workspace
            per = _rounded(2 * lin.n_out * _workspace_width(lin.k_in, rank)) * lin.copies
        else:
            per = _rounded(2 * lin.params)
        total += spec.layers * per
    return total, _rounded(scratch)


def trainer_memory(
    spec: ModelSpec,
    method: str = "qlora",
    seq: int = 2048,
    batch: int = 1,
    rank: int = 16,
    policy: str | Policy = "full",
    *,
    targets=None,
    quant: str = "nf4",
    grad_accum: int = 1,
    fused_loss: bool = True,
    measured: dict | None = None,
    optimizer: str = "adamw",
) -> Breakdown:
    """Peak memory of one optimizer step of kindred's trainer, by part (bytes); see the module docstring.

    ``measured``: the trainer's measured runtime memory (calibration.json's "memory", from the planning
    benchmark): "runtime_allocated_bytes" (torch's own allocations, e.g. cuBLAS workspaces),
    "reserved_over_allocated" (the caching allocator's slack) and "context_bytes" (device memory outside
    torch's reserve: CUDA context, kernels). Without it those parts are absent and ``info`` says so.
    ``fused_loss=False`` adds an unfused loss's logits (not kindred's trainer,
    whose loss is always fused: for comparing with trainers that materialize them). ``optimizer``: the
    trainer's ``train.optimizer`` ("adamw8bit": the moments' codes and block scales, nn/adamw8bit.py).
    """
    if optimizer not in OPTIMIZERS:
        raise KindredValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if method not in METHODS:
        raise KindredValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    check_sequence(spec, seq)
    for name, value in (("batch", batch), ("rank", rank), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise KindredValueError(f"{name} must be a positive integer, got {value!r}")
    if method != "full" and rank > spec.hidden:
        raise KindredValueError(f"LoRA rank {rank} is larger than {spec.name}'s hidden size {spec.hidden}")
    pol = get_policy(policy)
    tokens = seq * batch
    trained = _targets(spec, method, targets)
    acts = layer_activations(spec, method, rank, targets)
    h, v, layers = spec.hidden, spec.vocab, spec.layers
    counts = spec.param_counts()
    parts: dict[str, int] = {}
    notes: dict[str, str] = {}
    weights, scratch = _base_bytes(spec, method, quant, rank, trained)
    parts["weights"] = weights
    notes["weights"] = {
        "qlora": f"{quant.upper()} codes and scales as kindred stores them",
        "lora": "bf16, adapted ones inside their [N, K + r] LoRA workspaces",
        "full": "bf16",
    }[method]
    embed = _rounded(2 * v * h) * (1 if spec.tied_embeddings else 2)
    per_layer = spec.norms_per_layer * _rounded(2 * h) + (
        2 * _rounded(2 * spec.head_dim) if spec.qk_norm else 0
    )
    if spec.attention_bias:
        per_layer += _rounded(2 * spec.q_dim) + 2 * _rounded(2 * spec.kv_dim) + _rounded(2 * h)
    small = layers * per_layer + _rounded(2 * h)  # one tensor per norm weight and bias, + the final norm
    parts["embeddings"] = embed + small
    notes["embeddings"] = "bf16 embedding" + (" (tied lm_head)" if spec.tied_embeddings else " + lm_head")
    notes["embeddings"] += " and norm weights"
    if method == "full":
        trainable = counts["total"]
        parts["gradients"] = 2 * trainable
        parts["optimizer"] = 12 * trainable
        notes["optimizer"] = "fp32 master + AdamW moments (kindred trains adapters only: an estimate)"
        step_grads = 0
    else:
        shapes = lora_shapes(spec, rank, targets)
        trainable = sum(a + b for a, b in shapes)
        per_tensor = [n for pair in shapes for n in pair]
        parts["lora"] = sum(_rounded(2 * n) for n in per_tensor)
        parts["lora_masters"] = sum(_rounded(4 * n) for n in per_tensor)
        notes["lora"] = f"{trainable / 1e6:.1f} M LoRA parameters r={rank} in bf16"
        notes["lora_masters"] = "fp32 master copies AdamW updates"
        step_grads = sum(_rounded(4 * n) for n in per_tensor)  # fp32 master gradients
        if optimizer == "adamw8bit":
            from ..nn.adamw8bit import state_nbytes

            parts["optimizer"] = sum(_rounded(b) for n in per_tensor for b in state_nbytes(n))
            notes["optimizer"] = "AdamW8bit: two moments' 8-bit codes and block scales per LoRA tensor"
            step_grads += 2 * _rounded(4 * max(per_tensor))  # one tensor's moments in fp32 while it steps
        else:
            parts["optimizer"] = sum(2 * _rounded(4 * n) + _BLOCK for n in per_tensor)
            notes["optimizer"] = "AdamW: two fp32 moments (+ a step tensor) per LoRA tensor"
    if scratch:
        parts["dequant_scratch"] = scratch
        notes["dequant_scratch"] = "the largest adapted linear dequantized, [N, K + r] bf16, shared"
    if spec.is_moe and method == "qlora":  # gate_up_proj [E · 2I, H] is the largest expert projection
        parts["experts_workspace"] = _rounded(2 * spec.experts * 2 * spec.intermediate * h)
        notes["experts_workspace"] = "one layer's largest expert projection dequantized, bf16, shared"
    persistent = sum(parts.values())
    lora_grads_bf16 = 2 * trainable if method != "full" else 0
    accumulated = lora_grads_bf16 if grad_accum > 1 else 0
    kept = pol.kept(acts)
    inputs = tokens * (INPUT_BYTES_PER_TOKEN + 4 * spec.head_dim * (2 if spec.sliding_window else 1))
    final_in = (4 if spec.norms_per_layer == 4 else 2) * h
    # the loss: the final norm's saved input, the hidden states and dH it keeps, its chunk buffers
    loss = tokens * (final_in + 4 * h + LOSS_ROW_BYTES) + loss_chunk_bytes(tokens, h, v)
    phases = {
        "mask": persistent + inputs + MASK_BYTES_PER_PAIR * tokens * tokens,
        "loss": persistent + accumulated + inputs + tokens * layers * kept + loss,
        "backward": persistent
        + max(accumulated, lora_grads_bf16 // layers)
        + inputs
        + tokens * ((layers - 1) * kept + pol.live_in_backward(acts)),
        "optimizer": persistent + step_grads + lora_grads_bf16 // layers,
    }
    peak = max(phases, key=phases.get)
    parts["inputs"] = inputs if peak != "optimizer" else 0
    notes["inputs"] = "token ids, positions, labels, targets, document ids, rotary tables"
    parts["checkpoints"] = tokens * layers * kept if peak in ("loss", "backward") else 0
    notes["checkpoints"] = f"policy {pol.name}: {kept:,} B per token and layer kept ({pol.description})"
    if peak == "backward":
        parts["checkpoints"] -= tokens * kept
        parts["layer_backward"] = tokens * pol.live_in_backward(acts)
        notes["layer_backward"] = "the layer in its backward: saved tensors + gradients in flight"
    if peak == "loss":
        parts["loss"] = loss
        notes["loss"] = "final norm input, hidden states, dH (computed with the loss), the loss's chunk"
    if peak == "mask":
        parts["attention_mask"] = phases["mask"] - persistent - inputs
        notes["attention_mask"] = "FlexAttention's dense [T, T] mask while its block mask is built"
    if peak == "optimizer":
        parts["gradients"] = phases["optimizer"] - persistent
        notes["gradients"] = "fp32 gradients of the masters during the AdamW step"
    elif method != "full":
        parts["lora_grads"] = (
            max(accumulated, lora_grads_bf16 // layers) if peak == "backward" else accumulated
        )
        notes["lora_grads"] = "bf16 LoRA gradients accumulated so far"
    if measured and measured.get("runtime_allocated_bytes"):
        parts["torch_runtime"] = round(measured["runtime_allocated_bytes"])
        notes["torch_runtime"] = "torch's own allocations (cuBLAS workspaces), measured"
    if not fused_loss:
        parts["logits"] = logits_bytes(tokens, v, LOGITS_BYTES_UNFUSED)
        notes["logits"] = (
            f"unfused loss (not kindred's): {tokens} tokens × {v} vocab × {LOGITS_BYTES_UNFUSED} B"
        )
    allocated = sum(parts.values())
    if measured and measured.get("reserved_over_allocated"):
        parts["allocator_slack"] = round(allocated * (measured["reserved_over_allocated"] - 1))
        notes["allocator_slack"] = "reserved − allocated by torch's caching allocator, measured"
    if measured and measured.get("context_bytes"):
        parts["cuda_context"] = round(measured["context_bytes"])
        notes["cuda_context"] = "device memory outside torch's reserve (CUDA context, kernels), measured"
    info = {
        "method": method,
        "seq": seq,
        "batch": batch,
        "rank": rank,
        "policy": pol.name,
        "trainable_params": trainable,
        "allocated_bytes": allocated,
        "allocated_gib": allocated / GIB,
        "peak_phase": peak,
        "phases_gib": {k: val / GIB for k, val in phases.items()},
        "host_offload_bytes": tokens * layers * pol.host(acts),
        "runtime_measured": bool(measured),
        "kindred_trains_it": supported(spec) and method != "full",
    }
    return Breakdown({k: val for k, val in parts.items() if val}, notes, info)


@dataclass
class HostMemory:
    """Host RAM a training run needs, by part (bytes)."""

    parts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict:
        return {
            "parts_gib": {k: v / GIB for k, v in self.parts.items()},
            "total_gib": self.total / GIB,
            "total_gb": self.total / 1e9,
            "notes": dict(self.notes),
        }


def training_host_memory(
    spec: ModelSpec,
    method: str = "qlora",
    seq: int = 2048,
    batch: int = 1,
    rank: int = 16,
    policy: str | Policy = "full",
    *,
    dataset_tokens: int | None = None,
    merged: bool = False,
) -> HostMemory:
    """Host RAM to load the model and train (the Python, torch and CUDA runtime's own memory not included).

    Loading streams the checkpoint one tensor at a time (kindred.models.from_pretrained): the largest tensor
    (the embedding) in bf16 is the peak. Training adds the packed dataset (input ids, labels, positions:
    3 × int32 per token, and the tokenizer's lists while preparing it, ~8 B more), a checkpoint's host copies
    (fp32 masters, AdamW moments, the bf16 adapter), offloaded layer inputs (policies that offload), and with
    ``output.merged`` the whole merged bf16 model on the host while it is written.
    """
    pol = get_policy(policy)
    out = HostMemory()
    out.parts["load"] = 2 * spec.vocab * spec.hidden
    out.notes["load"] = "largest checkpoint tensor (the embedding) in bf16, read one tensor at a time"
    if dataset_tokens:
        out.parts["dataset"] = 20 * dataset_tokens
        out.notes["dataset"] = "packed rows (3 × int32 per token) + tokenizer lists while preparing"
    trainable = sum(a + b for a, b in lora_shapes(spec, rank)) if method != "full" else 0
    out.parts["checkpoint"] = 14 * trainable
    out.notes["checkpoint"] = "fp32 masters + AdamW moments + bf16 adapter copied to the host to save"
    acts = layer_activations(spec, method, rank)
    offload = seq * batch * spec.layers * pol.host(acts)
    if offload:
        out.parts["offloaded_checkpoints"] = offload
        out.notes["offloaded_checkpoints"] = f"policy {pol.name}: layer inputs held in host memory"
    if merged:
        out.parts["merged_export"] = 2 * spec.param_counts()["total"]
        out.notes["merged_export"] = "output.merged: the merged bf16 model on the host while it is written"
    return out
