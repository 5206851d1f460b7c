"""The demo model (Qwen2.5-Coder-0.5B int4) held to schemas, calling tools and filling in the middle, through
the server and the official openai client (slow: `pytest -m real_model`; QWEN_EDGE_DEMO_ARTIFACT names the
artifact, default artifacts/demo)."""

import importlib.util
import json
import os
import threading
from pathlib import Path

import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.generator import Generator
from qwen_edge.server import ChatServer, Engine

pytestmark = pytest.mark.real_model
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("QWEN_EDGE_DEMO_ARTIFACT") or ROOT / "artifacts" / "demo")
_spec = importlib.util.spec_from_file_location("bench_constrained", ROOT / "benchmarks" / "constrained.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


@pytest.fixture(scope="module")
def client():
    if not (DEMO / "manifest.json").exists():
        pytest.skip(f"no demo artifact at {DEMO}; build it (`qwen-edge build demo`) or set QWEN_EDGE_DEMO_ARTIFACT")
    srv = ChatServer(
        Engine(Generator(Artifact.open(DEMO, verify="size"), max_length=2048)), "127.0.0.1", 0, quiet=True
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=600)
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_20_prompts_x_schemas_all_valid(client, model):
    valid = 0
    for schema, user in cases.CASES:
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": user}],
            temperature=0,
            max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}},
        )
        valid += cases.valid(resp.choices[0].message.content, schema)
    assert valid == len(cases.CASES)


def test_tool_calls_have_valid_arguments(client, model):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in cases.TOOLS}
    right = 0
    for user, name in cases.TOOL_CASES:
        for choice in ("auto", "required"):
            resp = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": user}],
                tools=cases.TOOLS,
                tool_choice=choice,
                temperature=0,
                max_tokens=120,
            )
            calls = resp.choices[0].message.tool_calls
            if choice == "required":
                assert calls and resp.choices[0].finish_reason == "tool_calls"
            for call in calls or ():
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            right += bool(calls) and calls[0].function.name == name
    assert right >= len(cases.TOOL_CASES) * 2 - 2  # the right tool nearly always, even for a 0.5B model


def test_fim_fills_in_the_middle(client, model):
    for prefix, suffix, expected in cases.FIM_CASES:
        resp = client.completions.create(model=model, prompt=prefix, suffix=suffix, temperature=0, max_tokens=24)
        assert resp.choices[0].text.startswith(expected), (prefix, resp.choices[0].text)
