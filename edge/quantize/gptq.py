"""GPTQ: calibrated weight quantization of the decoder's linear layers, one layer at a time.

The calibration text (``edge/data/calibration``) is tokenized with the source's tokenizer and cut
into a few fixed-length sequences. Their embeddings then pass through the decoder layer by layer:
each layer is read from the source, run in plain torch, and every packed linear (qkv, o, gate_up,
down) is quantized in the order the forward pass meets it, from the second-order statistics
H = 2/n X^T X of its actual input. Later linears see the outputs of the already quantized ones, and
the next layer sees this layer's quantized output, so errors are compensated downstream.

Each linear is quantized column by column along K on a fixed per-block grid (the same uint8 q,
fp32 scale and uint8 zero point per block the MatMulNBits kernel reads); the rounding error of a
column is spread over the columns not yet quantized through the inverse Hessian's Cholesky factor.
The grid of a block is chosen from the block's error-updated weights just before it is quantized:
its full range or a narrower one (outliers clipped) if that rounds the block with less error.
Activation reordering is not used: it would break the block-wise grid. (onnxruntime's
``neural_compressor.weight_only.gptq`` is not used: it returns only fake-quantized values, no grid,
and in onnxruntime 1.32 its error feedback reads the zero triangle of the Cholesky factor, so its
output equals plain rounding.)

The shipped text is about 8,400 Qwen tokens (prose, code, chat turns; Chinese and French), so the
default (4096 tokens in sequences of 512) uses eight sequences spread over it; a longer request is
capped by the text (16 sequences).

Only one layer's weights and Hessians are in memory at a time; the blobs of each finished layer are
written to one ``.npz`` in a spill directory (uncompressed, so a 3B model costs its quantized size on
disk, not in RAM) and read back once when the graph is saved.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edge import DATA_DIR, report
from edge.config import QwenConfig
from edge.graph.plan import GROUPS, WeightPlan
from edge.quantize.blockwise import BlockQuantized, QuantSpec, pack, quantize
from edge.sources.base import row_blocks
from qwen_edge.contract import TOKENIZER_FILE
from qwen_edge.errors import QwenEdgeError

CALIBRATION_DIR = DATA_DIR / "calibration"
DEFAULT_TOKENS = 4096
SEQ_LEN = 512
PERCDAMP = 0.01  # dampening: this fraction of the mean Hessian diagonal is added to the diagonal
COLUMN_BLOCK = 128  # columns updated together (a multiple of every allowed block size)
SHRINK = 20  # block ranges tried: the full range and 20 narrower ones, down to 80% (see _grid)
SHRINK_STEP = 0.01

WeightHook = Callable[[str, torch.Tensor], torch.Tensor]


class CalibrationError(QwenEdgeError):
    """Calibration data that cannot drive GPTQ."""


# ----- calibration data ------------------------------------------------------------------------
def calibration_text() -> str:
    """The shipped calibration text (prose, code, Chinese, French), separate from the evaluation texts."""
    files = sorted(CALIBRATION_DIR.glob("*.txt"))
    if not files:
        raise CalibrationError(f"no calibration text in {CALIBRATION_DIR}; reinstall qwen-edge")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def source_tokenizer(source):
    """The `tokenizers` Tokenizer the artifact of `source` will ship."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        source.write_tokenizer(Path(tmp))
        return Tokenizer.from_file(str(Path(tmp) / TOKENIZER_FILE))


