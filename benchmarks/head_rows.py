"""lm_head alone: mean KL against fp32 of an int4 lm_head with N rows in int8, chosen as the first N token
ids or as the N rows edge.quantize.head_rows ranks first, on the evaluation texts (not the calibration text
the ranking is measured on). Every other weight is fp32, so the numbers isolate the choice of rows.

    python benchmarks/head_rows.py SOURCE [--block-size 64] [--rows 16384 32768]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from edge.check.fidelity import load_eval_texts
from edge.quantize import head_rows
from edge.quantize.blockwise import QuantSpec, quantize
from edge.quantize.gptq import source_tokenizer
from edge.sources import open_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a model source (HF directory, GGUF file)")
    parser.add_argument("--block-size", type=int, default=64, help="lm_head's int4 block size (default 64)")
    parser.add_argument("--rows", type=int, nargs="+", default=[16384, 32768], help="int8 row counts")
    args = parser.parse_args()
    source = open_source(args.source)
    storage = QuantSpec(4, args.block_size, symmetric=False)
    head = head_rows.head_matrix(source)
    int4 = quantize(head.numpy(), storage).dequantize()
    int8 = quantize(head.numpy(), QuantSpec(8, args.block_size, symmetric=True)).dequantize()
    (order,) = head_rows.ranking(source, [storage])
    with torch.no_grad():
        texts = load_eval_texts()
        tokenizer = source_tokenizer(source)
        hidden = {  # each text one sequence, as the fidelity check scores it
            name: head_rows.final_hidden(source, torch.tensor([tokenizer.encode(text).ids]))
            for name, text in texts.items()
        }
        reference = {name: torch.log_softmax(h @ head.T, -1) for name, h in hidden.items()}
        print(f"lm_head int4 block {args.block_size}; mean KL vs fp32 on {', '.join(texts)}")
        print(f"no int8 rows: {_row(hidden, reference, int4)}")
        for rows in args.rows:
            for label, ids in (("first ids", np.arange(rows)), ("ranked", np.sort(order[:rows]))):
                mixed = int4.copy()
                mixed[ids] = int8[ids]
                print(f"{rows} rows, {label}: {_row(hidden, reference, mixed)}")


def _row(hidden: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], stored: np.ndarray) -> str:
    stored = torch.from_numpy(stored)
    kls = {}
    for name, h in hidden.items():
        ref = reference[name]
        art = torch.log_softmax(h @ stored.T, -1)
        kls[name] = (ref.exp() * (ref - art)).sum(-1)
    overall = float(torch.cat(list(kls.values())).mean())
    return f"{overall:.5f} (" + ", ".join(f"{n} {float(v.mean()):.5f}" for n, v in kls.items()) + ")"


if __name__ == "__main__":
    main()
