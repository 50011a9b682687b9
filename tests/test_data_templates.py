"""Chat templates: the exact string each family renders for a multi-turn conversation with a system prompt,
the trainable segments (assistant content + end-of-turn token, nothing else), and
the family-specific rules: Qwen3's <think> handling, Llama's pinned date, NeMo's system prompt placement."""

import pytest

from kindred import KindredValueError
from kindred.data import TEMPLATES, Special, get_template

CONV = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Should I tell her? "},
    {"role": "assistant", "content": " Yes, gently."},
    {"role": "user", "content": "How?"},
    {"role": "assistant", "content": "Start with what worked."},
]

EXPECTED = {
    "gemma3": (
        "<bos><start_of_turn>user\nBe kind.\n\nShould I tell her?<end_of_turn>\n"
        "<start_of_turn>model\nYes, gently.<end_of_turn>\n"
        "<start_of_turn>user\nHow?<end_of_turn>\n"
        "<start_of_turn>model\nStart with what worked.<end_of_turn>\n"
    ),
    "qwen3": (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nShould I tell her? <|im_end|>\n"
        "<|im_start|>assistant\n Yes, gently.<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nStart with what worked.<|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nShould I tell her?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYes, gently.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nStart with what worked.<|eot_id|>"
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>Be kind.<|im_end|>"
        "<|im_start|>user<|im_sep|>Should I tell her? <|im_end|>"
        "<|im_start|>assistant<|im_sep|> Yes, gently.<|im_end|>"
        "<|im_start|>user<|im_sep|>How?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Start with what worked.<|im_end|>"
    ),
    "phi4-mini": (
        "<|system|>Be kind.<|end|><|user|>Should I tell her? <|end|><|assistant|> Yes, gently.<|end|>"
        "<|user|>How?<|end|><|assistant|>Start with what worked.<|end|><|endoftext|>"
    ),
    "mistral-nemo": (
        "<s>[INST]Should I tell her? [/INST] Yes, gently.</s>"
        "[INST]Be kind.\n\nHow?[/INST]Start with what worked.</s>"
    ),
    "chatml": (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nShould I tell her? <|im_end|>\n"
        "<|im_start|>assistant\n Yes, gently.<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n"
        "<|im_start|>assistant\nStart with what worked.<|im_end|>\n"
    ),
    "harmony": (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nBe kind.\n\n<|end|>"
        "<|start|>user<|message|>Should I tell her? <|end|>"
        "<|start|>assistant<|channel|>final<|message|> Yes, gently.<|end|>"
        "<|start|>user<|message|>How?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Start with what worked.<|return|>"
    ),
    "qwen3-coder": (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nShould I tell her? <|im_end|>\n"
        "<|im_start|>assistant\n Yes, gently.<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n"
        "<|im_start|>assistant\nStart with what worked.<|im_end|>\n"
    ),
}

# What each template trains per assistant turn: the content as rendered, then the end-of-turn token.
TRAINED = {
    "gemma3": ["Yes, gently.<end_of_turn>", "Start with what worked.<end_of_turn>"],
    "qwen3": [" Yes, gently.<|im_end|>", "Start with what worked.<|im_end|>"],
    "llama3": ["Yes, gently.<|eot_id|>", "Start with what worked.<|eot_id|>"],
    "phi4": [" Yes, gently.<|im_end|>", "Start with what worked.<|im_end|>"],
    "phi4-mini": [" Yes, gently.<|end|>", "Start with what worked.<|end|>"],
    "mistral-nemo": [" Yes, gently.</s>", "Start with what worked.</s>"],
    "chatml": [" Yes, gently.<|im_end|>", "Start with what worked.<|im_end|>"],
    # harmony: earlier final messages end with <|end|>, the last with <|return|> (where generation stops)
    "harmony": [" Yes, gently.<|end|>", "Start with what worked.<|return|>"],
    "qwen3-coder": [" Yes, gently.<|im_end|>", "Start with what worked.<|im_end|>"],
}


def test_every_template_is_covered():
    assert set(EXPECTED) == set(TEMPLATES) == set(TRAINED)


