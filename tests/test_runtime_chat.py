"""Chat: template rendering (checked against transformers), multi-turn cache reuse, Qwen3 thinking."""

import json

import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.chat import CLOSE_THINKING, ChatSession, ChatTemplate, _ThinkingBudget, strip_thinking
from qwen_edge.errors import QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你好 there"},
    {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
    {"role": "user", "content": "Again?"},
]


@pytest.fixture(scope="module")
def qwen3_gen(tiny_artifact):
    return Generator(Artifact.open(tiny_artifact("qwen3", tied=True)))


@pytest.fixture(scope="module")
def qwen2_gen(tiny_artifact):
    return Generator(Artifact.open(tiny_artifact("qwen2")))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2]])
def test_template_renders_like_transformers(tiny_model, family, thinking, messages):
    from transformers import AutoTokenizer

    model_dir = tiny_model(family, tied=family == "qwen3")
    extra = {} if thinking is None else {"enable_thinking": thinking}
    expected = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **extra
    )
    ours = ChatTemplate.from_tokenizer_config(model_dir / "tokenizer_config.json").render(messages, **extra)
    assert ours == expected


def write_config(tmp_path, template, **more):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>", **more}))
    return path


def test_template_helpers(tmp_path):
    source = "{{ messages[0].content | tojson }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}"
    out = ChatTemplate.from_tokenizer_config(write_config(tmp_path, source)).render(
        [{"role": "user", "content": "é<"}]
    )
    assert out == '"é<"|<|im_end|>|4'
    failing = ChatTemplate.from_tokenizer_config(write_config(tmp_path, "{{ raise_exception('no tools here') }}"))
    with pytest.raises(QwenEdgeError, match="chat template failed: no tools here; use --no-chat-template"):
        failing.render([])


def test_named_templates_and_missing_template(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    assert ChatTemplate.from_tokenizer_config(write_config(tmp_path, named)).render([{}]) == "D1"
    with pytest.raises(QwenEdgeError, match="has no chat template; use --no-chat-template"):
        ChatTemplate.from_tokenizer_config(write_config(tmp_path, None))


def test_template_sandbox_refuses_unsafe_access(tmp_path):
    evil = ChatTemplate.from_tokenizer_config(write_config(tmp_path, "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(QwenEdgeError):
        evil.render([])


def test_strip_thinking():
    assert strip_thinking("<think>\nplan\n</think>\n\nAnswer") == "Answer"
    assert strip_thinking("plan\n</think>\n\nAnswer") == "Answer"
    assert strip_thinking("Plain answer") == "Plain answer"


def test_thinking_budget_hook():
    hook = _ThinkingBudget(3, think_id=1, end_id=2, close_ids=[9, 2, 9], inside=False)
    assert [hook(t) for t in (5, 1, 5, 5)] == [None, None, None, None]
    assert hook(5) == [9, 2, 9]  # third token inside <think>
    assert hook(5) is None  # closed: no more forcing
    natural = _ThinkingBudget(3, 1, 2, [9], inside=True)
    assert [natural(t) for t in (5, 2, 5, 5, 5)] == [None] * 5


def test_second_turn_reuses_the_cache(qwen2_gen):
    chat = ChatSession(qwen2_gen, system="Be brief.")
    first = "".join(chat.send("Hello there", SamplingParams(), 12))
    turn1 = chat.last.stats
    assert chat.messages[-1] == {"role": "assistant", "content": first}
    "".join(chat.send("And again?", SamplingParams(), 12))
    turn2 = chat.last.stats
    # the first prompt is never fed again; the reply is reused up to where re-tokenizing its text differs
    # from the sampled tokens (a random model emits invalid UTF-8, which comes back as U+FFFD)
    new_turn = len(qwen2_gen.encode("<|im_end|>\n<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n"))
    assert turn2.reused_tokens > turn1.prompt_tokens
    assert turn2.prefill_tokens == turn2.prompt_tokens - turn2.reused_tokens
    assert turn2.prefill_tokens <= new_turn + len(qwen2_gen.encode(first))
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_reused_cache_gives_the_same_reply_as_a_fresh_start(qwen2_gen):
    chat = ChatSession(qwen2_gen)
    "".join(chat.send("Hello there", SamplingParams(), 10))
    second = "".join(chat.send("And again?", SamplingParams(), 10))
    assert chat.last.stats.reused_tokens > 0
    fresh = Generator(qwen2_gen.artifact)
    replay = ChatSession(fresh)
    replay.messages = chat.messages[:-1]
    result = fresh.generate(fresh.encode(replay.render()), SamplingParams(), 10)
    assert result.read() == second and result.stats.reused_tokens == 0


def test_qwen3_second_turn_reuses_all_but_the_dropped_empty_think_block(qwen3_gen):
    # Qwen3's template renders past replies without the empty think block the generation prompt had,
    # so the cache is reused up to the start of the first reply
    chat = ChatSession(qwen3_gen, enable_thinking=False)
    "".join(chat.send("Hello there", SamplingParams(), 8))
    turn1 = chat.last.stats
    "".join(chat.send("And again?", SamplingParams(), 8))
    empty_think = len(qwen3_gen.encode("<think>\n\n</think>\n\n"))
    assert chat.last.stats.reused_tokens == turn1.prompt_tokens - empty_think


def test_thinking_budget_closes_thinking_and_history_drops_it(qwen3_gen):
    # this template opens the thinking block in the generation prompt, as Qwen3 thinking-only models do
    chat = ChatSession(qwen3_gen, enable_thinking=True, thinking_budget=5)
    opened = chat.template.render
    chat.template.render = lambda *args, **kwargs: opened(*args, **kwargs) + "<think>\n"
    text = "".join(chat.send("Think a little", SamplingParams(), 20))
    close = qwen3_gen.encode(CLOSE_THINKING)
    ids = chat.last.token_ids
    assert ids[5 : 5 + len(close)] == close
    assert CLOSE_THINKING in text or "</think>" in text
    assert chat.messages[-1]["content"] == strip_thinking(text)
    assert "</think>" not in chat.messages[-1]["content"]


def test_thinking_budget_must_be_positive(qwen3_gen):
    with pytest.raises(QwenEdgeError, match="thinking budget must be >= 1"):
        ChatSession(qwen3_gen, thinking_budget=0)


def test_conversation_overflow_is_reported_and_not_kept(tiny_qwen3, tmp_path_factory, qwen3_gen):
    small = Generator(qwen3_gen.artifact, max_length=24)
    chat = ChatSession(small)
    with pytest.raises(QwenEdgeError, match=r"conversation has \d+ tokens and the context holds 24; use /reset"):
        "".join(chat.send("a long message " * 10, SamplingParams(), 4))
    assert chat.messages == []
