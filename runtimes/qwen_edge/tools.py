"""Tool calls: Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` replies as OpenAI tool calls.

The tools themselves reach the model through its own chat template (Qwen2.5 and Qwen3 templates take
`tools`). A reply is parsed into text and `ToolCall`s, whole (`parse_reply`) or streamed (`ToolCallStream`);
a block that is not a well-formed call of a known tool stays text. `call_grammar` is the Lark grammar
of one or more valid calls, for tool_choice "required" or a named function (qwen_edge.constrain).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from .constrain import Grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call: its id, the function name and its arguments as JSON text (what OpenAI sends)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        """The call as an OpenAI `tool_calls` entry (with `index` for a streamed delta)."""
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def tool_names(tools: Sequence[dict]) -> set[str]:
    """The function names of OpenAI-style tools (`{"type": "function", "function": {"name", ...}}`)."""
    return {t["function"]["name"] for t in tools}


def parse_call(block: str, names: set[str]) -> ToolCall | None:
    """The call in the text between <tool_call> and </tool_call>, or None when it is not a valid call of
    one of `names` (JSON object with a known "name" and object "arguments")."""
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    args = data.get("arguments", {})
    if isinstance(args, str):  # some replies give the arguments as JSON text already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(data["name"], json.dumps(args, ensure_ascii=False))


def _bare_call(text: str, names: set[str]) -> ToolCall | None:
    """A whole reply that is one call without the tags (small models often drop them), maybe in a code fence."""
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*\n(.*?)\n?```", text, re.S)
    return parse_call(fenced.group(1) if fenced else text, names)


class ToolCallStream:
    """Splits streamed reply text into ("content", text) and ("tool_call", ToolCall) parts, in order.
    Text that may begin `<tool_call>` is held back; a block that does not parse is given back as text.
    A reply that starts like a bare JSON call (`{` or a code fence) is held to its end and then parsed."""

    def __init__(self, names: set[str]):
        self.names = names
        self.held = ""
        self.inside = False
        self.bare: bool | None = None  # whether the reply may be one bare call (None: not known yet)

    def push(self, piece: str) -> list[tuple[str, object]]:
        """The parts certain after `piece`."""
        buf, out = self.held + piece, []
        if self.bare is None and buf.strip():
            self.bare = buf.lstrip().startswith(("{", "`"))
        if self.bare is not False:  # undecided or a possible bare call: hold it all
            self.held = buf
            return []
        while True:
            if self.inside:
                end = buf.find(CLOSE)
                if end < 0:
                    break
                block, buf = buf[: end + len(CLOSE)], buf[end + len(CLOSE) :]
                call = parse_call(block[len(OPEN) : -len(CLOSE)], self.names)
                out.append(("tool_call", call) if call else ("content", block))
                self.inside = False
                buf = buf.lstrip("\n") if call else buf
            else:
                start = buf.find(OPEN)
                if start < 0:
                    hold = max((k for k in range(1, len(OPEN)) if buf.endswith(OPEN[:k])), default=0)
                    out.append(("content", buf[: len(buf) - hold]))
                    buf = buf[len(buf) - hold :]
                    break
                out.append(("content", buf[:start]))
                buf, self.inside = buf[start:], True
        self.held = buf
        return [(kind, part) for kind, part in out if part]

    def flush(self) -> list[tuple[str, object]]:
        """What was held back (an unfinished block stays text), once the reply ended."""
        held, self.held, self.inside = self.held, "", False
        call = _bare_call(held, self.names) if self.bare else None
        if call is not None:
            return [("tool_call", call)]
        if self.bare:  # not a call after all: parse it as any other reply
            self.bare = False
            return self.push(held) + self.flush()
        return [("content", held)] if held else []


def parse_reply(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """A whole reply as its text (without the call blocks) and its tool calls."""
    stream = ToolCallStream(names)
    parts = stream.push(text) + stream.flush()
    calls = [part for kind, part in parts if kind == "tool_call"]
    content = "".join(part for kind, part in parts if kind == "content")
    return (content.strip() if calls else content), calls


def call_grammar(
    tools: Sequence[dict],
    only: str | None = None,
    open_id: int | None = None,
    close_id: int | None = None,
    several: bool = True,
) -> Grammar:
    """A Lark grammar of one `<tool_call>` block (or several), each a call whose arguments validate against
    its function's parameters schema (only function `only` when named). `open_id`/`close_id` are the
    vocabulary's <tool_call> and </tool_call> tokens when it has them (else the tags are text)."""
    chosen = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    alternatives = []
    for fn in chosen:
        params = fn.get("parameters") or {"type": "object"}
        schema = {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            # exactly the layout the Qwen templates show the model (json.dumps separators), no stray whitespace
            "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        }
        alternatives.append("%json " + json.dumps(schema, ensure_ascii=False))
    open_tag = f"<[{open_id}]>" if open_id is not None else json.dumps(OPEN)
    close_tag = f"<[{close_id}]>" if close_id is not None else json.dumps(CLOSE)
    lark = "\n".join(
        [
            'start: call ("\\n" call)*' if several else "start: call",
            f'call: {open_tag} "\\n" body "\\n" {close_tag}',
            "body: " + " | ".join(alternatives),
        ]
    )
    return Grammar("lark", lark)
