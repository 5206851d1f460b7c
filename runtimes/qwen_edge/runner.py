"""Runners: run k tokens at position p of an artifact's graph(s) and return their logits.

A runner owns the sessions, the IO binding and a KV-cache strategy (qwen_edge.kv_cache); it knows
nothing of tokens, sampling or stopping, which are the one generation loop's (qwen_edge.generator).
`forward(ids, pos)` runs `ids` after the first `pos` cached positions (a `pos` below what was run
before rewinds the cache) and returns the last position's logits row, or with `all_logits` every
position's `[n, vocab]`. Prompts longer than `prefill_chunk` are fed chunk by chunk.

- `DecoderRunner`: one `model.onnx` with a shared (GroupQueryAttention) or growing (plain-operator)
  cache, as the artifact's genai_config.json states.
- `StaticRunner`: an NPU artifact's two fixed-shape graphs (prefill chunk + one-token decode) over
  a host-side cache; the last chunk is padded and its padded rows are masked out and not committed.
"""

from __future__ import annotations

import platform
from typing import Callable, Protocol

import numpy as np
import onnxruntime as ort

from . import contract as c
from .adapters import lora_feeds
from .artifact import Artifact
from .errors import ArtifactError, ContextOverflowError, QwenEdgeError, RuntimeMissingError
from .kv_cache import GrowingKVCache, HostKVCache, SharedKVCache
from .session import create_session

DEFAULT_PREFILL_CHUNK = 512
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
FeedsCallback = Callable[[str, dict], None]
SessionFactory = Callable[[str, dict], ort.InferenceSession]


