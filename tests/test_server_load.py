"""Load on loopback: N clients x M requests, streaming and not, some leaving mid-stream. Nothing lost,
nothing mixed: every completed reply equals its prompt's solo greedy reply, and the model ends unlocked."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.chat import ChatSession
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams
from qwen_edge.server import ChatServer, Engine, Limits

MAX_LENGTH = 128
CLIENTS, REQUESTS = 8, 8  # 64 requests
NEW_TOKENS = 12
PROMPTS = [
    "def fibonacci(n):",
    "What is the capital of France?",
    "你好，世界",
    "Bonjour !",
    "List three colours.",
    "print('hi')",
]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("qwen2")


@pytest.fixture(scope="module")
def solo(artifact) -> dict[str, str]:
    """Each prompt's greedy reply from a fresh session of its own."""
    out = {}
    for prompt in PROMPTS:
        chat = ChatSession(Generator(Artifact.open(artifact), max_length=MAX_LENGTH))
        out[prompt] = "".join(chat.send(prompt, SamplingParams(), NEW_TOKENS))
    return out


@pytest.fixture(scope="module")
def server(artifact):
    srv = ChatServer(
        Engine(Generator(Artifact.open(artifact), max_length=MAX_LENGTH)),
        "127.0.0.1",
        0,
        quiet=True,
        limits=Limits(max_waiting=CLIENTS, wait_timeout=60, request_timeout=60),
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(server, prompt: str, stream: bool, leave: bool) -> tuple[int, str | None]:
    """One chat request; returns (status, reply text), the text None when the client left mid-stream."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_LENGTH if leave else NEW_TOKENS,  # one that leaves would run to the end of the context
        "temperature": 0,
        "stream": stream,
    }
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if not stream:
        payload = json.loads(resp.read())
        conn.close()
        return resp.status, payload["choices"][0]["message"]["content"] if resp.status == 200 else None
    text, events = [], 0
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        events += 1
        if leave and events == 2:  # the role event and one text piece, then gone
            conn.sock.close()
            conn.close()
            return resp.status, None
        for choice in json.loads(data)["choices"]:
            text.append(choice["delta"].get("content") or "")
    conn.close()
    return resp.status, "".join(text)


def test_many_clients_get_their_own_greedy_replies(server, solo):
    def client(c: int) -> list:
        results = []
        for m in range(REQUESTS):
            prompt = PROMPTS[(c + m) % len(PROMPTS)]
            stream = (c + m) % 2 == 0
            leave = stream and (c * REQUESTS + m) % 3 == 0
            results.append((prompt, stream, leave, *_request(server, prompt, stream, leave)))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(CLIENTS), timeout=300) for r in rs]
    seconds = time.perf_counter() - start
    assert len(results) == CLIENTS * REQUESTS
    left = sum(1 for r in results if r[2])
    assert 0 < left < len(results) and any(r[1] and not r[2] for r in results) and any(not r[1] for r in results)
    for prompt, stream, leave, status, text in results:
        assert status == 200, (prompt, stream, status)
        if not leave:
            assert text == solo[prompt], (prompt, stream)  # nothing lost, nothing mixed
    deadline = time.time() + 10
    while (server.engine.lock.locked() or server.engine.lock.waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert not server.engine.lock.locked() and server.engine.lock.waiting == 0
    assert _request(server, PROMPTS[0], False, False) == (200, solo[PROMPTS[0]])  # and it still serves
    print(
        f"\nload: {CLIENTS} clients x {REQUESTS} requests ({left} left mid-stream) in {seconds:.2f} s, "
        f"{len(results) / seconds:.1f} requests/s",
        file=sys.stderr,
    )
