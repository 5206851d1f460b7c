"""The generation loop over the two static-shape graphs (prefill + decode) that NPUs run.

The graphs (written by edge/static_graph.py) take a fixed-size KV cache as input and return only the
keys/values of the tokens they were fed; this loop owns the cache as numpy buffers, one
``[1, kv_heads, head_dim, L]`` (keys, transposed) and ``[1, kv_heads, L, head_dim]`` (values) per
layer, and commits the new slices at the right slots after each run:

- prompt tokens go through the prefill graph C at a time; the last chunk is padded to C, its padded
  rows are masked out and their keys/values are not committed;
- each generated token goes through the decode graph (C = 1);
- ``attention_bias`` lets each query see the committed cache slots ``[0, pos)`` and, causally, the
  tokens of its own run; everything else gets the graph's mask value.

Every buffer, bound input and output is allocated once; a step only rewrites them in place.
Generation, sampling, stop handling, prefix reuse and the context policy are Generator's.
"""

from __future__ import annotations

import platform
from typing import Callable

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .artifact import Artifact
from .errors import ArtifactError, ContextOverflowError, RuntimeMissingError
from .generator import Generator, _check_max_length
from .session import create_session

GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
FeedsCallback = Callable[[str, dict], None]
SessionFactory = Callable[[str, dict], ort.InferenceSession]


class _Graph:
    """One static graph: its session, IO binding and the host arrays bound to its inputs and outputs."""

    def __init__(self, name: str, session, cache: list[np.ndarray], layers: int):
        self.name, self.session = name, session
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        past = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
        missing = [n for n in ("input_ids", "position_ids", "attention_bias", *past) if n not in inputs]
        missing += [n for n in ("logits", *(p.replace("past", "present") for p in past)) if n not in outputs]
        if missing:
            raise ArtifactError(f"the {name} graph lacks {', '.join(missing[:4])}; rebuild the static artifact")
        self.chunk = int(inputs["input_ids"].shape[1])
        meta = session.get_modelmeta().custom_metadata_map
        try:
            self.mask_value = float(meta["qwen_edge.mask_value"])
        except (KeyError, ValueError):
            raise ArtifactError(f"the {name} graph has no qwen_edge.mask_value metadata; rebuild the static artifact") from None
        total = cache[1].shape[2] + self.chunk
        self.input_ids = np.zeros((1, self.chunk), np.int32)
        self.position_ids = np.zeros((1, self.chunk), np.int32)
        self.bias = np.zeros((1, 1, self.chunk, total), np.float32)
        self.causal = np.where(np.tri(self.chunk, dtype=bool), 0.0, self.mask_value).astype(np.float32)
        self.logits = np.zeros(outputs["logits"].shape, np.float32)
        self.present = [np.zeros(outputs[p.replace("past", "present")].shape, np.float32) for p in past]
        feeds = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_bias": self.bias,
                 **dict(zip(past, cache))}
        for n, array in feeds.items():
            if list(inputs[n].shape) != list(array.shape):
                raise ArtifactError(f"the {name} graph's {n} has shape {inputs[n].shape}, expected "
                                    f"{list(array.shape)}; the prefill and decode graphs do not match")
        self.feeds = feeds
        self.binding = b = session.io_binding()
        self._values = []  # keep the OrtValues (views of the numpy arrays) alive
        for n, array in feeds.items():
            self._values.append(value := ort.OrtValue.ortvalue_from_numpy(array))
            b.bind_ortvalue_input(n, value)
        for n, array in zip(("logits", *(p.replace("past", "present") for p in past)), (self.logits, *self.present)):
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


