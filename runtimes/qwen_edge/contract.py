"""The artifact contract: every file name, graph input/output name and cache layout of the format.

This module is the one owner of these facts. The build writes them (manifest.json, genai_config.json,
the graphs' I/O names), the Python runtime reads them from here, and the JavaScript runtime reads the
same facts from the artifact's genai_config.json and manifest.json, which the build fills from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError

FORMAT = "qwen-edge"
FORMAT_VERSION = 1

# files
MANIFEST = "manifest.json"
GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
LICENSE_FILE = "LICENSE"
STATIC_GRAPHS = ("prefill", "decode")  # an NPU artifact's two graphs, in the order a generation runs them
STATIC_GRAPH_FILES = {name: f"{name}.onnx" for name in STATIC_GRAPHS}
ALIGNMENT = 4096  # external data offsets, aligned for memory mapping

# signatures: a detached Ed25519 signature beside the JSON whose file table covers every other file
MANIFEST_SIGNATURE = "manifest.sig"  # beside manifest.json in an artifact
BUNDLE_SIGNATURE = "bundle.sig"  # beside bundle.json in a bundle (the one entry bundle.json cannot list)
SIGNATURE_FORMAT = "qwen-edge-signature"
SIGNATURE_VERSION = 1
SIGNATURE_ALGORITHM = "ed25519"
# what is signed: this prefix, the signed file's name, a newline, then the file's exact bytes (the
# prefix and name keep a signature of one file from being replayed as another's)
SIGNATURE_CONTEXT = b"qwen-edge signature v1\n"

# cache layouts (manifest/genai_config: how the graph holds its KV cache)
SHARED = "shared"  # one past/present buffer of max_length bound as both (GroupQueryAttention)
GROWING = "growing"  # present = past + this step (plain-operator graphs of the olive/optimum backends)
STATIC = "static"  # fixed-shape prefill/decode graphs; the host keeps the cache (NPUs)
LAYOUTS = (SHARED, GROWING, STATIC)
STATIC_BLOCK = "static"  # the manifest block that makes an artifact static (graphs, chunk, layouts, ...)

# decoder graph I/O (onnxruntime-genai's names)
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "num_logits_to_keep"  # optional scalar; 0 = logits at every position
LOGITS = "logits"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

# static graph I/O
ATTENTION_BIAS = "attention_bias"
STATIC_PAST_KEY = "past_key_%d"  # [1, kv_heads, head_dim, L]: keys transposed
STATIC_PAST_VALUE = "past_value_%d"  # [1, kv_heads, L, head_dim]
STATIC_PRESENT_KEY = "present_key_%d"
STATIC_PRESENT_VALUE = "present_value_%d"
STATIC_KEY_LAYOUT = "bhdl"
STATIC_VALUE_LAYOUT = "bhld"
MASK_VALUE_METADATA = "qwen_edge.mask_value"  # model metadata of a static graph: the bias of a masked slot


def past_names(num_layers: int, static: bool = False) -> list[str]:
    """The past key/value input names, layer by layer (key, value)."""
    key, value = (STATIC_PAST_KEY, STATIC_PAST_VALUE) if static else (PAST_KEY, PAST_VALUE)
    return [pattern % i for i in range(num_layers) for pattern in (key, value)]


def present_names(num_layers: int, static: bool = False) -> list[str]:
    """The present key/value output names, in the order of `past_names`."""
    key, value = (STATIC_PRESENT_KEY, STATIC_PRESENT_VALUE) if static else (PRESENT_KEY, PRESENT_VALUE)
    return [pattern % i for i in range(num_layers) for pattern in (key, value)]


@dataclass(frozen=True)
class GraphLayout:
    """How an artifact's graph must be driven: its cache layout and whether it takes position_ids."""

    kv_cache: str = SHARED
    position_ids: bool = False

    @classmethod
    def of(cls, root: Path, manifest: dict) -> "GraphLayout":
        """The layout an artifact states: static when the manifest has a `static` block, else as its
        genai_config.json says (`search.past_present_share_buffer`, `position_ids` among the decoder's
        inputs); an artifact without genai_config.json has the native layout."""
        if manifest.get(STATIC_BLOCK):
            return cls(STATIC, True)
        path = Path(root) / GENAI_CONFIG
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            shared = config.get("search", {}).get("past_present_share_buffer", True)
            inputs = config["model"]["decoder"].get("inputs", {})
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise ArtifactError(f"{path} is unreadable or malformed ({e}); rebuild the artifact") from None
        if not isinstance(shared, bool) or not isinstance(inputs, dict):
            raise ArtifactError(
                f"{path}: past_present_share_buffer or decoder inputs is malformed; rebuild the artifact"
            )
        return cls(SHARED if shared else GROWING, POSITION_IDS in inputs)


