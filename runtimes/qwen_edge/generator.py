"""The one generation loop: the cached tokens, sampling, stop tokens and strings, the context policy.

The loop drives a runner (qwen_edge.runner), which owns the graph and its KV-cache strategy, so the
same loop runs every artifact kind: qwen-edge's shared-buffer graph, the growing past/present of
plain-operator graphs, and the static prefill/decode graphs of an NPU artifact. Rolling the cache
back (`truncate`) only moves the position; the runner rewinds its cache at the next run.

Context policy: a prompt must leave room for at least one generated token (prompt tokens <
max_length) or `generate` raises ContextOverflowError with the numbers and what to do. A prompt that
fits but whose `max_new_tokens` would run past the end of the context generates until the context
is full and then stops with finish_reason "length" and a notice. Otherwise generation ends with
"stop" (a stop token or stop string) or "max_tokens".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from .artifact import Artifact
from .detokenize import Detokenizer
from .errors import ArtifactError, ContextOverflowError, QwenEdgeError
from .logprobs import MAX_TOP, TokenLogprob, token_logprob
from .runner import Runner, open_runner
from .sampling import Sampler, SamplingParams
from .speculative import Speculator, verify


@dataclass
class GenerationStats:
    """Token counts and timings of one `generate` call (seconds)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the cache (not fed again)
    prefill_tokens: int = 0  # prompt tokens fed to the model
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    drafted: int = 0  # speculative draft tokens verified by the target
    accepted: int = 0  # of which the target kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0


@dataclass
class Generation:
    """An in-progress generation: iterate for text pieces; afterwards read finish_reason, stats, text."""

    _pieces: Iterator[str] = field(repr=False)
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # the text emitted so far, piece by piece
    finish_reason: str | None = None  # "stop", "length" or "max_tokens"
    notice: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids when asked for (qwen_edge.logprobs)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self.pieces)

    def read(self) -> str:
        """Run to the end and return the whole text."""
        for _ in self:
            pass
        return self.text


class _StopFilter:
    """Holds back streamed text that could be the start of a stop string; reports a completed one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.hit = False  # a stop string was found: nothing after it is text

    def push(self, piece: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if self.hit:
            return "", True
        if not self.stops:
            return piece, False
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.hit = "", True
            return buf[: min(hits)], True
        hold = max(
            (k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0
        )
        self.held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text once generation ended without completing a stop string."""
        held, self.held = self.held, ""
        return held


def _told(constraint, on_token):
    """`on_token` that also tells the constraint each accepted token and the tokens forced after it."""

    def hook(token: int):
        forced = on_token(token) if on_token else None
        constraint.accept([token, *(forced or ())])
        return forced

    return hook


