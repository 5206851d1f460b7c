"""Incremental detokenizer for streaming: text pieces as tokens arrive, never half a character.

Built on `tokenizers.decoders.DecodeStream`, which decodes only a short window of recent tokens
(constant work per token) and holds back while the window's text ends in U+FFFD (an incomplete
UTF-8 sequence split across byte-level tokens).
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Feed token ids one at a time with `push`; each call returns the newly completed text ('' if none)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes."""
        return self._stream.step(self.tokenizer, int(token_id)) or ""
