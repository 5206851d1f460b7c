"""A GGUF tensor's own integers and scales as MatMulNBits / GatherBlockQuantized blobs, without re-rounding.

llama.cpp's symmetric block types are ``d * q`` with one scale per block, which ONNX Runtime's
symmetric layout ``scale * (u - 2**(bits-1))`` holds exactly whenever the storage has at least the
type's bits and its block size divides the type's scale block:

- Q8_0: q in [-128, 127], one float16 d per 32 → int8 block 32 (or 16);
- Q4_0: q - 8 in [-8, 7], d per 32 → int4 block 32 (or int8);
- Q5_0: q - 16 in [-16, 15], d per 32 → int8 block 32 (5 bits do not fit int4);
- Q6_K: q - 32 in [-32, 31], scale d * sc per 16 (sc int8; the product is exact in float32) → int8 block 16.

The types with a minimum (Q4_1, Q5_1: ``d * q + m``; Q4_K, Q5_K: ``d * sc * q - dmin * m`` per 32)
would need the zero point ``-m / d`` to be an integer, which it is not in general, and the other types
(Q2_K, Q3_K, IQ*, ...) are codebooks or nested scales; their dequantized values are re-rounded at
REROUNDED: int8 keeps them within 1/30 of their own step, where int4 would round them a second time
(an 8 % rms error on a real Q4_K matrix).
"""

from __future__ import annotations

import numpy as np

from edge.quantize.blockwise import BlockQuantized, QuantSpec, pack

# GGUF type name -> (bits of its integers, elements per scale): the grids ONNX Runtime holds exactly.
EXACT = {"Q8_0": (8, 32), "Q4_0": (4, 32), "Q5_0": (8, 32), "Q6_K": (8, 16)}
FLOAT_TYPES = ("F32", "F16", "BF16")
REROUNDED = QuantSpec(8, 32, symmetric=False)
# Bytes of one GGUF block and elements it holds.
_LAYOUT = {"Q8_0": (34, 32), "Q4_0": (18, 32), "Q5_0": (22, 32), "Q6_K": (210, 256)}


def native_storage(qtype: str) -> QuantSpec | None:
    """The storage a GGUF tensor type asks for: its exact grid, REROUNDED, or None for float types."""
    if qtype in FLOAT_TYPES:
        return None
    if qtype in EXACT:
        bits, block = EXACT[qtype]
        return QuantSpec(bits, block, symmetric=True)
    return REROUNDED


def holds(qtype: str, storage: QuantSpec | str) -> bool:
    """Whether `storage` holds the integers and scales of a `qtype` tensor exactly."""
    if qtype not in EXACT or isinstance(storage, str) or storage.method != "rtn":
        return False
    bits, block = EXACT[qtype]
    return storage.bits >= bits and block % storage.block_size == 0


def decode(qtype: str, raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed integers int8 [rows, k] and float32 scales [rows, k / scale block] of GGUF rows `raw`
    (uint8 [rows, bytes per row]); the values are ``q * scale`` per block, as gguf dequantizes them."""
    size, per = _LAYOUT[qtype]
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, k // per, size)
    if qtype == "Q6_K":
        ql, qh = b[..., :128].reshape(rows, -1, 2, 64), b[..., 128:192].reshape(rows, -1, 2, 1, 32)
        sc = b[..., 192:208].view(np.int8).astype(np.float32)
        d = b[..., 208:210].copy().view(np.float16).astype(np.float32)
        # each 128-element half: ql's 64 bytes give low nibbles (first 64) then high nibbles (next 64),
        # qh's 32 bytes give 2-bit pairs for the four groups of 32
        low = np.stack([ql & 0x0F, ql >> 4], axis=3).reshape(rows, -1, 2, 4, 32)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 0x03
        q = ((low | (high << 4)).astype(np.int16) - 32).reshape(rows, k)
        return q.astype(np.int8), (d * sc).reshape(rows, -1)
    d = b[..., :2].copy().view(np.float16).astype(np.float32).reshape(rows, -1)
    if qtype == "Q8_0":
        return b[..., 2:].view(np.int8).reshape(rows, k), d
    qs = b[..., -16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # elements 0..15, then 16..31
    if qtype == "Q4_0":
        return (q - 8).astype(np.int8).reshape(rows, k), d
    qh = b[..., 2:6].copy().view("<u4")  # Q5_0: bit j is the fifth bit of element j
    q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)) << 4
    return (q - 16).astype(np.int8).reshape(rows, k), d


def to_blocks(qtype: str, raw: np.ndarray, k: int, spec: QuantSpec) -> BlockQuantized:
    """GGUF rows `raw` of a `qtype` tensor with `k` columns as blobs in `spec` (which must hold them)."""
    if not holds(qtype, spec):
        raise ValueError(f"{spec} does not hold a {qtype} tensor exactly")
    q, scales = decode(qtype, raw, k)
    rows = q.shape[0]
    mid = 2 ** (spec.bits - 1)
    kb = k // spec.block_size
    u = (q.astype(np.int16) + mid).reshape(rows, kb, spec.block_size)
    zp = None
    if not spec.symmetric:
        zp = np.full((rows, kb), mid, np.uint8)
        zp = pack(zp, 4) if spec.bits == 4 else zp
    return BlockQuantized(
        packed=pack(u, spec.bits),
        scales=np.ascontiguousarray(np.repeat(scales, EXACT[qtype][1] // spec.block_size, axis=1)),
        zero_points=zp,
        bits=spec.bits,
        block_size=spec.block_size,
        n=rows,
        k=k,
    )
