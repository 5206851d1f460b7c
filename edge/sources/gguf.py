"""A llama.cpp GGUF file (architecture qwen2 or qwen3) as a `Source`.

Tensors are read from the memory-mapped file one at a time and dequantized with the `gguf`
package. GGUF lists dimensions innermost first, so a matrix the file describes as [in, out] comes
out of the reader as the numpy array [out, in], which is already the Hugging Face layout. Unlike
llama, llama.cpp's converter does not permute the q/k rows of qwen2/qwen3, so no un-permute is done.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from edge.artifact.licenses import LicenseFacts
from edge.config import SUPPORTED_TEXT, QwenConfig, UnsupportedModelError
from edge.sources.base import (
    Source,
    SourceError,
    hf_config_dict,
    hf_tensor_shapes,
    save_tokenizer,
)

GGUF_MAGIC = b"GGUF"
ROW_CHUNK = 4096
SUPPORTED_ARCHS = ("qwen2", "qwen3")


def is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic."""
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _f32(value) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


class GGUFSource(Source):
    """A qwen2/qwen3 GGUF file: config from its metadata, tensors dequantized to float32."""

    kind = "gguf"

    def __init__(self, path: Path, spec: str, cache_dir=None):
        super().__init__(spec, cache_dir)
        import gguf

        self.path = Path(path)
        if not is_gguf(self.path):
            raise SourceError(f"{spec} is not a GGUF file (bad magic); re-download it")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise SourceError(f"{spec} is a truncated or corrupt GGUF file ({e}); re-download it") from None
        arch = self._field("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; qwen-edge builds GGUF architectures "
                f"{' and '.join(SUPPORTED_ARCHS)} ({SUPPORTED_TEXT})"
            )
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = QwenConfig.from_hf(self._hf_like_config(arch))
        names = gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.QWEN3, self.config.num_layers
        )
        self._gguf_name = {}
        for hf_name in hf_tensor_shapes(self.config):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name in self._tensors:
                self._gguf_name[hf_name] = gguf_name
        self._shapes = hf_tensor_shapes(self.config)
        missing = [n for n in self._shapes if n not in self._gguf_name and n != "lm_head.weight"]
        if missing:
            raise SourceError(
                f"{spec} lacks tensors the config requires: {', '.join(missing[:3])}; the file is incomplete"
            )
        base, size, tune = (self._field(f"general.{k}") for k in ("basename", "size_label", "finetune"))
        names = (self._field("general.name"), "-".join(p for p in (base, size, tune) if p) if base and size else None)
        self._license = LicenseFacts(self._field("general.license"), None, tuple(n for n in names if n))
        # The parsed metadata (mostly the vocabulary) holds ~400 MB of small objects; the config is read.
        self._reader.fields.clear()

    def _field(self, key: str, default=None):
        field = self._reader.get_field(key)
        return default if field is None else field.contents()

    def _hf_like_config(self, arch: str) -> dict:
        def need(key: str):
            value = self._field(f"{arch}.{key}")
            if value is None:
                raise SourceError(f"{self.spec}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
            return value

        tokens = self._reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise SourceError(
                f"{self.spec}: GGUF has no tokenizer (tokenizer.ggml.tokens); use a GGUF with its vocabulary"
            )
        hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
        eos = self._field("tokenizer.ggml.eos_token_id")
        scaling = self._field(f"{arch}.rope.scaling.type")
        cfg = {
            "model_type": arch,
            "vocab_size": len(tokens.data),
            "hidden_size": hidden,
            "intermediate_size": int(need("feed_forward_length")),
            "num_hidden_layers": int(need("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{arch}.attention.head_count_kv", heads)),
            "head_dim": int(self._field(f"{arch}.attention.key_length", hidden // heads)),
            "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
            "rope_theta": _f32(self._field(f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(need("context_length")),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }
        if scaling not in (None, "none"):
            cfg["rope_scaling"] = {"rope_type": scaling}
        embd = self._tensors.get("token_embd.weight")
        if embd is not None and int(embd.shape[-1]) != cfg["vocab_size"]:
            raise SourceError(
                f"{self.spec}: {cfg['vocab_size']} tokens in the vocabulary but {int(embd.shape[-1])} embedding rows; "
                "the file is inconsistent"
            )
        return cfg

    def tensor_names(self) -> list[str]:
        return list(self._gguf_name)

    def has_tensor(self, name: str) -> bool:
        return name in self._gguf_name

    def tensor(self, name: str, rows: slice | None = None) -> np.ndarray:
        from gguf.quants import dequantize

        if name not in self._gguf_name:
            raise self._missing(name)
        t = self._tensors[self._gguf_name[name]]
        shape = self._shapes[name]
        stored = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        if stored != shape:
            raise SourceError(
                f"{self.spec}: tensor {t.name} has shape {stored}, expected {shape}; the file is inconsistent"
            )
        start, stop, _ = (rows or slice(None)).indices(shape[0])
        out = np.empty((max(stop - start, 0), *shape[1:]), np.float32)
        for i in range(start, stop, ROW_CHUNK):  # bounded temporaries for 150k-row embeddings
            end = min(i + ROW_CHUNK, stop)
            out[i - start : end - start] = dequantize(t.data[i:end], t.tensor_type).reshape(
                out[i - start : end - start].shape
            )
        # Drop the file pages just read from this process's resident set (they stay in the page cache).
        self._reader.data._mmap.madvise(mmap.MADV_DONTNEED)
        return out

    def tensor_types(self) -> dict[str, str]:
        """GGUF type name (F32, Q8_0, Q6_K, ...) of every tensor, by Hugging Face name."""
        return {name: self._tensors[g].tensor_type.name for name, g in self._gguf_name.items()}

    def grid_blocks(self, name: str, spec, rows: slice | None = None):
        """Rows of matrix `name` as blobs in `spec` made of the file's own integers and scales
        (``edge.quantize.source_grid``; `spec` must hold the tensor's type)."""
        from edge.quantize.blockwise import BlockQuantized
        from edge.quantize.source_grid import to_blocks

        t = self._tensors[self._gguf_name[name]]
        n, k = self._shapes[name]
        start, stop, _ = (rows or slice(None)).indices(n)
        parts = [
            to_blocks(t.tensor_type.name, t.data[i : min(i + ROW_CHUNK, stop)], k, spec)
            for i in range(start, stop, ROW_CHUNK)
        ]
        self._reader.data._mmap.madvise(mmap.MADV_DONTNEED)
        return BlockQuantized.concat(parts)

    def license_facts(self) -> LicenseFacts:
        return self._license

    def weight_files(self) -> list[Path]:
        return [self.path]

    def write_tokenizer(self, out_dir: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        eos = tok.convert_ids_to_tokens(self.config.eos_token_ids[0]) if self.config.eos_token_ids else None
        if eos is not None and tok.eos_token != eos:  # transformers <4.58 takes <|endoftext|> from the GGUF
            tok.eos_token = eos
        save_tokenizer(tok, out_dir, self.config, None)

    def reference_model(self):
        """transformers' own GGUF load, given our config (its GGUF reader ignores qwen3 key_length)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**hf_config_dict(self.config))
        return AutoModelForCausalLM.from_pretrained(
            self.path.parent, gguf_file=self.path.name, config=config, dtype=torch.float32
        ).eval()
