"""What every model source shares: the `Source` interface, its errors, weight hashing, the Hugging Face
tensor names and config of a `QwenConfig`, and the tokenizer and fp32-directory writers.

A `Source` gives the normalized `QwenConfig`, fp32 tensors by Hugging Face name (read lazily, one
at a time), a fingerprint of the weights, the tokenizer files, and the transformers fp32 reference
model the fidelity check compares against. `edge.sources.hf` and `edge.sources.gguf` implement it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge import report
from edge.artifact.licenses import LicenseFacts
from edge.config import QwenConfig
from qwen_edge.contract import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from qwen_edge.errors import QwenEdgeError

_HASH_CHUNK = 8 << 20
READ_ROWS = 16384  # rows of a large matrix read at a time, so that its fp32 copy never exists whole


def row_blocks(read, name: str, stop: int, step: int = READ_ROWS, *, start: int = 0):
    """``(first row, rows)`` over rows [start, stop) of tensor `name`, read `step` rows at a time with
    ``read(name, rows=slice)`` (a source's ``tensor``)."""
    for first in range(start, stop, step):
        yield first, read(name, rows=slice(first, min(first + step, stop)))


class SourceError(QwenEdgeError):
    """A model source that cannot be opened or read."""


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The cache directory: the argument, else ``$QWEN_EDGE_CACHE``, else ``~/.cache/qwen-edge``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("QWEN_EDGE_CACHE") or Path.home() / ".cache" / "qwen-edge")


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file, streamed (with a progress bar above 64 MB); remembered in a sidecar keyed by
    path, size and mtime."""
    path = Path(path).resolve()
    st = path.stat()
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    sidecar = cache_root(cache_dir) / "sha256" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(sidecar.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    bar = _bytes_bar(st.st_size, f"sha256 {path.name}", st.st_size > 64 << 20)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    bar.close()
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**key, "sha256": digest.hexdigest()}))
        tmp.replace(sidecar)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest.hexdigest()


def hf_tensor_shapes(config: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen decoder of this config has, by Hugging Face name, with its shape."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if config.attention_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
        if config.qk_norm:
            shapes.update(
                {p + "self_attn.q_norm.weight": (config.head_dim,), p + "self_attn.k_norm.weight": (config.head_dim,)}
            )
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def hf_config_dict(config: QwenConfig) -> dict:
    """A transformers config.json dict (fp32) for this QwenConfig."""
    arch = "Qwen2ForCausalLM" if config.family == "qwen2" else "Qwen3ForCausalLM"
    eos = list(config.eos_token_ids)
    return {
        "architectures": [arch],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "attention_bias": config.attention_bias,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "use_sliding_window": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


SHARD_BYTES = 2 << 30


def write_hf_directory(source: "Source", out_dir: Path) -> Path:
    """Write `source` as a Hugging Face fp32 directory (config.json, safetensors shards of at most
    2 GiB with an index, tokenizer files) for tools that read only that layout. The files go to a
    temporary sibling directory renamed to `out_dir` at the end; an existing `out_dir` is replaced."""
    import math
    import shutil

    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(source.config), indent=2) + "\n")
        shapes = {n: s for n, s in hf_tensor_shapes(source.config).items() if source.has_tensor(n)}
        groups, size = [[]], 0
        for n, s in shapes.items():
            nbytes = 4 * math.prod(s)
            if groups[-1] and size + nbytes > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(n)
            size += nbytes
        weight_map = {}
        bar = report.current().bar(total=len(shapes), desc="write fp32 safetensors", unit="tensor")
        for i, names in enumerate(groups, 1):
            fname = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for n in names:
                tensors[n] = source.tensor(n)
                bar.update(1)
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, fname))
        bar.close()
        if len(groups) > 1:
            total = 4 * sum(math.prod(s) for s in shapes.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        source.write_tokenizer(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; safetensors writes 0600 files
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _bytes_bar(total: int, desc: str, enabled: bool):
    return report.current().bar(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )


class Source(ABC):
    """A model to build from. Tensors are float32 numpy arrays by Hugging Face name ([out, in])."""

    kind: str  # "hf", "hub" or "gguf"
    spec: str
    config: QwenConfig

    def __init__(self, spec: str, cache_dir: Path | None):
        self.spec = spec
        self.cache_dir = Path(cache_dir) if cache_dir else None

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Hugging Face names of the tensors this source holds."""

    @abstractmethod
    def tensor(self, name: str, rows: slice | None = None) -> np.ndarray:
        """One tensor as a float32 array, read on demand (only the rows `rows` selects, if given)."""

    @abstractmethod
    def weight_files(self) -> list[Path]:
        """The files the weights are read from."""

    @abstractmethod
    def write_tokenizer(self, out_dir: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json (with chat_template) and generation_config.json if known."""

    @abstractmethod
    def reference_model(self):
        """The transformers fp32 causal LM of this source, in eval mode."""

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_names()

    def license_facts(self) -> LicenseFacts:
        """What the source says about the model's licence (id, licence file, names to look up)."""
        return LicenseFacts(names=(self.spec,))

    def fingerprint(self) -> dict:
        """kind, spec, sha256 of the weights (one file: its hash; several: hash of their hashes), bytes."""
        files = self.weight_files()
        hashes = [file_sha256(f, self.cache_dir) for f in files]
        digest = hashes[0] if len(hashes) == 1 else hashlib.sha256("\n".join(hashes).encode()).hexdigest()
        return {
            "kind": self.kind,
            "spec": self.spec,
            "sha256": digest,
            "files": {f.name: h for f, h in zip(files, hashes)},
            "bytes": sum(f.stat().st_size for f in files),
        }

    def _missing(self, name: str) -> SourceError:
        hint = (
            " (the model ties lm_head to the embeddings)"
            if name == "lm_head.weight" and self.config.tie_word_embeddings
            else ""
        )
        return SourceError(f"{self.spec} has no tensor {name!r}{hint}")


def save_tokenizer(tokenizer, out_dir: Path, config: QwenConfig, generation_config: dict | None) -> None:
    """Save a transformers tokenizer as tokenizer.json + tokenizer_config.json holding the chat
    template and the bos/eos/pad strings, plus generation_config.json when given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        tmp = Path(tmp)
        tok_cfg = json.loads((tmp / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
        template = tokenizer.chat_template
        if not template:
            raise SourceError(
                f"the tokenizer of {config.family} model has no chat template; add one to tokenizer_config.json"
            )
        tok_cfg["chat_template"] = template
        for key in ("is_local", "local_files_only", "name_or_path"):
            tok_cfg.pop(key, None)
        if tok_cfg.get("model_max_length", float("inf")) > config.max_position_embeddings:
            tok_cfg["model_max_length"] = config.max_position_embeddings
        for key, token_id in (
            ("bos_token", config.bos_token_id),
            ("pad_token", config.pad_token_id),
            ("eos_token", config.eos_token_ids[0] if config.eos_token_ids else None),
        ):
            if tok_cfg.get(key) is None and token_id is not None:
                tok_cfg[key] = tokenizer.convert_ids_to_tokens(int(token_id))
        # Written compact: half the bytes of the pretty-printed file, read the same by every client.
        Tokenizer.from_file(str(tmp / TOKENIZER_FILE)).save(str(out_dir / TOKENIZER_FILE), pretty=False)
    _write_json(out_dir / TOKENIZER_CONFIG_FILE, tok_cfg)
    if generation_config:
        _write_json(out_dir / "generation_config.json", generation_config)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
