"""`qwen-edge serve`: a local OpenAI-compatible HTTP server for one artifact (standard library only).

Endpoints (JSON; errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status):

- `GET /v1/models`, `GET /v1/models/{id}`: the artifact as one model; its id is the recipe name from
  the manifest unless `--model-id` sets another.
- `POST /v1/chat/completions`: OpenAI chat completions. Fields: `model` (required, must be the
  served id, else 404 `model_not_found`), `messages` (system/developer/user/assistant/tool, text
  content as a string or a list of `{"type": "text"}` parts), `max_completion_tokens` or
  `max_tokens` (default: the rest of the context), `temperature` (default 1.0; 0 = greedy),
  `top_p`, `seed`, `stop` (a string or a list), `n` (1 only), `stream`, `stream_options.include_usage`;
  extensions `top_k`, `min_p`, `repetition_penalty`, `chat_template_kwargs` (e.g.
  `{"enable_thinking": false}` for Qwen3) and `thinking_budget` (Qwen3: close the thinking after this
  many tokens; default: `serve --thinking-budget`). A Qwen3 reply's thinking comes back apart from
  the answer, as `reasoning_content` (streamed as `reasoning_content` deltas), so a client that sends
  the conversation back sends it without the thinking. Other OpenAI fields are ignored. `finish_reason` is
  "stop" (end of turn or a stop string) or "length" (max tokens or the end of the context).
  With `stream` the reply is server-sent events: `data: {chat.completion.chunk}` lines (first the
  assistant role, then text pieces, then an empty delta with the finish reason, then usage if asked)
  ending with `data: [DONE]`.

Statuses: 400 malformed JSON or a missing/invalid field (`invalid_request_error`), 400 with code
`context_length_exceeded` for a prompt that does not fit the context, 404 unknown model or path,
405 wrong method, 411/413 missing or oversized body, 500 an unexpected failure (the server goes on).

One model is loaded once. Generations run one at a time under a lock, because the KV cache belongs to
one generation at a time; concurrent clients wait their turn. The cache is kept between requests, so
a request that starts with the previous one's tokens (same system prompt, next turn of the same
conversation) only feeds the new part. A streaming client that disconnects stops its generation.
"""

from __future__ import annotations

import collections
import json
import select
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from .chat import ChatSession, ThinkingSplitter
from .errors import ContextOverflowError, QwenEdgeError
from .generator import Generator
from .sampling import SamplingParams

MAX_BODY = 16 << 20
ROLES = {"system", "developer", "user", "assistant", "tool"}
MODELS = "/v1/models"
CHAT = "/v1/chat/completions"


class RequestError(Exception):
    """A request the server answers with an OpenAI-style error and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed the connection; its generation is abandoned."""


