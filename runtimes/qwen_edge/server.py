"""`qwen-edge serve`: a local OpenAI-compatible HTTP server for one artifact (standard library only).

Endpoints (JSON; errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status):

- `GET /v1/models`, `GET /v1/models/{id}`: the artifact as one model; its id is the recipe name from
  the manifest unless `--model-id` sets another. Each switchable LoRA adapter it ships is one more
  model, `ID:ADAPTER`, served by the same loaded graph (a switch costs the cached prefix).
- `POST /v1/chat/completions`: OpenAI chat completions. Fields: `model` (required, must be the
  served id, else 404 `model_not_found`), `messages` (system/developer/user/assistant/tool, text
  content as a string or a list of `{"type": "text"}` parts), `max_completion_tokens` or
  `max_tokens` (default: the rest of the context), `temperature` (default 1.0; 0 = greedy),
  `top_p`, `seed`, `stop` (a string or a list), `n` (1 only), `stream`, `stream_options.include_usage`;
  extensions `top_k`, `min_p`, `repetition_penalty`, `chat_template_kwargs` (e.g.
  `{"enable_thinking": false}` for Qwen3) and `thinking_budget` (Qwen3: close the thinking after this
  many tokens; default: `serve --thinking-budget`). A Qwen3 reply's thinking comes back apart from
  the answer, as `reasoning_content` (streamed as `reasoning_content` deltas), so a client that sends
  the conversation back sends it without the thinking. `response_format` (text, json_object,
  json_schema) holds the reply to the schema (qwen_edge.constrain; `strict` is accepted, the schema is
  always enforced). `tools` reach the model through its chat template; `<tool_call>` blocks in the
  reply come back as `tool_calls` (streamed as one tool-call delta per call), a malformed one as text;
  `tool_choice` none (tools not rendered) / auto / required / a named function (required and named
  constrain the reply to one valid call, several with `parallel_tool_calls: true` under required).
  `logprobs: true` with `top_logprobs` (0..20) gives `choices[].logprobs.content` (token, logprob,
  bytes, top_logprobs; streamed with the deltas) from the model's distribution (qwen_edge.logprobs).
  Extension `speculation: {"lookup": bool, "draft": false, "draft_tokens": 1..16}` (chat and
  completions): prompt lookup on or off for this request, the server's draft model (`serve --draft`)
  off, the initial draft length; the reply is the same, only its speed changes.
  Any other field is a 400 naming it. `finish_reason` is "stop" (end of turn or a stop string),
  "tool_calls" or "length" (max tokens or the end of the context).
  With `stream` the reply is server-sent events: `data: {chat.completion.chunk}` lines (first the
  assistant role, then text pieces, then an empty delta with the finish reason, then usage if asked)
  ending with `data: [DONE]`.
- `POST /v1/completions`: `prompt` (raw text, no chat template), or with `suffix` fill-in-the-middle
  with the model's FIM tokens (Qwen2.5-Coder; a 400 for a vocabulary without them); `max_tokens`
  (default: the rest of the context), the sampling fields, `stop`, `n` (1), `stream`, `stream_options`,
  `logprobs` (0..5: tokens, token_logprobs, top_logprobs, text_offset).
- `GET /health`: `{"status": "ok", "model": id}`.

Statuses: 400 malformed JSON or a missing/invalid field (`invalid_request_error`), 400 with code
`context_length_exceeded` for a prompt that does not fit the context, 404 unknown model or path,
405 wrong method, 411/413 missing or oversized body, 500 an unexpected failure (the server goes on).
Hardening (`Limits`, `Guard`): 401 without the `--api-key`, 403 from a web origin not allowed by
`--allow-origin`, 400 past the per-request limits (tokens, messages), 503 with Retry-After when the wait
queue is full or the wait for a turn timed out, 504 past the request timeout.

One model is loaded once. Generations run one at a time under a lock, because the KV cache belongs to
one generation at a time; concurrent clients wait their turn. The cache is kept between requests, so
a request that starts with the previous one's tokens (same system prompt, next turn of the same
conversation) only feeds the new part. A streaming client that disconnects stops its generation.
"""

