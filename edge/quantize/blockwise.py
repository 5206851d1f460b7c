"""Block-wise weight-only quantization of one weight matrix into MatMulNBits / GatherBlockQuantized blobs.

Every method quantizes a matrix W of shape [N, K] (output features, input features) in blocks of
``block_size`` consecutive input features; each block has its own scale (and zero point when
asymmetric). Rows are independent, so large matrices are processed in row chunks to bound memory.

Methods:
- ``rtn``: round-to-nearest on the block's range (onnxruntime's C++ block quantizer).
- ``kquant``: per-block search over scales and offsets minimising a weighted squared error
  (onnxruntime's k-quant implementation); asymmetric.
- ``hqq``: half-quadratic optimisation of the zero point under an lp-norm error
  (onnxruntime's HQQ implementation), rounded to integer zero points; asymmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("rtn", "kquant", "hqq")
ROW_CHUNK = 8192


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one matrix: bit width (4 or 8), block size, symmetry and method."""

    bits: int
    block_size: int
    symmetric: bool = True
    method: str = "rtn"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")


@dataclass
class BlockQuantized:
    """A quantized [N, K] matrix in MatMulNBits layout.

    packed: uint8 [N, k_blocks, block_size * bits / 8], low nibble first for 4 bits.
    scales: float32 [N, k_blocks].
    zero_points: None (symmetric: implied 2**(bits-1)) or uint8 packed [N, ceil(k_blocks * bits / 8)].
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    n: int
    k: int

    @property
    def k_blocks(self) -> int:
        return self.packed.shape[1]

    def zero_point_values(self) -> np.ndarray:
        """Integer zero points [N, k_blocks], one per block (uint8 layouts only)."""
        if self.bits == 8:
            return self.zero_points
        return unpack(self.zero_points, 4)[:, : self.k_blocks]

    def dequantize(self) -> np.ndarray:
        """Float32 [N, K] matrix these blobs represent (for checks and tests)."""
        q = unpack(self.packed, self.bits).astype(np.float32)  # [N, kb, block]
        if self.zero_points is None:
            zp = np.float32(2 ** (self.bits - 1))
        else:
            zp = self.zero_point_values()[:, :, None].astype(np.float32)
        w = (q - zp) * self.scales[:, :, None]
        return w.reshape(self.n, -1)[:, : self.k]

    @staticmethod
    def concat(parts: list["BlockQuantized"]) -> "BlockQuantized":
        """One matrix from row blocks quantized alike (rows are quantized independently)."""
        first = parts[0]
        zp = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
        return BlockQuantized(
            np.concatenate([p.packed for p in parts]),
            np.concatenate([p.scales for p in parts]),
            zp,
            first.bits,
            first.block_size,
            sum(p.n for p in parts),
            first.k,
        )

    def take(self, ids: np.ndarray) -> "BlockQuantized":
        """The blobs of rows `ids` (rows are quantized independently)."""
        zp = None if self.zero_points is None else self.zero_points[ids]
        return BlockQuantized(self.packed[ids], self.scales[ids], zp, self.bits, self.block_size, len(ids), self.k)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack uint8 bytes into one value per element along the last axis (low nibble first)."""
    if bits == 8:
        return packed
    lo = packed & 0x0F
    hi = packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer values in [0, 2**bits) along the last axis into uint8 (low nibble first)."""
    v = values.astype(np.uint8)
    if bits == 8:
        return v
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def quantize(weight: np.ndarray, spec: QuantSpec) -> BlockQuantized:
    """Quantize a float [N, K] matrix block-wise along K, in row chunks."""
    n, k = weight.shape
    parts = [
        _quantize_rows(np.ascontiguousarray(weight[i : i + ROW_CHUNK], np.float32), spec)
        for i in range(0, n, ROW_CHUNK)
    ]
    zps = [p[2] for p in parts]
    return BlockQuantized(
        packed=np.concatenate([p[0] for p in parts]),
        scales=np.concatenate([p[1] for p in parts]),
        zero_points=None if zps[0] is None else np.concatenate(zps),
        bits=spec.bits,
        block_size=spec.block_size,
        n=n,
        k=k,
    )


def _quantize_rows(w: np.ndarray, spec: QuantSpec):
    if spec.method == "rtn":
        return _rtn(w, spec)
    kb, blocks = _blocks(w, spec.block_size)
    if spec.method == "kquant":
        from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

        q, scale, zp = quant_tensor_k_quant_cpu(blocks, spec.bits, spec.block_size)
        q = q.reshape(w.shape[0], kb, spec.block_size)
        zp = zp.reshape(w.shape[0], kb)
        zp_packed = pack(zp, spec.bits) if spec.bits == 4 else zp
        return pack(q, spec.bits), scale.reshape(w.shape[0], kb).astype(np.float32), zp_packed
    return _hqq(w, kb, blocks, spec)


def _blocks(w: np.ndarray, block: int) -> tuple[int, np.ndarray]:
    n, k = w.shape
    kb = -(-k // block)
    if kb * block != k:
        w = np.pad(w, ((0, 0), (0, kb * block - k)))
    return kb, w.reshape(n * kb, block)


def _rtn(w: np.ndarray, spec: QuantSpec):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    block = spec.block_size
    kb = -(-k // block)
    wt = np.ascontiguousarray(w.T)  # the kernel takes the MatMul B layout [K, N]
    if kb * block != k:
        wt = np.pad(wt, ((0, kb * block - k), (0, 0)))
    packed = np.zeros((n, kb, block * spec.bits // 8), np.uint8)
    zp = np.zeros((n, -(-kb * spec.bits // 8)), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    kernel = quantize_matmul_4bits if spec.bits == 4 else quantize_matmul_8bits
    kernel(packed, wt, scales, zp, block, n, kb * block, spec.symmetric)
    return packed, scales, None if spec.symmetric else zp


def _hqq(w: np.ndarray, kb: int, blocks: np.ndarray, spec: QuantSpec):
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=spec.bits))
    q, scale, zero = quantizer.quantize_internal(
        torch.from_numpy(w), bits=spec.bits, group_size=spec.block_size, axis=1
    )
    n = w.shape[0]
    scale = scale.numpy().reshape(n, kb).astype(np.float32)
    # onnxruntime repacks MatMulNBits weights for its fast kernels only with integer zero points
    # (float ones run a dequantize-every-call path, ~45x slower at decode): round the optimised zero
    # points to the grid and requantize the block against them.
    top = 2**spec.bits - 1
    zero = np.clip(np.round(zero.numpy().reshape(n, kb)), 0, top)
    q = np.clip(np.round(blocks.reshape(n, kb, spec.block_size) / scale[:, :, None] + zero[:, :, None]), 0, top)
    return pack(q, spec.bits), scale, pack(zero, spec.bits)