def calibration_ids(
    source, tokens: int = DEFAULT_TOKENS, seq_len: int = SEQ_LEN, text: str | None = None
) -> torch.Tensor:
    """int64 [sequences, seq_len] token ids: up to `tokens // seq_len` windows spread evenly over the text."""
    ids = source_tokenizer(source).encode(calibration_text() if text is None else text, add_special_tokens=False).ids
    if len(ids) < seq_len:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    count = max(1, min(tokens // seq_len, len(ids) // seq_len))
    starts = np.linspace(0, len(ids) - seq_len, count).round().astype(int)
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.int64)


def embed(source, plan: WeightPlan, ids: torch.Tensor) -> torch.Tensor:
    """float32 [B, L, hidden] embeddings of `ids` as the artifact stores them (dequantized table rows)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    wanted = unique.numpy()  # sorted: the table is read in row blocks, keeping the wanted rows
    rows = np.concatenate(
        [
            block[wanted[(wanted >= a) & (wanted < a + len(block))] - a]
            for a, block in row_blocks(source.tensor, "model.embed_tokens.weight", source.config.vocab_size)
        ]
    )
    if isinstance(plan.embedding, QuantSpec):
        rows = quantize(rows, plan.embedding).dequantize()  # rows quantize independently
    elif plan.embedding == "fp16":
        rows = rows.astype(np.float16).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))[inverse]


# ----- one decoder layer in torch --------------------------------------------------------------
def layer_weights(source, config: QwenConfig, i: int) -> dict[str, torch.Tensor]:
    """Layer `i`'s fp32 weights from the source, with qkv and gate/up rows packed like the graph."""
    p = f"model.layers.{i}."

    def read(name):
        return torch.from_numpy(np.ascontiguousarray(source.tensor(p + name), dtype=np.float32))

    w = {group: torch.cat([read(f"{part}.weight") for part in parts]) for group, (_, parts) in GROUPS.items()}
    w["input_norm"] = read("input_layernorm.weight")
    w["post_norm"] = read("post_attention_layernorm.weight")
    if config.attention_bias:
        w["qkv_bias"] = torch.cat([read(f"self_attn.{x}_proj.bias") for x in "qkv"])
    if config.qk_norm:
        w["q_norm"] = read("self_attn.q_norm.weight")
        w["k_norm"] = read("self_attn.k_norm.weight")
    return w


def rotary(config: QwenConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] for positions 0..length-1 (half rotation, as in the graph)."""
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return torch.from_numpy(np.cos(angles).astype(np.float32)), torch.from_numpy(np.sin(angles).astype(np.float32))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def layer_forward(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    config: QwenConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weight: WeightHook | None = None,
) -> torch.Tensor:
    """One Qwen2/Qwen3 decoder layer on [B, L, hidden] (causal, every sequence from position 0).

    `weight(group, input)` returns the [N, K] matrix applied to `input` for each linear group
    ("qkv", "o", "gate_up", "down"); by default the layer's own weights.
    """
    c = config
    weight = weight or (lambda group, _inp: w[group])
    b, length, _ = x.shape
    q_n, kv_n = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    h = F.rms_norm(x, (c.hidden_size,), w["input_norm"], c.rms_norm_eps)
    q, k, v = F.linear(h, weight("qkv", h), w.get("qkv_bias")).split([q_n, kv_n, kv_n], dim=-1)
    q = q.reshape(b, length, c.num_heads, c.head_dim)
    k = k.reshape(b, length, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, length, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q = F.rms_norm(q, (c.head_dim,), w["q_norm"], c.rms_norm_eps)
        k = F.rms_norm(k, (c.head_dim,), w["k_norm"], c.rms_norm_eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    attn = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=c.head_dim**-0.5,
        enable_gqa=True,
    )
    attn = attn.transpose(1, 2).reshape(b, length, q_n)
    x = x + F.linear(attn, weight("o", attn))
    h = F.rms_norm(x, (c.hidden_size,), w["post_norm"], c.rms_norm_eps)
    gate, up = F.linear(h, weight("gate_up", h)).chunk(2, dim=-1)
    act = F.silu(gate) * up
    return x + F.linear(act, weight("down", act))


# ----- GPTQ for one matrix ---------------------------------------------------------------------
def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2/n X^T X of a linear's inputs ([..., K] → [K, K])."""
    x = inputs.reshape(-1, inputs.shape[-1])
    return (x.T @ x) * (2.0 / x.shape[0])


def _grid(w: torch.Tensor, spec: QuantSpec, shrink: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of one block [N, block] whose range includes 0 (uint8 zero points).

    With `shrink` > 0 the range is also tried narrowed to 1 - s * SHRINK_STEP (s = 1..shrink), clipping
    the outliers, and each row keeps the range whose rounding error on `w` is smallest.
    """
    maxq = 2**spec.bits - 1
    lo0 = torch.clamp(w.min(dim=1).values, max=0)
    hi0 = torch.clamp(w.max(dim=1).values, min=0)
    if spec.symmetric:
        hi0 = torch.maximum(-lo0, hi0)
        lo0 = -hi0
    flat = (lo0 == 0) & (hi0 == 0)
    lo0, hi0 = torch.where(flat, -1.0, lo0), torch.where(flat, 1.0, hi0)
    best = None
    for s in range(shrink + 1):
        lo, hi = lo0 * (1 - s * SHRINK_STEP), hi0 * (1 - s * SHRINK_STEP)
        scale = (hi - lo) / maxq
        zero = torch.full_like(scale, 2 ** (spec.bits - 1)) if spec.symmetric else torch.round(-lo / scale)
        if shrink == 0:
            return scale, zero
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
        err = ((q - zero[:, None]) * scale[:, None] - w).square().sum(dim=1)
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            best = tuple(torch.where(better, new, old) for new, old in zip((err, scale, zero), best))
    return best[1], best[2]


ROW_CHUNK = 16384  # output rows swept at a time (a 150k-row lm_head would otherwise need GBs of temporaries)


def gptq(
    weight: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    percdamp: float = PERCDAMP,
    column_block: int = COLUMN_BLOCK,
    *,
    shrink: int = SHRINK,
    overwrite: bool = False,
) -> BlockQuantized:
    """Quantize an fp32 [N, K] matrix on `spec`'s block grid, minimising ||X W^T - X Q^T|| for H = 2/n X^T X.

    `shrink` is how many narrowed block ranges are tried (see _grid); 0 keeps each block's full range.
    `overwrite` lets the sweep use `weight` itself as its work buffer (saves one copy of a large matrix).
    """
    if spec.method != "rtn":
        raise ValueError(f"gptq stores the rtn layout; got a {spec.method!r} QuantSpec")
    if column_block % spec.block_size:
        raise ValueError(f"column_block {column_block} must be a multiple of block_size {spec.block_size}")
    w = weight.detach().to(torch.float32)
    w = w if overwrite else w.clone()
    h = h.detach().to(torch.float32).clone()
    n, k = w.shape
    bs = spec.block_size
    kb = -(-k // bs)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros(n, kb * bs, dtype=torch.uint8)
    scales = torch.zeros(n, kb)
    zeros = torch.zeros(n, kb)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: extra threads only add synchronisation (6x slower on 2 cores)
    try:
        for r in range(0, n, ROW_CHUNK):  # rows are independent: chunks bound the sweep's temporaries
            rows = slice(r, r + ROW_CHUNK)
            _columns(w[rows], hinv, spec, column_block, shrink, q[rows], scales[rows], zeros[rows])
    finally:
        torch.set_num_threads(threads)

    zp = None
    if not spec.symmetric:
        zp = zeros.to(torch.uint8).numpy()
        if spec.bits == 4:  # an odd block count pads the last byte with 8, as the rtn kernel does
            zp = pack(np.pad(zp, ((0, 0), (0, kb % 2)), constant_values=8), 4)
    return BlockQuantized(
        packed=pack(q.reshape(n, kb, bs).numpy(), spec.bits),
        scales=scales.numpy(),
        zero_points=zp,
        bits=spec.bits,
        block_size=bs,
        n=n,
        k=k,
    )


def _columns(
    w: torch.Tensor,
    hinv: torch.Tensor,
    spec: QuantSpec,
    column_block: int,
    shrink: int,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
) -> None:
    """The GPTQ sweep over K: quantize a column, push its error onto the columns to its right."""
    k = w.shape[1]
    bs, maxq = spec.block_size, 2**spec.bits - 1
    for i1 in range(0, k, column_block):
        i2 = min(i1 + column_block, k)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if col % bs == 0:
                scale, zero = _grid(w1[:, j : j + bs], spec, shrink)
                scales[:, col // bs], zeros[:, col // bs] = scale, zero
            qc = torch.clamp(torch.round(w1[:, j] / scale) + zero, 0, maxq)
            q[:, col] = qc.to(torch.uint8)
            e = (w1[:, j] - scale * (qc - zero)) / hinv1[j, j]
            w1[:, j:] -= e[:, None] * hinv1[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]


# ----- the whole model -------------------------------------------------------------------------
class Calibrated:
    """GPTQ blobs by graph key, one ``.npz`` per layer (and one for lm_head) in `directory`.

    Call it as DecoderGraph's `quantized`: blobs by graph key, None for keys it does not hold.
    """

    _KEY = re.compile(r"^model\.layers\.(\d+)\.")

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        match = self._KEY.match(key)
        return self.directory / (f"layer{match.group(1)}.npz" if match else f"{key}.npz")

    def add(self, blobs: dict[str, BlockQuantized]) -> None:
        """Spill blobs that share one file: one layer's groups, or a single non-layer key."""
        arrays = {}
        for key, b in blobs.items():
            arrays[f"{key}|packed"], arrays[f"{key}|scales"] = b.packed, b.scales
            arrays[f"{key}|shape"] = np.array([b.bits, b.block_size, b.n, b.k], np.int64)
            if b.zero_points is not None:
                arrays[f"{key}|zp"] = b.zero_points
        np.savez(self._path(next(iter(blobs))), **arrays)

    def __call__(self, key: str) -> BlockQuantized | None:
        path = self._path(key)
        if not path.is_file():
            return None
        with np.load(path) as data:
            if f"{key}|packed" not in data:
                return None
            bits, block, n, k = (int(v) for v in data[f"{key}|shape"])
            zp = data[f"{key}|zp"] if f"{key}|zp" in data else None
            return BlockQuantized(data[f"{key}|packed"], data[f"{key}|scales"], zp, bits, block, n, k)

    def close(self) -> None:
        """Delete the spilled blobs."""
        shutil.rmtree(self.directory, ignore_errors=True)


def calibrate(
    source,
    plan: WeightPlan,
    spill_dir: Path,
    *,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = SEQ_LEN,
    text: str | None = None,
    lm_head: bool = False,
) -> Calibrated:
    """Quantize every decoder linear that `plan` stores as a QuantSpec with sequential GPTQ.

    The embedding is not touched (the graph quantizes it with its own spec); nor is lm_head unless
    `lm_head` is set and it has its own blobs (not the tied embedding's).
    """
    cfg = source.config
    ids = calibration_ids(source, tokens, seq_len, text)
    result = Calibrated(spill_dir)
    try:
        with torch.no_grad():
            x = embed(source, plan, ids)
            cos, sin = rotary(cfg, ids.shape[1])
            bar = report.current().bar(range(cfg.num_layers), desc=f"gptq ({ids.numel()} tokens)", unit="layer")
            for i in bar:
                w = layer_weights(source, cfg, i)
                blobs: dict[str, BlockQuantized] = {}

                def quantized_weight(group: str, inputs: torch.Tensor) -> torch.Tensor:
                    suffix, parts = GROUPS[group]
                    spec = plan.for_linear([f"model.layers.{i}.{part}.weight" for part in parts])
                    if isinstance(spec, str):
                        return w[group]
                    key = f"model.layers.{i}.{suffix}"
                    blobs[key] = gptq(w[group], hessian(inputs), spec)
                    return torch.from_numpy(blobs[key].dequantize())

                x = layer_forward(x, w, cfg, cos, sin, quantized_weight)
                if blobs:
                    result.add(blobs)
            shared = plan.lm_head_shares_embedding(cfg.tie_word_embeddings)  # the graph reuses the table's blobs
            if lm_head and isinstance(plan.lm_head, QuantSpec) and not shared:
                norm = torch.from_numpy(source.tensor("model.norm.weight"))
                h = hessian(F.rms_norm(x, (cfg.hidden_size,), norm, cfg.rms_norm_eps))
                name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
                blocks = [
                    gptq(torch.from_numpy(rows), h, plan.lm_head, overwrite=True)  # rows are independent
                    for _, rows in row_blocks(source.tensor, name, cfg.vocab_size, ROW_CHUNK)
                ]
                result.add({"lm_head": BlockQuantized.concat(blocks)})
    except BaseException:
        result.close()  # nothing half-written stays behind
        raise
    return result
