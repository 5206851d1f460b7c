"""Logits -> next token: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded RNG.

Numpy only, and no Python loop over the vocabulary: top-k uses argpartition, top-p sorts only the
few highest candidates (growing the candidate set until it holds the requested mass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QwenEdgeError

_TOP_P_START = 64  # candidates sorted first for top-p; grown x4 until they hold top_p of the mass


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


class Sampler:
    """Turns one row of logits into a token id; a seeded sampler is reproducible."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        """Pick a token from a 1-D float logits row; `seen` holds the token ids of the sequence so far
        (prompt and generated) for the repetition penalty. `logits` is never modified."""
        p = self.params
        if p.repetition_penalty != 1.0 and seen is not None and len(seen):
            logits = logits.copy()
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        return int(self._sample(np.asarray(logits, dtype=np.float32) / np.float32(p.temperature)))

    def _sample(self, scaled: np.ndarray) -> int:
        p = self.params
        if 0 < p.top_k < scaled.size:
            ids = np.argpartition(scaled, scaled.size - p.top_k)[scaled.size - p.top_k :]
            scaled = scaled[ids]
        else:
            ids = None
        probs = np.exp(scaled - scaled.max(), dtype=np.float64)
        probs /= probs.sum()
        if p.min_p > 0:
            keep = np.flatnonzero(probs >= p.min_p * probs.max())
            ids = keep if ids is None else ids[keep]
            probs = probs[keep]
        if p.top_p < 1:
            order = _top_mass(probs, p.top_p)
            ids = order if ids is None else ids[order]
            probs = probs[order]
        cdf = np.cumsum(probs)
        pick = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), cdf.size - 1)
        return pick if ids is None else int(ids[pick])


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