from __future__ import annotations

import collections
import hmac
import json
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote

from .adapters import adapter_names
from .chat import ChatSession, ThinkingSplitter
from .constrain import Grammar, validate
from .contract import MAX_DRAFT_TOKENS
from .detokenize import Detokenizer
from .errors import ContextOverflowError, QwenEdgeError
from .fim import fim_prompt, fim_stop_ids
from .generator import Generator
from .listen import Listener
from .logprobs import MAX_TOP, TokenText
from .sampling import SamplingParams
from .speculative import DraftModel, PromptLookup
from .tools import CLOSE, OPEN, ToolCallStream, call_grammar, parse_reply, tool_names

MAX_BODY = 16 << 20
ROLES = {"system", "developer", "user", "assistant", "tool"}
MODELS = "/v1/models"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HEALTH = "/health"


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


class Busy(RequestError):
    """The wait queue is full or the wait for a turn timed out: 503 with Retry-After."""

    def __init__(self, why: str):
        super().__init__(
            503, f"the server is busy ({why}); retry after {RETRY_AFTER} s", code="server_busy", kind="server_error"
        )


# -- hardening: limits, API key, CORS ----------------------------------------------------------------

RETRY_AFTER = 2  # seconds a 503 asks a client to wait


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how long it may take (`qwen-edge serve` flags)."""

    max_tokens: int | None = None  # cap on generated tokens per request (None: the rest of the context)
    max_body: int = MAX_BODY  # bytes of a request body
    max_messages: int = 512  # messages of one chat request
    max_waiting: int = 32  # requests queued behind the one generating; more get a 503
    wait_timeout: float = 120.0  # seconds a request may wait for its turn before a 503
    request_timeout: float = 600.0  # seconds from a request's arrival to its last token (504, or a cut stream)
    read_timeout: float = 30.0  # seconds a client may stay silent while sending its request

    def check(self, body: dict) -> None:
        """A 400 for a body over the per-request limits; with a token cap, the cap becomes the default
        `max_tokens` (which every endpoint reads) when the request sets none."""
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > self.max_messages:
            raise RequestError(
                400,
                f"`messages` has {len(messages)} entries; this server takes at most {self.max_messages}",
                code="too_many_messages",
                param="messages",
            )
        if self.max_tokens is None:
            return
        for name in ("max_completion_tokens", "max_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_tokens:
                raise RequestError(
                    400,
                    f"`{name}` is {value}; this server generates at most {self.max_tokens} tokens per request",
                    code="max_tokens_exceeded",
                    param=name,
                )
        if body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
            body["max_tokens"] = self.max_tokens


class Guard:
    """Who may call the server: an optional API key (`Authorization: Bearer KEY`) and the web origins
    allowed to (CORS; none by default, `*` for any). A browser request from any other origin is refused
    (403) before it reaches the model, so a web page cannot make the local server generate."""

    ALLOW_HEADERS = "Authorization, Content-Type"
    ALLOW_METHODS = "GET, POST, OPTIONS"

    def __init__(self, api_key: str | None = None, allow_origins: tuple[str, ...] = ()):
        if api_key is not None and not api_key.strip():
            raise QwenEdgeError("--api-key is empty; give a secret or leave the option out")
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.allow_origins = tuple(o.rstrip("/") for o in allow_origins)

    def origin(self, headers) -> str | None:
        """The Access-Control-Allow-Origin value for a request (None: no CORS headers)."""
        origin = headers.get("Origin")
        if origin is None or not self.allow_origins:
            return None
        if "*" in self.allow_origins:
            return "*"
        return origin if origin.rstrip("/") in self.allow_origins else None

    def check(self, method: str, headers) -> bool:
        """Raise a RequestError for a request that may not proceed; True for a CORS preflight (answered 204)."""
        origin = headers.get("Origin")
        if origin is not None and self.origin(headers) is None:
            raise RequestError(
                403,
                f"requests from the web origin {origin[:100]!r} are not allowed; start the server with "
                "--allow-origin to allow it",
                code="origin_not_allowed",
                kind="permission_error",
            )
        if method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in headers:
            return True
        if self.api_key is not None:
            scheme, _, token = (headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self.api_key):
                raise RequestError(
                    401,
                    "a valid API key is required: send `Authorization: Bearer KEY`",
                    code="invalid_api_key",
                    kind="authentication_error",
                )
        return False


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
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _content(message, i), **_tool_message_fields(message, i)})
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


# -- structured outputs, tools, completions ----------------------------------------------------------

# the request fields each endpoint implements; any other is a 400 naming it (README: "Server")
CHAT_FIELDS = frozenset(
    {
        "model", "messages", "max_completion_tokens", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
        "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "chat_template_kwargs",
        "thinking_budget", "response_format", "tools", "tool_choice", "parallel_tool_calls", "logprobs",
        "top_logprobs", "speculation",
    }
)  # fmt: skip
COMPLETION_FIELDS = frozenset(
    {
        "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
        "stream_options", "top_k", "min_p", "repetition_penalty", "logprobs", "speculation",
    }
)  # fmt: skip


def check_fields(body: dict, allowed: frozenset, endpoint: str) -> None:
    """A 400 naming the first request field `endpoint` does not implement."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        shown = unknown[0] if unknown[0].isprintable() else json.dumps(unknown[0])  # one line, whatever was sent
        raise RequestError(
            400,
            f"`{shown[:100]}` is not supported by {endpoint} on this server; drop it (the README lists the "
            "accepted fields)",
            code="unsupported_field",
            param=unknown[0],
        )


