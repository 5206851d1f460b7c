"""Incremental detokenizer for streaming: text pieces as tokens arrive, never half a character.

Built on `tokenizers.decoders.DecodeStream`, which decodes only a short window of recent tokens
(constant work per token) and holds back while the window's text ends in U+FFFD (an incomplete
UTF-8 sequence split across byte-level tokens). `flush` gives what is still held when generation ends:
a model can end on bytes that never complete a character, and those decode to U+FFFD as in a full decode.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Feed token ids one at a time with `push`; each call returns the newly completed text ('' if none)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._last: int | None = None  # the token that completed the last piece (decoding context for flush)
        self._held: list[int] = []  # tokens pushed since, whose text is not out yet

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes."""
        token_id = int(token_id)
        piece = self._stream.step(self.tokenizer, token_id) or ""
        if piece:
            self._last = token_id
            self._held.clear()
        else:
            self._held.append(token_id)
        return piece

    def flush(self) -> str:
        """The text of the tokens still held back (an incomplete character decodes to U+FFFD)."""
        if not self._held:
            return ""
        context = [] if self._last is None else [self._last]
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
        text, prefix = decode(context + self._held), decode(context)
        self._held.clear()
        return text[len(prefix) :] if text.startswith(prefix) else text
