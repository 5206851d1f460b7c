"""Chat on top of the Generator: the artifact's chat template, multi-turn KV reuse, Qwen3 thinking.

Each turn renders the whole conversation with the template and hands all its tokens to the
Generator, which keeps the prefix already in the cache and feeds only the rest, so a second turn
does not re-read the first.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ArtifactError, ContextOverflowError, QwenEdgeError
from .generator import Generation, Generator
from .sampling import SamplingParams

THINK, END_THINK = "<think>", "</think>"
CLOSE_THINKING = "\n</think>\n\n"  # forced when the thinking budget runs out


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """The chat template of tokenizer_config.json, rendered in a sandbox like transformers does."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ArtifactError(f"the artifact's chat template does not compile ({e}); rebuild the artifact") from None
        self.special_tokens = special_tokens

    @classmethod
    def from_tokenizer_config(cls, path: Path) -> "ChatTemplate":
        """Read `chat_template` (a string, or a list of named templates: "default" is used)."""
        try:
            cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path} is unreadable ({e}); rebuild the artifact or re-copy it") from None
        source = cfg.get("chat_template")
        if isinstance(source, list):
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        if not isinstance(source, str) or not source.strip():
            raise QwenEdgeError(f"{path} has no chat template; use --no-chat-template for a raw completion")
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str):
                special[key] = tok
        return cls(source, special)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`; extra keyword arguments (e.g. enable_thinking) reach the template."""
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
            )
        except jinja2.TemplateError as e:
            raise QwenEdgeError(f"the chat template failed: {e}; use --no-chat-template for a raw completion") from None


class _ThinkingBudget:
    """Token hook: after `budget` tokens inside <think> without </think>, force the close of thinking."""

    def __init__(self, budget: int, think_id: int, end_id: int, close_ids: list[int], inside: bool):
        self.budget, self.think_id, self.end_id, self.close_ids = budget, think_id, end_id, close_ids
        self.inside, self.count = inside, 0

    def __call__(self, token: int) -> list[int] | None:
        if token == self.think_id:
            self.inside, self.count = True, 0
        elif token == self.end_id:
            self.inside = False
        elif self.inside:
            self.count += 1
            if self.count >= self.budget:
                self.inside = False
                return self.close_ids
        return None


def strip_thinking(text: str) -> str:
    """The answer part of a reply: everything after the last </think>, as Qwen3's template keeps it."""
    return text.rsplit(END_THINK, 1)[-1].lstrip("\n") if END_THINK in text else text


class ChatSession:
    """A multi-turn conversation with one Generator (whose KV cache carries over between turns)."""

    def __init__(
        self,
        generator: Generator,
        system: str | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
    ):
        self.generator = generator
        self.template = ChatTemplate.from_tokenizer_config(generator.artifact.tokenizer_config_path)
        self.system = system
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.messages: list[dict] = []
        self.last: Generation | None = None
        self.reset()
        if thinking_budget is not None:
            if thinking_budget < 1:
                raise QwenEdgeError(f"thinking budget must be >= 1 token, not {thinking_budget}")
            tok = generator.tokenizer
            self._think_ids = (tok.token_to_id(THINK), tok.token_to_id(END_THINK))
            if None in self._think_ids:
                raise QwenEdgeError("this model has no <think> tokens; --thinking-budget applies to Qwen3 thinking models")
            self._close_ids = generator.encode(CLOSE_THINKING)

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays; its cached tokens are reused)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def render(self) -> str:
        """The prompt text of the conversation so far, ending with the assistant generation prompt."""
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return self.template.render(self.messages, add_generation_prompt=True, **extra)

    def send(
        self,
        user_text: str,
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] = (),
    ) -> Iterator[str]:
        """Add a user turn and stream the reply's text pieces; the reply (without its thinking) is
        recorded in the history when the stream ends or is closed. `self.last` is the Generation."""
        self.messages.append({"role": "user", "content": user_text})
        prompt = self.render()
        ids = self.generator.encode(prompt)
        hook = None
        if self.thinking_budget is not None and self.enable_thinking is not False:
            inside = prompt.rfind(THINK) > prompt.rfind(END_THINK)
            hook = _ThinkingBudget(self.thinking_budget, *self._think_ids, self._close_ids, inside)
        try:
            gen = self.generator.generate(ids, params, max_new_tokens, stop_strings=stop_strings, on_token=hook)
        except ContextOverflowError:
            self.messages.pop()
            raise ContextOverflowError(
                f"the conversation has {len(ids)} tokens and the context holds {self.generator.max_length}; "
                "use /reset (or a new session) to start over, or a larger --max-length"
            ) from None
        except QwenEdgeError:
            self.messages.pop()
            raise
        self.last = gen
        try:
            yield from gen
        finally:
            self.messages.append({"role": "assistant", "content": strip_thinking(gen.text)})
