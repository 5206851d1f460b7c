"""Incremental detokenizer: streamed pieces add up to the full decode and never split a character."""

import pytest
import tiny_models

from qwen_edge.detokenize import Detokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_models.build_tokenizer()


TEXTS = [
    "你好，世界！今天天气很好。量化可以让模型在手机上运行。",
    "Emoji 🙂 ✓ → € and “quotes” — déjà testé, naïf.",
    "def f(x):\n    return x + 1  # 中文注释",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_equal_the_full_decode_without_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text) / 3  # the tiny vocabulary splits multi-byte characters
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    # some tokens complete no character yet: they yield nothing instead of a replacement character
    assert "" in pieces


def test_byte_tokens_of_one_character_are_held_back_until_complete(tokenizer):
    # force a character to arrive one byte-token at a time (each byte-level symbol is a token)
    byte_ids = [tokenizer.token_to_id(c) for token in tokenizer.encode("界").tokens for c in token]
    assert len(byte_ids) == 3 and None not in byte_ids
    detok = Detokenizer(tokenizer)
    out = [detok.push(i) for i in byte_ids]
    assert out[:-1] == [""] * (len(out) - 1) and out[-1] == "界"


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nHello<|im_end|>", add_special_tokens=False).ids
    detok = Detokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) == "assistant\nHello"


def test_bytes_that_never_complete_a_character_are_flushed_at_the_end(tokenizer):
    lead = tokenizer.token_to_id(tokenizer.encode("界").tokens[0][0])  # an incomplete UTF-8 sequence
    ids = tokenizer.encode("hello").ids + [lead]
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert pieces[-1] == ""
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids) == "hello\ufffd"
    assert detok.flush() == ""