@pytest.mark.parametrize("name", TEMPLATES)
def test_renders_the_exact_string(name):
    assert get_template(name).render_text(CONV) == EXPECTED[name]


@pytest.mark.parametrize("name", TEMPLATES)
def test_trainable_segments_are_assistant_content_and_end_of_turn(name):
    tpl = get_template(name)
    segs = tpl.render(CONV)
    trained = [s for s in segs if s.trainable]
    assert [s.text for s in trained] == TRAINED[name]
    assert all(s.role == "assistant" for s in trained)
    assert all(type(s.parts[-1]) is Special and s.parts[-1] in tpl.specials for s in trained)
    assert trained[-1].parts[-1] == tpl.end_of_turn
    # every special token is a Special part (resolved by name), never text
    for s in segs:
        for p in s.parts:
            if type(p) is not Special:
                for special in tpl.specials:
                    assert special not in p, (name, p)
    # turns and exchanges: assistant turns 2 and 4 belong to exchanges 0 and 1
    assert [(s.turn, s.exchange) for s in trained] == [(2, 0), (4, 1)]


@pytest.mark.parametrize("name", TEMPLATES)
def test_without_system_prompt(name):
    text = get_template(name).render_text(CONV[1:])
    assert "Be kind." not in text
    assert text.count("Start with what worked.") == 1


def test_gemma_assistant_is_model_and_eot_not_eos():
    segs = get_template("gemma3").render(CONV)
    assert "<eos>" not in "".join(s.text for s in segs)
    system = [s for s in segs if s.role == "system"]
    assert [s.text for s in system] == ["Be kind.\n\n"] and system[0].exchange == -1


def test_llama_date_is_pinned_and_configurable():
    assert "Today Date: 26 Jul 2024\n" in get_template("llama-3.1").render_text(CONV)
    assert "Today Date: 01 Jan 2026\n" in get_template("llama3", date_string="01 Jan 2026").render_text(CONV)
    # no system message: the header (with its date lines) is still there, with empty system text
    assert (
        get_template("llama3")
        .render_text(CONV[1:])
        .startswith(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        )
    )


def test_qwen3_think_blocks():
    conv = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nfirst thoughts\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nsecond thoughts\n</think>\n\nA2"},
    ]
    tpl = get_template("qwen3")
    # earlier turns lose their reasoning; the last keeps it
    assert tpl.render_text(conv) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nsecond thoughts\n</think>\n\nA2<|im_end|>\n"
    )
    trained = [s.text for s in tpl.render(conv) if s.trainable]
    assert trained == ["A1<|im_end|>", "<think>\nsecond thoughts\n</think>\n\nA2<|im_end|>"]
    # reasoning_content is used as the reasoning
    conv[3] = {"role": "assistant", "content": "A2", "reasoning_content": "\nr\n"}
    assert tpl.render_text(conv).endswith("<|im_start|>assistant\n<think>\nr\n</think>\n\nA2<|im_end|>\n")
    # no reasoning: the empty think block is template text, not trained
    conv[3] = {"role": "assistant", "content": "\nA2"}
    segs = tpl.render(conv)
    assert tpl.render_text(conv).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n")
    assert [s.text for s in segs if s.trainable][-1] == "A2<|im_end|>"


def test_mistral_nemo_system_prompt_goes_to_the_last_user_turn():
    tpl = get_template("nemo")
    three = [
        CONV[0],
        *CONV[1:],
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Listen."},
    ]
    text = tpl.render_text(three)
    assert text.count("Be kind.") == 1
    assert text.endswith("[INST]Be kind.\n\nAnd then?[/INST]Listen.</s>")
    assert " [INST]" not in text and "[INST] " not in text
    # truncating exchanges from the front never moves it
    assert tpl.render_text([CONV[0], *three[3:]]).endswith("[INST]Be kind.\n\nAnd then?[/INST]Listen.</s>")


def test_get_template_errors():
    with pytest.raises(KindredValueError, match="unknown chat template 'vicuna'"):
        get_template("vicuna")
    with pytest.raises(KindredValueError, match="template 'gemma3'"):
        get_template("gemma3", date_string="x")
