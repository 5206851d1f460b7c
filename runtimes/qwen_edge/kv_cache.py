"""KV-cache strategies: how a graph's past keys/values are held between runs.

Each strategy binds the cache before a run at position `pos` (the number of valid positions; a `pos`
below the cached length rewinds the cache) and takes the run's outputs afterwards:

- `SharedKVCache` (qwen-edge's GroupQueryAttention graph): one `[1, kv_heads, max_length, head_dim]`
  buffer per past tensor, bound once as its past input and its present output; the graph writes in
  place and the attention mask's length says how many positions are valid, so rewinding is free.
- `GrowingKVCache` (plain-operator graphs of the olive/optimum backends): `present` = past + this step,
  allocated by onnxruntime and bound as the next step's past without a copy; rewinding slices once.
- `HostKVCache` (the NPU's static graphs): numpy buffers the host owns, fed whole to every run; the
  graph returns only this run's keys/values, which `commit` writes at their slots.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class SharedKVCache:
    """One buffer per past tensor, bound as both its past input and its present output."""

    reads_outputs = False

    def __init__(self, binding, names: dict[str, str], shape: tuple[int, ...], dtype):
        self._buffers = []  # numpy memory backing the bound OrtValues (allocated once, lazily paged)
        for past, present in names.items():
            buf = np.zeros(shape, dtype=dtype)
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
            self._buffers.append((buf, value))

    def bind(self, pos: int) -> None:
        """Nothing to rebind: the attention mask alone says how many positions are valid."""

    def update(self, outputs: list | None, total: int) -> None:
        """The graph already wrote into the shared buffers."""


class GrowingKVCache:
    """`present` = past + new, allocated by onnxruntime each step and bound as the next step's past."""

    reads_outputs = True

    def __init__(self, binding, names: dict[str, str], shape: tuple[int, ...], dtype):
        self._binding, self._names = binding, names
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((*shape[:2], 0, shape[3]), dtype=dtype))
        self._values = [empty] * len(names)
        self._length = 0
        for present in names.values():  # bound after logits: outputs come back in binding order
            binding.bind_output(present, "cpu")

    def bind(self, pos: int) -> None:
        """Bind the past (cut to its first `pos` positions if the cache was rewound) and fresh presents."""
        if pos != self._length:
            self._values = [
                ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :pos])) for v in self._values
            ]
            self._length = pos
        for (past, present), value in zip(self._names.items(), self._values):
            self._binding.bind_ortvalue_input(past, value)
            self._binding.bind_output(present, "cpu")

    def update(self, outputs: list, total: int) -> None:
        """Keep this step's presents (the last bound outputs) as the next past."""
        self._values = outputs[len(outputs) - len(self._names) :]
        self._length = total


class HostKVCache:
    """The static graphs' cache on the host: per layer keys `[1, kv_heads, head_dim, L]` (transposed)
    and values `[1, kv_heads, L, head_dim]`, the same arrays bound to every run of both graphs."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, context: int):
        self.arrays: list[np.ndarray] = []
        for _ in range(num_layers):
            self.arrays += [
                np.zeros((1, kv_heads, head_dim, context), np.float32),
                np.zeros((1, kv_heads, context, head_dim), np.float32),
            ]

    def commit(self, presents: list[np.ndarray], pos: int, n: int) -> None:
        """Write the first `n` (unpadded) new slices of a run at slots pos..pos+n-1."""
        for buf, new in zip(self.arrays[0::2], presents[0::2]):
            buf[..., pos : pos + n] = new[..., :n]
        for buf, new in zip(self.arrays[1::2], presents[1::2]):
            buf[:, :, pos : pos + n] = new[:, :, :n]
