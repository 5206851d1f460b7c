"""How far re-rounding moves the GGUF tensors that precision method gguf cannot keep exactly.

For every matrix of a GGUF whose type has no exact ONNX Runtime grid (Q4_K, Q5_K, Q4_1, Q5_1, ...),
the relative rms error of its dequantized values re-rounded at edge.quantize.source_grid.REROUNDED
(int8 block 32 with zero points) and, for comparison, at int4 block 32 with zero points.

    python benchmarks/gguf_reround.py FILE.gguf [--rows 512]
"""

from __future__ import annotations

import argparse

import numpy as np

from edge.quantize.blockwise import QuantSpec, quantize
from edge.quantize.source_grid import EXACT, FLOAT_TYPES, REROUNDED
from edge.sources.gguf import GGUFSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--rows", type=int, default=512, help="rows of each matrix measured (default 512)")
    args = parser.parse_args()
    source = GGUFSource(args.gguf, args.gguf)
    int4 = QuantSpec(4, 32, symmetric=False)
    for name, qtype in source.tensor_types().items():
        if qtype in EXACT or qtype in FLOAT_TYPES:
            continue
        w = source.tensor(name, slice(0, args.rows))
        errors = [np.sqrt(np.mean((quantize(w, s).dequantize() - w) ** 2) / np.mean(w**2)) for s in (REROUNDED, int4)]
        print(f"{name} ({qtype}): int8 block 32 {errors[0]:.2%}, int4 block 32 {errors[1]:.2%} relative rms")


if __name__ == "__main__":
    main()