def static_graph_files(manifest: dict) -> dict[str, str]:
    """{graph name: file} of a static artifact (the manifest's `static` block may rename them)."""
    static = manifest.get(STATIC_BLOCK) or {}
    return {name: str(static.get(name, STATIC_GRAPH_FILES[name])) for name in STATIC_GRAPHS}


def graph_files(manifest: dict) -> tuple[str, ...]:
    """The ONNX graph files an artifact must hold."""
    return tuple(static_graph_files(manifest).values()) if manifest.get(STATIC_BLOCK) else (MODEL_FILE,)


# LoRA adapters of a switchable artifact (manifest block ADAPTERS_BLOCK: {name: {file, rank, ...}})
ADAPTERS_BLOCK = "adapters"
ADAPTERS_DIR = "adapters"  # adapters/<name>.npz
ADAPTER_SUFFIX = ".npz"
ADAPTER_KEY_A = "layers.%d.%s.a"  # in the .npz: A transposed [in, r] of one layer's linear (q_proj, ...)
ADAPTER_KEY_B = "layers.%d.%s.b"  # scale * B transposed [r, out]
# graph inputs with zero-rank defaults (overridable initializers): each fused linear's LoRA, its parts
# concatenated along the rank (A) and block-diagonal (B), so "no adapter" runs the base graph's numbers.
LORA_A = "lora.%d.%s.a"  # [in, rank]
LORA_B = "lora.%d.%s.b"  # [rank, out]
LORA_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def adapter_file(name: str) -> str:
    """The artifact-relative file of a switchable adapter."""
    return f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"


# default speculative decoding (manifest block SPECULATION_BLOCK, from the recipe's `speculation`)
SPECULATION_BLOCK = "speculation"
MAX_DRAFT_TOKENS = 16  # the longest initial draft length a recipe or a request may ask for


@dataclass(frozen=True)
class SpeculationDefault:
    """The speculative decoding an artifact's manifest asks the runtime to use unless told otherwise:
    prompt `lookup`, or a `draft` artifact (a path relative to the directory holding this artifact,
    e.g. a sibling's name, or absolute), with an initial `draft_tokens` (None: the runtime's default)."""

    lookup: bool = False
    draft: str | None = None
    draft_tokens: int | None = None

    @classmethod
    def of(cls, manifest: dict) -> "SpeculationDefault | None":
        """The manifest's block (None when it has none); a malformed one is an ArtifactError."""
        block = manifest.get(SPECULATION_BLOCK)
        if block is None:
            return None
        k = block.get("draft_tokens") if isinstance(block, dict) else None
        ok = (
            isinstance(block, dict)
            and set(block) <= {"lookup", "draft", "draft_tokens"}
            and isinstance(block.get("lookup", False), bool)
            and (block.get("draft") is None or (isinstance(block["draft"], str) and block["draft"]))
            and (k is None or (type(k) is int and 1 <= k <= MAX_DRAFT_TOKENS))
            and bool(block.get("lookup")) != (block.get("draft") is not None)
        )
        if not ok:
            raise ArtifactError(
                f"manifest.json: the {SPECULATION_BLOCK} block {json.dumps(block)[:200]} is malformed (one of lookup: "
                f"true or draft: PATH, draft_tokens 1..{MAX_DRAFT_TOKENS}); rebuild the artifact"
            )
        return cls(bool(block.get("lookup")), block.get("draft"), k)

    def draft_path(self, root: Path) -> Path:
        """Where the draft artifact is for the artifact at `root`."""
        path = Path(self.draft).expanduser()
        return path if path.is_absolute() else Path(root).resolve().parent / path