class Runner(Protocol):
    """What the generation loop needs of a graph: logits for tokens at a position, over a KV cache."""

    max_length: int
    prefill_chunk: int

    def forward(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """Run `ids` after the first `pos` cached positions; the last logits row, or `[n, vocab]`."""


def check_max_length(max_length: int | None, context_length: int) -> int:
    """The context a runner allocates: `max_length` (2..context_length) or the artifact's whole context."""
    if max_length is None:
        return context_length
    if not 2 <= max_length <= context_length:
        raise QwenEdgeError(
            f"max_length {max_length} must be between 2 and the artifact's context length {context_length}"
        )
    return int(max_length)


def _check_room(pos: int, n: int, max_length: int) -> None:
    if n == 0:
        raise QwenEdgeError("nothing to run: the token list is empty")
    if pos + n > max_length:
        raise ContextOverflowError(
            f"{pos} cached + {n} new tokens exceed the context of {max_length}; "
            "reset the cache or use a longer --max-length"
        )


class DecoderRunner:
    """`model.onnx` with its KV cache: shared buffer or growing past/present (genai_config.json)."""

    def __init__(
        self,
        artifact: Artifact,
        max_length: int | None = None,
        prefill_chunk: int | None = None,
        layout: c.GraphLayout | None = None,
    ):
        info = artifact.model
        self.max_length = check_max_length(max_length, info.context_length)
        self.prefill_chunk = int(prefill_chunk or artifact.profile.get("prefill_chunk") or DEFAULT_PREFILL_CHUNK)
        if self.prefill_chunk < 1:
            raise QwenEdgeError(f"prefill_chunk must be >= 1, not {self.prefill_chunk}")
        self.layout = layout or c.GraphLayout.of(artifact.root, artifact.manifest)
        if self.layout.kv_cache == c.STATIC:
            raise ArtifactError(f"{artifact.root} holds static NPU graphs; open it with StaticRunner")
        self.session = create_session(artifact.model_path, artifact.profile)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        past, present = c.past_names(info.num_layers), c.present_names(info.num_layers)
        self.has_position_ids = self.layout.position_ids
        needed = (c.INPUT_IDS, c.ATTENTION_MASK, *((c.POSITION_IDS,) if self.has_position_ids else ()), *past)
        missing = [n for n in needed if n not in inputs]
        missing += [n for n in (c.LOGITS, *present) if n not in outputs]
        if missing:
            raise ArtifactError(
                f"{artifact.model_path} lacks the graph inputs/outputs {', '.join(missing[:4])} that the manifest's "
                f"{info.num_layers} layers and {c.GENAI_CONFIG} imply; rebuild the artifact"
            )
        if c.POSITION_IDS in inputs and not self.has_position_ids:
            raise ArtifactError(
                f"{artifact.model_path} takes position_ids but {c.GENAI_CONFIG} does not list them; "
                "rebuild the artifact"
            )
        dtype = _DTYPES.get(inputs[past[0]].type)
        if dtype is None:
            raise ArtifactError(f"KV cache type {inputs[past[0]].type} is not supported; rebuild the artifact")
        self._binding = b = self.session.io_binding()
        # num_logits_to_keep is an overridable initializer (default 0 = all positions) or a plain input
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.has_logits_to_keep = c.LOGITS_TO_KEEP in inputs or c.LOGITS_TO_KEEP in overridable
        if self.has_logits_to_keep:
            self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
            self._keep_all = ort.OrtValue.ortvalue_from_numpy(np.array(0, dtype=np.int64))
            self._logits = np.zeros((1, 1, info.vocab_size), dtype=np.float32)
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
            b.bind_ortvalue_input(c.LOGITS_TO_KEEP, self._keep_last)
            b.bind_ortvalue_output(c.LOGITS, self._logits_value)
        else:
            b.bind_output(c.LOGITS, "cpu")  # bound first: outputs come back in binding order
        shape = (1, info.num_kv_heads, self.max_length, info.head_dim)
        strategy = SharedKVCache if self.layout.kv_cache == c.SHARED else GrowingKVCache
        self.cache = strategy(b, dict(zip(past, present)), shape, dtype)
        self._ones = np.ones(self.max_length, dtype=np.int64)
        self._positions = np.arange(self.max_length, dtype=np.int64) if self.has_position_ids else None
        self._artifact = artifact
        self._lora_shapes = {
            i.name: i.shape for i in self.session.get_overridable_initializers() if i.name.startswith("lora.")
        }
        self._adapters: dict[str | None, list] = {}  # bound OrtValues of each adapter used so far
        self.adapter: str | None = None

    def set_adapter(self, name: str | None) -> None:
        """Bind switchable adapter `name`'s LoRA tensors (None: the base model). The cache still holds
        the previous adapter's keys and values: the caller must not reuse them."""
        if name == self.adapter:
            return
        if not self._lora_shapes:
            raise QwenEdgeError(
                f"artifact {self._artifact.root} takes no adapters; build it with adapter mode switchable"
            )
        if name not in self._adapters:
            feeds = lora_feeds(self._artifact, name, self._lora_shapes)
            self._adapters[name] = [(n, ort.OrtValue.ortvalue_from_numpy(a)) for n, a in feeds.items()]
        for n, value in self._adapters[name]:
            self._binding.bind_ortvalue_input(n, value)
        self.adapter = name

    def forward(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """Run `ids` after the first `pos` cached positions, `prefill_chunk` tokens per run."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        _check_room(pos, ids.size, self.max_length)
        rows = []
        for start in range(0, ids.size, self.prefill_chunk):
            part = ids[start : start + self.prefill_chunk]
            logits = self._run(part, pos + start, all_logits)
            rows.append(logits)
        return np.concatenate(rows) if all_logits and len(rows) > 1 else rows[-1]

    def _run(self, ids: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        n = ids.size
        total = pos + n
        b = self._binding
        b.bind_cpu_input(c.INPUT_IDS, ids.reshape(1, n))
        b.bind_cpu_input(c.ATTENTION_MASK, self._ones[:total].reshape(1, total))
        if self._positions is not None:
            b.bind_cpu_input(c.POSITION_IDS, self._positions[pos:total].reshape(1, n))
        own_logits = self.has_logits_to_keep and not all_logits  # the preallocated [1, 1, vocab] buffer
        if not own_logits:  # [1, n, vocab] changes shape: onnxruntime allocates it for this run
            if self.has_logits_to_keep:
                b.bind_ortvalue_input(c.LOGITS_TO_KEEP, self._keep_all)
            b.bind_output(c.LOGITS, "cpu")
        self.cache.bind(pos)
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs() if self.cache.reads_outputs or not own_logits else None
        self.cache.update(outputs, total)
        if own_logits:
            return self._logits[0, -1]
        logits = outputs[0].numpy()[0]
        if self.has_logits_to_keep:  # back to the last-position buffer for the next run
            b.bind_ortvalue_input(c.LOGITS_TO_KEEP, self._keep_last)
            b.bind_ortvalue_output(c.LOGITS, self._logits_value)
        return logits if all_logits else logits[-1]


class _StaticGraph:
    """One static graph: its session, IO binding and the host arrays bound to its inputs and outputs."""

    def __init__(self, name: str, session, cache: HostKVCache, layers: int):
        self.name, self.session = name, session
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        past, present = c.past_names(layers, static=True), c.present_names(layers, static=True)
        missing = [n for n in (c.INPUT_IDS, c.POSITION_IDS, c.ATTENTION_BIAS, *past) if n not in inputs]
        missing += [n for n in (c.LOGITS, *present) if n not in outputs]
        if missing:
            raise ArtifactError(f"the {name} graph lacks {', '.join(missing[:4])}; rebuild the static artifact")
        self.chunk = int(inputs[c.INPUT_IDS].shape[1])
        meta = session.get_modelmeta().custom_metadata_map
        try:
            self.mask_value = float(meta[c.MASK_VALUE_METADATA])
        except (KeyError, ValueError):
            raise ArtifactError(
                f"the {name} graph has no {c.MASK_VALUE_METADATA} metadata; rebuild the static artifact"
            ) from None
        total = cache.arrays[1].shape[2] + self.chunk
        self.input_ids = np.zeros((1, self.chunk), np.int32)
        self.position_ids = np.zeros((1, self.chunk), np.int32)
        self.bias = np.zeros((1, 1, self.chunk, total), np.float32)
        self.causal = np.where(np.tri(self.chunk, dtype=bool), 0.0, self.mask_value).astype(np.float32)
        self.logits = np.zeros(outputs[c.LOGITS].shape, np.float32)
        self.present = [np.zeros(outputs[p].shape, np.float32) for p in present]
        feeds = {
            c.INPUT_IDS: self.input_ids,
            c.POSITION_IDS: self.position_ids,
            c.ATTENTION_BIAS: self.bias,
            **dict(zip(past, cache.arrays)),
        }
        for n, array in feeds.items():
            if list(inputs[n].shape) != list(array.shape):
                raise ArtifactError(
                    f"the {name} graph's {n} has shape {inputs[n].shape}, expected "
                    f"{list(array.shape)}; the prefill and decode graphs do not match"
                )
        self.feeds = feeds
        self.binding = b = session.io_binding()
        self._values = []  # keep the OrtValues (views of the numpy arrays) alive
        for n, array in feeds.items():
            self._values.append(value := ort.OrtValue.ortvalue_from_numpy(array))
            b.bind_ortvalue_input(n, value)
        for n, array in zip((c.LOGITS, *present), (self.logits, *self.present)):
            self._values.append(value := ort.OrtValue.ortvalue_from_numpy(array))
            b.bind_ortvalue_output(n, value)

    def run(self, ids: np.ndarray, pos: int, context: int, on_feeds: FeedsCallback | None) -> None:
        """Feed `ids` (at most one chunk) at positions pos.. with the cache slots [0, pos) visible."""
        n = ids.size
        self.input_ids[0, :n] = ids
        self.input_ids[0, n:] = 0
        self.position_ids[0] = np.minimum(np.arange(pos, pos + self.chunk), context - 1)
        self.bias[0, 0, :, :pos] = 0.0
        self.bias[0, 0, :, pos:context] = self.mask_value
        self.bias[0, 0, :, context:] = self.causal
        if on_feeds is not None:
            on_feeds(self.name, {k: v.copy() for k, v in self.feeds.items()})
        self.session.run_with_iobinding(self.binding)


class StaticRunner:
    """An NPU artifact's prefill and decode graphs over a host-side cache.

    `sessions` = (prefill, decode) already-made InferenceSessions, or else each is made by
    `session_factory(path, artifact.profile)`. `on_feeds(graph_name, feeds)` receives a copy of every
    feed dict before its run (e.g. to collect calibration data). The context is the graphs' fixed
    cache size unless `max_length` is smaller.
    """

    def __init__(
        self,
        artifact: Artifact,
        max_length: int | None = None,
        *,
        sessions: tuple | None = None,
        session_factory: SessionFactory = create_session,
        on_feeds: FeedsCallback | None = None,
    ):
        info = artifact.model
        if sessions is None:
            _check_loadable(artifact)
            files = c.static_graph_files(artifact.manifest)
            sessions = tuple(session_factory(artifact.path(files[g]), artifact.profile) for g in c.STATIC_GRAPHS)
        prefill, decode = sessions
        past = {i.name: i.shape for i in decode.get_inputs()}.get(c.STATIC_PAST_KEY % 0)
        if past is None or len(past) != 4 or not all(isinstance(d, int) for d in past):
            raise ArtifactError("the decode graph has no static past_key_0 input; rebuild the static artifact")
        self.context = int(past[3])
        if self.context != info.context_length:
            raise ArtifactError(
                f"the graphs hold {self.context} tokens but the manifest says "
                f"{info.context_length}; rebuild the static artifact"
            )
        self.max_length = check_max_length(max_length, self.context)
        self.on_feeds = on_feeds
        self.cache = HostKVCache(info.num_layers, info.num_kv_heads, info.head_dim, self.context)
        self._prefill = _StaticGraph("prefill", prefill, self.cache, info.num_layers)
        self._decode = _StaticGraph("decode", decode, self.cache, info.num_layers)
        if self._decode.chunk != 1 or self._prefill.chunk < 2 or self.context % self._prefill.chunk:
            raise ArtifactError(
                f"graph chunks {self._prefill.chunk} (prefill) and {self._decode.chunk} (decode) "
                f"do not fit a context of {self.context}; rebuild the static artifact"
            )
        self.prefill_chunk = self._prefill.chunk

    def forward(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """Run `ids` chunk by chunk (one token: the decode graph) and commit their keys/values."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        _check_room(pos, ids.size, self.max_length)
        rows = []
        for start in range(0, ids.size, self.prefill_chunk):
            part = ids[start : start + self.prefill_chunk]
            n, at = part.size, pos + start
            graph = self._decode if n == 1 else self._prefill
            graph.run(part, at, self.context, self.on_feeds)
            self.cache.commit(graph.present, at, n)
            if all_logits:
                rows.append(graph.logits[0, :n].copy())
        return np.concatenate(rows) if all_logits else graph.logits[0, n - 1]


def _check_loadable(artifact: Artifact) -> None:
    """Refuse, with what to do, a shared-weights QNN artifact on the x86-64 HTP emulator (which crashes on it)."""
    shared = (artifact.manifest.get(c.STATIC_BLOCK) or {}).get("share_weights")
    emulated = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    if shared and emulated and str(artifact.profile.get("execution_provider")) == "qnn":
        raise RuntimeMissingError(
            "this artifact's QNN context binary holds the weights once for both graphs, which the x86-64 HTP "
            "emulator cannot load; run it on a Snapdragon device, or rebuild with `overrides: {share_weights: false}` "
            "in the recipe to run it here"
        )


def open_runner(artifact: Artifact, max_length: int | None = None, prefill_chunk: int | None = None) -> Runner:
    """The runner an artifact's layout needs: StaticRunner for NPU graphs, else DecoderRunner."""
    layout = c.GraphLayout.of(artifact.root, artifact.manifest)
    if layout.kv_cache == c.STATIC:
        return StaticRunner(artifact, max_length)
    return DecoderRunner(artifact, max_length, prefill_chunk, layout)
