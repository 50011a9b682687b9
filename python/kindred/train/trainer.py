"""The QLoRA trainer: ``kindred.train(config)`` / ``kindred train config.yaml``.

One optimizer step = ``grad_accum`` micro-steps of ``micro_batch_tokens`` tokens each (whole packed rows,
flattened into one sequence whose documents attend only within themselves). The frozen base runs in the
config's dtype; the LoRA A/B parameters the model computes with are copies of fp32 master weights, which
AdamW updates. The loss is kindred's fused linear cross-entropy on the final hidden states with the frozen
lm_head (no dW GEMM), summed over the step's trained tokens and divided by their number, counted on the
device (no host sync per micro-step). Rows whose next-token target is ignored are left out before the loss
(their indices come from the host-side packed labels). Losses are read back only every ``log_every`` steps.

Held-out loss: before training, every ``output.eval_every`` steps and at the end, each with a greedy sample
reply (heldout.py) in samples.jsonl and the log; the RNG streams are left as they were.

Data order: every epoch is a permutation of the packed rows drawn from ``seed + epoch``; the data cursor is
the number of rows consumed, so a resumed run continues with exactly the rows it would have seen.

Several ranks (torchrun, or an initialized process group): rank r takes rows[r::world] of every optimizer
step's rows, so the global batch is rows_per_micro × grad_accum × world; gradients are synchronized by DDP
or the base is sharded by FSDP2 (``train.distributed``, see parallel.py). Checkpoints hold the global
state and resume on any number of ranks that keeps the global batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import clean_temp, fault_point, write_folder, write_text
from ..data import get_template
from ..errors import KindredError, KindredFormatError, KindredValueError
from ..nn.adamw8bit import AdamW8bit, state_shapes
from ..nn.lora import apply_lora
from ..nn.peft import save_adapter
from ..ops.loss import linear_cross_entropy
from ..ops.tokens import IGNORE_INDEX, count_trainable
from .checkpoint import ADAPTER, latest_checkpoint, load_state, save_checkpoint, write_state
from .config import TrainConfig, load_config
from .heldout import sample_prompt, sample_reply
from .metrics import MetricsLog, plot_loss
from .parallel import allreduce_grads, barrier, check_engine, init_from_env, parallelize
from .progress import Progress
from .run_folder import (
    RunLock,
    check_fresh,
    check_same_data,
    config_differences,
    data_fingerprint,
)
from .setup import distributed, load_data, load_model, model_source, read_sources

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainResult:
    """What a run produced; ``eval_losses`` holds (step, held-out loss), step 0 being before training."""

    out_dir: Path
    step: int
    metrics: list[dict]
    eval_losses: list[tuple[int, float]]
    adapter_dir: Path
    merged_dir: Path | None
    loss_plot: Path | None
    model: torch.nn.Module
    tokenizer: object
    template: object
    config: TrainConfig


def train(
    config, *, resume: bool = False, overwrite: bool = False, overrides: dict | None = None
) -> TrainResult:
    """Fine-tune with LoRA adapters as ``config`` (a YAML path, dict or TrainConfig) says; see config.py.
    ``resume`` continues the run in output.dir from its latest checkpoint; ``overwrite`` replaces a run found
    there (without either, a folder holding another run is refused; see run_folder.py).
    Under torchrun (no process group yet) this joins the group for the run and leaves it at the end."""
    created = init_from_env()
    try:
        cfg = load_config(config, overrides)
        if not (resume or overwrite):  # refused before the model and data load (fit checks again)
            check_fresh(Path(cfg.output.dir), overwrite=False)
        return Trainer(cfg).fit(resume=resume, overwrite=overwrite)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _device(name: str, world: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KindredValueError(f"device is {name!r} but CUDA is not available; use device: auto or cpu")
    if dev.type == "cuda" and world > 1:  # one GPU per rank: the one the process group bound
        if "nccl" not in str(torch.distributed.get_backend()):
            raise KindredValueError(
                f"device is {name!r} on {world} ranks, but the process group has no NCCL backend (one GPU "
                f"per local rank is needed; this host has {torch.cuda.device_count()})"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


class Trainer:
    """Builds the model, data, adapters and optimizer from a config; :meth:`fit` trains."""

    def __init__(self, config, overrides: dict | None = None, *, model=None, tokenizer=None, rows=None):
        """``model`` (a DecoderLM on the config's device and dtype), ``tokenizer`` and ``rows`` (a
        kindred.data.PackedData) may be given instead of the config's model and data (benchmarks, notebooks);
        the config's ``model`` and ``data.path`` are then not needed."""
        injected = model is not None and rows is not None
        cfg = self.cfg = load_config(config, overrides, require_sources=not injected)
        self.rank, self.world = distributed()
        self.device = _device(cfg.device, self.world)
        self.dtype = _DTYPES[cfg.dtype]
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise KindredValueError("dtype: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.engine = cfg.train.distributed if self.world > 1 else None
        check_engine(self.engine, cfg.quant)
        if self.engine == "fsdp" and cfg.output.merged:
            raise KindredValueError(
                "output.merged needs the whole base on one rank; with train.distributed: fsdp merge the "
                "saved adapter in one process (kindred.export.save_merged)"
            )
        self.out = Path(cfg.output.dir)
        self.out.mkdir(parents=True, exist_ok=True)
        _seed_all(cfg.train.seed)
        self.prepared = self.eval_prepared = None
        if injected:
            self.model, self.tokenizer, self.hf_config = model, tokenizer, None
            self.base = None
            self.rows_data, self.eval_rows = rows, None
            self.template = get_template(cfg.data.template) if cfg.data.template else None
        else:
            sources = read_sources(cfg)  # data and template checked before the model loads
            self.model, self.tokenizer, self.hf_config = load_model(cfg, self.device, self.dtype, self.out)
            self.base = model_source(cfg.model).resolve()  # what the adapter names as its base
            self.prepared, self.eval_prepared, self.template = load_data(cfg, self.tokenizer, sources)
            self.rows_data = self.prepared.packed
            self.eval_rows = self.eval_prepared.packed if self.eval_prepared is not None else None
        # The sample reply's prompt (heldout.py): the first held-out conversation's last question.
        self._sample = sample_prompt(self.eval_prepared, self.model) if self.eval_prepared else None
        self.row = self.rows_data.max_tokens
        tr = cfg.train
        self.rows_per_micro = (tr.micro_batch_tokens or self.row) // self.row
        self.rows_per_step = self.rows_per_micro * tr.grad_accum * self.world
        n_rows = self.rows_data.rows
        self.total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * n_rows / self.rows_per_step))
        lo = cfg.lora
        self.adapted = apply_lora(self.model, lo.targets, lo.r, lo.alpha, lo.dropout, lo.rslora)
        self.model.model.gradient_checkpointing = tr.gradient_checkpointing != "none"
        if tr.gradient_checkpointing != "none":
            self.model.model.checkpoint_policy = tr.gradient_checkpointing
        # What the loss calls: the model itself, its DDP wrapper, or the model sharded in place by FSDP.
        self.net = parallelize(self.model, self.engine, self.device) if self.engine else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        adam = {"lr": tr.lr, "betas": tuple(tr.adam_betas), "eps": tr.adam_eps}
        adam["weight_decay"] = tr.weight_decay
        if tr.optimizer == "adamw8bit":
            self.optimizer = AdamW8bit(self.master, **adam)
        else:
            self.optimizer = torch.optim.AdamW(self.master, **adam, fused=self.device.type == "cuda")
        sched = (self.total_steps, tr.warmup_steps, tr.schedule, tr.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, *sched))
        self.step = 0
        self.cursor = 0  # packed rows consumed (all ranks together)
        self.eval_losses: list[tuple[int, float]] = []

    # ---- data --------------------------------------------------------------------------------------------
    def _rows(self, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start+count`` of the endless stream of per-epoch permutations."""
        n = self.rows_data.rows
        out = []
        while count > 0:
            epoch, offset = divmod(start, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch))
            take = min(count, n - offset)
            out.append(perm[offset : offset + take].numpy())
            start, count = start + take, count - take
        return np.concatenate(out)

    def _batch(self, packed, rows: np.ndarray) -> dict:
        """A micro-batch on the device: one flattened row, the trained positions and their targets."""
        b = packed.batch(rows)
        labels = b["labels"].reshape(-1)
        keep = torch.nonzero(labels[1:] != IGNORE_INDEX).reshape(-1)  # host tensors: no device sync
        pin = self.device.type == "cuda"

        def dev(t):
            return (t.pin_memory() if pin else t).to(self.device, non_blocking=True)

        return {
            "input_ids": dev(b["input_ids"].reshape(1, -1)),
            "position_ids": dev(b["position_ids"].reshape(1, -1)),
            "cu_seqlens": dev(b["cu_seqlens"]),
            "max_seqlen": int(b["cu_seqlens"].diff().max()),  # on the host: sizes varlen attention's grid
            "labels": dev(b["labels"]),
            "keep": keep,  # host indices: the loss drops the other rows before any FLOP, without a sync
            "targets": dev(labels[1:]),
            "tokens": _real(packed, rows),
            "trainable": int(keep.numel()),
        }

    # ---- loss --------------------------------------------------------------------------------------------
    def _loss_sum(self, batch: dict) -> torch.Tensor:
        ids, positions, cu_seqlens = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
        hidden = self.net(ids, positions, cu_seqlens, return_hidden=True, max_seqlen=batch["max_seqlen"])
        hidden = hidden[0, :-1]  # t predicts token t + 1
        cap = self.model.config.final_logit_softcapping
        weight = self.model.lm_head.weight
        return linear_cross_entropy(
            hidden, weight, batch["targets"], reduction="sum", softcap=cap, valid_rows=batch["keep"]
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per trained token on the held-out data (dropout off), or None without held-out data."""
        if self.eval_rows is None:
            return None
        packed = self.eval_rows
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for start in range(0, packed.rows, self.rows_per_micro):
            batch = self._batch(packed, np.arange(start, min(start + self.rows_per_micro, packed.rows)))
            if batch["trainable"]:
                total += self._loss_sum(batch).double()
                count += batch["trainable"]
        self.model.train(was_training)
        return float(total) / max(count, 1)

    def _evaluate(self, log: MetricsLog | None, progress: Progress) -> None:
        """The held-out loss at this step and (rank 0) a sample reply: recorded in eval_losses, the metrics
        and samples.jsonl, and printed. The RNG streams are restored afterwards, so training draws the same
        numbers (dropout masks) with evaluations as without."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loss = self.evaluate()
            reply = self._sample_reply() if self.rank == 0 else None
        self.model.train()
        self.eval_losses.append((self.step, loss))
        prompt = self._sample.text if reply is not None else None
        if log is not None:
            log.add_eval(self.step, loss, prompt, reply)
        line = f"step {self.step}: held-out loss {loss:.4f}"
        progress.note(line if reply is None else f"{line}  sample: {_clip(reply, 160)!r}")

    def _sample_reply(self) -> str | None:
        """The greedy reply to the first held-out conversation's last prompt (heldout.py); None when
        output.sample_tokens is 0, under FSDP (the sharded base generates only through all ranks), or
        when that conversation has no trained answer."""
        if not self.cfg.output.sample_tokens or self.engine == "fsdp" or self._sample is None:
            return None
        return sample_reply(self.model, self._sample, self.cfg.output.sample_tokens, self.tokenizer)

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _train_step(self) -> dict:
        if self.engine:  # dropout masks differ across ranks, and depend only on (seed, step, rank)
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * (self.step * self.world + self.rank + 1))
        rows = self._rows(self.cursor, self.rows_per_step)
        self.cursor += self.rows_per_step
        mine = rows[self.rank :: self.world]
        micro = [mine[i : i + self.rows_per_micro] for i in range(0, len(mine), self.rows_per_micro)]
        batches = [self._batch(self.rows_data, r) for r in micro]
        count = sum(count_trainable(b["labels"], b["cu_seqlens"]).total for b in batches).to(torch.float32)
        if self.world > 1:
            torch.distributed.all_reduce(count)
        denom = count.clamp(min=1.0)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, b in enumerate(batches):
            # Several ranks run every micro-step, even one without a trained token (its loss is an empty
            # sum): the collectives of DDP and FSDP pair up across ranks. DDP syncs on the last one only.
            if b["trainable"] or self.engine:
                sync = i == len(batches) - 1 or self.engine != "ddp"
                with contextlib.nullcontext() if sync else self.net.no_sync():
                    loss_sum = self._loss_sum(b)
                    (loss_sum / denom).backward()
                loss += loss_sum.detach().float()
        for p, m in zip(self.params, self.master, strict=True):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            p.grad = None
        if self.engine == "fsdp":  # the adapters are outside FSDP: sum their gradients here
            allreduce_grads(self.master)
        if self.world > 1:
            torch.distributed.all_reduce(loss)
        max_norm = self.cfg.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.master, max_norm if max_norm else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        fault_point("step")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)
        self.step += 1
        return {
            "step": self.step,
            "epoch": self.cursor / self.rows_data.rows,
            "loss": loss / denom,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": sum(b["tokens"] for b in batches),
            "trainable_tokens": sum(b["trainable"] for b in batches),
        }

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _write_checkpoint(self, folder: Path) -> None:
        self._save_adapter(folder / ADAPTER)
        name, keys, pos, has_gauss, cached = np.random.get_state()
        rng = {
            "python": random.getstate(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "step": self.step,
            "cursor": self.cursor,
            "rows_per_step": self.rows_per_step,
            "master": [m.detach().cpu() for m in self.master],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "eval_losses": [list(e) for e in self.eval_losses],
            "config": self.cfg.to_dict(),
            "fingerprint": {"data": self._data_fingerprint()},
        }
        write_state(folder, state)

    def _state_shapes(self, master: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """The optimizer's state tensors for one master, by key: a checkpoint's must match before loading."""
        if isinstance(self.optimizer, AdamW8bit):
            return state_shapes(master.numel())
        return {"step": (), "exp_avg": tuple(master.shape), "exp_avg_sq": tuple(master.shape)}

    def _data_fingerprint(self) -> dict:
        if getattr(self, "_fingerprint", None) is None:
            examples = len(self.prepared.chat) if self.prepared is not None else None
            self._fingerprint = data_fingerprint(self.rows_data, examples)
        return self._fingerprint

    def _save_adapter(self, folder: Path) -> None:
        base = str(self.base) if self.base is not None else self.cfg.model
        save_adapter(self.model, folder, base_model_name_or_path=base, tokenizer=self.tokenizer)

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint (all ranks hold the same LoRA state); the others wait for it."""
        path = None
        if self.rank == 0:
            path = save_checkpoint(
                self.out, self.step, self._write_checkpoint, self.cfg.output.keep_checkpoints
            )
        if self.world > 1:
            barrier()
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint folder ``path``: same config (but for RESUMABLE keys), same prepared
        data, same global batch; a malformed checkpoint is a KindredFormatError naming the file."""
        state = load_state(path)
        saved, now = state["config"], self.cfg.to_dict()
        if state["rows_per_step"] != self.rows_per_step:
            per_rank = self.rows_per_micro * self.world
            raise KindredValueError(
                f"{path}: the checkpoint took {state['rows_per_step']} rows per optimizer step, this run "
                f"{self.rows_per_step} (rows per micro-step × train.grad_accum × {self.world} ranks); "
                f"set train.grad_accum to {state['rows_per_step'] / per_rank:g} to resume"
            )
        saved_train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
        train_now = {**now["train"], "grad_accum": saved_train.get("grad_accum")}
        differ = config_differences(saved, {**now, "train": train_now})
        if differ:
            raise KindredValueError(f"{path}: cannot resume with a different config ({'; '.join(differ)})")
        data = state["fingerprint"].get("data")
        check_same_data(data if isinstance(data, dict) else {}, self._data_fingerprint(), path)
        where = path / "state.json"
        masters = state["master"]
        shapes = [tuple(m.shape) for m in self.master]
        if [tuple(m.shape) for m in masters] != shapes or any(m.dtype != torch.float32 for m in masters):
            raise KindredError(
                f"{path}: checkpoint has {len(masters)} LoRA tensors that do not match the model's "
                f"{len(self.master)} (fp32, shapes {shapes[:2]}...)"
            )
        try:
            for index, values in state["optimizer"]["state"].items():
                want = self._state_shapes(masters[index])
                for key, value in values.items():
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
                    if key not in want or (shape and shape != want[key]):
                        raise ValueError(f"optimizer state {index}.{key} has shape {shape}")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            step, cursor = state["step"], state["cursor"]
            evals = [(int(s), None if v is None else float(v)) for s, v in state["eval_losses"]]
            rng = state["rng"]
            version, internal, gauss = rng["python"]
            py_state = (int(version), tuple(int(v) for v in internal), gauss)
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np_state = (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(rng["cuda"])
        except _BAD_STATE as e:
            raise KindredFormatError(f"{where}: not a usable checkpoint state ({str(e)[:160]})") from None
        with torch.no_grad():
            for m, value in zip(self.master, masters, strict=True):
                m.copy_(value)
            torch._foreach_copy_(self.params, self.master)
        self.step, self.cursor, self.eval_losses = step, cursor, evals

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train to the last step. ``resume``: continue from the latest checkpoint in output.dir (from step 0
        if there is none); ``overwrite``: replace another run's files there (refused otherwise)."""
        lock = RunLock(self.out) if self.rank == 0 else None
        if lock is not None:
            clean_temp(self.out)  # what a killed run of this folder left half-written
        try:
            return self._fit(resume, overwrite)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool, overwrite: bool) -> TrainResult:
        cfg, out = self.cfg, self.cfg.output
        start = latest_checkpoint(self.out) if resume else None
        if resume and start is None and self.rank == 0:
            print(f"kindred train: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
        if start is not None:
            self.restore(start)
        elif self.rank == 0:  # a fresh run (or a resumed one that had no checkpoint yet): never mixed
            check_fresh(self.out, overwrite or resume)
        if self.world > 1:
            barrier()
        log = (
            MetricsLog(self.out, self.step if start else None, out.tensorboard and self.rank == 0)
            if self.rank == 0
            else None
        )
        progress = Progress(self.total_steps, self.step, out.progress and self.rank == 0)
        if self.eval_rows is None:
            progress.note("no held-out data (data.eval_path or data.eval_fraction): no held-out loss")
        elif self.engine == "fsdp" and out.sample_tokens:
            progress.note("train.distributed: fsdp: held-out loss without sample replies (a sharded base)")
        elif out.sample_tokens and self._sample is None:
            progress.note(
                "no sample replies: the first held-out conversation's last answer has no trained token, or "
                "its prompt fills the model's context"
            )
        if self.eval_rows is not None and not self.eval_losses:
            self._evaluate(log, progress)
        self.model.train()
        pending: list[dict] = []
        self._t0 = last_time = time.perf_counter()
        if start is not None and log is not None and log.rows:  # elapsed_s goes on from the checkpoint
            self._t0 -= log.rows[-1]["elapsed_s"]
        try:
            while self.step < self.total_steps:
                try:
                    pending.append(self._train_step())
                except torch.OutOfMemoryError:
                    raise _oom(cfg, self.step) from None
                done = self.step == self.total_steps
                if self.step % out.log_every == 0 or done:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    tokens = sum(r["tokens"] for r in pending) * self.world
                    rows = [self._row(r, tokens / max(now - last_time, 1e-9), now) for r in pending]
                    last_time, pending = now, []
                    if log is not None:
                        log.append(rows)
                    progress.update(self.step, rows[-1])
                evaluate = done or (out.eval_every and self.step % out.eval_every == 0)
                if evaluate and self.eval_rows is not None:
                    began = time.perf_counter()
                    self._evaluate(log, progress)  # before the checkpoint of this step, which holds it
                    last_time += time.perf_counter() - began  # tokens_per_s: training time only
                if (out.save_every and self.step % out.save_every == 0) or done:
                    if log is not None:
                        log.sync()
                    self.save()
        finally:
            progress.close()
        result = self._finish(log)
        if self.world > 1:  # no rank leaves before rank 0 has written the outputs
            barrier()
        return result

    def _row(self, r: dict, tokens_per_s: float, now: float) -> dict:
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return {
            "step": r["step"],
            "epoch": round(r["epoch"], 4),
            "loss": float(r["loss"]),
            "lr": r["lr"],
            "grad_norm": float(r["grad_norm"]),
            "tokens": r["tokens"] * self.world,
            "trainable_tokens": r["trainable_tokens"],
            "tokens_per_s": round(tokens_per_s, 1),
            "elapsed_s": round(now - self._t0, 3),
            "gpu_mem_gib": None if mem is None else round(mem, 3),
        }

    def _finish(self, log: MetricsLog | None) -> TrainResult:
        adapter_dir = self.out / "adapter"
        merged_dir = plot = None
        metrics = log.rows if log is not None else []
        if self.rank == 0:
            write_folder(adapter_dir, self._save_adapter)
            _write_yaml(self.cfg.to_dict(), self.out / "config.yaml")
            if self.cfg.output.plot and metrics:
                plot = plot_loss(metrics, self.eval_losses, self.out / "loss.png")
            if self.cfg.output.merged:
                from ..export import save_merged

                if self.hf_config is None:
                    raise KindredValueError(
                        "output.merged needs the config.json of a model loaded from a path"
                    )

                # onto the 16-bit base folder; a GGUF base has only its dequantized weights (warned)
                merged_dir = save_merged(
                    self.model,
                    self.hf_config,
                    self.out / "merged",
                    self.tokenizer,
                    base=self.base,
                    allow_quantized_base=True,
                    template=self.cfg.data.template,
                    overwrite=True,
                )
            log.close()
        return TrainResult(
            self.out,
            self.step,
            metrics,
            list(self.eval_losses),
            adapter_dir,
            merged_dir,
            plot,
            self.model,
            self.tokenizer,
            self.template,
            self.cfg,
        )


# What torch, random and numpy raise for a state of the wrong shape (load_state checked the outline).
_BAD_STATE = (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError, AttributeError)


def _real(packed, rows: np.ndarray) -> int:
    """Real (non-padding) tokens in ``rows`` of a PackedData."""
    total = 0
    for r in rows:
        seqs = slice(packed.row_seqs[r], packed.row_seqs[r + 1])
        lengths = np.diff(packed.cu_seqlens[seqs.start : seqs.stop + 1])
        total += int(lengths[packed.seq_example[seqs] >= 0].sum())
    return total


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _oom(cfg: TrainConfig, step: int) -> KindredError:
    tr = cfg.train
    hints = [
        f"train.micro_batch_tokens (now {tr.micro_batch_tokens or 'one row'}; "
        "raise grad_accum to keep the batch)"
    ]
    if tr.gradient_checkpointing == "none":
        hints.append("train.gradient_checkpointing: full (recompute activations) or offload")
    if tr.gradient_checkpointing == "full":
        hints.append("train.gradient_checkpointing: offload (layer inputs in host memory)")
    if cfg.quant == "none":
        hints.append("quant: nf4 (4-bit base weights)")
    hints.append(f"data.pack / data.budget (now {cfg.data.pack or cfg.data.budget} tokens per row)")
    hints.append(f"lora.r (now {cfg.lora.r})")
    return KindredError(f"out of GPU memory at step {step + 1}; lower one of: " + "; ".join(hints))


def _write_yaml(d: dict, path: Path) -> None:
    import yaml

    write_text(path, yaml.safe_dump(d, sort_keys=False))
