"""Optimum anchor: optimum-onnx export (text-generation-with-past, fp32) and its int8 dynamic
quantization (avx2 preset), run with ORTModelForCausalLM.generate.

Runs inside the anchor venv (`benchmarks/envs/setup.sh optimum`; optimum-onnx pins transformers <4.58).
Subcommands:

  build   export an HF directory to ONNX (fp32); with --int8, then quantize it with ORTQuantizer's
          avx2 dynamic preset; writes to a temp dir, renamed at the end; prints one JSON object.
  run     one measurement in this process: load, short warm-up, one timed greedy generation of
          exactly --new-tokens; prints one JSON object.
  repeat  one discarded process, then --reps `run` processes; each JSON line and the median.
  logits  logits at every position of each sequence in --ids -> float32 npz.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ANCHOR = "optimum"
QUANTIZED = "model_quantized.onnx"
META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def build(args) -> dict:
    """Export (and optionally int8-quantize) into a temp dir next to --output, renamed at the end."""
    if not os.path.isfile(os.path.join(args.input, "config.json")):
        common.fail(f"{args.input} is not a Hugging Face model directory (no config.json); pass --input DIR")
    from optimum.exporters.onnx import main_export

    out = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}-")
    try:
        export_dir = os.path.join(tmp, "fp32") if args.int8 else os.path.join(tmp, "out")
        main_export(args.input, output=export_dir, task="text-generation-with-past", device="cpu")
        final = export_dir
        if args.int8:
            from optimum.onnxruntime import ORTQuantizer
            from optimum.onnxruntime.configuration import AutoQuantizationConfig

            final = os.path.join(tmp, "out")
            quantizer = ORTQuantizer.from_pretrained(export_dir, file_name="model.onnx")
            quantizer.quantize(
                save_dir=final,
                quantization_config=AutoQuantizationConfig.avx2(is_static=False),
                use_external_data_format=True,
            )
            for name in META_FILES:
                if os.path.isfile(os.path.join(export_dir, name)):
                    shutil.copy(os.path.join(export_dir, name), final)
            shutil.rmtree(export_dir)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(final, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    return {
        "anchor": ANCHOR,
        "precision": "int8-dynamic-avx2" if args.int8 else "fp32",
        "artifact_bytes": sum(files.values()),
        "files": files,
    }


def _load(path: str, threads: int):
    if not os.path.isfile(os.path.join(path, "config.json")):
        common.fail(f"{path} is not an Optimum export; build it first with `optimum_onnx.py build`")
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    kwargs = {"file_name": QUANTIZED} if os.path.isfile(os.path.join(path, QUANTIZED)) else {}
    return ORTModelForCausalLM.from_pretrained(
        path, provider="CPUExecutionProvider", session_options=options, use_cache=True, **kwargs
    )


def run(args) -> dict:
    return common.hf_run(args, ANCHOR, _load, "ort-default")


def logits(args) -> dict:
    import torch

    model = _load(args.model, args.threads)

    def logits_of(ids):
        inp = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            return model(input_ids=inp, attention_mask=torch.ones_like(inp)).logits[0].float().numpy()

    return common.write_logits(args.ids, args.out, logits_of)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--input", required=True, help="Hugging Face model directory (fp32)")
    b.add_argument("--output", required=True, help="directory to create (replaced if present)")
    b.add_argument("--int8", action="store_true", help="int8 dynamic quantization (avx2 preset) after export")
    for name in ("run", "repeat"):
        common.add_run_args(
            sub.add_parser(name),
            "Optimum export directory",
            0,
            "ONNX Runtime intra-op threads (0: onnxruntime's default)",
        )
    common.add_logits_args(sub.add_parser("logits"), "Optimum export directory", threads=0)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        result = build(args)
    elif args.cmd == "run":
        result = run(args)
    elif args.cmd == "repeat":
        common.repeat(os.path.abspath(__file__), common.run_argv(args), args.reps, ANCHOR)
        return
    else:
        result = logits(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
