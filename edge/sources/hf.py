"""A Hugging Face model directory (config.json + safetensors) or a Hub id downloaded into one, as a `Source`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from edge import report
from edge.artifact.licenses import LicenseFacts, directory_facts
from edge.config import QwenConfig
from edge.sources.base import Source, SourceError, save_tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "LICENSE*",
    "README.md",
]


class HFSource(Source):
    """A Hugging Face model directory: config.json + model.safetensors or indexed shards."""

    kind = "hf"

    def __init__(self, path: Path, spec: str, cache_dir=None, kind: str = "hf"):
        super().__init__(spec, cache_dir)
        from safetensors import SafetensorError, safe_open

        self.kind = kind
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{spec}: no config.json; expected a Hugging Face model directory")
        try:
            self._hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise SourceError(f"{cfg_path} is not valid JSON ({e}); re-download the model") from None
        self.config = QwenConfig.from_hf(self._hf_config)
        self._files = self._find_weights()
        self._where: dict[str, Path] = {}
        for f in self._files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    self._where.update(dict.fromkeys(st.keys(), f))
            except (SafetensorError, OSError) as e:
                raise SourceError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from None

    def license_facts(self) -> LicenseFacts:
        facts = directory_facts(self.path)
        return LicenseFacts(facts.license_id, facts.license_file, (self.spec, *facts.names))

    def _find_weights(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise SourceError(f"{index} is not a valid safetensors index ({e})") from None
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise SourceError(
                    f"{self.spec}: shard(s) {', '.join(missing)} listed in {index.name} are missing; re-download them"
                )
            return [self.path / n for n in names]
        if (self.path / "model.safetensors").is_file():
            return [self.path / "model.safetensors"]
        shards = sorted(self.path.glob("model-*-of-*.safetensors"))
        if shards:
            return shards
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")) or list(self.path.glob("*.pth")):
            raise SourceError(
                f"{self.spec} holds PyTorch .bin weights; qwen-edge reads safetensors only: re-save with "
                "model.save_pretrained(dir, safe_serialization=True)"
            )
        raise SourceError(f"{self.spec}: no model.safetensors (or indexed shards) found")

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def has_tensor(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str, rows: slice | None = None) -> np.ndarray:
        from safetensors import safe_open

        if name not in self._where:
            raise self._missing(name)
        with safe_open(str(self._where[name]), framework="pt") as st:
            if rows is not None:  # only those rows' pages of the mapped file are touched
                return st.get_slice(name)[rows].float().numpy()
            return st.get_tensor(name).float().numpy()

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def write_tokenizer(self, out_dir: Path) -> None:
        from transformers import AutoTokenizer

        if not (self.path / "tokenizer_config.json").is_file():
            raise SourceError(
                f"{self.spec}: no tokenizer_config.json; copy the model's tokenizer files next to config.json"
            )
        gen = self.path / "generation_config.json"
        save_tokenizer(
            AutoTokenizer.from_pretrained(self.path),
            out_dir,
            self.config,
            json.loads(gen.read_text()) if gen.is_file() else None,
        )

    def reference_model(self):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()


def download(repo_id: str) -> Path:
    """snapshot_download the files a build needs into the Hugging Face cache (with the Hub's own bars
    unless the current Reporter is quiet); errors become one clear line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = report.current().quiet
    was_disabled = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise SourceError(
            f"{repo_id} is gated: accept its license on huggingface.co and run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{repo_id} was not found on the Hugging Face Hub; check the id, or give a local directory or .gguf file"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        raise SourceError(
            f"cannot download {repo_id}: the Hub is unreachable (or HF_HUB_OFFLINE is set) and it is not in the "
            f"local Hugging Face cache; pass a local model directory or a .gguf file instead ({type(e).__name__})"
        ) from None
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()
