"""Fill-in-the-middle: prefix + suffix -> the code in between, with Qwen2.5-Coder's FIM tokens.

The prompt is `<|fim_prefix|>` prefix `<|fim_suffix|>` suffix `<|fim_middle|>`; the model writes the
middle and ends it with an end-of-text (or another FIM control) token.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from .errors import QwenEdgeError

PREFIX, SUFFIX, MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# control tokens that end an infill besides the model's eos ids
ENDS = ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", PREFIX, SUFFIX, MIDDLE, "<|endoftext|>")


def fim_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """The vocabulary's prefix, suffix and middle token ids, or an error saying the model has none."""
    ids = tuple(tokenizer.token_to_id(t) for t in (PREFIX, SUFFIX, MIDDLE))
    if None in ids:
        raise QwenEdgeError(
            f"this model's vocabulary has no {PREFIX}/{SUFFIX}/{MIDDLE} tokens, so it cannot fill in the middle; "
            "use a Qwen2.5-Coder artifact, or drop the suffix for a plain completion"
        )
    return ids  # type: ignore[return-value]


def fim_prompt(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """The token ids of the infill prompt."""
    pre, suf, mid = fim_ids(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids if text else []

    return [pre, *encode(prefix), suf, *encode(suffix), mid]


def fim_stop_ids(tokenizer: Tokenizer, eos: tuple[int, ...]) -> frozenset[int]:
    """The tokens that end an infill: the model's eos ids and the FIM control tokens it has."""
    return frozenset(eos) | {i for i in (tokenizer.token_to_id(t) for t in ENDS) if i is not None}