class StaticGenerator(Generator):
    """Generator over an artifact's static prefill/decode graphs (same `generate` surface and results).

    `sessions` = (prefill, decode) already-made InferenceSessions, or else each is made by
    `session_factory(path, artifact.profile)` (default: qwen_edge.session.create_session).
    `on_feeds(graph_name, feeds)` receives a copy of every feed dict before its run (e.g. to collect
    calibration data). The context is the graphs' fixed cache size unless `max_length` is smaller.
    """

    def __init__(self, artifact: Artifact, sessions: tuple | None = None, *,
                 session_factory: SessionFactory = create_session, max_length: int | None = None,
                 on_feeds: FeedsCallback | None = None):
        self.artifact = artifact
        info = artifact.model
        try:
            self.tokenizer = Tokenizer.from_file(str(artifact.tokenizer_path))
        except Exception as e:
            raise ArtifactError(f"{artifact.tokenizer_path} is not a valid tokenizer ({e}); rebuild the artifact") from None
        if sessions is None:
            _check_loadable(artifact)
            files = {**GRAPH_FILES, **(artifact.manifest.get("static") or {})}
            sessions = tuple(session_factory(artifact.path(files[g]), artifact.profile) for g in GRAPH_FILES)
        prefill, decode = sessions
        past = {i.name: i.shape for i in decode.get_inputs()}.get("past_key_0")
        if past is None or len(past) != 4 or not all(isinstance(d, int) for d in past):
            raise ArtifactError("the decode graph has no static past_key_0 input; rebuild the static artifact")
        self.context = int(past[3])
        if self.context != info.context_length:
            raise ArtifactError(f"the graphs hold {self.context} tokens but the manifest says "
                                f"{info.context_length}; rebuild the static artifact")
        self.max_length = _check_max_length(max_length, self.context)
        self.eos_token_ids = tuple(info.eos_token_ids)
        self.on_feeds = on_feeds
        self._cache = []
        for _ in range(info.num_layers):
            self._cache += [np.zeros((1, info.num_kv_heads, info.head_dim, self.context), np.float32),
                            np.zeros((1, info.num_kv_heads, self.context, info.head_dim), np.float32)]
        self._prefill = _Graph("prefill", prefill, self._cache, info.num_layers)
        self._decode = _Graph("decode", decode, self._cache, info.num_layers)
        if self._decode.chunk != 1 or self._prefill.chunk < 2 or self.context % self._prefill.chunk:
            raise ArtifactError(f"graph chunks {self._prefill.chunk} (prefill) and {self._decode.chunk} (decode) "
                                f"do not fit a context of {self.context}; rebuild the static artifact")
        self.prefill_chunk = self._prefill.chunk
        self._tokens = np.zeros(self.max_length, dtype=np.int64)
        self._pos = 0

    def logits(self, ids) -> np.ndarray:
        """Logits ``[n, vocab]`` at every position of `ids`, fed from an empty cache (for fidelity checks)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not 0 < ids.size <= self.max_length:
            raise ContextOverflowError(f"{ids.size} tokens do not fit the static graphs' context of {self.max_length}")
        self.reset()
        rows = []
        for start in range(0, ids.size, self.prefill_chunk):
            part = ids[start : start + self.prefill_chunk]
            self._step(part)
            rows.append((self._decode if part.size == 1 else self._prefill).logits[0, : part.size].copy())
        self.reset()
        return np.concatenate(rows)

    def _step(self, ids: np.ndarray) -> np.ndarray:
        """Run `ids` after the cache (chunk by chunk), commit their keys/values, return the last logits row."""
        for start in range(0, ids.size, self.prefill_chunk):
            part = ids[start : start + self.prefill_chunk]
            n, pos = part.size, self._pos
            graph = self._decode if n == 1 else self._prefill
            graph.run(part, pos, self.context, self.on_feeds)
            for buf, new in zip(self._cache[0::2], graph.present[0::2]):
                buf[..., pos : pos + n] = new[..., :n]
            for buf, new in zip(self._cache[1::2], graph.present[1::2]):
                buf[:, :, pos : pos + n] = new[:, :, :n]
            self._tokens[pos : pos + n] = part
            self._pos = pos + n
        return graph.logits[0, n - 1]


def _check_loadable(artifact: Artifact) -> None:
    """Refuse, with what to do, a shared-weights QNN artifact on the x86-64 HTP emulator (which crashes on it)."""
    shared = (artifact.manifest.get("static") or {}).get("share_weights")
    emulated = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    if shared and emulated and str(artifact.profile.get("execution_provider")) == "qnn":
        raise RuntimeMissingError(
            "this artifact's QNN context binary holds the weights once for both graphs, which the x86-64 HTP "
            "emulator cannot load; run it on a Snapdragon device, or rebuild with `overrides: {share_weights: false}` "
            "in the recipe to run it here"
        )


def open_generator(artifact: Artifact, max_length: int | None = None) -> Generator:
    """The loop an artifact needs: StaticGenerator for an NPU artifact's static graphs, else Generator."""
    if artifact.manifest.get("static"):
        return StaticGenerator(artifact, max_length=max_length)
    return Generator(artifact, max_length=max_length)
