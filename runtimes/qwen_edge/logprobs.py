"""Per-token log-probabilities: what the model gave each emitted token and its top alternatives.

The distribution is the model's own: log_softmax of the raw logits row the token was picked from,
before the sampler's chain (token mask, repetition penalty, temperature, top-k/min-p/top-p). So the
numbers do not depend on the sampling settings, a greedy token is always the top-1, and the plain
and speculative loops report the same row (the verify step's row at that position).
Token strings are the tokenizer's pieces: `bytes` exact, `text` their UTF-8 decoding with `\\xNN`
escapes for a piece that is only part of a character.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, decoders

MAX_TOP = 20  # the most alternatives a token carries (OpenAI's chat limit)


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token: its id, its log-probability (None for a token forced without sampling, such
    as the thinking budget's close) and the `top` (id, logprob) alternatives, most likely first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, n: int) -> TokenLogprob:
    """The entry of `token` picked from the logits row `logits`, with its `n` most likely alternatives."""
    row = np.asarray(logits, dtype=np.float64)
    shifted = row - row.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    top: tuple[tuple[int, float], ...] = ()
    if n > 0:
        best = np.argpartition(-logp, n - 1)[:n] if n < logp.size else np.arange(logp.size)
        best = best[np.argsort(-logp[best], kind="stable")]
        top = tuple((int(i), float(logp[i])) for i in best)
    return TokenLogprob(int(token), float(logp[token]), top)


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE character of each byte (printable bytes stand for themselves, the others are
    shifted past U+0100), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """A token id's piece as (text, bytes), cached; special and added tokens are their own text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._alphabet = _byte_level_alphabet() if self.byte_level else {}
        self._added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self._piece(token)
        return hit

    def _piece(self, token: int) -> tuple[str, bytes]:
        raw = self.tokenizer.id_to_token(token)
        if raw is None:  # a padded row of the vocabulary: no token
            return "", b""
        if raw in self._added or not self.byte_level or any(c not in self._alphabet for c in raw):
            data = (raw if raw in self._added else self.tokenizer.decode([token], skip_special_tokens=False)).encode()
        else:
            data = bytes(self._alphabet[c] for c in raw)
        return data.decode("utf-8", errors="backslashreplace"), data
