"""Chat JSONL input: every bad input of issue 3 gives an error naming file, line and field; --skip-invalid
counts and lists the lines instead; gzip'd input; no partial output file is left behind on failure."""

import gzip
import json

import pytest

from kindred import KindredFormatError
from kindred.cli import main
from kindred.data import read_jsonl, write_jsonl
from kindred.data.jsonl import atomic_write
from kindred.data.samples import calibration_path, load_calibration

GOOD = {
    "messages": [{"role": "user", "content": "Is it okay?"}, {"role": "assistant", "content": "It depends."}]
}


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# (bad line, expected field, expected words in the message)
BAD = [
    (b'{"messages": [{"role": "user", "content": "hi"}', "", "malformed JSON"),
    (b"[1, 2]", "", "expected a JSON object"),
    (b'{"conversation": []}', "messages", "missing"),
    (b'{"messages": "hello"}', "messages", "must be a list"),
    (json.dumps({"messages": [{"content": "hi"}]}).encode(), "messages[0].role", "missing"),
    (json.dumps(_msgs(("user", "hi"), ("bot", "yo"))).encode(), "messages[1].role", "unknown role 'bot'"),
    (
        json.dumps(_msgs(("user", "a"), ("user", "b"), ("assistant", "c"))).encode(),
        "messages[1].role",
        "two user turns in a row",
    ),
    (
        json.dumps(_msgs(("user", "a"), ("assistant", "  \n"))).encode(),
        "messages[1].content",
        "empty assistant content",
    ),
    (
        json.dumps(_msgs(("user", "a"), ("system", "s"), ("assistant", "c"))).encode(),
        "messages[1].role",
        "system prompt must be the first",
    ),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "", "invalid UTF-8 at byte"),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}]}
        ).encode(),
        "messages[0].content",
        "invalid UTF-8",
    ),
    (
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}).encode(),
        "messages[0].content",
        "missing",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(),
        "messages[0].content",
        "must be a string",
    ),
    (
        json.dumps(_msgs(("user", "a"), ("assistant", "b"), ("user", "c"))).encode(),
        "messages[2].role",
        "last message must be an assistant",
    ),
    (
        json.dumps(_msgs(("system", "s"), ("assistant", "b"))).encode(),
        "messages[1].role",
        "first turn after the system prompt",
    ),
]


@pytest.mark.parametrize("bad,field,words", BAD)
def test_bad_line_names_file_line_and_field(tmp_path, bad, field, words):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + bad + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(KindredFormatError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: " + (f"{field}: " if field else "")), msg
    assert words in msg


def test_skip_invalid_counts_and_lists_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(GOOD).encode(), BAD[0][0], json.dumps(GOOD).encode(), BAD[6][0], BAD[9][0]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = read_jsonl(path, skip_invalid=True)
    assert len(data) == 2 and data.lines == [1, 3]
    assert [s.line for s in data.skipped] == [2, 4, 5]
    assert data.skipped[1].field == "messages[1].role"
    assert data.where(1) == f"{path}:3"


def test_gzip_input_and_round_trip(tmp_path):
    convs = load_calibration()[:5]
    path = tmp_path / "data.jsonl.gz"
    write_jsonl(path, convs)
    with gzip.open(path) as f:
        assert f.read(1) == b"{"
    assert read_jsonl(path).conversations == convs
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(KindredFormatError, match=r"cut.jsonl.gz:"):
        read_jsonl(truncated)


def test_missing_data_file(tmp_path):
    with pytest.raises(KindredFormatError, match=r"nothing.jsonl: data file not found"):
        read_jsonl(tmp_path / "nothing.jsonl")


def test_shipped_calibration_set_is_valid():
    data = read_jsonl(calibration_path())
    assert len(data) >= 60 and not data.skipped
    for conv in data.conversations:
        assert conv[0]["role"] == "system"
        exchanges = sum(m["role"] == "user" for m in conv)
        assert 2 <= exchanges <= 5


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_cli_failure_leaves_no_output_file(tmp_path, hf_tokenizer_path, capsys):
    pytest.importorskip("matplotlib")
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + BAD[6][0] + b"\n")
    out = tmp_path / "prepared.safetensors"
    plot = tmp_path / "hist.png"
    argv = ["tokens", str(data), "--tokenizer", str(hf_tokenizer_path), "--template", "chatml"]
    assert main([*argv, "--out", str(out), "--plot", str(plot)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: messages[1].role: two user turns in a row" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
    # with --skip-invalid the run succeeds, reports the skipped line and writes both files
    assert main([*argv, "--out", str(out), "--plot", str(plot), "--skip-invalid"]) == 0
    shown = capsys.readouterr().out
    assert "1 invalid line(s) skipped" in shown and "skipped lines" in shown
    assert out.is_file() and plot.is_file()
    # a policy error after reading also leaves no file
    out2 = tmp_path / "second.safetensors"
    assert main([*argv, "--skip-invalid", "--budget", "5", "--policy", "error", "--out", str(out2)]) == 2
    assert "over the budget of 5 tokens" in capsys.readouterr().err
    assert not out2.exists()
