"""Chat on top of the Generator: the artifact's chat template, multi-turn KV reuse, Qwen3 thinking.

Each turn renders the whole conversation with the template and hands all its tokens to the
Generator, which keeps the prefix already in the cache and feeds only the rest, so a second turn
does not re-read the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .adapters import check_adapter
from .constrain import Constraint, Grammar
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
            raise QwenEdgeError(
                f"the chat template failed: {e}; use --no-chat-template for a raw completion"
            ) from None


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


class ThinkingSplitter:
    """Routes streamed reply text to ("reasoning", text) inside <think>...</think> and ("content", text)
    outside, without the tags and the newlines that follow them; text that may begin a tag is held back."""

    def __init__(self, inside: bool = False):
        self.inside, self.held, self._after_tag = inside, "", inside

    def push(self, piece: str) -> list[tuple[str, str]]:
        """The parts of `piece` (with what was held back) that are certain, in order."""
        buf, out = self.held + piece, []
        while (i := buf.find(END_THINK if self.inside else THINK)) >= 0:
            out.append(self._part(buf[:i]))
            buf = buf[i + len(END_THINK if self.inside else THINK) :]
            self.inside, self._after_tag = not self.inside, True
        tag = END_THINK if self.inside else THINK
        hold = max((k for k in range(1, len(tag)) if buf.endswith(tag[:k])), default=0)
        self.held = buf[len(buf) - hold :]
        out.append(self._part(buf[: len(buf) - hold]))
        return [part for part in out if part[1]]

    def flush(self) -> list[tuple[str, str]]:
        """What was held back, once the reply ended."""
        held, self.held = self.held, ""
        return [part for part in (self._part(held),) if part[1]]

    def _part(self, text: str) -> tuple[str, str]:
        if self._after_tag:
            text = text.lstrip("\n")
            self._after_tag = not text
        return ("reasoning" if self.inside else "content", text)


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: its text, token ids, and whether it leaves the model inside <think>."""

    text: str
    ids: list[int]
    thinking: bool
    enable_thinking: bool | None


class ChatSession:
    """Conversations with one Generator: the chat template, Qwen3 thinking mode and budget, and a
    multi-turn history whose KV cache carries over between turns (`send`). `prompt` + `generate`
    serve a conversation given whole (the server's requests) with the same template and budget.
    `adapter` names the switchable LoRA adapter its replies use (None: the base model); sessions with
    different adapters may share one Generator, which forgets its cache when the adapter changes."""

    def __init__(
        self,
        generator: Generator,
        system: str | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        adapter: str | None = None,
    ):
        check_adapter(generator.artifact, adapter)
        self.generator = generator
        self.adapter = adapter
        self.template = ChatTemplate.from_tokenizer_config(generator.artifact.tokenizer_config_path)
        self.system = system
        self.enable_thinking = enable_thinking
        tok = generator.tokenizer
        self._think_ids = (tok.token_to_id(THINK), tok.token_to_id(END_THINK))
        self._close_ids = generator.encode(CLOSE_THINKING) if self.has_thinking else []
        self.thinking_budget = self._check_budget(thinking_budget)
        self.messages: list[dict] = []
        self.last: Generation | None = None
        self.reset()

    @property
    def has_thinking(self) -> bool:
        """Whether the model has Qwen3's <think> tokens."""
        return None not in self._think_ids

    def _check_budget(self, budget: int | None) -> int | None:
        if budget is None:
            return None
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise QwenEdgeError(f"thinking budget must be >= 1 token (an integer), not {budget!r}")
        if not self.has_thinking:
            raise QwenEdgeError("this model has no <think> tokens; a thinking budget applies to Qwen3 thinking models")
        return budget

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays; its cached tokens are reused)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def render(self) -> str:
        """The prompt text of the conversation so far, ending with the assistant generation prompt."""
        return self.prompt(self.messages).text

    def prompt(self, messages: Sequence[dict], **template_kwargs) -> ChatPrompt:
        """Render `messages` with the template (keyword arguments reach it, e.g. enable_thinking) and encode it."""
        if self.enable_thinking is not None:
            template_kwargs.setdefault("enable_thinking", self.enable_thinking)
        text = self.template.render(messages, add_generation_prompt=True, **template_kwargs)
        inside = text.rfind(THINK) > text.rfind(END_THINK)
        return ChatPrompt(text, self.generator.encode(text), inside, template_kwargs.get("enable_thinking"))

    def generate(
        self,
        prompt: ChatPrompt,
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] = (),
        thinking_budget: int | None = None,
        grammar: Grammar | None = None,
        logprobs: int | None = None,
    ) -> Generation:
        """Start the reply to a rendered conversation; `thinking_budget` overrides the session's. A
        `grammar` (qwen_edge.constrain) holds the answer to it; a Qwen3 reply's thinking stays free.
        `logprobs`: as in `Generator.generate`."""
        budget = self.thinking_budget if thinking_budget is None else self._check_budget(thinking_budget)
        hook = None
        if budget is not None and prompt.enable_thinking is not False:
            hook = _ThinkingBudget(budget, *self._think_ids, self._close_ids, prompt.thinking)
        constraint = None
        if grammar is not None:
            thinks = self.has_thinking and (prompt.thinking or prompt.enable_thinking is not False)
            constraint = Constraint(grammar, self.generator, (*self._think_ids, prompt.thinking) if thinks else None)
        self.generator.set_adapter(self.adapter)
        return self.generator.generate(
            prompt.ids,
            params,
            max_new_tokens,
            stop_strings=stop_strings,
            on_token=hook,
            constraint=constraint,
            logprobs=logprobs,
        )

    def send(
        self,
        user_text: str,
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] = (),
        grammar: Grammar | None = None,
    ) -> Iterator[str]:
        """Add a user turn and stream the reply's text pieces; the reply (without its thinking) is
        recorded in the history when the stream ends or is closed. `self.last` is the Generation."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            prompt = self.prompt(self.messages)
            gen = self.generate(prompt, params, max_new_tokens, stop_strings, grammar=grammar)
        except ContextOverflowError:
            self.messages.pop()
            raise ContextOverflowError(
                f"the conversation has {len(prompt.ids)} tokens and the context holds {self.generator.max_length}; "
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
