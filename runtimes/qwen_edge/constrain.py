"""Constrained decoding: the output held to a JSON schema, a regex or a Lark grammar, on llguidance.

A `Grammar` says what the output must match; `Constraint(grammar, generator)` is one constrained
generation: its `mask()` fills the Sampler's token-mask slot and it is told every accepted token
(`accept`, forced tokens included). The next mask is computed on a worker thread as soon as a
token is accepted, so it overlaps the model's forward pass (llguidance releases the GIL, as does
onnxruntime); `mask()` only waits for what is left of it.

llguidance reads the artifact's tokenizer.json itself (no transformers). It is an optional extra:
`pip install 'qwen-edge[constrained]'`.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import QwenEdgeError

if TYPE_CHECKING:
    from .generator import Generator

INSTALL = "pip install 'qwen-edge[constrained]'"
KINDS = ("json_schema", "regex", "lark")
# whitespace between JSON tokens is bounded, so a model cannot run on in blanks (a schema's x-guidance may override)
JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-edge-mask")


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise QwenEdgeError(f"constrained decoding needs llguidance; install it with {INSTALL}") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What the output must match: `kind` is json_schema (source: a schema dict or its JSON text), regex or
    lark (llguidance's Lark dialect: `%json {schema}` embeds a schema, `<[id]>` a special token)."""

    kind: str
    source: str | dict

    def __post_init__(self):
        if self.kind not in KINDS:
            raise QwenEdgeError(f"grammar kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Grammar":
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object."""
        return cls("json_schema", {"type": "object"})

    def compile(self) -> str:
        """The llguidance grammar text (raises QwenEdgeError for a malformed schema)."""
        lg = _llguidance()
        if self.kind == "regex":
            return lg.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "lark":
            return lg.LLMatcher.grammar_from_lark(self.source)
        try:
            return lg.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_DEFAULTS)
        except ValueError as e:
            raise QwenEdgeError(f"the JSON schema is not a JSON object ({e}); give an object schema") from None


@functools.lru_cache(maxsize=4)
def _vocabulary(tokenizer_path: str, n_vocab: int, eos: tuple[int, ...]):
    """llguidance's view of the tokenizer (about a second to build at 150k tokens: built once)."""
    lg = _llguidance()
    with open(tokenizer_path, encoding="utf-8") as f:
        return lg.LLTokenizer(f.read(), n_vocab=n_vocab, eos_token=list(eos))


def vocabulary(generator: "Generator"):
    """The llguidance tokenizer of a generator's artifact (cached)."""
    art = generator.artifact
    return _vocabulary(str(art.tokenizer_path), art.model.vocab_size, tuple(generator.eos_token_ids))


class Constraint:
    """One constrained generation over a generator's vocabulary.

    `think` = (think_id, end_think_id, inside) for Qwen3 thinking: the thinking is left free and the
    grammar applies after `</think>` (the whitespace the model writes after it is let through).
    `inside` says the prompt already opened `<think>`; otherwise `<think>` is allowed as the first token.
    """

    def __init__(self, grammar: Grammar, generator: "Generator", think: tuple[int, int, bool] | None = None):
        lg = _llguidance()
        self.grammar = grammar
        self._matcher = lg.LLMatcher(vocabulary(generator), validate(grammar, generator), log_level=0)
        self._tokenizer = generator.tokenizer
        self.vocab_size = generator.artifact.model.vocab_size
        self._bits = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        self._think_id, self._end_id, inside = think if think else (None, None, False)
        self._state = "thinking" if inside else ("first" if think else "on")
        self._pending: Future | None = _WORKER.submit(self._compute)

    def _compute(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    @property
    def active(self) -> bool:
        """Whether the grammar applies to the next token (False while a Qwen3 reply thinks)."""
        return self._state != "thinking"

    def mask(self) -> np.ndarray | None:
        """The allowed next tokens as a boolean row over the vocabulary (None while thinking)."""
        if self._state == "thinking":
            return None
        self._wait()
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)
        if self._state == "first":
            allowed = allowed.copy()
            allowed[self._think_id] = True
        return allowed

    def accept(self, tokens: Sequence[int]) -> None:
        """Record accepted tokens (sampled and forced); starts computing the next mask."""
        fed = []
        for token in tokens:
            token = int(token)
            if self._state == "first":
                self._state = "thinking" if token == self._think_id else "on"
                if self._state == "thinking":
                    continue
            elif self._state == "thinking":
                if token == self._end_id:
                    self._state = "after_think"
                continue
            if self._state == "after_think":
                if not self._tokenizer.decode([token], skip_special_tokens=False).strip():
                    continue
                self._state = "on"
            fed.append(token)
        if not fed:
            return
        self._wait()
        if not self._matcher.consume_tokens(fed):
            reason = self._matcher.get_error().strip().splitlines()
            raise QwenEdgeError(
                f"the output left the {self.grammar.kind.replace('_', ' ')} ({reason[0] if reason else 'rejected'}); "
                "forced tokens must fit the grammar"
            )
        self._pending = _WORKER.submit(self._compute)

    @property
    def accepting(self) -> bool:
        """Whether what was accepted so far is a complete match."""
        self._wait()
        return self._matcher.is_accepting()


def load_grammar(json_schema: str | None = None, regex: str | None = None, lark: str | None = None) -> Grammar | None:
    """The grammar of the CLI's `--json-schema FILE`, `--regex PATTERN` or `--grammar FILE` (at most one),
    checked before the model loads; None when none is given."""
    given = [g for g in (json_schema, regex, lark) if g is not None]
    if not given:
        return None
    if len(given) > 1:
        raise QwenEdgeError("give one of --json-schema, --regex and --grammar")
    if regex is not None:
        grammar = Grammar("regex", regex)
    else:
        path = json_schema if json_schema is not None else lark
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise QwenEdgeError(f"cannot read {path} ({e.strerror or e})") from None
        if lark is not None:
            grammar = Grammar("lark", text)
        else:
            try:
                schema = json.loads(text)
            except ValueError as e:
                raise QwenEdgeError(f"{path} is not valid JSON ({e}); give a JSON schema file") from None
            if not isinstance(schema, dict):
                raise QwenEdgeError(f"{path} must hold a JSON schema object")
            grammar = Grammar.json_schema(schema)
    validate(grammar)
    return grammar


def validate(grammar: Grammar, generator: "Generator | None" = None) -> str:
    """Compile and validate `grammar` (against the artifact's vocabulary when a generator is given);
    returns the llguidance grammar text, or raises QwenEdgeError naming the problem."""
    compiled = grammar.compile()
    lg = _llguidance()
    vocab = vocabulary(generator) if generator is not None else None
    is_error, messages = lg.LLMatcher.validate_grammar_with_warnings(compiled, vocab)
    if is_error:
        first = messages[0].strip().splitlines()[0] if messages else "invalid"
        raise QwenEdgeError(f"the {grammar.kind.replace('_', ' ')} is not usable: {first}")
    return compiled
