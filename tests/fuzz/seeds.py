"""Valid inputs of every reader, built by kindred (and the libraries it reads) in a temporary folder: the
fuzz targets mutate them and the reliability tests edit them one field at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# A byte-level BPE vocabulary of 64 tokens whose 8 merges are consistent (each part and result a token).
_LETTERS = "abcdefghijklmnopqrstuvwxyzĠ"
_MERGES = ["a b", "c d", "ab cd", "e f", "Ġ a", "Ġa b", "g h", "gh i"]


def _vocab() -> list[str]:
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *_LETTERS]
    for m in _MERGES:
        a, b = m.split(" ")
        tokens.append(a + b)
    tokens += [f"<x{i}>" for i in range(64 - len(tokens))]
    return tokens


def model_folder(folder: Path) -> Path:
    """config.json + model.safetensors of a tiny random llama (kindred.models.from_config)."""
    from safetensors.torch import save_file

    from kindred import models

    folder.mkdir(parents=True, exist_ok=True)
    model = models.from_config(TINY, dtype=torch.float32)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(TINY, indent=2))
    return folder


def sharded_folder(folder: Path) -> Path:
    """The tiny model in two shards with a model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    src = model_folder(folder / "_src")
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text((src / "config.json").read_text())
    return folder


def bnb_tensors(prefix: str = "model.layers.0.mlp.up_proj.weight") -> dict[str, torch.Tensor]:
    """A bitsandbytes NF4 (double-quantized) weight as transformers stores it (kindred.formats.nf4_to_bnb)."""
    from kindred.formats.bnb import nf4_to_bnb
    from kindred.ops import quantize_nf4

    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    return nf4_to_bnb(quantize_nf4(w, 64, True), prefix)


def adapter_folder(folder: Path) -> Path:
    """A PEFT LoRA adapter of the tiny model (kindred.nn.apply_lora + save_adapter) with a rank pattern."""
    from kindred import models
    from kindred.nn import apply_lora
    from kindred.nn.peft import save_adapter

    model = models.from_config(TINY, dtype=torch.float32)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.01)
    save_adapter(model, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"model.layers.1.self_attn.q_proj": 4}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def gguf_file(path: Path) -> Path:
    """A tiny llama GGUF (gguf-py's writer): F32 norms, Q8_0 / Q4_K projections, a BPE vocabulary."""
    import gguf

    from kindred import models
    from kindred.models.gguf import _BLOCK, _GLOBAL

    model = models.from_config(TINY, dtype=torch.float32, seed=1)
    names = {v: k for k, v in _GLOBAL.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_vocab_size(TINY["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(_vocab())
    w.add_token_merges(_MERGES)
    w.add_token_types([2, 3, 3, 3, 3] + [1] * 59)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name in names:
            g = names[name]
        else:
            _, _, layer, *rest = name.split(".")
            part = ".".join(rest[:-1])
            g = f"blk.{layer}.{next(k for k, v in _BLOCK.items() if v == part)}.{rest[-1]}"
        data = t.numpy()
        if g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = TINY["num_attention_heads"] if "attn_q" in g else TINY["num_key_value_heads"]
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
        if data.ndim == 2 and "ffn" in g:
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(g, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokenizer_json(path: Path, kind: str = "bpe") -> Path:
    """A tokenizer.json of the 64-token vocabulary: byte-level BPE, or WordPiece with its [UNK]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(_vocab())}
    if kind == "bpe":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in _MERGES]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    else:
        wp = {**{t: i for i, t in enumerate(["[UNK]", "[CLS]", *_LETTERS])}, "##a": 40, "##b": 41}
        tok = Tokenizer(models.WordPiece(vocab=wp, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def sentencepiece_model(path: Path, normalization: str = "nmt_nfkc") -> Path:
    """A sentencepiece unigram .model trained on kindred's sample corpus (with a precompiled charsmap when
    ``normalization`` is nmt_nfkc)."""
    import sentencepiece as spm

    from kindred.data.samples import corpus_lines

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_prefix=str(path.with_suffix("")),
        model_type="unigram",
        vocab_size=500,
        character_coverage=0.995,
        normalization_rule_name=normalization,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return path


def chat_jsonl() -> bytes:
    conv = [
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "adding"},
            ]
        },
    ]
    return "".join(json.dumps(c) + "\n" for c in conv).encode()


TRAIN_YAML = b"""\
model: some/model
quant: nf4
lora: {r: 8, alpha: 16, dropout: 0.05, targets: all-linear}
data: {path: &chats chats.jsonl, eval_path: *chats, template: chatml, budget: 256, pack: 512}
train:
  epochs: 2
  lr: 1.0e-4
  grad_accum: 2
  adam_betas: [0.9, 0.99]
output: {dir: runs/x, save_every: 10}
"""
