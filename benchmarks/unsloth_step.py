"""Unsloth's QLoRA training step, bench_e2e.py's third anchor (issues 19 and 20), in a process of its own.

Unsloth must be imported before transformers and patches it (and torch, PEFT, bitsandbytes) globally, so it
never shares kindred's process: bench_e2e.py writes a model folder (random bf16 weights of the case's HF
config, saved with ``save_pretrained`` beside a minimal tokenizer) and the token rows, then runs this file as

    python benchmarks/unsloth_step.py SPEC.json

with Unsloth (``.carry/unsloth.tar.xz``, unpacked by bench_e2e) on PYTHONPATH after ``.carry/site``. SPEC
names the folder, the rows (``.npz`` with ``input_ids`` and ``labels`` [rows, seq]), the LoRA targets, rank,
lr, warm-up and timed step counts. The step: ``FastLanguageModel.from_pretrained(folder, load_in_4bit=True,
max_seq_length=seq, dtype=torch.bfloat16)``, ``FastLanguageModel.get_peft_model(r, lora_alpha=r,
lora_dropout=0, target_modules, use_gradient_checkpointing="unsloth", bias="none")``,
``torch.optim.AdamW(fused=True)`` on the trainable parameters; one step = forward with labels,
``loss.backward()``, ``opt.step()``, ``opt.zero_grad()``. The first warm-up step is timed alone (Unsloth
compiles there). The last line printed is ``RESULT_TAG`` + one JSON object (``parse_result``); everything
before it is Unsloth's own output.

The helpers above ``main`` (the folder writer, the rows file, the result parser) run in bench_e2e's process
and import transformers only when called; nothing here imports kindred or Unsloth at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

RESULT_TAG = "KINDRED_UNSLOTH_RESULT "
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # pad, bos, eos, unk
GIB = 2**30


# ---- bench_e2e's side: the model folder, the rows, the result line ---------------------------------------
def special_ids(config) -> dict[str, int]:
    """Token ids of pad, bos, eos and unk: the config's own where it names them (an int), else the smallest
    ids not taken, all distinct."""
    ids: dict[str, int] = {}
    for tok, key in zip(_SPECIALS, ("pad_token_id", "bos_token_id", "eos_token_id", None), strict=True):
        value = getattr(config, key, None) if key else None
        if isinstance(value, list):  # some configs name several eos ids
            value = value[0] if value else None
        if isinstance(value, int) and value not in ids.values():
            ids[tok] = value
    free = (i for i in range(len(_SPECIALS) * 2) if i not in ids.values())
    for tok in _SPECIALS:
        ids.setdefault(tok, next(free))
    return ids


def write_tokenizer(folder: Path, config) -> dict[str, int]:
    """A WordLevel tokenizer with exactly ``config.vocab_size`` tokens ("t<id>" and the four specials at
    ``special_ids``), saved as a PreTrainedTokenizerFast; the config's pad/bos/eos ids set to match (so
    nothing resizes the embeddings). No chat template. Returns the special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = special_ids(config)
    by_id = {i: tok for tok, i in ids.items()}
    vocab = {by_id.get(i, f"t{i}"): i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=getattr(config, "max_position_embeddings", None) or 2**20,
    )
    fast.save_pretrained(folder)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = ids["<pad>"], ids["<s>"], ids["</s>"]
    return ids


def random_model(hf: dict, device):
    """transformers' model of ``hf``'s shape, random bf16 weights built on ``device`` (as the anchor's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def state_bytes(model) -> int:
    """Bytes of the model's tensors, each storage once (tied weights are one)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def pick_folder(need: int, candidates: list[str], margin: int = 2 * GIB) -> Path:
    """The first of ``candidates`` (existing folders) with ``need`` + ``margin`` bytes free; a new empty
    folder ``kindred-unsloth-model-*`` is made in it."""
    import tempfile

    tried = []
    for c in candidates:
        if not c or not os.path.isdir(c):
            continue
        free = shutil.disk_usage(c).free
        tried.append(f"{c}: {free / GIB:.1f} GiB free")
        if free >= need + margin:
            return Path(tempfile.mkdtemp(prefix="kindred-unsloth-model-", dir=c))
    raise RuntimeError(
        f"the {need / GIB:.1f} GiB checkpoint (+{margin / GIB:.0f} GiB margin) fits in none of: "
        + ("; ".join(tried) or "no folder")
    )


