"""One fuzz target per reader: its valid seed inputs (built by tests/fuzz/seeds.py) and how an input is fed
to the reader — written into a scratch folder under the file name the reader expects, then read the way
kindred reads it, down to the C++/Rust code behind it (dequantization, tokenization)."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import seeds
from .mutate import pack, unpack


@dataclasses.dataclass
class Target:
    name: str
    kind: str  # mutation style: "binary", "json", "yaml", "text"
    backend: str  # what reads the bytes, in words ("C++", "Rust", "Python")
    build: Callable[[Path], list[bytes]]  # the seed inputs, built in a folder
    run: Callable[[bytes, Path], None]  # feed one input (scratch folder given)
    parts: int = 1
    part_kinds: tuple[str, ...] = ()

    def kind_of(self, part: int) -> str:
        return self.part_kinds[part] if self.part_kinds else self.kind


_BASE: dict = {}  # per-process cache of what a target reuses between inputs (a base model)


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------------------------------------- GGUF


def _gguf_build(root: Path) -> list[bytes]:
    return [seeds.gguf_file(root / "seed.gguf").read_bytes()]


def _gguf_read(data: bytes, work: Path) -> Path:
    """The reader's own work on a GGUF file: container, metadata, config, tokenizer, every tensor's blocks."""
    from kindred.formats.gguf import (
        gguf_metadata,
        gguf_tensor,
        gguf_to_hf_config,
        read_gguf,
        tokenizer_from_gguf,
    )

    path = work / "model.gguf"
    path.write_bytes(data)
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    gguf_to_hf_config(meta, {t.name for t in reader.tensors}, str(path))
    tokenizer_from_gguf(meta).encode("ab cd <|im_start|> ghi")
    for t in reader.tensors:
        gguf_tensor(t)
    return path


def _gguf_run(data: bytes, work: Path) -> None:
    from kindred.models.gguf import from_gguf

    from_gguf(_gguf_read(data, work), dtype=torch.float32)(torch.tensor([[1, 5, 9]]))


def _blocks_build(root: Path) -> list[bytes]:
    """Per block type, two rows of 512 random values quantized, behind a (ggml_type, rows, cols) header."""
    from kindred.ops.gguf import GGUF_BLOCK_TYPES, quantize_gguf

    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    out = []
    for type_id, _, _ in GGUF_BLOCK_TYPES.values():
        out.append(struct.pack("<Iii", type_id, 2, 512) + quantize_gguf(x, type_id).numpy().tobytes())
    return out


def _blocks_run(data: bytes, work: Path) -> None:
    """GGUF tensor data straight into the C++ dequantizer, and what comes out back into the quantizer."""
    from kindred.ops.gguf import dequantize_gguf, quantize_gguf

    if len(data) < 12:
        return
    type_id, rows, cols = struct.unpack_from("<Iii", data)
    raw = (
        torch.frombuffer(bytearray(data[12:]), dtype=torch.uint8)
        if len(data) > 12
        else torch.empty(0, dtype=torch.uint8)
    )
    x = dequantize_gguf(raw, type_id, (rows, cols))
    quantize_gguf(x, type_id)


# --------------------------------------------------------------------------------------- model folder


def _folder_build(root: Path) -> list[bytes]:
    folder = seeds.model_folder(root / "model")
    return [pack([(folder / "config.json").read_bytes(), (folder / "model.safetensors").read_bytes()])]


def _folder_run(data: bytes, work: Path) -> None:
    from kindred import models

    config, weights = unpack(data, 2, [])
    folder = _fresh(work / "model")
    (folder / "config.json").write_bytes(config)
    (folder / "model.safetensors").write_bytes(weights)
    models.from_pretrained(folder, dtype=torch.float32)(torch.tensor([[1, 2, 3]]))


def _index_build(root: Path) -> list[bytes]:
    folder = seeds.sharded_folder(root / "sharded")
    _BASE["index_folder"] = folder
    return [(folder / "model.safetensors.index.json").read_bytes()]


def _index_run(data: bytes, work: Path) -> None:
    from kindred import models
    from kindred.formats import read_prefix

    folder = work / "sharded"
    if "index_folder" not in _BASE:  # a replay without the seeds built: build the shards
        _index_build(Path(tempfile.mkdtemp(prefix="kindred-fuzz-shards-")))
    if not folder.exists():  # shards copied once; only the index changes between inputs
        shutil.copytree(_BASE["index_folder"], folder)
    (folder / "model.safetensors.index.json").write_bytes(data)
    read_prefix(folder, "model.norm")
    models.from_pretrained(folder, dtype=torch.float32)


# ---------------------------------------------------------------------------------------- bnb, PEFT

_BNB_PREFIX = "model.layers.0.mlp.up_proj"


def _bnb_build(root: Path) -> list[bytes]:
    from safetensors.torch import save_file

    path = root / "bnb.safetensors"
    save_file({k: v.contiguous() for k, v in seeds.bnb_tensors(_BNB_PREFIX + ".weight").items()}, str(path))
    return [path.read_bytes()]


def _bnb_run(data: bytes, work: Path) -> None:
    from kindred.nn.linear4bit import load_linear4bit

    path = work / "bnb.safetensors"
    path.write_bytes(data)
    layer = load_linear4bit(path, _BNB_PREFIX)
    layer(torch.ones(2, layer.in_features))


def _peft_build(root: Path) -> list[bytes]:
    folder = seeds.adapter_folder(root / "adapter")
    return [
        pack(
            [
                (folder / "adapter_config.json").read_bytes(),
                (folder / "adapter_model.safetensors").read_bytes(),
            ]
        )
    ]


def _peft_run(data: bytes, work: Path) -> None:
    import copy

    from kindred import models
    from kindred.nn.peft import load_adapter

    config, weights = unpack(data, 2, [])
    folder = _fresh(work / "adapter")
    (folder / "adapter_config.json").write_bytes(config)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    if "tiny" not in _BASE:
        _BASE["tiny"] = models.from_config(seeds.TINY, dtype=torch.float32)
    model = copy.deepcopy(_BASE["tiny"])
    load_adapter(model, folder)
    model(torch.tensor([[1, 2, 3]]))


# ------------------------------------------------------------------------------------- data and config


def _jsonl_run(data: bytes, work: Path) -> None:
    from kindred.data.jsonl import read_jsonl

    path = work / "chats.jsonl"
    path.write_bytes(data)
    read_jsonl(path, skip_invalid=True)
    read_jsonl(path)


def _yaml_run(data: bytes, work: Path) -> None:
    from kindred.train.config import load_config

    path = work / "train.yaml"
    path.write_bytes(data)
    load_config(path)


# ------------------------------------------------------------------------------------------ tokenizers


def _tokenizer_json_build(root: Path) -> list[bytes]:
    return [seeds.tokenizer_json(root / f"{k}.json", k).read_bytes() for k in ("bpe", "wordpiece")]


def _tokenizer_json_run(data: bytes, work: Path) -> None:
    from kindred.data.tokenizers import load_tokenizer

    path = work / "tokenizer.json"
    path.write_bytes(data)
    tok = load_tokenizer(path)
    ids = tok.encode("abcd ab <|im_start|> zz ☃")
    tok.encode_batch(["a b", "", "ghi"])
    tok.decode(ids)


def _sentencepiece_build(root: Path) -> list[bytes]:
    return [seeds.sentencepiece_model(root / f"{n}.model", n).read_bytes() for n in ("nmt_nfkc", "identity")]


def _sentencepiece_run(data: bytes, work: Path) -> None:
    from kindred.data.tokenizers import load_tokenizer

    path = work / "tokenizer.model"
    path.write_bytes(data)
    tok = load_tokenizer(path)
    ids = tok.encode("Hello ＡＢ world ① ☃ 123")
    tok.encode_batch(["x y", "ｶ", ""])
    tok.decode(ids)
    tok.lookup("<unk>")


TARGETS = {
    t.name: t
    for t in [
        # gguf_blocks is the C++ alone (the 10^6 inputs of the long mode); gguf_reader stops where the
        # model is built (twice gguf's rate); gguf-py's container parser is most of its time
        Target("gguf_blocks", "binary", "C++ (dequantize_gguf, quantize_gguf)", _blocks_build, _blocks_run),
        Target("gguf_reader", "binary", "C++ (dequantize_gguf), Rust (tokenizers)", _gguf_build, _gguf_read),
        Target("gguf", "binary", "the reader, then a model built and run", _gguf_build, _gguf_run),
        Target(
            "model_folder", "binary", "Rust (safetensors)", _folder_build, _folder_run, 2, ("json", "binary")
        ),
        Target("index_json", "json", "Rust (safetensors)", _index_build, _index_run),
        Target("bnb", "binary", "Rust (safetensors) and C++ (dequantize_nf4)", _bnb_build, _bnb_run),
        Target("peft", "binary", "Rust (safetensors)", _peft_build, _peft_run, 2, ("json", "binary")),
        Target("jsonl", "json", "Python", lambda root: [seeds.chat_jsonl()], _jsonl_run),
        Target("yaml", "yaml", "Python (PyYAML)", lambda root: [seeds.TRAIN_YAML], _yaml_run),
        Target("tokenizer_json", "json", "Rust (tokenizers)", _tokenizer_json_build, _tokenizer_json_run),
        Target("sentencepiece", "binary", "C++ (sentencepiece)", _sentencepiece_build, _sentencepiece_run),
    ]
}

CORPUS = Path(__file__).parent / "corpus"


def preload() -> None:
    """Import what the targets use and build the base model, once, so that forked children do not do it for
    every input (the first model built also imports seconds of torch internals)."""
    import kindred.data.jsonl
    import kindred.data.tokenizers
    import kindred.formats.gguf
    import kindred.models.gguf
    import kindred.nn.linear4bit
    import kindred.nn.peft
    import kindred.train.config  # noqa: F401
    from kindred import models

    if "tiny" not in _BASE:
        _BASE["tiny"] = models.from_config(seeds.TINY, dtype=torch.float32)


def corpus_inputs(name: str) -> list[tuple[Path, bytes]]:
    """The kept reproducers of target ``name`` (``.gz`` files are stored compressed)."""
    folder = CORPUS / name
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    return [(f, gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()) for f in files]
