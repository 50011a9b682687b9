"""Chat data in the forms people have (kindred.data.formats): ShareGPT, Alpaca, prompt-completion and chat
messages, in JSONL, JSON arrays, Parquet, CSV and Hugging Face datasets, detected automatically, all giving
the same conversations; errors name file:line (or row), the field and the detected format."""

import json

import pytest

from kindred import KindredFormatError, KindredValueError
from kindred.data import prepare
from kindred.data.formats import detect_format, read_chat

SYSTEM = "Answer honestly."
CHATS = [
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Is a white lie fine?"},
        {"role": "assistant", "content": "Sometimes, when it spares pain and costs nothing."},
        {"role": "user", "content": "And at work?"},
        {"role": "assistant", "content": "Less often: trust there compounds."},
    ],
    [
        {"role": "user", "content": "Summarize:\n\nKeep promises."},
        {"role": "assistant", "content": "Do what you said."},
    ],
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": "Is a white lie fine?"},
            {"from": "gpt", "value": "Sometimes, when it spares pain and costs nothing."},
            {"from": "human", "value": "And at work?"},
            {"from": "gpt", "value": "Less often: trust there compounds."},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Summarize:\n\nKeep promises."},
            {"from": "gpt", "value": "Do what you said."},
        ]
    },
]
ALPACA = [
    {"instruction": "Summarize:", "input": "Keep promises.", "output": "Do what you said.", "system": ""},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": SYSTEM},
]
ALPACA_CHATS = [
    CHATS[1],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ],
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    ("records", "fmt", "expected"),
    [
        ([{"messages": c} for c in CHATS], "messages", CHATS),
        (SHAREGPT, "sharegpt", CHATS),
        (ALPACA, "alpaca", ALPACA_CHATS),
        (
            [{"prompt": "Say hi.", "completion": "Hi!"}],
            "prompt-completion",
            [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]],
        ),
    ],
)
def test_every_format_in_every_container_gives_the_same_conversations(tmp_path, records, fmt, expected):
    assert detect_format(records[0]) == fmt
    sources = [write_jsonl(tmp_path / "d.jsonl", records), records]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    sources.append(tmp_path / "d.json")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    sources.append(tmp_path / "d.parquet")
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(tmp_path / "saved"))
    sources += [ds, tmp_path / "saved"]
    for source in sources:
        assert read_chat(source).conversations == expected, source


def test_csv_alpaca_and_json_columns(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output", "system"])
        w.writeheader()
        for r in ALPACA:
            w.writerow({"system": "", **r})
    assert read_chat(path).conversations == ALPACA_CHATS
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "messages"])
        for i, c in enumerate(CHATS):
            w.writerow([i, json.dumps(c)])
    assert read_chat(path).conversations == CHATS
    path.write_text('id,messages\n0,"[{""role"": ""user""}]"\n1,not json\n')
    with pytest.raises(KindredFormatError, match=r"m\.csv:2: messages\[0\]\.content: missing"):
        read_chat(path)
    assert [s.line for s in read_chat(path, skip_invalid=True).skipped] == [2, 3]


def test_errors_name_file_line_field_and_detected_format(tmp_path):
    bad = [
        SHAREGPT[0],
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
    ]
    path = write_jsonl(tmp_path / "share.jsonl", bad)
    with pytest.raises(KindredFormatError) as e:
        read_chat(path)
    assert str(e.value) == (
        f"{path}:2: conversations[1].from: unknown speaker 'robot' (expected one of system, human, user, "
        "gpt, assistant, model, chatgpt) (format: ShareGPT ({'conversations': [{'from', 'value'}]}), "
        "detected from line 1)"
    )
    (tmp_path / "a.json").write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": "x"}\n]')
    with pytest.raises(KindredFormatError, match=r"a\.json:3: output: missing \(format: Alpaca"):
        read_chat(tmp_path / "a.json")
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        KindredFormatError, match=r"u\.jsonl:1: unknown chat data format \(fields: question, answer\)"
    ):
        read_chat(path)
    with pytest.raises(KindredValueError, match=r"<memory>: row 1: output: must be a string, got int"):
        read_chat([ALPACA[0], {"instruction": "x", "output": 3}])
    with pytest.raises(KindredFormatError, match="data file not found"):
        read_chat(tmp_path / "missing.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(KindredFormatError, match=r"broken\.parquet: not a readable Parquet file"):
        read_chat(tmp_path / "broken.parquet")
    with pytest.raises(KindredValueError, match="unknown chat data format 'axolotl'"):
        read_chat(ALPACA, format="axolotl")
    datasets = pytest.importorskip("datasets")
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)})
    with pytest.raises(KindredValueError, match=r"several splits \(train\); pass one"):
        read_chat(both)


def test_prepare_reads_every_format(tmp_path, hf_tokenizer_path):
    a = prepare(write_jsonl(tmp_path / "s.jsonl", SHAREGPT), hf_tokenizer_path, "chatml")
    b = prepare([{"messages": c} for c in CHATS], hf_tokenizer_path, "chatml")
    assert a.tokenized.ids.tolist() == b.tokenized.ids.tolist()
    assert a.chat.where(1) == f"{tmp_path / 's.jsonl'}:2"