def parse_response_format(value) -> Grammar | None:
    """`response_format` as the grammar the reply must follow (None for text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError(
                400, "`response_format.json_schema` must be an object with a `schema` object", param="response_format"
            )
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise RequestError(
                400, "`response_format.json_schema.strict` must be true or false", param="response_format"
            )
        return Grammar.json_schema(spec.get("schema") or {"type": "object"})
    raise RequestError(400, "`response_format.type` must be text, json_object or json_schema", param="response_format")


def parse_tools(body: dict) -> tuple[list[dict], str | None, bool]:
    """`tools`, `tool_choice` and `parallel_tool_calls`: the tools, the choice ("auto", "required" or a
    function name; None when no tool may be called) and whether a reply may hold several calls."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError(400, "`parallel_tool_calls` must be true or false", param="parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none"):
            raise RequestError(400, "`tool_choice` needs `tools`", param="tool_choice")
        return [], None, parallel
    if not isinstance(tools, list) or not tools:
        raise RequestError(400, "`tools` must be a non-empty list of function tools", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(
                400, f'tools[{i}] must be {{"type": "function", "function": {{"name", ...}}}}', param="tools"
            )
        if not isinstance(fn.get("parameters", {}), dict):
            raise RequestError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
    if choice is None or choice in ("auto", "required"):
        return tools, choice or "auto", parallel
    if choice == "none":
        return tools, None, parallel
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise RequestError(
            400,
            '`tool_choice` must be "none", "auto", "required" or {"type": "function", "function": {"name"}}',
            param="tool_choice",
        )
    if name not in tool_names(tools):
        raise RequestError(400, f"`tool_choice` names {name!r}, which is not in `tools`", param="tool_choice")
    return tools, name, parallel


def _tool_message_fields(message: dict, index: int) -> dict:
    """The tool-call parts of a message for the chat template: an assistant's `tool_calls` (arguments as
    objects, as the Qwen templates expect) and a tool result's `tool_call_id`/`name`."""
    out = {}
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and calls:
        if not isinstance(calls, list):
            raise RequestError(400, f"messages[{index}].tool_calls must be a list", param="messages")
        out["tool_calls"] = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise RequestError(
                    400, f"messages[{index}].tool_calls entries need function.name and arguments", param="messages"
                )
            args = fn.get("arguments") or "{}"
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                raise RequestError(
                    400, f"messages[{index}].tool_calls: arguments of {fn['name']!r} are not JSON", param="messages"
                ) from None
            out["tool_calls"].append({"id": call.get("id"), "type": "function", "function": {**fn, "arguments": args}})
    if message.get("role") == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    return out


def reply_grammar(engine: "Engine", body: dict, tools: list[dict], choice: str | None):
    """The grammar a chat reply must follow (response_format, or a tool call when tool_choice requires
    one), checked against the vocabulary; None when the reply is free."""
    grammar = parse_response_format(body.get("response_format"))
    if choice not in (None, "auto"):
        if grammar is not None:
            raise RequestError(
                400, "`response_format` and a required or named `tool_choice` exclude each other", param="tool_choice"
            )
        tok = engine.generator.tokenizer
        several = choice == "required" and body.get("parallel_tool_calls") is True  # else one call, then the end
        grammar = call_grammar(
            tools, None if choice == "required" else choice, tok.token_to_id(OPEN), tok.token_to_id(CLOSE), several
        )
    if grammar is None:
        return None
    try:
        validate(grammar, engine.generator)
    except QwenEdgeError as e:
        param = "tools" if choice not in (None, "auto") else "response_format"
        raise RequestError(400, f"`{param}`: {e}", param=param) from None
    return grammar


MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit


def parse_logprobs(body: dict, chat: bool) -> int | None:
    """How many top alternatives each token's logprobs carry (None: no logprobs). Chat: `logprobs: true`
    with `top_logprobs` 0..20; completions: `logprobs` 0..5."""
    if not chat:
        top = _integer(body, "logprobs", None, 0)
        if top is not None and top > MAX_COMPLETION_LOGPROBS:
            raise RequestError(
                400, f"`logprobs` must be from 0 to {MAX_COMPLETION_LOGPROBS}, not {top}", param="logprobs"
            )
        return top
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise RequestError(400, f"`logprobs` must be true or false, not {json.dumps(on)}", param="logprobs")
    top = _integer(body, "top_logprobs", None, 0)
    if top is not None and not on:
        raise RequestError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    if top is not None and top > MAX_TOP:
        raise RequestError(400, f"`top_logprobs` must be from 0 to {MAX_TOP}, not {top}", param="top_logprobs")
    return (top or 0) if on else None


def chat_logprobs(text: TokenText, entries) -> dict:
    """Chat `choices[].logprobs` for some tokens' entries (qwen_edge.logprobs)."""

    def one(token: int, logprob) -> dict:
        piece, data = text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(data)}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """The legacy completions `logprobs` block, chunk by chunk: `text_offset` counts characters from the
    start of the prompt text (as OpenAI's does) in the text the tokens decode to; a token after part of
    a character starts after that part's replacement character."""

    def __init__(self, engine: "Engine", prompt: str):
        self.text, self.offset, self.held = engine.token_text, len(prompt), []
        self.tokenizer = engine.generator.tokenizer
        self.detok = Detokenizer(self.tokenizer)

    def block(self, entries) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(self.text(e.token)[0])
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({self.text(i)[0]: lp for i, lp in e.top})
            out["text_offset"].append(self.offset + (len(self.tokenizer.decode(self.held)) if self.held else 0))
            piece = self.detok.push(e.token)
            self.held.append(e.token)
            if piece:  # the held tokens' text is out
                self.offset, self.held = self.offset + len(piece), []
        return out


