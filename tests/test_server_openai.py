"""`qwen-edge serve` with the official openai client: response_format, tools, /v1/completions, /health, fields."""

import http.client
import json

import pytest
from serving import serving

from qwen_edge.artifact import Artifact
from qwen_edge.generator import Generator
from qwen_edge.server import ChatServer, Engine

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# bounded, so the tiny random model reaches the end within the token limit
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "rank": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None},
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    """A tiny Qwen2 artifact with room for the tools block the template adds (the shared ones hold 256 tokens)."""
    return tiny_artifact("qwen2", context_length=2048)


@pytest.fixture(scope="module")
def server(artifact):
    with serving(ChatServer(Engine(Generator(Artifact.open(artifact))), "127.0.0.1", 0, quiet=True)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def get(server, path: str):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


def check_calls(calls, only=None):
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and only in (None, call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_response_validates(client, seed):
    resp = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=120,
        seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    )
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), CITY)


def test_json_object_response_streams_json(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=150,
        seed=1,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), CITY)
    resp = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, response_format={"type": "text"})
    assert resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("seed", range(2))
def test_tool_choice_required_and_named_return_valid_calls(client, seed):
    resp = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=150, seed=seed
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    check_calls(choice.message.tool_calls)
    named = {"type": "function", "function": {"name": "add"}}
    resp = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=150, seed=seed
    )
    check_calls(resp.choices[0].message.tool_calls, only="add")
    assert len(resp.choices[0].message.tool_calls) == 1


def test_streamed_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=150, seed=0, stream=True
    )
    deltas, finish = [], None
    for chunk in stream:
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [d.index for d in deltas] == list(range(len(deltas)))
    check_calls(deltas)


def test_auto_and_multi_turn_with_tool_results(client):
    # the random model writes no valid call under auto: its reply comes back as text, never a 500
    resp = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=20, temperature=0)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason != "tool_calls"
    turns = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ]
    resp = client.chat.completions.create(model="tiny", messages=turns, tools=TOOLS, max_tokens=10, temperature=0)
    assert resp.usage.prompt_tokens > 0
    none = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens < resp.usage.prompt_tokens  # "none": the tools are not rendered


def test_completions_plain_streamed_and_without_fim_tokens(client):
    resp = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 8
    stream = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == resp.choices[0].text
    with pytest.raises(openai.BadRequestError, match="fim_prefix") as err:
        client.completions.create(model="tiny", prompt="def f(", suffix="\n", max_tokens=8)
    assert err.value.body["param"] == "suffix"


def test_health(server):
    assert get(server, "/health") == (200, {"status": "ok", "model": "tiny"})


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_or_unknown_fields_are_a_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, extra_body=extra)
    assert err.value.body["param"] == param and param.split("_")[0] in err.value.body["message"]


def test_unknown_completion_field(client):
    with pytest.raises(openai.BadRequestError, match="`echo`"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, echo=True)
