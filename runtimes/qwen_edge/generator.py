"""The KV-cached generation loop: IO binding, shared or growing past/present, chunked prefill.

Two graph layouts, told apart by the artifact's genai_config.json (`search.past_present_share_buffer`,
and `position_ids` among `model.decoder.inputs`):

- shared buffer (qwen-edge's own graph): the cache is allocated once per Generator as one
  `[1, num_kv_heads, max_length, head_dim]` buffer per layer and key/value; the same OrtValue is bound
  as `past_key_values.{i}.*` and `present.{i}.*`, so the graph writes new keys/values in place and
  nothing is copied per token. The number of valid cache positions is just the length of the
  `attention_mask` fed with each step, so rolling the cache back (`truncate`) only moves that length.
- growing (plain-op graphs such as an Optimum export): `present.{i}.*` is past + new, allocated by
  onnxruntime; those OrtValues are bound as the next step's `past_key_values.{i}.*` without a copy.
  Rolling back slices the past once, at the next step. Such graphs also take `position_ids`.

Context policy: a prompt must leave room for at least one generated token (prompt tokens <
max_length) or `generate` raises ContextOverflowError with the numbers and what to do. A prompt that
fits but whose `max_new_tokens` would run past the end of the context generates until the context
is full and then stops with finish_reason "length" and a notice. Otherwise generation ends with
"stop" (a stop token or stop string) or "max_tokens".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .artifact import GENAI_CONFIG, Artifact
from .detokenize import Detokenizer
from .errors import ArtifactError, ContextOverflowError, QwenEdgeError
from .sampling import Sampler, SamplingParams
from .session import create_session

DEFAULT_PREFILL_CHUNK = 512
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class GenerationStats:
    """Token counts and timings of one `generate` call (seconds)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the cache (not fed again)
    prefill_tokens: int = 0  # prompt tokens fed to the model
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0


@dataclass
class Generation:
    """An in-progress generation: iterate for text pieces; afterwards read finish_reason, stats, text."""

    _pieces: Iterator[str] = field(repr=False)
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # the text emitted so far, piece by piece
    finish_reason: str | None = None  # "stop", "length" or "max_tokens"
    notice: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self.pieces)

    def read(self) -> str:
        """Run to the end and return the whole text."""
        for _ in self:
            pass
        return self.text


class _StopFilter:
    """Holds back streamed text that could be the start of a stop string; reports a completed one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text once generation ended without completing a stop string."""
        held, self.held = self.held, ""
        return held


def graph_layout(artifact: Artifact) -> tuple[bool, bool]:
    """(past_present_share_buffer, takes position_ids) as the artifact's genai_config.json states them;
    an artifact without that file has qwen-edge's own layout (shared buffer, no position_ids)."""
    path = artifact.path(GENAI_CONFIG)
    if not path.is_file():
        return True, False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        shared = config.get("search", {}).get("past_present_share_buffer", True)
        inputs = config["model"]["decoder"].get("inputs", {})
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ArtifactError(f"{path} is unreadable or malformed ({e}); rebuild the artifact") from None
    if not isinstance(shared, bool) or not isinstance(inputs, dict):
        raise ArtifactError(f"{path}: past_present_share_buffer or decoder inputs is malformed; rebuild the artifact")
    return shared, "position_ids" in inputs


class _SharedKV:
    """One `[1, kv_heads, max_length, head_dim]` buffer per past tensor, bound as its past input and its
    present output once: the graph writes each step's keys/values in place."""

    def __init__(self, binding, names: dict[str, str], shape: tuple[int, ...], dtype):
        self.buffers = []  # numpy memory backing the bound OrtValues (allocated once, lazily paged)
        for past, present in names.items():
            buf = np.zeros(shape, dtype=dtype)
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
            self.buffers.append((buf, value))

    def before(self, pos: int) -> None:
        """Nothing to rebind: the attention mask alone says how many positions are valid."""

    def after(self, outputs: list | None, total: int) -> None:
        """The graph already wrote into the shared buffers."""


class _GrowingKV:
    """`present` = past + new, allocated by onnxruntime each step and bound as the next step's past."""

    def __init__(self, binding, names: dict[str, str], shape: tuple[int, ...], dtype):
        self._binding, self._names = binding, names
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((*shape[:2], 0, shape[3]), dtype=dtype))
        self._values = [empty] * len(names)
        self._length = 0
        for present in names.values():  # bound after logits: outputs come back in binding order
            binding.bind_output(present, "cpu")

    def before(self, pos: int) -> None:
        """Bind the past (cut to its first `pos` positions if the cache was rolled back) and fresh presents."""
        if pos != self._length:
            self._values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :pos]))
                            for v in self._values]
            self._length = pos
        for (past, present), value in zip(self._names.items(), self._values):
            self._binding.bind_ortvalue_input(past, value)
            self._binding.bind_output(present, "cpu")

    def after(self, outputs: list, total: int) -> None:
        """Keep this step's presents (the last bound outputs) as the next past."""
        self._values = outputs[len(outputs) - len(self._names):]
        self._length = total