def parse_speculation(value, default):
    """The speculator a request asks for with `speculation: {lookup, draft, draft_tokens}` (extension):
    prompt lookup on or off (it needs no second model, so any server has it), the server's draft model
    (`serve --draft`) off, an initial draft length; `default` is the server's own (None: plain decoding)."""
    if value is None:
        return default
    if not isinstance(value, dict):
        raise RequestError(
            400, "`speculation` must be an object: {lookup: bool, draft: bool, draft_tokens: int}", param="speculation"
        )
    unknown = sorted(set(value) - {"lookup", "draft", "draft_tokens"})
    if unknown:
        raise RequestError(
            400,
            f"`speculation.{unknown[0][:100]}` is not supported; use lookup, draft or draft_tokens",
            param="speculation",
        )
    lookup, draft, k = value.get("lookup"), value.get("draft"), value.get("draft_tokens")
    for name, flag in (("lookup", lookup), ("draft", draft)):
        if flag is not None and not isinstance(flag, bool):
            raise RequestError(400, f"`speculation.{name}` must be true or false", param="speculation")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS):
        raise RequestError(
            400, f"`speculation.draft_tokens` must be an integer from 1 to {MAX_DRAFT_TOKENS}", param="speculation"
        )
    if lookup and draft:
        raise RequestError(400, "`speculation`: lookup and draft exclude each other; pick one", param="speculation")
    if draft and not isinstance(default, DraftModel):
        raise RequestError(
            400,
            "`speculation.draft`: this server has no draft model; start it with `qwen-edge serve --draft ARTIFACT`",
            param="speculation",
        )
    spec = default
    if lookup:
        spec = default if isinstance(default, PromptLookup) else PromptLookup()
    elif (lookup is False and isinstance(default, PromptLookup)) or (
        draft is False and isinstance(default, DraftModel)
    ):
        spec = None
    if k is not None:
        if spec is None:
            raise RequestError(
                400, "`speculation.draft_tokens` needs lookup or a draft model in use", param="speculation"
            )
        spec = spec.with_length(k)
    return spec


