"""`qwen-edge serve` on loopback: the official openai client, raw HTTP errors, concurrent load, disconnects."""

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import serving

from qwen_edge import cli
from qwen_edge.artifact import Artifact
from qwen_edge.chat import CLOSE_THINKING, ChatSession, strip_thinking
from qwen_edge.errors import QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams
from qwen_edge.server import ChatServer, ClientGone, Engine, TurnLock

openai = pytest.importorskip("openai")

SYSTEM = "You are terse."
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("qwen2")


@pytest.fixture(scope="module")
def server(artifact):
    with serving(
        ChatServer(Engine(Generator(Artifact.open(artifact), max_length=MAX_LENGTH)), "127.0.0.1", 0, quiet=True)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)


def reference(artifact, user: str, max_new_tokens: int) -> str:
    """The Python loop's greedy reply for [system, user]."""
    chat = ChatSession(Generator(Artifact.open(artifact), max_length=MAX_LENGTH), system=SYSTEM)
    return "".join(chat.send(user, SamplingParams(), max_new_tokens))


def messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def raw(server, method: str, path: str, body=None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, resp.headers, json.loads(payload) if payload else None


def test_models_list_and_retrieve(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]  # the recipe name
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_completion_equals_the_python_loop(client, artifact):
    resp = client.chat.completions.create(model="tiny", messages=messages("Hello there"), max_tokens=12, temperature=0)
    assert resp.object == "chat.completion" and resp.model == "tiny" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference(artifact, "Hello there", 12)
    assert choice.finish_reason == "length"  # a random tiny model does not end its turn in 12 tokens
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12 and resp.usage.prompt_tokens > 5


def test_streaming_equals_the_python_loop(client, artifact):
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages("Stream me"),
        max_completion_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(artifact, "Stream me", 15)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stop_strings_and_sampling_extensions(client, artifact):
    full = reference(artifact, "Stop test", 20)
    stop = full[5:8]
    resp = client.chat.completions.create(
        model="tiny", messages=messages("Stop test"), max_tokens=20, temperature=0, stop=[stop, "never-appears"]
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == full[: full.index(stop)]

    def sampled():
        return (
            client.chat.completions.create(
                model="tiny",
                messages=messages("Sample"),
                max_tokens=10,
                temperature=0.9,
                top_p=0.9,
                seed=7,
                extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
            )
            .choices[0]
            .message.content
        )

    assert sampled() == sampled()  # seeded sampling is reproducible through the server


def test_bad_requests_get_openai_errors(server):
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        ({**good, "model": "gpt-4o"}, 404, "model_not_found"),
        ({k: v for k, v in good.items() if k != "model"}, 400, None),
        ({**good, "messages": []}, 400, None),
        ({**good, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
        ({**good, "max_tokens": 0}, 400, None),
        ({**good, "temperature": "hot"}, 400, None),
        ({**good, "temperature": -1}, 400, None),
        ({**good, "top_p": 0}, 400, None),
        ({**good, "seed": -1}, 400, None),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
        ({**good, "stop": 5}, 400, None),
        ({**good, "n": 2}, 400, None),
        ({**good, "stream": "yes"}, 400, None),
        ({**good, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded"),
    ]
    for body, status, code in cases:
        got, _, payload = raw(server, "POST", "/v1/chat/completions", body)
        assert got == status, (body, payload)
        err = payload["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and err["code"] == code, (body, payload)
    assert raw(server, "POST", "/v1/chat/completions", good)[0] == 200  # still serving


def test_unknown_paths_and_wrong_methods(server):
    status, _, payload = raw(server, "GET", "/v1/embeddings")
    assert status == 404 and payload["error"]["code"] == "unknown_url"
    status, headers, payload = raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST" and payload["error"]["code"] == "method_not_allowed"
    assert raw(server, "DELETE", "/v1/models")[0] == 405
    status, _, payload = raw(server, "FROB", "/v1/models")
    assert status == 501 and "error" in payload
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:  # garbage instead of HTTP
        sock.sendall(b"\x00\x01garbage\r\n\r\n")
        assert b'"Bad request syntax' in sock.recv(4096)  # no status line: http.server treats it as HTTP/0.9
    assert raw(server, "GET", "/v1/models")[0] == 200


def test_errors_keep_a_keep_alive_connection_usable(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    good = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    for method, path, body, status in [
        ("POST", "/v1/nothing", good, 404),
        ("POST", "/v1/chat/completions", "{", 400),
        ("POST", "/v1/models", good, 405),
        ("POST", "/v1/chat/completions", good, 200),
        ("GET", "/v1/models/tiny", None, 200),
        ("POST", "/v1/chat/completions", good, 200),
    ]:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == status, (method, path, payload)
    conn.close()


def test_concurrent_clients_get_their_own_answers(client, server):
    prompts = [f"Question number {i}: {'why ' * i}" for i in range(12)]

    def ask(prompt):
        resp = client.chat.completions.create(model="tiny", messages=messages(prompt), max_tokens=8, temperature=0)
        return resp.choices[0].message.content

    sequential = [ask(p) for p in prompts]
    assert len(set(sequential)) > 1  # the prompts lead to different replies, so a mix-up would show
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            assert list(pool.map(ask, prompts)) == sequential
    assert not server.engine.lock.locked()


def test_a_disconnecting_streaming_client_frees_the_server(client, server):
    host, port = server.server_address[:2]
    body = json.dumps(
        {"model": "tiny", "messages": messages("Leave early"), "max_tokens": 100_000, "temperature": 0, "stream": True}
    ).encode()
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    sock.close()
    deadline = time.time() + 10
    while server.engine.lock.locked() and time.time() < deadline:
        time.sleep(0.05)
    assert not server.engine.lock.locked()
    resp = client.chat.completions.create(model="tiny", messages=messages("Next"), max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens == 3


def test_generation_stops_when_the_client_is_gone(server):
    engine = server.engine
    request = engine.prepare({"model": "tiny", "messages": messages("Go on"), "temperature": 0})
    checks = []

    def alive():
        checks.append(1)
        return len(checks) < 4

    pieces = engine.run(request, alive)
    with pytest.raises(ClientGone):
        list(pieces)
    assert not engine.lock.locked()
    assert engine.generator.position < len(request["prompt"].ids) + 10  # stopped after a few tokens, not at max_tokens
    assert request["max_tokens"] == MAX_LENGTH - len(request["prompt"].ids)  # default: the rest of the context


def _ctrl_c_as_usual():
    """In the child before exec: Ctrl-C's default action, which a runner started in the background (where the
    shell ignores SIGINT) would otherwise pass on, so that the server would never see the SIGINT sent to it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_serve_end_to_end(artifact):
    code = "import sys; from qwen_edge.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            str(artifact),
            "--port",
            "0",
            "--model-id",
            "mine",
            "--max-length",
            "128",
            "--verify",
            "size",
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_usual,
    )
    try:
        banner = proc.stderr.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1) ", banner).group(1)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["mine"]
        reply = client.chat.completions.create(
            model="mine", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.usage.completion_tokens <= 3 and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in err


def test_cli_serve_reports_a_busy_port(artifact, server, capsys):
    port = server.server_address[1]
    assert cli.main(["serve", str(artifact), "--port", str(port), "--verify", "none"]) == 2
    assert "cannot listen on 127.0.0.1:%d" % port in capsys.readouterr().err
    with pytest.raises(QwenEdgeError, match="pick another --port"):
        ChatServer(server.engine, "127.0.0.1", port)


def test_turn_lock_serves_in_arrival_order():
    lock, order, threads = TurnLock(), [], []
    with lock:
        for i in range(5):

            def take(i=i):
                with lock:
                    order.append(i)

            threads.append(threading.Thread(target=take))
            threads[-1].start()
            while lock.waiting < i + 1:
                time.sleep(0.001)
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4] and not lock.locked() and lock.waiting == 0


@pytest.fixture(scope="module")
def thinking_server(tiny_artifact):
    """A tiny Qwen3 whose generation prompt opens the thinking block (as thinking-only models do)."""
    engine = Engine(Generator(Artifact.open(tiny_artifact("qwen3", tied=True)), max_length=MAX_LENGTH))
    opened = engine.chat.template.render
    engine.chat.template.render = lambda *args, **kwargs: opened(*args, **kwargs) + "<think>\n"
    with serving(ChatServer(engine, "127.0.0.1", 0, quiet=True)) as srv:
        yield srv


def test_server_honours_the_thinking_budget_and_returns_the_thinking_apart(thinking_server):
    engine = thinking_server.engine
    chat = ChatSession(engine.generator, thinking_budget=5)
    chat.template.render = engine.chat.template.render
    expected = "".join(chat.send("Think a little", SamplingParams(), 20))
    close_ids = engine.generator.encode(CLOSE_THINKING)
    assert chat.last.token_ids[5 : 5 + len(close_ids)] == close_ids  # the reference closed its thinking at 5
    engine.generator.reset()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Think a little"}],
        "temperature": 0,
        "max_tokens": 20,
        "thinking_budget": 5,
    }
    status, _, reply = raw(thinking_server, "POST", "/v1/chat/completions", body)
    assert status == 200, reply
    message = reply["choices"][0]["message"]
    assert message["content"] == strip_thinking(expected)
    assert message["reasoning_content"] and "</think>" not in message["reasoning_content"]
    assert "</think>" not in message["content"]
    client = openai.OpenAI(base_url=thinking_server.url, api_key="none", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="tiny",
        messages=body["messages"],
        temperature=0,
        max_tokens=20,
        stream=True,
        extra_body={"thinking_budget": 5},
    )
    content, reasoning = "", ""
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
    assert (content, reasoning) == (message["content"], message["reasoning_content"])
    assert message["content"]  # the budget closed the thinking, so an answer followed
    _, _, reply = raw(thinking_server, "POST", "/v1/chat/completions", dict(body, thinking_budget=None))
    assert reply["choices"][0]["message"]["content"] == ""  # without it, all 20 tokens stay in the thinking