class Generator:
    """Runs an artifact's model with a persistent KV cache.

    `generate(ids)` takes the whole sequence (e.g. the full rendered conversation): the longest prefix
    already in the cache is kept and only the rest is fed, in chunks of `prefill_chunk` tokens.
    One generation runs at a time: starting a new one abandons the previous one.
    """

    def __init__(self, artifact: Artifact, max_length: int | None = None, prefill_chunk: int | None = None):
        self.artifact = artifact
        info = artifact.model
        self.max_length = _check_max_length(max_length, info.context_length)
        self.prefill_chunk = int(prefill_chunk or artifact.profile.get("prefill_chunk") or DEFAULT_PREFILL_CHUNK)
        if self.prefill_chunk < 1:
            raise QwenEdgeError(f"prefill_chunk must be >= 1, not {self.prefill_chunk}")
        try:
            self.tokenizer = Tokenizer.from_file(str(artifact.tokenizer_path))
        except Exception as e:
            raise ArtifactError(f"{artifact.tokenizer_path} is not a valid tokenizer ({e}); rebuild the artifact") from None
        self.session = create_session(artifact.model_path, artifact.profile)
        self.eos_token_ids = tuple(info.eos_token_ids)
        self._bind(info)
        self._tokens = np.zeros(self.max_length, dtype=np.int64)
        self._ones = np.ones(self.max_length, dtype=np.int64)
        self._pos = 0

    def _bind(self, info) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        shared, self.has_position_ids = graph_layout(self.artifact)
        kv = [f"past_key_values.{i}.{k}" for i in range(info.num_layers) for k in ("key", "value")]
        present = {name: name.replace("past_key_values", "present") for name in kv}
        needed = ("input_ids", "attention_mask", *(("position_ids",) if self.has_position_ids else ()), *kv)
        missing = [n for n in needed if n not in inputs]
        missing += [n for n in ("logits", *present.values()) if n not in outputs]
        if missing:
            raise ArtifactError(
                f"{self.artifact.model_path} lacks the graph inputs/outputs {', '.join(missing[:4])} that the manifest's "
                f"{info.num_layers} layers and {GENAI_CONFIG} imply; rebuild the artifact"
            )
        if "position_ids" in inputs and not self.has_position_ids:
            raise ArtifactError(f"{self.artifact.model_path} takes position_ids but {GENAI_CONFIG} does not list them; "
                                "rebuild the artifact")
        dtype = _DTYPES.get(inputs[kv[0]].type)
        if dtype is None:
            raise ArtifactError(f"KV cache type {inputs[kv[0]].type} is not supported; rebuild the artifact")
        self._binding = b = self.session.io_binding()
        # num_logits_to_keep is an overridable initializer (default 0 = all positions) or a plain input
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.has_logits_to_keep = "num_logits_to_keep" in inputs or "num_logits_to_keep" in overridable
        if self.has_logits_to_keep:
            self._keep = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
            b.bind_ortvalue_input("num_logits_to_keep", self._keep)
            self._logits = np.zeros((1, 1, info.vocab_size), dtype=np.float32)
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
            b.bind_ortvalue_output("logits", self._logits_value)
        else:
            b.bind_output("logits", "cpu")  # bound first: outputs come back in binding order
        shape = (1, info.num_kv_heads, self.max_length, info.head_dim)
        self._kv = (_SharedKV if shared else _GrowingKV)(b, present, shape, dtype)
        # a shared cache with a preallocated logits buffer needs nothing back from a run
        self._reads_outputs = not (shared and self.has_logits_to_keep)
        self._positions = np.arange(self.max_length, dtype=np.int64) if self.has_position_ids else None

    # -- cache state ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Number of tokens in the cache."""
        return self._pos

    @property
    def tokens(self) -> np.ndarray:
        """The token ids in the cache (a read-only view)."""
        view = self._tokens[: self._pos]
        view.flags.writeable = False
        return view

    def reset(self) -> None:
        """Forget the cache (no memory is released or cleared)."""
        self._pos = 0

    def truncate(self, n: int) -> None:
        """Roll the cache back to its first `n` tokens."""
        if not 0 <= n <= self._pos:
            raise QwenEdgeError(f"cannot truncate the cache to {n} tokens; it holds {self._pos}")
        self._pos = n

    def append(self, ids: Sequence[int]) -> np.ndarray:
        """Feed tokens after the cache (chunked) and return the logits row of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise QwenEdgeError("nothing to append: the token list is empty")
        if self._pos + ids.size > self.max_length:
            raise ContextOverflowError(
                f"{self._pos} cached + {ids.size} new tokens exceed the context of {self.max_length}; "
                "reset the cache or use a longer --max-length"
            )
        for start in range(0, ids.size, self.prefill_chunk):
            logits = self._step(ids[start : start + self.prefill_chunk])
        return logits

    def _step(self, ids: np.ndarray) -> np.ndarray:
        n = ids.size
        total = self._pos + n
        b = self._binding
        b.bind_cpu_input("input_ids", ids.reshape(1, n))
        b.bind_cpu_input("attention_mask", self._ones[:total].reshape(1, total))
        if self._positions is not None:
            b.bind_cpu_input("position_ids", self._positions[self._pos : total].reshape(1, n))
        if not self.has_logits_to_keep:  # [1, n, vocab] changes shape: let onnxruntime allocate it each run
            b.bind_output("logits", "cpu")
        self._kv.before(self._pos)
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs() if self._reads_outputs else None
        self._kv.after(outputs, total)
        self._tokens[self._pos : total] = ids
        self._pos = total
        if self.has_logits_to_keep:
            return self._logits[0, -1]
        return outputs[0].numpy()[0, -1]

    def common_prefix(self, ids: np.ndarray) -> int:
        """Length of the longest common prefix of `ids` and the cached tokens."""
        m = min(ids.size, self._pos)
        diff = np.flatnonzero(self._tokens[:m] != ids[:m])
        return int(diff[0]) if diff.size else m

    # -- generation ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` with the artifact's tokenizer."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] = (),
        stop_token_ids: Iterable[int] | None = None,
        on_token: Callable[[int], Sequence[int] | None] | None = None,
    ) -> Generation:
        """Generate after the whole sequence `prompt_ids` (its cached prefix is reused).

        Iterate the result for text pieces. Generation stops at a stop token (default: the model's
        eos ids; not emitted), at a stop string (not emitted; text that may begin one is held back),
        after `max_new_tokens`, or at the end of the context. `on_token(id)` may return token ids to
        force after a sampled token (e.g. closing a thinking block); they count as generated.
        """
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise QwenEdgeError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise QwenEdgeError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        if ids.size >= self.max_length:
            more = (
                f", raise --max-length (up to {self.artifact.model.context_length})"
                if self.max_length < self.artifact.model.context_length
                else ""
            )
            raise ContextOverflowError(
                f"the prompt has {ids.size} tokens; with {max_new_tokens} new tokens it needs "
                f"{ids.size + max_new_tokens} but the context holds {self.max_length}; shorten the prompt"
                f"{more}, or use an artifact built with a longer context"
            )
        stops = frozenset(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        gen = Generation(_pieces=iter(()))
        gen._pieces = self._run(gen, ids, Sampler(params), max_new_tokens, _StopFilter(stop_strings), stops, on_token)
        return gen

    def _run(self, gen: Generation, ids, sampler: Sampler, max_new: int, stop_text: _StopFilter, stops, on_token):
        stats = gen.stats
        t0 = time.perf_counter()
        reuse = min(self.common_prefix(ids), ids.size - 1)  # the last prompt token is always fed for its logits
        self.truncate(reuse)
        stats.prompt_tokens, stats.reused_tokens, stats.prefill_tokens = ids.size, reuse, ids.size - reuse
        logits = self.append(ids[reuse:])
        stats.prefill_s = time.perf_counter() - t0
        penalize = sampler.params.repetition_penalty != 1.0
        detok = Detokenizer(self.tokenizer)
        t_first = t_last = None
        while True:
            token = sampler(logits, self._tokens[: self._pos] if penalize else None)
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
                stats.ttft_s = t_first - t0
            if token in stops:
                gen.finish_reason = "stop"
                break
            new = [token, *(on_token(token) or ())] if on_token else [token]
            gen.token_ids.extend(new)
            stats.new_tokens += 1
            text, hit = stop_text.push("".join(detok.push(t) for t in new))
            if text:
                gen.pieces.append(text)
                yield text
            if hit:
                gen.finish_reason = "stop"
                break
            if len(gen.token_ids) >= max_new:
                gen.finish_reason = "max_tokens"
                break
            if self._pos + len(new) > self.max_length:
                gen.finish_reason = "length"
                gen.notice = (
                    f"stopped at the end of the context ({self.max_length} tokens) after {len(gen.token_ids)} new "
                    "tokens; use a shorter prompt, fewer new tokens, a larger --max-length, or an artifact with a "
                    "longer context"
                )
                break
            logits = self._step(np.asarray(new, dtype=np.int64))
        stats.decode_s = t_last - t_first
        tail = stop_text.flush()
        if tail:
            gen.pieces.append(tail)
            yield tail


def _check_max_length(max_length: int | None, context_length: int) -> int:
    if max_length is None:
        return context_length
    if not 2 <= max_length <= context_length:
        raise QwenEdgeError(
            f"max_length {max_length} must be between 2 and the artifact's context length {context_length}"
        )
    return int(max_length)