def parse_prompt(value) -> str:
    """A completion's `prompt`: a string (or a list holding one)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise RequestError(400, "`prompt` must be a string (one prompt per request)", param="prompt")
    return value


# -- turns -----------------------------------------------------------------------------------------


class TurnLock:
    """A lock granted in arrival order: waiting clients are served first come, first served.

    With `max_waiting`, a request finding that many already queued is refused at once, and with `wait_timeout`
    one that waited that long gives up: both raise `Busy` (a 503 with Retry-After), never queue without bound.
    """

    def __init__(self, max_waiting: int | None = None, wait_timeout: float | None = None):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._held = False
        self.max_waiting, self.wait_timeout = max_waiting, wait_timeout

    def __enter__(self) -> "TurnLock":
        me = object()
        with self._cond:
            if self.max_waiting is not None and self._held and len(self._queue) >= self.max_waiting:
                raise Busy(f"{len(self._queue)} requests are already waiting for the model")
            self._queue.append(me)
            if not self._cond.wait_for(lambda: not self._held and self._queue[0] is me, self.wait_timeout):
                self._queue.remove(me)
                self._cond.notify_all()  # the one behind may now be first
                raise Busy(f"no turn on the model within {self.wait_timeout:g} s")
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
        self.chats = {self.model_id: self.chat}  # model id -> its session (the adapter ids: ID:ADAPTER)
        for adapter in adapter_names(generator.artifact):
            self.chats[f"{self.model_id}:{adapter}"] = ChatSession(
                generator, thinking_budget=thinking_budget, adapter=adapter
            )
        self.created = int(generator.artifact.model_path.stat().st_mtime)
        self.lock = TurnLock()
        self.token_text = TokenText(generator.tokenizer)
        self.speculator = generator.speculator  # the server's own; a request may change it for its turn

    def model_card(self, model_id: str | None = None) -> dict:
        return {"id": model_id or self.model_id, "object": "model", "created": self.created, "owned_by": "qwen-edge"}

    def unknown_model(self, model: str) -> RequestError:
        return RequestError(
            404,
            f"model {model!r} does not exist; this server serves {', '.join(map(repr, self.chats))}",
            code="model_not_found",
            param="model",
        )

    def _common(self, body: dict, fields, endpoint: str) -> tuple[str, bool | None, dict]:
        """The fields every generation request shares: known fields only, the model, n, stream options."""
        check_fields(body, fields, endpoint)
        model = body.get("model")
        if not isinstance(model, str):
            raise RequestError(400, "`model` is required: a model id from GET /v1/models", param="model")
        if model not in self.chats:
            raise self.unknown_model(model)
        if _integer(body, "n", 1, 1) != 1:
            raise RequestError(400, "`n` must be 1: one choice per request", param="n")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise RequestError(400, "`stream` must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError(400, "`stream_options` must be an object", param="stream_options")
        return model, stream, options

    def prepare(self, body: dict) -> dict:
        """Validate a chat request and render its prompt; returns what `run` needs."""
        model, stream, options = self._common(body, CHAT_FIELDS, f"POST {CHAT}")
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
        tools, choice, parallel = parse_tools(body)
        if choice is not None:
            kwargs = {**kwargs, "tools": tools}
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
            "model": model,
            "prompt": prompt,
            "params": params,
            "stop": stop,
            "stream": bool(stream),
            "thinking_budget": budget,
            "max_tokens": max_tokens or limit - len(prompt.ids),
            "usage": bool(options.get("include_usage")),
            "grammar": reply_grammar(self, body, tools, choice),
            "tools": tool_names(tools) if choice is not None else None,
            "parallel": parallel,
            "logprobs": parse_logprobs(body, chat=True),
            "speculator": parse_speculation(body.get("speculation"), self.speculator),
        }

    def prepare_completion(self, body: dict) -> dict:
        """Validate a `/v1/completions` request: a raw prompt, or with `suffix` a fill-in-the-middle one."""
        model, stream, options = self._common(body, COMPLETION_FIELDS, f"POST {COMPLETIONS}")
        prompt, suffix = parse_prompt(body.get("prompt")), body.get("suffix")
        tok = self.generator.tokenizer
        if suffix is None:
            ids, stop_ids = self.generator.encode(prompt, add_special_tokens=True), None
        elif not isinstance(suffix, str):
            raise RequestError(400, "`suffix` must be a string", param="suffix")
        else:
            try:
                ids = fim_prompt(tok, prompt, suffix)
            except QwenEdgeError as e:
                raise RequestError(400, str(e), param="suffix") from None
            stop_ids = fim_stop_ids(tok, self.generator.eos_token_ids)
        if not ids:
            raise RequestError(400, "`prompt` is empty; give some text", param="prompt")
        limit = self.generator.max_length
        if len(ids) >= limit:
            raise RequestError(
                400,
                f"the prompt has {len(ids)} tokens and the context holds {limit} (with at least one to "
                "generate); shorten it",
                code="context_length_exceeded",
                param="prompt",
            )
        return {
            "model": model,
            "prompt_text": prompt,
            "logprobs": parse_logprobs(body, chat=False),
            "speculator": parse_speculation(body.get("speculation"), self.speculator),
            "prompt_ids": ids,
            "stop_ids": stop_ids,
            "params": parse_params(body),
            "stop": parse_stop(body.get("stop")),
            "stream": bool(stream),
            "max_tokens": _integer(body, "max_tokens", None, 1) or limit - len(ids),
            "usage": bool(options.get("include_usage")),
        }

    def _start(self, request: dict):
        """Start the generation a prepared request asks for (a chat reply or a completion)."""
        chat = self.chats[request["model"]]
        self.generator.speculator = request["speculator"]
        if "prompt_ids" in request:
            self.generator.set_adapter(chat.adapter)
            return self.generator.generate(
                request["prompt_ids"],
                request["params"],
                request["max_tokens"],
                request["stop"],
                stop_token_ids=request["stop_ids"],
                logprobs=request["logprobs"],
            )
        return chat.generate(
            request["prompt"],
            request["params"],
            request["max_tokens"],
            request["stop"],
            thinking_budget=request["thinking_budget"],
            grammar=request["grammar"],
            logprobs=request["logprobs"],
        )

    def splitter(self, request: dict) -> ThinkingSplitter | None:
        """Separates a Qwen3 reply's thinking from its answer (None for models without thinking)."""
        return ThinkingSplitter(request["prompt"].thinking) if self.splits_thinking else None

    def run(self, request: dict, alive=lambda: True):
        """Generate under the lock, yielding text pieces; returns the Generation (also `request["generation"]`
        once started, for what streams beside the text). Stops early (ClientGone) when `alive()` turns false."""
        with self.lock:
            if not alive():
                raise ClientGone()
            try:
                gen = request["generation"] = self._start(request)
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
    timeout = Limits.read_timeout  # seconds a client may stay silent while sending a request (per server)

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout
        super().setup()

    def end_headers(self) -> None:
        origin = self.server.guard.origin(self.headers) if getattr(self, "headers", None) is not None else None
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

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
        self._deadline = time.monotonic() + self.server.limits.request_timeout
        self._timed_out = False
        try:
            if self.server.guard.check(method, self.headers):
                self._preflight()
                return
            path = unquote(self.path.split("?", 1)[0]).rstrip("/")
            if path == CHAT:
                self._allow(method, "POST")
                self._chat()
            elif path == COMPLETIONS:
                self._allow(method, "POST")
                self._completion()
            elif path == HEALTH:
                self._allow(method, "GET")
                self._send_json(200, {"status": "ok", "model": self.engine.model_id})
            elif path == MODELS:
                self._allow(method, "GET")
                cards = [self.engine.model_card(m) for m in self.engine.chats]
                self._send_json(200, {"object": "list", "data": cards})
            elif path.startswith(MODELS + "/"):
                self._allow(method, "GET")
                if path[len(MODELS) + 1 :] not in self.engine.chats:
                    raise self.engine.unknown_model(path[len(MODELS) + 1 :])
                self._send_json(200, self.engine.model_card(path[len(MODELS) + 1 :]))
            else:
                raise RequestError(
                    404,
                    f"no endpoint {self.path}; use GET {MODELS}, GET {HEALTH}, POST {CHAT} or POST {COMPLETIONS}",
                    code="unknown_url",
                )
        except RequestError as e:
            self._discard_body()
            self._send_json(e.status, e.body(), close=e.status >= 411)
        except (ClientGone, ConnectionError, socket.timeout):
            self.close_connection = True
            if self._timed_out and not self._started:
                err = RequestError(504, self._timeout_message(), code="request_timeout", kind="server_error")
                self._send_json(504, err.body(), close=True)
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
        if length and length.isdigit() and int(length) <= self.server.limits.max_body:
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
        limit = self.server.limits.max_body
        if int(length) > limit:
            raise RequestError(
                413, f"the body has {length} bytes, over this server's limit of {limit}", code="request_too_large"
            )
        self._body_read = True
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object", code="invalid_json")
        self.server.limits.check(body)
        return body

    def _send_json(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._started = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", self._allowed)
        if status == 503:
            self.send_header("Retry-After", str(RETRY_AFTER))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
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

    def _preflight(self) -> None:
        """Answer an allowed origin's CORS preflight (the allow-origin header comes with `end_headers`)."""
        self._discard_body()
        self._started = True
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", Guard.ALLOW_METHODS)
        self.send_header("Access-Control-Allow-Headers", Guard.ALLOW_HEADERS)
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _timeout_message(self) -> str:
        limit = self.server.limits.request_timeout
        return f"the request took longer than this server's {limit:g} s limit; ask for fewer tokens"

    def _alive(self) -> bool:
        """False once the client has closed its side of the connection or the request is past its deadline."""
        if time.monotonic() > self._deadline:
            self._timed_out = True
            return False
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
        head = {"id": ident, "created": created, "model": request["model"], "system_fingerprint": None}
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
        finish = _finish(gen)
        logprobs = None if gen.logprobs is None else chat_logprobs(engine.token_text, gen.logprobs)
        if request["tools"] is not None:
            content, calls = parse_reply(message["content"], request["tools"])
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [c.openai() for c in calls[: None if request["parallel"] else 1]]
                finish = "tool_calls"
        self._send_json(
            200,
            {
                **head,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
                "usage": _usage(gen),
            },
        )

    def _stream(self, pieces, request: dict, head: dict) -> None:
        chunk = {**head, "object": "chat.completion.chunk"}
        splitter = self.engine.splitter(request)

        told = 0  # the tokens whose logprobs were sent

        def event(delta=None, finish=None, usage=None, carry=True) -> None:
            nonlocal told
            logprobs, entries = None, request["generation"].logprobs if delta is not None and carry else None
            if entries is not None and len(entries) > told:  # the tokens since the last event
                logprobs, told = chat_logprobs(self.engine.token_text, entries[told:]), len(entries)
            choices = (
                [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
            )
            extra = {"usage": usage} if usage is not None else ({"usage": None} if request["usage"] else {})
            self._sse({**chunk, "choices": choices, **extra})

        first, gen = self._open_events(pieces)
        calls = ToolCallStream(request["tools"]) if request["tools"] is not None else None
        sent: list = []  # the tool calls streamed so far

        def deliver(kind, piece) -> None:
            if kind != "tool_call":
                event({"reasoning_content" if kind == "reasoning" else "content": piece})
            elif request["parallel"] or not sent:
                event({"tool_calls": [piece.openai(len(sent))]})
                sent.append(piece)

        def text(parts) -> None:
            for kind, piece in parts:
                for part in calls.push(piece) if calls is not None and kind == "content" else [(kind, piece)]:
                    deliver(*part)

        try:
            event({"role": "assistant", "content": ""}, carry=False)
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
            for part in calls.flush() if calls is not None else ():
                deliver(*part)
        except OSError:
            pieces.close()  # the client left: stop generating and free the lock
            raise ClientGone() from None
        event({}, "tool_calls" if sent else _finish(gen))
        if request["usage"]:
            event(usage=_usage(gen))
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _open_events(self, pieces):
        """Wait for the first piece (the lock is then held, or generation is over), then start the event
        stream; returns (first piece or None, the Generation if it already ended)."""
        try:
            first, gen = next(pieces), None
        except StopIteration as end:
            first, gen = None, end.value
        self._started = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        return first, gen

    def _sse(self, payload: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")

    # completions

    def _completion(self) -> None:
        engine = self.engine
        request = engine.prepare_completion(self._read_json())
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request["model"],
            "system_fingerprint": None,
        }
        pieces = engine.run(request, self._alive)
        blocks = CompletionLogprobs(engine, request["prompt_text"]) if request["logprobs"] is not None else None
        told = 0  # the tokens whose logprobs were sent

        def choice(text: str, finish: str | None) -> dict:
            nonlocal told
            logprobs = None
            if blocks is not None:
                entries = request["generation"].logprobs
                logprobs, told = blocks.block(entries[told:]), len(entries)
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        if not request["stream"]:
            text = []
            try:
                while True:
                    text.append(next(pieces))
            except StopIteration as end:
                gen = end.value
            self._send_json(200, {**head, "choices": [choice("".join(text), _finish(gen))], "usage": _usage(gen)})
            return
        first, gen = self._open_events(pieces)
        extra = {"usage": None} if request["usage"] else {}
        try:
            if first is not None:
                self._sse({**head, "choices": [choice(first, None)], **extra})
                try:
                    while True:
                        self._sse({**head, "choices": [choice(next(pieces), None)], **extra})
                except StopIteration as end:
                    gen = end.value
        except OSError:
            pieces.close()
            raise ClientGone() from None
        self._sse({**head, "choices": [choice("", _finish(gen))], **extra})
        if request["usage"]:
            self._sse({**head, "choices": [], "usage": _usage(gen)})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class ChatServer(Listener):
    """A threading HTTP server holding one Engine."""

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 8000,
        quiet: bool = False,
        limits: Limits | None = None,
        guard: Guard | None = None,
    ):
        self.engine, self.quiet = engine, quiet
        self.limits, self.guard = limits or Limits(), guard or Guard()
        engine.lock.max_waiting, engine.lock.wait_timeout = self.limits.max_waiting, self.limits.wait_timeout
        super().__init__(host, port, Handler)

    @property
    def url(self) -> str:
        return f"{self.origin}/v1"
