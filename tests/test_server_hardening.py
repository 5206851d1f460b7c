"""`qwen-edge serve` hardening: loopback default, API key, CORS, per-request limits, timeouts, bounded queue."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.cli import build_parser, main
from qwen_edge.generator import Generator
from qwen_edge.server import Busy, ChatServer, Engine, Guard, Limits, TurnLock

MAX_LENGTH = 128
KEY = "s3cret-key"
APP = "http://app.example:3000"


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("qwen2")


def _serve(artifact, limits=None, guard=None):
    srv = ChatServer(
        Engine(Generator(Artifact.open(artifact), max_length=MAX_LENGTH)),
        "127.0.0.1",
        0,
        quiet=True,
        limits=limits,
        guard=guard,
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def plain(artifact):
    srv = _serve(artifact)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def hardened(artifact):
    limits = Limits(max_tokens=8, max_body=4096, max_messages=4, max_waiting=1, wait_timeout=30)
    srv = _serve(artifact, limits, Guard(KEY, (APP,)))
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, method="POST", path="/v1/chat/completions", body=None, headers=None, key=KEY):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **auth, **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, resp.headers, json.loads(payload) if payload else None


def chat(text="Hello", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def test_default_bind_is_loopback(plain):
    assert plain.server_address[0] == "127.0.0.1"
    assert build_parser().parse_args(["serve", "art"]).host == "127.0.0.1"
    assert ChatServer.__init__.__defaults__[0] == "127.0.0.1"


def test_api_key_is_required_when_set(hardened):
    for key in (None, "wrong", KEY + "x"):
        status, headers, payload = call(hardened, body=chat(max_tokens=2), key=key)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert payload["error"]["code"] == "invalid_api_key"
    status, _, _ = call(hardened, "GET", "/v1/models", key=None)
    assert status == 401
    status, _, payload = call(hardened, body=chat(max_tokens=2))
    assert status == 200 and payload["usage"]["completion_tokens"] == 2


def test_openai_client_with_the_key(hardened):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=hardened.url, api_key=KEY, max_retries=0, timeout=30)
    assert client.models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=hardened.url, api_key="nope", max_retries=0).models.list()


def test_cors_is_off_by_default(plain):
    status, headers, payload = call(plain, "GET", "/v1/models", key=None)
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    evil = {"Origin": "http://evil.example"}
    status, headers, payload = call(plain, body=chat(max_tokens=2), headers=evil, key=None)
    assert status == 403 and payload["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = call(
        plain, "OPTIONS", headers={"Origin": APP, "Access-Control-Request-Method": "POST"}, key=None
    )
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


def test_allowed_origin_gets_cors_headers_and_preflight(hardened):
    preflight = {"Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x"}
    status, headers, _ = call(hardened, "OPTIONS", headers=preflight, key=None)  # browsers send no key here
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == APP
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "POST" in headers["Access-Control-Allow-Methods"]
    status, headers, _ = call(hardened, body=chat(max_tokens=2), headers={"Origin": APP})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == APP and headers["Vary"] == "Origin"
    status, headers, _ = call(hardened, body=chat(max_tokens=2), headers={"Origin": "http://other.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


def test_per_request_limits(hardened):
    status, _, payload = call(hardened, body=chat("x" * 5000))
    assert status == 413 and payload["error"]["code"] == "request_too_large" and "4096" in payload["error"]["message"]
    five = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 5}
    status, _, payload = call(hardened, body=five)
    assert status == 400 and payload["error"]["code"] == "too_many_messages"
    for field in ("max_tokens", "max_completion_tokens"):
        status, _, payload = call(hardened, body=chat(**{field: 9}))
        assert status == 400 and payload["error"]["param"] == field and "at most 8" in payload["error"]["message"]
    status, _, payload = call(hardened, body=chat("Tell a long story"))  # no max_tokens: the cap
    assert status == 200 and payload["usage"]["completion_tokens"] <= 8
    body = {"model": "tiny", "prompt": "def f(", "temperature": 0}
    status, _, payload = call(hardened, path="/v1/completions", body=body)
    assert status == 200 and payload["usage"]["completion_tokens"] <= 8


def test_turn_lock_bounds_its_queue_and_wait():
    lock = TurnLock(max_waiting=1, wait_timeout=None)
    entered = threading.Event()
    lock.__enter__()
    waiter = threading.Thread(target=lambda: (lock.__enter__(), entered.set(), lock.__exit__()))
    waiter.start()
    while lock.waiting < 1:
        time.sleep(0.01)
    with pytest.raises(Busy, match="1 requests are already waiting"):
        lock.__enter__()
    lock.__exit__()
    waiter.join(10)
    assert entered.is_set() and not lock.locked() and lock.waiting == 0
    timed = TurnLock(wait_timeout=0.2)
    with timed:
        with pytest.raises(Busy, match="no turn on the model within 0.2 s"):
            timed.__enter__()
        assert timed.waiting == 0
    with timed:  # still usable
        pass


def test_full_queue_answers_503_with_retry_after(hardened):
    results = {}

    def queued():
        results["queued"] = call(hardened, body=chat(max_tokens=2))

    with hardened.engine.lock:  # the model is busy
        thread = threading.Thread(target=queued)
        thread.start()
        while hardened.engine.lock.waiting < 1:
            time.sleep(0.01)
        status, headers, payload = call(hardened, body=chat(max_tokens=2))
        assert status == 503 and headers["Retry-After"] == "2" and payload["error"]["code"] == "server_busy"
        status, headers, _ = call(hardened, body=chat(max_tokens=2, stream=True))
        assert status == 503 and headers["Retry-After"] == "2"
    thread.join(30)
    assert results["queued"][0] == 200  # the queued request was served once the model was free


def test_wait_and_request_timeouts(artifact):
    srv = _serve(artifact, Limits(wait_timeout=0.3, request_timeout=30))
    slow = _serve(artifact, Limits(wait_timeout=30, request_timeout=0.3))
    try:
        with srv.engine.lock:
            status, headers, payload = call(srv, body=chat(max_tokens=2), key=None)
        assert status == 503 and "within 0.3 s" in payload["error"]["message"] and headers["Retry-After"]
        with slow.engine.lock:
            result = {}
            thread = threading.Thread(target=lambda: result.update(r=call(slow, body=chat(max_tokens=2), key=None)))
            thread.start()
            time.sleep(0.6)  # the deadline passes while it waits
        thread.join(30)
        status, _, payload = result["r"]
        assert status == 504 and payload["error"]["code"] == "request_timeout"
        assert not slow.engine.lock.locked()
        assert call(srv, body=chat(max_tokens=2), key=None)[0] == 200
    finally:
        for s in (srv, slow):
            s.shutdown()
            s.server_close()


def test_silent_client_is_dropped_after_the_read_timeout(artifact):
    srv = _serve(artifact, Limits(read_timeout=0.3))
    try:
        host, port = srv.server_address[:2]
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and then nothing
        start = time.monotonic()
        assert sock.recv(4096) == b""  # the server closed the connection
        assert time.monotonic() - start < 5
        sock.close()
        assert call(srv, body=chat(max_tokens=2), key=None)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--queue", "-1"], "--queue must be 0 or more"),
        (["--max-tokens-cap", "0"], "--max-tokens-cap must be positive"),
        (["--request-timeout", "0"], "--request-timeout must be positive"),
        (["--api-key", " "], "--api-key is empty"),
    ],
)
def test_bad_serve_flags_are_one_line_errors(artifact, capsys, flags, needle):
    assert main(["serve", str(artifact), "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
