"""Speculative decoding: draft tokens cheaply, verify them in one multi-token step of the target.

A speculator proposes up to k tokens that may follow the sequence so far; the generation loop
(qwen_edge.generator) feeds the token it picked plus the drafts in one `runner.forward(...,
all_logits=True)`, keeps the drafts the target agrees with and rolls the cache back over the rest.

- `PromptLookup`: drafts are what followed the latest earlier occurrence of the sequence's last n
  tokens (prompt and generated text): no second model; pays off when the answer quotes its context
  (code editing, summaries, answers about a given text).
- `DraftModel`: a smaller artifact with the same tokenizer runs ahead of the target, keeping its own
  KV cache in step with the target's sequence.

Exactness: with greedy decoding a draft is kept only when it is the target's argmax, so the tokens
are those of plain decoding. With sampling, `verify` is the standard accept/reject step (accept draft
d with probability min(1, p(d)/q(d)), else draw from the normalised max(0, p - q)), which leaves the
target distribution p unchanged; a lookup draft is deterministic (q is one-hot on d).
The number of drafts adapts: it grows after a round with every draft accepted and shrinks after a
round with fewer than half accepted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import QwenEdgeError
from .sampling import Sampler, SamplingParams


@dataclass
class Draft:
    """Proposed tokens and, for a sampled draft, the draft distribution each was drawn from
    (dense rows over the vocabulary; None = deterministic drafts)."""

    tokens: list[int]
    probs: list[np.ndarray] | None = None


class Speculator(Protocol):
    """Proposes tokens that may follow `context` (the whole sequence, prompt + generated)."""

    def start(self, params: SamplingParams) -> None:
        """A new generation with these sampling parameters begins."""

    def propose(self, context: np.ndarray, room: int) -> Draft:
        """At most `room` draft tokens after `context`."""

    def feedback(self, proposed: int, accepted: int) -> None:
        """How many of the last round's drafts the target kept."""

    def with_length(self, k: int) -> "Speculator":
        """The same speculator starting at draft length `k` (what it holds, e.g. a draft model, shared)."""


class AdaptiveK:
    """The draft length: +1 after a round with every draft accepted, -1 after one with under half kept."""

    def __init__(self, k: int, k_max: int):
        if not 1 <= k <= k_max:
            raise QwenEdgeError(f"the draft length must be between 1 and {k_max}, not {k}")
        self.start_k, self.k_max = k, k_max
        self.k = k

    def reset(self) -> None:
        self.k = self.start_k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.k_max, self.k + 1)
        elif 2 * accepted < proposed:
            self.k = max(1, self.k - 1)


class _Resizable:
    length: AdaptiveK

    def with_length(self, k: int):
        """The same speculator starting at draft length `k` (what it holds, e.g. a draft model, shared)."""
        other = copy.copy(self)
        other.length = AdaptiveK(k, max(k, self.length.k_max))
        return other


class PromptLookup(_Resizable):
    """Drafts from n-grams: the tokens after the latest earlier occurrence of the last `n` tokens,
    longest n first (`max_ngram` down to `min_ngram`)."""

    def __init__(self, k: int = 10, max_ngram: int = 3, min_ngram: int = 1, k_max: int = 16):
        if not 1 <= min_ngram <= max_ngram:
            raise QwenEdgeError(f"n-gram sizes must satisfy 1 <= min <= max, not {min_ngram}..{max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.length = AdaptiveK(k, max(k, k_max))

    def start(self, params: SamplingParams) -> None:
        self.length.reset()

    def propose(self, context: np.ndarray, room: int) -> Draft:
        k = min(self.length.k, room)
        size = context.size
        if k < 1:
            return Draft([])
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            # windows that start early enough to be followed by at least one token
            windows = sliding_window_view(context[: size - 1], n)
            hits = np.flatnonzero((windows == context[size - n :]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return Draft(context[start : start + k].tolist())
        return Draft([])

    def feedback(self, proposed: int, accepted: int) -> None:
        self.length.update(proposed, accepted)


class DraftModel(_Resizable):
    """A smaller artifact with the target's tokenizer runs `k` tokens ahead (greedy when the target is,
    else sampled with the same parameters) over its own KV cache."""

    def __init__(self, draft, target, k: int = 4, k_max: int = 8):
        if draft.tokenizer.get_vocab(with_added_tokens=True) != target.tokenizer.get_vocab(with_added_tokens=True):
            raise QwenEdgeError(
                f"the draft {draft.artifact.root} has a different tokenizer from the target "
                f"{target.artifact.root}; a draft must share the target's vocabulary (e.g. the same model family)"
            )
        self.draft = draft
        self.vocab = min(draft.artifact.model.vocab_size, target.artifact.model.vocab_size)
        self.length = AdaptiveK(k, max(k, k_max))
        self.sampler: Sampler | None = None

    def start(self, params: SamplingParams) -> None:
        self.length.reset()
        self.sampler = Sampler(params)
        # draws independent of the target's (the same seed would correlate drafts with their acceptance)
        self.sampler.rng = np.random.default_rng(None if params.seed is None else [params.seed, 1])

    def propose(self, context: np.ndarray, room: int) -> Draft:
        d = self.draft
        k = min(self.length.k, room, d.max_length - context.size)
        if k < 1 or self.sampler is None:
            return Draft([])
        keep = min(d.common_prefix(context), context.size - 1)
        d.truncate(keep)
        logits = d.append(context[keep:])
        tokens, probs = [], None if self.sampler.params.greedy else []
        for i in range(k):
            if probs is None:
                token = int(np.argmax(logits[: self.vocab]))
            else:
                q = distribution(self.sampler, logits[: self.vocab], None)
                token = _draw(q, self.sampler.rng)
                probs.append(q)
            tokens.append(token)
            if i + 1 < k:
                logits = d.append([token])
        return Draft(tokens, probs)

    def feedback(self, proposed: int, accepted: int) -> None:
        self.length.update(proposed, accepted)


def distribution(sampler: Sampler, logits: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
    """The sampler's distribution over the whole vocabulary (its chain applied, zeros where filtered)."""
    cand = sampler.candidates(logits, seen)
    probs = cand.normalise()
    if cand.ids is None:
        return probs
    dense = np.zeros(logits.size, dtype=np.float64)
    dense[cand.ids] = probs
    return dense


def verify(sampler: Sampler, logits: np.ndarray, seen: np.ndarray | None, token: int, q: np.ndarray | None) -> int:
    """The target's pick at a drafted position: `token` if kept, else a draw that corrects the draft.

    Greedy: the argmax (the draft is kept when it equals it). Sampling: keep with probability
    min(1, p/q), else draw from max(0, p - q) renormalised (q one-hot on `token` when None)."""
    if sampler.params.greedy:
        return sampler(logits, seen)
    p = distribution(sampler, logits, seen)
    qd = 1.0 if q is None else float(q[token]) if token < q.size else 0.0
    if qd > 0 and sampler.rng.random() * qd < p[token]:
        return token
    residual = p.copy()
    if q is None:
        residual[token] = 0.0
    else:
        residual[: q.size] = np.maximum(residual[: q.size] - q, 0.0)
    if residual.sum() <= 0:  # p == q: nothing to correct
        residual = p
    return _draw(residual, sampler.rng)


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn in proportion to the non-negative `weights`."""
    cdf = np.cumsum(weights)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), cdf.size - 1))
