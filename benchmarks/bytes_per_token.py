"""Bytes a decode step reads from memory, and the decode speed a memory bandwidth allows.

    python benchmarks/bytes_per_token.py ARTIFACT [ARTIFACT...] [--bandwidth-gbs 17.07] [--context 1024]

A decode step reads every weight once except the embedding table, of which it gathers one row, plus
the KV cache of the tokens so far. Decode on a phone or a board is bound by memory bandwidth, so
``bandwidth / bytes per token`` is an upper bound on its tokens per second (sustained bandwidth is
below the peak a datasheet gives).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx.external_data_helper import uses_external_data

from edge.graph.decoder import gathered_initializers


def _size(tensor: onnx.TensorProto) -> int:
    if uses_external_data(tensor):
        return int({e.key: e.value for e in tensor.external_data}["length"])
    return len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes


def bytes_per_token(artifact: Path, context: int) -> dict:
    """Weight bytes read per decode step, the gathered tables left out, and the KV cache at ``context``."""
    model = onnx.load(artifact / "model.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    gathered = gathered_initializers(ir.serde.deserialize_model(model).graph)
    weights = sum(_size(t) for name, t in inits.items() if name not in gathered)
    m = json.loads((artifact / "manifest.json").read_text())["model"]
    kv = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 4 * context  # float32 keys and values
    return {"weights": weights, "gathered_tables": sum(_size(inits[n]) for n in gathered if n in inits), "kv": kv}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--bandwidth-gbs", type=float, default=17.07, help="peak memory bandwidth, GB/s")
    parser.add_argument("--context", type=int, default=1024, help="tokens in the KV cache")
    args = parser.parse_args(argv)
    for art in args.artifacts:
        b = bytes_per_token(art, args.context)
        total = b["weights"] + b["kv"]
        print(
            f"{art}: {b['weights'] / 1e6:.1f} MB weights + {b['kv'] / 1e6:.1f} MB KV at {args.context} tokens "
            f"per decode step (embedding {b['gathered_tables'] / 1e6:.1f} MB not read); at "
            f"{args.bandwidth_gbs} GB/s at most {args.bandwidth_gbs * 1e9 / total:.1f} tok/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