# -- request validation ----------------------------------------------------------------------------


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"`{name}` must be a number, not {json.dumps(value)}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"`{name}` must be an integer, not {json.dumps(value)}", param=name)
    if minimum is not None and value < minimum:
        raise RequestError(400, f"`{name}` must be >= {minimum}, not {value}", param=name)
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(400, f"messages[{index}].content: only text parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


def parse_messages(value) -> list[dict]:
    """The request's messages as `{"role", "content"}` dicts for the chat template (developer -> system)."""
    if not isinstance(value, list) or not value:
        raise RequestError(400, "`messages` must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RequestError(400, f"messages[{i}] must be an object with role and content", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                400,
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, not {json.dumps(role)}",
                param="messages",
            )
        out.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    return out


def parse_stop(value) -> tuple[str, ...]:
    """`stop` as a tuple of strings (a string, a list of strings, or null)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise RequestError(400, "`stop` must be a string or a list of strings", param="stop")


def parse_params(body: dict) -> SamplingParams:
    """Sampling parameters of a request (OpenAI defaults: temperature 1, top_p 1)."""
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=_integer(body, "top_k", 0),
            min_p=_number(body, "min_p", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            seed=_integer(body, "seed", None, 0),
        )
    except QwenEdgeError as e:
        raise RequestError(400, str(e)) from None


# -- turns -----------------------------------------------------------------------------------------


class TurnLock:
    """A lock granted in arrival order: waiting clients are served first come, first served."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._held = False

    def __enter__(self) -> "TurnLock":
        me = object()
        with self._cond:
            self._queue.append(me)
            self._cond.wait_for(lambda: not self._held and self._queue[0] is me)
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        """Requests queued for their turn."""
        return len(self._queue)


# -- the model -------------------------------------------------------------------------------------


class Engine:
    """One loaded model shared by all requests; `lock` makes generations take turns on its KV cache.
    Requests are rendered and generated by one ChatSession (template, thinking mode and budget)."""

    def __init__(self, generator: Generator, model_id: str | None = None, thinking_budget: int | None = None):
        self.generator = generator
        self.chat = ChatSession(generator, thinking_budget=thinking_budget)
        self.splits_thinking = self.chat.has_thinking
        recipe = generator.artifact.manifest.get("recipe")
        name = recipe.get("name") if isinstance(recipe, dict) else recipe
        self.model_id = model_id or (name if isinstance(name, str) and name else generator.artifact.root.name)
        self.created = int(generator.artifact.model_path.stat().st_mtime)
        self.lock = TurnLock()

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "qwen-edge"}

    def prepare(self, body: dict) -> dict:
        """Validate a chat request and render its prompt; returns what `run` needs."""
        model = body.get("model")
        if not isinstance(model, str):
            raise RequestError(400, "`model` is required: a model id from GET /v1/models", param="model")
        if model != self.model_id:
            raise RequestError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_id!r}",
                code="model_not_found",
                param="model",
            )
        if _integer(body, "n", 1, 1) != 1:
            raise RequestError(400, "`n` must be 1: one choice per request", param="n")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise RequestError(400, "`stream` must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError(400, "`stream_options` must be an object", param="stream_options")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise RequestError(400, "`chat_template_kwargs` must be an object", param="chat_template_kwargs")
        max_tokens = _integer(body, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", None, 1)
        budget = _integer(body, "thinking_budget", None, 1)
        if budget is not None and not self.splits_thinking:
            raise RequestError(
                400,
                "`thinking_budget` applies to Qwen3 thinking models; this model has no <think> tokens",
                param="thinking_budget",
            )
        messages = parse_messages(body.get("messages"))
        params = parse_params(body)
        stop = parse_stop(body.get("stop"))
        try:
            prompt = self.chat.prompt(messages, **kwargs)
        except (QwenEdgeError, TypeError) as e:
            raise RequestError(400, f"the messages do not fit the chat template: {e}", param="messages") from None
        limit = self.generator.max_length
        if len(prompt.ids) >= limit:
            raise RequestError(
                400,
                f"the prompt has {len(prompt.ids)} tokens and the context holds {limit} (with at "
                "least one to generate); shorten the messages",
                code="context_length_exceeded",
                param="messages",
            )
        return {
            "prompt": prompt,
            "params": params,
            "stop": stop,
            "stream": bool(stream),
            "thinking_budget": budget,
            "max_tokens": max_tokens or limit - len(prompt.ids),
            "usage": bool(options.get("include_usage")),
        }

    def splitter(self, request: dict) -> ThinkingSplitter | None:
        """Separates a Qwen3 reply's thinking from its answer (None for models without thinking)."""
        return ThinkingSplitter(request["prompt"].thinking) if self.splits_thinking else None

    def run(self, request: dict, alive=lambda: True):
        """Generate under the lock, yielding text pieces; returns the Generation. Stops early (ClientGone)
        when `alive()` turns false."""
        with self.lock:
            if not alive():
                raise ClientGone()
            try:
                gen = self.chat.generate(
                    request["prompt"],
                    request["params"],
                    request["max_tokens"],
                    request["stop"],
                    thinking_budget=request["thinking_budget"],
                )
            except ContextOverflowError as e:
                raise RequestError(400, str(e), code="context_length_exceeded") from None
            pieces = iter(gen)
            try:
                for piece in pieces:
                    yield piece
                    if not alive():
                        raise ClientGone()
            finally:
                pieces.close()
            return gen


def _usage(gen) -> dict:
    n = len(gen.token_ids)
    return {
        "prompt_tokens": gen.stats.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": gen.stats.prompt_tokens + n,
    }


def _finish(gen) -> str:
    return "stop" if gen.finish_reason == "stop" else "length"


# -- HTTP ------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's Engine; every failure becomes a JSON error, never a crash."""

    protocol_version = "HTTP/1.1"
    server_version = "qwen-edge"
    timeout = 120  # seconds a client may stay silent while sending a request

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    # routing

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def do_HEAD(self):
        self._route("HEAD")

    def do_OPTIONS(self):
        self._route("OPTIONS")

    def _route(self, method: str) -> None:
        self._started = self._body_read = False  # per request: one handler serves a keep-alive connection
        self._allowed = ""
        try:
            path = unquote(self.path.split("?", 1)[0]).rstrip("/")
            if path == CHAT:
                self._allow(method, "POST")
                self._chat()
            elif path == MODELS:
                self._allow(method, "GET")
                self._send_json(200, {"object": "list", "data": [self.engine.model_card()]})
            elif path.startswith(MODELS + "/"):
                self._allow(method, "GET")
                if path[len(MODELS) + 1 :] != self.engine.model_id:
                    raise RequestError(
                        404,
                        f"model {path[len(MODELS) + 1 :]!r} does not exist; this server serves "
                        f"{self.engine.model_id!r}",
                        code="model_not_found",
                    )
                self._send_json(200, self.engine.model_card())
            else:
                raise RequestError(
                    404, f"no endpoint {self.path}; use GET {MODELS} or POST {CHAT}", code="unknown_url"
                )
        except RequestError as e:
            self._discard_body()
            self._send_json(e.status, e.body(), close=e.status >= 411)
        except (ClientGone, ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # the server goes on; the client gets a 500 if nothing was sent yet
            self.close_connection = True
            print(f"qwen-edge serve: error in {method} {self.path}: {e!r}", file=sys.stderr)
            if not self._started:
                err = RequestError(500, f"internal error: {e}", kind="server_error")
                try:
                    self._send_json(500, err.body(), close=True)
                except OSError:
                    pass

    def _allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            self._allowed = allowed
            raise RequestError(
                405, f"{method} is not allowed on {self.path}; use {allowed}", code="method_not_allowed"
            )

    # bodies

    def _discard_body(self) -> None:
        if self._body_read:
            return
        length = self.headers.get("Content-Length")
        if length is None and "Transfer-Encoding" not in self.headers:
            return  # no body
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self._body_read = True
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "send the JSON body with a Content-Length header", code="length_required")
        if not length.isdigit():
            raise RequestError(400, f"Content-Length {length!r} is not a number")
        if int(length) > MAX_BODY:
            raise RequestError(413, f"the body is larger than {MAX_BODY >> 20} MiB", code="request_too_large")
        self._body_read = True
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _send_json(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._started = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", self._allowed)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (bad request line, unsupported method) as JSON too."""
        status = HTTPStatus(code)
        kind = "server_error" if code >= 500 else "invalid_request_error"
        self.close_connection = True
        body = RequestError(code, message or status.phrase, code=None, kind=kind).body()
        data = json.dumps(body).encode("utf-8")
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)

    def _alive(self) -> bool:
        """False once the client has closed its side of the connection."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return not readable or sock.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    # chat

    def _chat(self) -> None:
        engine = self.engine
        request = engine.prepare(self._read_json())
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": engine.model_id, "system_fingerprint": None}
        pieces = engine.run(request, self._alive)
        if request["stream"]:
            self._stream(pieces, request, head)
            return
        text = []
        try:
            while True:
                text.append(next(pieces))
        except StopIteration as end:
            gen = end.value
        message = {"role": "assistant", "content": "".join(text), "refusal": None}
        splitter = engine.splitter(request)
        if splitter is not None:
            parts = splitter.push(message["content"]) + splitter.flush()
            message["content"] = "".join(t for kind, t in parts if kind == "content")
            reasoning = "".join(t for kind, t in parts if kind == "reasoning")
            if reasoning:
                message["reasoning_content"] = reasoning
        self._send_json(
            200,
            {
                **head,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(gen)}],
                "usage": _usage(gen),
            },
        )

    def _stream(self, pieces, request: dict, head: dict) -> None:
        chunk = {**head, "object": "chat.completion.chunk"}
        splitter = self.engine.splitter(request)

        def event(delta=None, finish=None, usage=None) -> None:
            choices = (
                [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            )
            extra = {"usage": usage} if usage is not None else ({"usage": None} if request["usage"] else {})
            self._write_chunk(
                b"data: "
                + json.dumps({**chunk, "choices": choices, **extra}, ensure_ascii=False).encode("utf-8")
                + b"\n\n"
            )

        try:
            first = next(pieces)
        except StopIteration as end:
            first, gen = None, end.value
        # the lock is held from here on (or generation is already over): start the event stream
        self._started = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def text(parts) -> None:
            for kind, piece in parts:
                event({"reasoning_content" if kind == "reasoning" else "content": piece})

        try:
            event({"role": "assistant", "content": ""})
            if first is not None:
                text(splitter.push(first) if splitter else [("content", first)])
                try:
                    while True:
                        piece = next(pieces)
                        text(splitter.push(piece) if splitter else [("content", piece)])
                except StopIteration as end:
                    gen = end.value
            if splitter:
                text(splitter.flush())
        except OSError:
            pieces.close()  # the client left: stop generating and free the lock
            raise ClientGone() from None
        event({}, _finish(gen))
        if request["usage"]:
            event(usage=_usage(gen))
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    """A threading HTTP server holding one Engine."""

    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False):
        self.engine, self.quiet = engine, quiet
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise QwenEdgeError(
                f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host"
            ) from None

    def handle_error(self, request, client_address) -> None:
        """A client resetting its connection is routine; anything else is logged on one line."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"qwen-edge serve: error with client {client_address[0]}: {error!r}", file=sys.stderr)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"
