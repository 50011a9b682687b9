"""``kindred generate`` and ``kindred chat`` on a tiny model folder (its own BPE tokenizer, ChatML), the
chat driven through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from kindred.demo import build_tiny_model
from kindred.generate import SamplingConfig, generate
from kindred.generate.cli import encode_chat, load

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


def run(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "kindred", *args], capture_output=True, text=True, env=env, timeout=300, **kw
    )


SAMPLE = ("--temperature", "1.0", "--seed", "5")  # a random model's greedy reply is newlines


def expected_replies(folder, conversations, n):
    """What the API gives for these conversations as one batch (a row's draws depend on its index)."""
    args = types.SimpleNamespace(
        model=str(folder), adapter=None, merge=False, template=None, quant="none", device="cpu"
    )
    loaded = load(args)
    assert loaded.template.name == "chatml" and loaded.model.lm_head.weight.dtype == torch.float32
    prompts = [encode_chat(loaded, m) for m in conversations]
    for ids, m in zip(prompts, conversations, strict=True):
        text = loaded.template.render_text(m) + loaded.template.generation_prompt()
        assert ids == loaded.tokenizer.encode(text)
    cfg = SamplingConfig(max_new_tokens=n, temperature=1.0, seed=5)
    out = generate(loaded.model, prompts, cfg, stop_token_ids=loaded.stops, tokenizer=loaded.tokenizer)
    return [c.text.strip() for c in out]


def expected_reply(folder, messages, n):
    return expected_replies(folder, [messages], n)[0]


def test_generate_prompt_prints_the_reply_and_speed(tiny):
    r = run(
        "generate",
        str(tiny),
        "--prompt",
        "Is honesty a duty?",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        *SAMPLE,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")  # (a random model's reply may hold other line breaks)
    want = expected_reply(tiny, [{"role": "user", "content": "Is honesty a duty?"}], 12)
    assert lines[0] == want and want
    assert "time to first token" in lines[1] and "tokens/s" in lines[1]
    assert "template chatml" in r.stderr


def test_generate_messages_answers_each_conversation(tiny, tmp_path):
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is fairness?"}],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Should I lie to spare feelings?"},
            {"role": "assistant", "content": "a reference answer, dropped"},
        ],
    ]
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    r = run("generate", str(tiny), "--messages", str(f), "--max-new-tokens", "10", "--device", "cpu", *SAMPLE)
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.split("\n") if line.startswith("[")]
    want = expected_replies(tiny, [convs[0], convs[1][:-1]], 10)
    assert replies == [f"[{i + 1}] {w}".rstrip() for i, w in enumerate(want)]
    assert r.stdout.count("time to first token") == 2


def test_generate_bad_arguments(tiny, tmp_path):
    r = run("generate", str(tiny), "--device", "cpu")
    assert r.returncode == 2 and "exactly one of --prompt" in r.stderr
    f = tmp_path / "bad.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "bot"}]}\n')
    r = run("generate", str(tiny), "--messages", str(f), "--device", "cpu")
    assert r.returncode == 2 and f"{f}:2: messages[0]" in r.stderr
    r = run("generate", str(tiny), "--prompt", "x", "--temperature", "-1", "--device", "cpu")
    assert r.returncode == 2 and "temperature" in r.stderr
    r = run("generate", str(tmp_path / "nope"), "--prompt", "x", "--device", "cpu")
    assert r.returncode == 2 and "neither a model folder" in r.stderr


def test_chat_in_a_pseudo_terminal(tiny):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "kindred",
        "chat",
        str(tiny),
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--max-seconds",
        "60",
        *SAMPLE,
    ]
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=240)
    try:
        child.expect("template chatml")
        child.expect_exact("you> ")
        child.sendline("What is courage?")
        child.expect_exact("bot> ")
        child.expect(r"\(time to first token [0-9.]+ s .* tokens/s .*within the 60 s limit\)")
        first = expected_reply(tiny, [{"role": "user", "content": "What is courage?"}], 8)
        assert first in child.before.replace("\r", "")
        child.expect_exact("you> ")
        child.sendline("/system Answer in one word.")
        child.expect_exact("(system prompt set; conversation reset)")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact("you> ")
        child.sendline("/what")
        child.expect_exact("unknown command /what")
        child.expect_exact("you> ")
        child.sendline("Why?")
        child.expect(r"within the 60 s limit\)")
        want = expected_reply(
            tiny,
            [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Why?"}],
            8,
        )
        assert want in child.before.replace("\r", "")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