class Generator:
    """The one generation loop: tokens in the cache, sampling, stops and the context policy, over the
    runner an artifact needs (qwen_edge.runner: shared, growing or static KV cache).

    `generate(ids)` takes the whole sequence (e.g. the full rendered conversation): the longest prefix
    already in the cache is kept and only the rest is fed, in chunks of the runner's `prefill_chunk`.
    One generation runs at a time: starting a new one abandons the previous one. `runner` replaces
    the default one (e.g. a StaticRunner over sessions already made). With a `speculator`
    (qwen_edge.speculative) each step verifies its drafts in one multi-token run; the tokens stay
    those of plain decoding (greedy) or of its distribution (sampling).
    """

    def __init__(
        self,
        artifact: Artifact,
        max_length: int | None = None,
        prefill_chunk: int | None = None,
        runner: Runner | None = None,
        speculator: Speculator | None = None,
    ):
        self.artifact = artifact
        try:
            self.tokenizer = Tokenizer.from_file(str(artifact.tokenizer_path))
        except Exception as e:
            raise ArtifactError(
                f"{artifact.tokenizer_path} is not a valid tokenizer ({e}); rebuild the artifact"
            ) from None
        self.runner = runner or open_runner(artifact, max_length, prefill_chunk)
        self.max_length = self.runner.max_length
        self.eos_token_ids = tuple(artifact.model.eos_token_ids)
        self._tokens = np.zeros(self.max_length, dtype=np.int64)
        self._pos = 0
        self.speculator = speculator

    @property
    def prefill_chunk(self) -> int:
        return self.runner.prefill_chunk

    # -- cache state ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Number of tokens in the cache."""
        return self._pos

    @property
    def tokens(self) -> np.ndarray:
        """The token ids in the cache (a read-only view)."""
        view = self._tokens[: self._pos]
        view.flags.writeable = False
        return view

    def reset(self) -> None:
        """Forget the cache (no memory is released or cleared)."""
        self._pos = 0

    @property
    def adapter(self) -> str | None:
        """The switchable LoRA adapter in use (None: the base model)."""
        return getattr(self.runner, "adapter", None)

    def set_adapter(self, name: str | None) -> None:
        """Use switchable adapter `name` (None: the base model). A switch forgets the cache: its keys
        and values belong to the adapter that computed them."""
        if name == self.adapter:
            return
        if not hasattr(self.runner, "set_adapter"):
            raise QwenEdgeError(f"artifact {self.artifact.root} takes no adapters (its graphs are static)")
        self.runner.set_adapter(name)
        self.reset()

    def truncate(self, n: int) -> None:
        """Roll the cache back to its first `n` tokens."""
        if not 0 <= n <= self._pos:
            raise QwenEdgeError(f"cannot truncate the cache to {n} tokens; it holds {self._pos}")
        self._pos = n

    def append(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after the cache and return the logits row of the last one (or of every one)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        logits = self.runner.forward(ids, self._pos, all_logits)
        self._tokens[self._pos : self._pos + ids.size] = ids
        self._pos += ids.size
        return logits

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits `[n, vocab]` at every position of `ids`, fed from an empty cache (fidelity checks)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not 0 < ids.size <= self.max_length:
            raise ContextOverflowError(f"{ids.size} tokens do not fit the context of {self.max_length}")
        self.reset()
        try:
            return np.array(self.append(ids, all_logits=True), dtype=np.float32)
        finally:
            self.reset()

    def common_prefix(self, ids: np.ndarray) -> int:
        """Length of the longest common prefix of `ids` and the cached tokens."""
        m = min(ids.size, self._pos)
        diff = np.flatnonzero(self._tokens[:m] != ids[:m])
        return int(diff[0]) if diff.size else m

    # -- generation ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` with the artifact's tokenizer."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] = (),
        stop_token_ids: Iterable[int] | None = None,
        on_token: Callable[[int], Sequence[int] | None] | None = None,
        constraint=None,
        logprobs: int | None = None,
    ) -> Generation:
        """Generate after the whole sequence `prompt_ids` (its cached prefix is reused).

        Iterate the result for text pieces. Generation stops at a stop token (default: the model's
        eos ids; not emitted), at a stop string (not emitted; text that may begin one is held back),
        after `max_new_tokens`, or at the end of the context. `on_token(id)` may return token ids to
        force after a sampled token (e.g. closing a thinking block); they count as generated.
        A `constraint` (qwen_edge.constrain) masks every pick and is told every token, forced ones too.
        `logprobs` (0..20; None = off) fills `Generation.logprobs`: each token's log-probability under
        the model and that many top alternatives (qwen_edge.logprobs).
        """
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise QwenEdgeError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise QwenEdgeError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP
        ):
            raise QwenEdgeError(f"logprobs must be an integer from 0 to {MAX_TOP} (None = off), not {logprobs!r}")
        if ids.size >= self.max_length:
            more = (
                f", raise --max-length (up to {self.artifact.model.context_length})"
                if self.max_length < self.artifact.model.context_length
                else ""
            )
            raise ContextOverflowError(
                f"the prompt has {ids.size} tokens; with {max_new_tokens} new tokens it needs "
                f"{ids.size + max_new_tokens} but the context holds {self.max_length}; shorten the prompt"
                f"{more}, or use an artifact built with a longer context"
            )
        stops = frozenset(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        gen = Generation(_pieces=iter(()), logprobs=None if logprobs is None else [])
        sampler = Sampler(params, mask=constraint.mask if constraint is not None else None)
        if constraint is not None:
            on_token = _told(constraint, on_token)
        stop_text = _StopFilter(stop_strings)
        gen._pieces = self._run(gen, ids, sampler, max_new_tokens, stop_text, stops, on_token, logprobs)
        return gen

    def _run(self, gen: Generation, ids, sampler: Sampler, max_new: int, stop_text: _StopFilter, stops, on_token, top):
        stats = gen.stats
        t0 = time.perf_counter()
        reuse = min(self.common_prefix(ids), ids.size - 1)  # the last prompt token is always fed for its logits
        self.truncate(reuse)
        stats.prompt_tokens, stats.reused_tokens, stats.prefill_tokens = ids.size, reuse, ids.size - reuse
        logits = self.append(ids[reuse:])
        stats.prefill_s = time.perf_counter() - t0
        penalize = sampler.uses_history
        detok = Detokenizer(self.tokenizer)
        t_first = t_last = None
        spec = self.speculator
        if spec is not None:
            spec.start(sampler.params)
        # drafts in the cache past the last kept token, the logits row after each, their draft distributions
        ahead, rows, probs, kept_now = [], [], None, 0
        while True:
            seen = self._tokens[: self._pos - len(ahead)] if penalize else None
            if ahead:
                token = verify(sampler, logits, seen, ahead[0], probs[len(rows) - len(ahead)] if probs else None)
            else:
                token = sampler(logits, seen)
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
                stats.ttft_s = t_first - t0
            if token in stops:
                gen.finish_reason = "stop"
                break
            new = [token, *(on_token(token) or ())] if on_token else [token]
            gen.token_ids.extend(new)
            if top is not None:  # `logits` is the row the token was picked from, in both paths
                gen.logprobs.append(token_logprob(logits, token, top))
                gen.logprobs.extend(TokenLogprob(t, None) for t in new[1:])
            stats.new_tokens += 1
            text, hit = stop_text.push("".join(detok.push(t) for t in new))
            if text:
                gen.pieces.append(text)
                yield text
            if hit:
                gen.finish_reason = "stop"
                break
            if len(gen.token_ids) >= max_new:
                gen.finish_reason = "max_tokens"
                break
            kept = bool(ahead) and token == ahead[0]
            if kept:  # already in the cache, and its logits row computed
                ahead.pop(0)
                logits = rows[len(rows) - len(ahead) - 1]
                stats.accepted += 1
                kept_now += 1
            feed = new[1:] if kept else new
            if self._pos - len(ahead) + len(feed) > self.max_length:
                gen.finish_reason = "length"
                gen.notice = (
                    f"stopped at the end of the context ({self.max_length} tokens) after {len(gen.token_ids)} new "
                    "tokens; use a shorter prompt, fewer new tokens, a larger --max-length, or an artifact with a "
                    "longer context"
                )
                break
            if kept and not feed:
                continue
            if ahead:  # drafts rejected (or overtaken by forced tokens): roll the cache back over them
                self.truncate(self._pos - len(ahead))
                ahead = []
            if spec is None:
                logits = self.append(feed)
                continue
            if rows:
                spec.feedback(len(rows), kept_now)
            context = np.concatenate([self._tokens[: self._pos], np.asarray(feed, dtype=np.int64)])
            draft = spec.propose(context, self.max_length - context.size)
            if not draft.tokens:
                rows = []
                logits = self.append(feed)
                continue
            out = self.append([*feed, *draft.tokens], all_logits=True)
            logits, rows, ahead, probs = out[len(feed) - 1], list(out[len(feed) :]), list(draft.tokens), draft.probs
            stats.drafted += len(ahead)
            kept_now = 0
        if ahead:
            self.truncate(self._pos - len(ahead))
        stats.decode_s = t_last - t_first
        tail = stop_text.push(detok.flush())[0] + stop_text.flush()  # bytes that never completed a character
        if tail:
            gen.pieces.append(tail)
            yield tail
