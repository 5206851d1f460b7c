"""Logits -> next token: one chain of logits processors, built once from the sampling parameters.

The chain runs on `Candidates` (token ids and their logits or probabilities; the whole vocabulary
until a filter narrows it): an optional token mask (e.g. a grammar's allowed tokens), the repetition
penalty, temperature, top-k, min-p, top-p, then the pick (argmax when greedy, else a seeded draw).
Every tool (run, chat, server, bench) samples through the same `Sampler`. Numpy only, and no Python
loop over the vocabulary: top-k uses argpartition, top-p sorts only the few highest candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .errors import QwenEdgeError

_TOP_P_START = 64  # candidates sorted first for top-p; grown x4 until they hold top_p of the mass
# the token ids a constraint allows next, as a boolean row over the vocabulary (None = no constraint)
TokenMask = Callable[[], "np.ndarray | None"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (argmax); 0/1.0 disable the filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise QwenEdgeError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}")
        if self.top_k < 0:
            raise QwenEdgeError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QwenEdgeError(f"top_p must be in (0, 1] (1 = off), not {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise QwenEdgeError(f"min_p must be in [0, 1) (0 = off), not {self.min_p}")
        if not self.repetition_penalty > 0:
            raise QwenEdgeError(f"repetition_penalty must be > 0 (1 = off), not {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Candidates:
    """The tokens still in the running: `ids` (None = the whole vocabulary, in order) with their
    `logits`, and once a processor needed them, their normalised `probs` (float64)."""

    logits: np.ndarray
    ids: np.ndarray | None = None
    probs: np.ndarray | None = None

    def keep(self, index: np.ndarray) -> None:
        """Narrow to the candidates at positions `index`."""
        self.ids = index if self.ids is None else self.ids[index]
        self.logits = self.logits[index]
        if self.probs is not None:
            self.probs = self.probs[index]

    def token(self, index: int) -> int:
        return int(index if self.ids is None else self.ids[index])

    def normalise(self) -> np.ndarray:
        if self.probs is None:
            probs = np.exp(self.logits - self.logits.max(), dtype=np.float64)
            self.probs = probs / probs.sum()
        return self.probs


class LogitsProcessor(Protocol):
    """One link of the chain: narrows or reweighs the candidates; `seen` is the sequence so far."""

    def __call__(self, cand: Candidates, seen: np.ndarray | None) -> None: ...


class MaskProcessor:
    """Only the tokens `mask()` allows (a constraint such as a JSON schema or a grammar)."""

    def __init__(self, mask: TokenMask):
        self.mask = mask

    def __call__(self, cand: Candidates, seen) -> None:
        allowed = self.mask()
        if allowed is None:
            return
        ids = np.flatnonzero(allowed[: cand.logits.size] if cand.ids is None else allowed[cand.ids])
        if ids.size == 0:
            raise QwenEdgeError("the constraint allows no next token; check the schema or grammar")
        cand.keep(ids)


class RepetitionPenalty:
    """Divides positive and multiplies negative logits of tokens already in the sequence."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, cand: Candidates, seen) -> None:
        if seen is None or not len(seen):
            return
        logits = cand.logits.copy()
        if cand.ids is None:
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / self.penalty, vals * self.penalty)
        else:
            hit = np.isin(cand.ids, seen)
            vals = logits[hit]
            logits[hit] = np.where(vals > 0, vals / self.penalty, vals * self.penalty)
        cand.logits = logits


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = np.float32(temperature)

    def __call__(self, cand: Candidates, seen) -> None:
        cand.logits = np.asarray(cand.logits, dtype=np.float32) / self.temperature


class TopK:
    def __init__(self, k: int):
        self.k = k

    def __call__(self, cand: Candidates, seen) -> None:
        n = cand.logits.size
        if self.k < n:
            cand.keep(np.argpartition(cand.logits, n - self.k)[n - self.k :])


class MinP:
    """Tokens whose probability is at least `min_p` times the highest one's."""

    def __init__(self, min_p: float):
        self.min_p = min_p

    def __call__(self, cand: Candidates, seen) -> None:
        probs = cand.normalise()
        cand.keep(np.flatnonzero(probs >= self.min_p * probs.max()))


class TopP:
    """The fewest highest-probability tokens whose mass reaches `top_p`, highest first."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, cand: Candidates, seen) -> None:
        cand.keep(_top_mass(cand.normalise(), self.top_p))


class Sampler:
    """Turns one row of logits into a token id through the chain; a seeded sampler is reproducible.

    `mask` (optional) is the chain's token-mask slot: called before each pick, it returns the allowed
    tokens as a boolean row over the vocabulary, or None when nothing is constrained.
    """

    def __init__(self, params: SamplingParams, mask: TokenMask | None = None):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        chain: list[LogitsProcessor] = []
        if mask is not None:
            chain.append(MaskProcessor(mask))
        if params.repetition_penalty != 1.0:
            chain.append(RepetitionPenalty(params.repetition_penalty))
        if not params.greedy:
            chain.append(Temperature(params.temperature))
            if params.top_k > 0:
                chain.append(TopK(params.top_k))
            if params.min_p > 0:
                chain.append(MinP(params.min_p))
            if params.top_p < 1:
                chain.append(TopP(params.top_p))
        self.chain = tuple(chain)

    @property
    def uses_history(self) -> bool:
        """Whether a pick needs the sequence so far (the repetition penalty does)."""
        return self.params.repetition_penalty != 1.0

    def candidates(self, logits: np.ndarray, seen: np.ndarray | None = None) -> Candidates:
        """The candidates the chain leaves for a logits row (speculative verification needs their probabilities)."""
        cand = Candidates(logits)
        for processor in self.chain:
            processor(cand, seen)
        return cand

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        """Pick a token from a 1-D float logits row; `seen` holds the token ids of the sequence so far
        (prompt and generated) for the repetition penalty. `logits` is never modified."""
        cand = self.candidates(logits, seen)
        if self.params.greedy:
            return cand.token(int(np.argmax(cand.logits)))
        probs = cand.normalise()
        cdf = np.cumsum(probs)
        pick = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), cdf.size - 1)
        return cand.token(pick)


def _top_mass(probs: np.ndarray, mass: float) -> np.ndarray:
    """Indices of the fewest highest probabilities whose sum reaches `mass`, highest first."""
    n = probs.size
    k = min(n, _TOP_P_START)
    while True:
        part = np.argpartition(probs, n - k)[n - k :] if k < n else np.arange(n)
        order = part[np.argsort(-probs[part], kind="stable")]
        cum = np.cumsum(probs[order])
        if cum[-1] >= mass or k == n:
            break
        k = min(n, k * 4)
    return order[: min(int(np.searchsorted(cum, mass)) + 1, k)]
