"""Tool calls (qwen_edge.tools): parsing whole and streamed replies, and the grammar of a valid call."""

import json
from pathlib import Path

import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.constrain import Constraint
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams
from qwen_edge.tools import ToolCallStream, call_grammar, parse_reply, tool_names

NAMES = {"get_weather", "add"}
TWO = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "maximum": 99, "minimum": 0}},
                "required": ["a"],
                "additionalProperties": False,
            },
        },
    },
]


def streamed(text: str, size: int):
    stream = ToolCallStream(NAMES)
    parts = [p for i in range(0, len(text), size) for p in stream.push(text[i : i + size])] + stream.flush()
    return "".join(p for k, p in parts if k == "content"), [p for k, p in parts if k == "tool_call"]


def test_several_calls_in_one_reply():
    content, calls = parse_reply(TWO, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    entry = calls[0].openai(0)
    assert entry["index"] == 0 and entry["type"] == "function" and entry["function"]["name"] == "get_weather"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_in_any_pieces_equals_whole(size):
    content, calls = streamed(TWO, size)
    assert content.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "add"]


CONFORMANCE = json.loads((Path(__file__).parent / "conformance" / "tool_calls.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", CONFORMANCE["cases"], ids=lambda c: c["reply"][:30])
def test_conformance_cases_whole_and_streamed(case):
    """The cases the JS runtime parses the same way (runtimes/js/test/tools.test.js)."""
    names = set(CONFORMANCE["names"])
    content, calls = parse_reply(case["reply"], names)
    assert content == case["content"]
    assert [[c.name, c.arguments] for c in calls] == case["calls"]
    for size in (1, 3, 1000):
        stream = ToolCallStream(names)
        r = case["reply"]
        parts = [p for i in range(0, len(r), size) for p in stream.push(r[i : i + size])] + stream.flush()
        assert [[c.name, c.arguments] for k, c in parts if k == "tool_call"] == case["calls"]


def test_call_grammar_gives_valid_calls(tiny_artifact):
    jsonschema = pytest.importorskip("jsonschema")
    gen = Generator(Artifact.open(tiny_artifact("qwen2")), max_length=256)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for only, several in [(None, False), ("add", False), (None, True)]:
        for seed in range(3):
            constraint = Constraint(call_grammar(TOOLS, only, several=several), gen)
            out = gen.generate(gen.encode("call:"), SamplingParams(1.0, seed=seed), 200, constraint=constraint)
            content, calls = parse_reply(out.read(), tool_names(TOOLS))
            assert out.finish_reason == "stop" and content == "" and calls, out.text
            assert several or len(calls) == 1
            for call in calls:
                assert only in (None, call.name)
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
