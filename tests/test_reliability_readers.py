"""Hostile files against every reader (issue 15, "Hangs and memory", "Foreign exceptions" and the reader half
of "Security"): each must end, quickly and within bounded memory, in a KindredError naming the file and the
key / byte offset / line. Cases that hung, ate memory or crashed run in a forked child (tests/fuzz/child.py)
under a time and memory limit, so a regression fails the test instead of the test run."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from kindred.errors import KindredFormatError, KindredValueError

from .fuzz import seeds
from .fuzz.child import run_in_child


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    return {
        "model": seeds.model_folder(root / "model"),
        "gguf": seeds.gguf_file(root / "tiny.gguf"),
        "adapter": seeds.adapter_folder(root / "adapter"),
    }


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    return {
        n: seeds.sentencepiece_model(root / f"{n}.model", n).read_bytes() for n in ("nmt_nfkc", "identity")
    }


def fails_fast(fn, *args, match: str, seconds: float = 3.0):
    """fn(*args) must raise a KindredError matching ``match`` within ``seconds`` of CPU time, in a forked
    child limited to 2 GB more address space."""
    out = run_in_child(fn, *args, timeout=seconds)
    assert out.kind == "kindred", f"{out.kind}: {out.detail[:600]}"
    assert re.search(match, out.detail), out.detail


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------- GGUF


def _gguf_array_count_offset(data: bytes, key: str) -> int:
    """Byte offset of the u64 item count of the array value of ``key`` (after its type and item type)."""
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", data, at)[0] == 9  # an array
    return at + 8


def _read_all_gguf(path):
    from kindred.formats.gguf import gguf_metadata, read_gguf

    gguf_metadata(read_gguf(path))


def test_gguf_array_length_2_62_fails_fast(built, tmp_path):
    data = bytearray(built["gguf"].read_bytes())
    at = _gguf_array_count_offset(bytes(data), "tokenizer.ggml.tokens")
    struct.pack_into("<Q", data, at, 1 << 62)
    bad = tmp_path / "huge-array.gguf"
    bad.write_bytes(data)
    fails_fast(_read_all_gguf, bad, match=rf"huge-array.gguf: .*byte {at}: .*tokenizer.ggml.tokens.* claims")


def test_gguf_truncated_and_invalid_utf8(built, tmp_path):
    data = built["gguf"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    fails_fast(_read_all_gguf, cut, match=r"cut.gguf: .*truncated")
    bad = bytearray(data)
    at = bad.index(b"{% for m in messages %}") + 3
    bad[at] = 0xFF
    (tmp_path / "utf8.gguf").write_bytes(bad)
    fails_fast(
        _read_all_gguf, tmp_path / "utf8.gguf", match=rf"utf8.gguf: .*byte {at}: .*chat_template.* UTF-8"
    )


def _gguf_meta():
    return {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("llama.attention.head_count", 0, r"'llama.attention.head_count' must be an integer"),
        ("llama.embedding_length", "32", r"'llama.embedding_length' must be an integer"),
        ("llama.block_count", [2], r"'llama.block_count' must be an integer"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            "x",
            r"'llama.attention.layer_norm_rms_epsilon' must be a number",
        ),
        ("tokenizer.ggml.bos_token_id", -1, r"'tokenizer.ggml.bos_token_id' must be an integer"),
    ],
)
def test_gguf_config_values_are_checked(key, value, match):
    from kindred.formats.gguf import gguf_to_hf_config

    with pytest.raises(KindredFormatError, match=r"tiny.gguf: " + match):
        gguf_to_hf_config({**_gguf_meta(), key: value}, set(), "tiny.gguf")


@pytest.mark.parametrize(
    ("merges", "match"),
    [
        (["a zz"], r"merges\[0\] 'a zz' names 'zz'"),  # the library raised a bare Exception
        (["a c"], r"merges\[0\] 'a c' names 'ac'"),  # the library panicked (PanicException)
        (["abc"], r"merges\[0\] 'abc' is not two tokens"),
    ],
)
def test_gguf_merge_naming_an_unknown_token(merges, match):
    from kindred.formats.gguf import tokenizer_from_gguf

    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "c", "ab"],
        "tokenizer.ggml.merges": merges,
    }
    out = run_in_child(tokenizer_from_gguf, meta)
    assert out.kind == "kindred" and re.search(match, out.detail), out


def test_gguf_layer_count_checked_against_tensors_before_building(built, tmp_path):
    from kindred.models.gguf import from_gguf

    data = bytearray(built["gguf"].read_bytes())
    k = b"llama.block_count"
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4
    struct.pack_into("<I", data, at, 1024)
    (tmp_path / "layers.gguf").write_bytes(data)
    fails_fast(
        from_gguf, tmp_path / "layers.gguf", seconds=2.0, match=r"num_hidden_layers is 1024 .* 2 layers"
    )


# ---------------------------------------------------------------------------------- config.json


def _load(path):
    from kindred import models

    models.from_pretrained(path, dtype=torch.float32)


def _with_config(built, tmp_path, edit) -> Path:
    folder = copy_folder(built["model"], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    text = edit(cfg)
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else json.dumps(text).encode())
    return folder


@pytest.mark.parametrize("layers", [1 << 63, 1 << 40])
def test_huge_layer_count_fails_in_milliseconds(built, tmp_path, layers):
    folder = _with_config(built, tmp_path, lambda c: {**c, "num_hidden_layers": layers})
    fails_fast(
        _load, folder, seconds=2.0, match=r"config.json: 'num_hidden_layers' must be a positive integer"
    )


def test_layer_count_checked_against_the_checkpoint_before_the_skeleton(built, tmp_path):
    folder = _with_config(built, tmp_path, lambda c: {**c, "num_hidden_layers": 1024})
    fails_fast(
        _load, folder, seconds=2.0, match=r"num_hidden_layers is 1024 but the checkpoint holds 2 layers"
    )


def test_config_json_invalid_utf8_and_deep_nesting(built, tmp_path):
    utf8 = _with_config(
        built, tmp_path, lambda c: json.dumps(c).encode()[:20] + b"\xff" + json.dumps(c).encode()[20:]
    )
    with pytest.raises(KindredFormatError, match=r"config.json: invalid UTF-8 at byte 20"):
        _load(utf8)
    deep = copy_folder(utf8, tmp_path / "deep")
    (deep / "config.json").write_text('{"model_type": "llama",\n "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(KindredFormatError, match=r"config.json: line 2: nested deeper than 64 levels"):
        _load(deep)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}
# (config change, key the error names): each raised ValueError, TypeError or OverflowError, or passed
BAD_VALUES = [
    ({"rms_norm_eps": "x"}, "rms_norm_eps"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rope_theta": "abc"}, "rope_theta"),
    ({"rope_theta": [1]}, "rope_theta"),
    ({"max_position_embeddings": "x"}, "max_position_embeddings"),
    ({"max_position_embeddings": 1 << 62}, "max_position_embeddings"),
    ({"partial_rotary_factor": "x"}, "partial_rotary_factor"),
    ({"rope_scaling": [1]}, "rope_scaling"),
    ({"rope_parameters": "x"}, "rope_parameters"),
    ({"rope_scaling": {**LLAMA3_ROPE, "factor": "x"}}, "factor"),
    ({"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": [1]}}, "low_freq_factor"),
    (
        {"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": "x"}},
        "original_max_position_embeddings",
    ),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": "x"}}, "beta_fast"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": 5, "long_factor": 5}}, "short_factor"),
    ({"layer_types": 5}, "layer_types"),
    ({"hidden_act": ["silu"]}, "hidden_act"),
    ({"final_logit_softcapping": "x"}, "final_logit_softcapping"),
    ({"vocab_size": 1 << 40}, "vocab_size"),
    ({"hidden_size": 1 << 40}, "hidden_size"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"eos_token_id": [2, 999]}, "eos_token_id"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"model_type": "gemma3_text", "sliding_window_pattern": "x"}, "sliding_window_pattern"),
    ({"model_type": "gemma3_text", "query_pre_attn_scalar": "x"}, "query_pre_attn_scalar"),
    (
        {"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": "x"},
        "max_window_layers",
    ),
]


@pytest.mark.parametrize(
    ("change", "key"), BAD_VALUES, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_VALUES)]
)
def test_config_values_of_the_wrong_type_or_size_name_the_key(change, key):
    from kindred.models import DecoderConfig

    with pytest.raises(KindredValueError, match=rf"^cfg.json: .*'?{key}'? "):
        DecoderConfig.from_hf({**seeds.TINY, **change}, "cfg.json")


def test_json_numbers_out_of_range_are_refused(built, tmp_path):
    folder = _with_config(
        built,
        tmp_path,
        lambda c: json.dumps(c, indent=1).replace('"rope_theta": 10000.0', '"rope_theta": 1e400').encode(),
    )
    with pytest.raises(KindredFormatError, match=r"config.json: line \d+: number '1e400' is out of range"):
        _load(folder)


# ------------------------------------------------------------------------------------- index json


def _sharded(tmp_path) -> Path:
    return seeds.sharded_folder(tmp_path / "sharded")


def _edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: edit(v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_seed_loads(tmp_path):
    _load(_sharded(tmp_path))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_shard_names_are_confined_to_the_model_folder(tmp_path, kind):
    folder = _sharded(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(folder.glob("model-*.safetensors"))[0]
    (outside / first.name).write_bytes(first.read_bytes())
    first.unlink()
    if kind == "absolute":
        _edit_index(folder, lambda v: str(outside / v) if v == first.name else v)
    elif kind == "dotdot":
        _edit_index(folder, lambda v: f"../outside/{v}" if v == first.name else v)
    else:
        first.symlink_to(outside / first.name)
    match = (
        "resolves outside the folder" if kind == "symlink" else "must be a relative path inside the folder"
    )
    with pytest.raises(KindredFormatError, match=rf"model.safetensors.index.json: shard .*{match}"):
        _load(folder)
    from kindred.formats import read_prefix

    with pytest.raises(KindredFormatError, match=match):
        read_prefix(folder, "model.norm")


def test_index_json_invalid_utf8_and_deep_nesting(tmp_path):
    folder = _sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"\xff": 1}}')
    with pytest.raises(KindredFormatError, match=r"index.json: invalid UTF-8 at byte 17"):
        _load(folder)
    index.write_text('{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(KindredFormatError, match=r"index.json: nested deeper than 64 levels"):
        _load(folder)
    index.write_text('{"weight_map": {"model.norm.weight": 7}}')
    with pytest.raises(KindredFormatError, match=r"index.json: shard 7 is not a file name"):
        _load(folder)


# ------------------------------------------------------------------------------------ bnb quant state

PREFIX = "model.layers.0.mlp.up_proj.weight"
STATE = PREFIX + ".quant_state.bitsandbytes__nf4"


def _state(change) -> dict:
    t = seeds.bnb_tensors(PREFIX)
    state = json.loads(bytes(t[STATE].tolist()))
    blob = change(state)
    blob = blob if isinstance(blob, (bytes, torch.Tensor)) else json.dumps(blob).encode()
    t[STATE] = blob if isinstance(blob, torch.Tensor) else torch.tensor(list(blob), dtype=torch.uint8)
    return t


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", r"nested deeper than 4 levels"),
        (
            lambda s: torch.tensor(list(json.dumps(s).encode()), dtype=torch.uint8).reshape(-1, 1),
            r"1-D uint8",
        ),
        (lambda s: {**s, "nested_offset": 1e30}, r"'nested_offset' must be a number"),
        (
            lambda s: json.dumps(s).replace('"nested_offset": ', '"nested_offset": 1e400, "x": ').encode(),
            r"out of range",
        ),
        (lambda s: {**s, "blocksize": 10**30}, r"blocksize 10+; NF4 blocksizes"),
        (lambda s: {**s, "blocksize": -(10**30)}, r"blocksize -10+; NF4 blocksizes"),
        (lambda s: {**s, "blocksize": 1e30}, r"lacks a valid 'blocksize'"),
        (lambda s: {**s, "shape": [1 << 40, 1 << 40]}, r"more than 2\^40 elements"),
        (lambda s: {**s, "blocksize": 128}, r"absmax' has 32 entries, expected 16"),
    ],
)
def test_bnb_quant_state_is_checked(change, match):
    from kindred.formats.bnb import nf4_from_bnb

    out = run_in_child(nf4_from_bnb, _state(change), PREFIX, "ckpt.safetensors")
    assert out.kind == "kindred" and "ckpt.safetensors: " in out.detail and re.search(match, out.detail), out


# ------------------------------------------------------------------------------------------ PEFT


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rank_pattern": [4]}, r"'rank_pattern' must be an object"),
        ({"rank_pattern": {"(": 4}}, r"'rank_pattern' key: '\(' is not a valid regex"),
        ({"rank_pattern": {"q_proj": "4"}}, r"'rank_pattern'\['q_proj'\] must be an integer"),
        ({"alpha_pattern": {"q_proj": 1e300}}, r"'alpha_pattern'\['q_proj'\] must be a number"),
        ({"target_modules": [1, 2]}, r"'target_modules' must be a regex string or a list"),
        ({"target_modules": "("}, r"'target_modules': '\(' is not a valid regex"),
        ({"lora_dropout": "x"}, r"'lora_dropout' must be a number"),
        ({"lora_dropout": 1.5}, r"'lora_dropout' must be a number in \[0, 1\]"),
        ({"lora_alpha": 1e300}, r"'lora_alpha' must be a number"),
        ({"lora_alpha": 10**400}, r"number '1000.*' is out of range"),
        ({"r": 2.5}, r"'r' must be an integer"),
        ({"use_rslora": "yes"}, r"'use_rslora' must be true or false"),
    ],
)
def test_adapter_config_values_are_checked(built, tmp_path, change, match):
    from kindred import models
    from kindred.formats import read_adapter
    from kindred.nn.peft import load_adapter

    folder = copy_folder(built["adapter"], tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(KindredFormatError, match=r"adapter_config.json: " + match):
        read_adapter(folder)
    with pytest.raises(KindredFormatError, match=match):
        load_adapter(models.from_config(seeds.TINY, dtype=torch.float32), folder)


# ------------------------------------------------------------------------------------------- JSONL


def test_deeply_nested_jsonl_line_is_one_skippable_bad_line(tmp_path):
    from kindred.data.jsonl import read_jsonl

    good = seeds.chat_jsonl()
    path = tmp_path / "chats.jsonl"
    path.write_bytes(good + b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n" + good)
    data = read_jsonl(path, skip_invalid=True)
    assert len(data) == 4 and [s.line for s in data.skipped] == [3]
    assert "nested deeper than 64 levels" in data.skipped[0].reason
    with pytest.raises(KindredFormatError, match=r"chats.jsonl:3: nested deeper than 64 levels"):
        read_jsonl(path)
    path.write_bytes(good + b'{"messages": [], "n": 1e400}\n')
    with pytest.raises(KindredFormatError, match=r"chats.jsonl:3: number '1e400' is out of range"):
        read_jsonl(path)


# -------------------------------------------------------------------------------------- training YAML


def _train_config(path):
    from kindred.train.config import load_config

    load_config(path)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (seeds.TRAIN_YAML[:30] + b"\xff" + seeds.TRAIN_YAML[30:], r"invalid UTF-8 at byte 30"),
        (b"model: " + b"[" * 100_000, r"line 1: nested deeper than 64 levels"),
        (b"model: x\nlora: &l {r: *l}\n", r"line 2: alias \*l refers to a collection that contains it"),
        (BOMB.encode(), r"more than 100,000 values once aliases are expanded"),
        (seeds.TRAIN_YAML.replace(b"lr: 1.0e-4", b"lr: 1e400"), r"'train.lr' must be a finite number"),
        (seeds.TRAIN_YAML.replace(b"lr: 1.0e-4", b"lr: 1.0e+400"), r"'train.lr' must be a finite number"),
        (seeds.TRAIN_YAML.replace(b"r: 8", b"r: " + b"9" * 5000), r"a value cannot be read"),
        (seeds.TRAIN_YAML.replace(b"r: 8", b"r: 2001-02-30"), r"a value cannot be read"),
        (
            seeds.TRAIN_YAML.replace(b"r: 8", b"r: 100000000000000000000"),
            r"'lora.r' must be an integer of at most 63",
        ),
        (b"model: x\n1.5: y\n", r"key 1.5 is not a name"),
        (b'model: "\\ud800"\n', r"lone UTF-16 surrogate"),
        (
            seeds.TRAIN_YAML.replace(b"lr: 1.0e-4", b"lr: " + b"9" * 400),
            r"'train.lr' must be a finite number",
        ),
    ],
    ids=[
        "number-key",
        "lone-surrogate",
        "lr-400-digits",
        "utf8",
        "deep",
        "self-alias",
        "alias-bomb",
        "lr-1e400",
        "lr-1.0e+400",
        "5000-digits",
        "bad-date",
        "r-2^66",
    ],
)
def test_training_yaml_is_bounded(tmp_path, text, match):
    path = tmp_path / "train.yaml"
    path.write_bytes(text)
    fails_fast(_train_config, path, seconds=3.0, match=r"train.yaml: .*" + match)


def test_training_yaml_seed_with_an_alias_loads(tmp_path):
    from kindred.train.config import load_config

    path = tmp_path / "train.yaml"
    path.write_bytes(seeds.TRAIN_YAML)
    assert load_config(path).data.eval_path == "chats.jsonl"


# ------------------------------------------------------------------------------------- tokenizers


def test_json_lone_surrogate_escapes_are_refused(tmp_path):
    from kindred.data.tokenizers import load_tokenizer

    path = seeds.tokenizer_json(tmp_path / "tokenizer.json")
    obj = json.loads(path.read_text())
    obj["model"]["merges"][2] = ["ab", "@@"]
    text = json.dumps(obj).replace('"@@"', '"\\ud800"')
    assert "\\ud800" in text
    path.write_text(text)
    with pytest.raises(KindredFormatError, match=r"tokenizer.json: not a valid tokenizer.json .*lone UTF-16"):
        load_tokenizer(path)


def test_wordpiece_without_its_unk_token_is_refused_at_load(tmp_path):
    from kindred.data.tokenizers import load_tokenizer

    path = seeds.tokenizer_json(tmp_path / "wp.json", "wordpiece")
    obj = json.loads(path.read_text())
    del obj["model"]["vocab"]["[UNK]"]
    path.write_text(json.dumps(obj))
    with pytest.raises(
        KindredFormatError, match=r"wp.json: not a valid tokenizer.json .*WordPiece unk_token '\[UNK\]'"
    ):
        load_tokenizer(path)


@pytest.mark.parametrize(("merge", "bad"), [("a zz", "zz"), ("a c", "ac")])
def test_tokenizer_json_merge_naming_an_unknown_token(tmp_path, merge, bad):
    from kindred.data.tokenizers import load_tokenizer

    path = seeds.tokenizer_json(tmp_path / "tokenizer.json")
    obj = json.loads(path.read_text())
    obj["model"]["merges"].append(merge if isinstance(obj["model"]["merges"][0], str) else merge.split(" "))
    path.write_text(json.dumps(obj))
    out = run_in_child(load_tokenizer, path)
    assert out.kind == "kindred" and f"names '{bad}', not a token" in out.detail, out


def _charsmap_unit_offset(model: bytes) -> tuple[int, int]:
    """(byte offset of the trie in the normalizer's precompiled_charsmap, its unit count)."""

    def fields(buf, start, end):
        pos = start
        while pos < end:
            key, pos = _varint(buf, pos)
            wire = key & 7
            if wire == 0:
                _, pos = _varint(buf, pos)
                continue
            if wire in (1, 5):
                pos += 8 if wire == 1 else 4
                continue
            n, pos = _varint(buf, pos)
            yield key >> 3, pos, pos + n
            pos += n

    for number, a, b in fields(model, 0, len(model)):
        if number == 3:
            for sub, c, _ in fields(model, a, b):
                if sub == 2:
                    return c + 4, struct.unpack_from("<I", model, c)[0] // 4
    raise AssertionError("no precompiled_charsmap")


def _varint(buf, pos):
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _encode_sentencepiece(path):
    from kindred.data.tokenizers import load_tokenizer

    tok = load_tokenizer(path)
    tok.encode("Hello ＡＢ world ①")
    tok.encode_batch(["x y", "ｶ"])


def test_sentencepiece_charsmap_pointing_out_of_bounds_does_not_crash(tmp_path, sp_models):
    # A leaf of the normalizer's trie whose value points far past the replacement strings: the C++ library
    # read out of bounds (SIGSEGV) on the first encode.
    model = bytearray(sp_models["nmt_nfkc"])
    trie, n = _charsmap_unit_offset(bytes(model))
    units = list(struct.unpack_from(f"<{n}I", model, trie))
    leaves = [
        p ^ ((u >> 10) << ((u & 512) >> 6)) for p, u in enumerate(units) if not u >> 31 and (u >> 8) & 1
    ]
    for q in leaves:
        struct.pack_into("<I", model, trie + 4 * q, (1 << 31) | 0x7FFF0000)
    (tmp_path / "bad.model").write_bytes(model)
    out = run_in_child(_encode_sentencepiece, tmp_path / "bad.model", timeout=10)
    assert out.kind == "kindred" and "bad.model: not a valid sentencepiece model: byte" in out.detail, out


def test_sentencepiece_charsmap_unit_pointing_outside_the_trie_is_named(tmp_path, sp_models):
    # The first unit that is not a value, its child block moved past the trie's end; and, in a second file,
    # a later leaf's value past the strings: each error names that unit and its byte.
    model = bytearray(sp_models["nmt_nfkc"])
    trie, n = _charsmap_unit_offset(bytes(model))
    units = list(struct.unpack_from(f"<{n}I", model, trie))
    first = next(p for p, u in enumerate(units) if not u >> 31)
    outside = bytearray(model)
    struct.pack_into("<I", outside, trie + 4 * first, (units[first] & 0xFF) | (0x1FFFFF << 10))
    (tmp_path / "outside.model").write_bytes(outside)
    out = run_in_child(_encode_sentencepiece, tmp_path / "outside.model", timeout=10)
    assert out.kind == "kindred", out
    assert (
        f"byte {trie + 4 * first}: precompiled_charsmap trie unit {first} points outside the trie"
        in out.detail
    )
    leaves = [
        (p, p ^ ((u >> 10) << ((u & 512) >> 6))) for p, u in enumerate(units) if not u >> 31 and (u >> 8) & 1
    ]
    q = leaves[len(leaves) // 2][1]
    p = min(pp for pp, qq in leaves if qq == q)  # leaves may share a value unit: the first one reads it
    past = bytearray(model)
    struct.pack_into("<I", past, trie + 4 * q, (1 << 31) | 0x7FFF0000)
    (tmp_path / "past.model").write_bytes(past)
    out = run_in_child(_encode_sentencepiece, tmp_path / "past.model", timeout=10)
    assert out.kind == "kindred", out
    assert f"trie unit {p} names string {0x7FFF0000}, past the" in out.detail, out.detail


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m[:-7], r"claims|runs past"),
        (lambda m: b"\x0b" + m, r"wire type 3"),
        (lambda m: b"\x0a\x02\x0a\x00" + m, r"pieces\[0\] has an empty piece string"),
        (lambda m: b"\x0a\x03\x0a\x01\xff" + m, r"pieces\[0\].piece is not valid UTF-8"),
        (lambda m: b"\x0a\x02\x18\x09" + m, r"pieces\[0\].type 9"),
        (lambda m: b"\x0a\x04\x0a\x02\x00a" + m, r"pieces\[0\].piece '\\x00a' holds a NUL byte"),
    ],
)
def test_sentencepiece_framing_is_checked(tmp_path, sp_models, edit, match):
    model = sp_models["identity"]
    (tmp_path / "bad.model").write_bytes(edit(model))
    out = run_in_child(_encode_sentencepiece, tmp_path / "bad.model", timeout=10)
    assert out.kind == "kindred" and re.search(match, out.detail), out
