"""The templates of the MoE families: gpt-oss's harmony (channels, the analysis / final split, labels on
final), Qwen3-Coder's XML tool calls, and every template name the plan's catalogue uses resolving."""

import json
from pathlib import Path

import pytest

from kindred import KindredValueError
from kindred.data import get_template

CATALOGUE = Path(__file__).resolve().parents[1] / "python" / "kindred" / "plan" / "catalogue.json"

THINKING = [
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "4.", "thinking": "Earlier reasoning."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6.", "thinking": "Add three to three."},
]
SYSTEM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: {effort}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)


def test_every_catalogue_template_resolves():
    names = {m["chat_template"] for m in json.loads(CATALOGUE.read_text())["models"]}
    assert {"harmony", "mistral-tekken", "llama3.1"} <= names
    for name in names:
        assert get_template(name).render_text(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


def test_mistral_tekken_is_nemos_v3_tekken():
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    assert get_template("mistral-tekken").render_text(conv) == "<s>[INST]S\n\nu[/INST]a</s>"


def test_harmony_analysis_of_the_last_turn_only_and_untrained_by_default():
    tpl = get_template("harmony")
    assert tpl.render_text(THINKING) == (
        SYSTEM.format(date="2025-06-28", effort="medium") + "<|start|>user<|message|>2 + 2?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4.<|end|>"
        "<|start|>user<|message|>And 3 + 3?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Add three to three.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>6.<|return|>"
    )
    assert [s.text for s in tpl.render(THINKING) if s.trainable] == ["4.<|end|>", "6.<|return|>"]
    trained = [s.text for s in get_template("harmony", train_analysis=True).render(THINKING) if s.trainable]
    assert trained == ["4.<|end|>", "Add three to three.<|end|>", "6.<|return|>"]
    # reasoning_content (kindred's JSONL field) is read like thinking
    alt = [*THINKING[:3], {"role": "assistant", "content": "6.", "reasoning_content": "Add three to three."}]
    assert tpl.render_text(alt) == tpl.render_text(THINKING)


def test_harmony_options_and_bad_input():
    tpl = get_template("harmony", current_date="2026-01-02", reasoning_effort="high")
    text = tpl.render_text(THINKING[:2])
    assert text.startswith(SYSTEM.format(date="2026-01-02", effort="high"))
    assert "developer" not in text and tpl.generation_prompt() == "<|start|>assistant"
    with pytest.raises(KindredValueError, match="reasoning_effort must be one of"):
        get_template("harmony", reasoning_effort="max")
    bad = [THINKING[0], {"role": "assistant", "content": "<|channel|>final<|message|>4."}]
    with pytest.raises(KindredValueError, match=r"messages\[1\]\.content holds a <\|channel\|> tag"):
        tpl.render(bad)


TOOLS = [
    {"role": "system", "content": "You may call get_weather."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": " Checking both. ",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
            {"name": "get_weather", "arguments": '{"city": "Rome", "units": ["C", "F"], "exact": true}'},
        ],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "Paris is sunny, Rome rainy."},
]


def test_qwen3_coder_tool_calls_and_responses():
    tpl = get_template("qwen3-coder")
    assert tpl.render_text(TOOLS) == (
        "<|im_start|>system\nYou may call get_weather.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\nChecking both.\n"
        "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
        "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
        '<parameter=units>\n["C", "F"]\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n'
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nrain\n</tool_response>\n<|im_end|>\n"
        "<|im_start|>assistant\nParis is sunny, Rome rainy.<|im_end|>\n"
    )
    segs = tpl.render(TOOLS)
    trained = [s.text for s in segs if s.trainable]
    assert trained[0].startswith("\nChecking both.\n\n<tool_call>") and trained[0].endswith("<|im_end|>")
    assert trained[1] == "Paris is sunny, Rome rainy.<|im_end|>"
    assert not any(s.trainable for s in segs if "tool_response" in s.text)
    with pytest.raises(KindredValueError, match=r"messages\[2\]\.tool_calls\[0\]\.arguments: not JSON"):
        tpl.render(
            [
                *TOOLS[:2],
                {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{"}]},
            ]
        )