def write_model_folder(hf: dict, device, candidates: list[str]) -> tuple[Path, int]:
    """Random bf16 weights of ``hf``'s shape saved with ``save_pretrained`` (safetensors) and a minimal
    tokenizer into a new folder under the first of ``candidates`` with room. Returns (folder, checkpoint
    bytes); the caller deletes the folder. Nothing is left behind when it fails."""
    import gc

    import torch

    model = random_model(hf, device)
    folder = None
    try:
        need = state_bytes(model)
        folder = pick_folder(need, candidates)
        write_tokenizer(folder, model.config)
        model.save_pretrained(folder)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return folder, need


def write_rows(path: Path, input_ids: np.ndarray, labels: np.ndarray) -> None:
    np.savez(path, input_ids=np.asarray(input_ids, dtype=np.int64), labels=np.asarray(labels, dtype=np.int64))


def parse_result(text: str) -> dict | None:
    """The JSON object of the last ``RESULT_TAG`` line of ``text``, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_TAG):
            try:
                value = json.loads(line[len(RESULT_TAG) :])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def tail(text: str, n: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


# ---- the subprocess --------------------------------------------------------------------------------------
def _host_stats(torch) -> dict:
    out = {}
    try:
        import psutil

        out["rss_mib"] = psutil.Process().memory_info().rss / 2**20
    except Exception:
        pass
    try:
        s = torch.cuda.host_memory_stats()
        out["pinned_mib"] = s.get("allocated_bytes.current", 0) / 2**20
        out["pinned_peak_mib"] = s.get("allocated_bytes.peak", 0) / 2**20
    except Exception:
        pass
    return out


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import unsloth  # first: it patches transformers, PEFT and bitsandbytes on import

    FastLanguageModel = unsloth.FastLanguageModel
    import torch

    import_s = time.perf_counter() - t0
    seq = int(spec["seq"])
    t0 = time.perf_counter()
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model"], max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=int(spec["rank"]),
        lora_alpha=int(spec["rank"]),
        lora_dropout=0,
        target_modules=list(spec["targets"]),
        use_gradient_checkpointing="unsloth",
        bias="none",
        random_state=0,
    )
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    model.train()
    rows = np.load(spec["rows"])
    ids = torch.from_numpy(rows["input_ids"]).long().cuda()
    labels = torch.from_numpy(rows["labels"]).long().cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(spec["lr"]), fused=True)
    live_mib = torch.cuda.memory_allocated() / 2**20

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    warmup, steps = max(1, int(spec["warmup"])), int(spec["steps"])
    t0 = time.perf_counter()
    step()  # the first step: Unsloth's torch.compile and Triton autotuning happen here
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    import gc

    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(Exception):  # torch >= 2.6
        torch.cuda.reset_peak_host_memory_stats()
    host_before = _host_stats(torch)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    host_after = _host_stats(torch)

    import bitsandbytes as bnb

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokens = ids.numel() * steps
    result = {
        "ms": 1e3 * seconds / steps,
        "tokens_per_s": tokens / seconds,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        "live_mib": live_mib,
        "loss": float(loss),
        "first_step_s": first_s,
        "load_s": load_s,
        "import_s": import_s,
        "steps": steps,
        "warmup": warmup,
        "tokens": tokens,
        "trainable": sum(p.numel() for p in params),
        "n_4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
        "attn": str(getattr(base.config, "_attn_implementation", "")),
        "unsloth": getattr(unsloth, "__version__", "?"),
        "host_before": host_before,
        "host_after": host_after,
    }
    try:
        import resource

        result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        pass
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the result is out: no waiting on compile workers or atexit hooks at shutdown
