"""An artifact's fidelity on aarch64 beside x86-64: top-1 agreement and mean KL against the same fp32 reference.

    .venv/bin/python scripts/arm64/fidelity.py ARTIFACT [--tokens 256] [--accuracy-level N] [--reference SPEC] [--json]

On this x86-64 host: the shipped evaluation texts are cut to an equal share of ``--tokens``, the fp32
transformers reference scores them (cached under the arm64 cache, keyed by source and token ids), the
runtime scores them here, and the same runtime scores them as aarch64 under qemu-user
(scripts/arm64/python running this file with ``--emit``, which needs only qwen_edge and numpy). The
numbers come from edge.check.fidelity.compare, one per language and token-weighted overall.

The MatMulNBits accuracy level is a node attribute fixed at build time; ``--accuracy-level`` scores a
copy of the artifact whose nodes carry the given level instead (the other files hard-linked where they can be).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("QWEN_EDGE_ARM64_CACHE") or Path.home() / ".cache" / "qwen-edge" / "arm64")


def emit(artifact: str, ids_file: str, out_dir: str) -> None:
    """(aarch64 side) every text's logits at every position, as ``out_dir/<name>.npy``."""
    from qwen_edge.artifact import Artifact
    from qwen_edge.generator import Generator

    gen = Generator(Artifact.open(artifact))
    for name, ids in json.loads(Path(ids_file).read_text()).items():
        np.save(Path(out_dir) / f"{name}.npy", gen.logits(ids))


def token_ids(artifact, tokens: int) -> dict[str, list[int]]:
    """The shipped evaluation texts' token ids, each cut to an equal share of ``tokens``."""
    from edge.check.fidelity import load_eval_texts
    from qwen_edge.generator import Generator

    texts = load_eval_texts()
    share = max(2, tokens // len(texts))
    gen = Generator(artifact)
    return {name: gen.encode(text)[:share] for name, text in texts.items()}


def reference(spec: str, source_sha: str, ids: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """fp32 transformers logits per text, computed once per (source, ids) and cached."""
    from edge.check.fidelity import reference_logits
    from edge.sources import open_source

    key = hashlib.sha256(json.dumps([source_sha, ids], sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / "reference" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return {name: cached[name] for name in ids}
    model = open_source(spec).reference_model()
    logits = {name: reference_logits(model, seq) for name, seq in ids.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **logits)
    tmp.replace(path)
    return logits


def with_accuracy_level(artifact_dir: Path, level: int, out: Path) -> Path:
    """`out` as the artifact with every MatMulNBits at `level`: model.onnx rewritten, the manifest's entry
    for it updated, every other file a hard link, else a copy (onnxruntime refuses external data behind a symlink
    that leaves the model's folder; a signed artifact's signature would no longer match)."""
    import onnx

    from edge.artifact.manifest import write_json
    from qwen_edge.artifact import sha256_file

    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    model = onnx.load(artifact_dir / "model.onnx", load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    if not nodes:
        raise SystemExit(f"{artifact_dir}: no MatMulNBits nodes, --accuracy-level does not apply")
    for node in nodes:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = level
        if not any(attr.name == "accuracy_level" for attr in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    out.mkdir(parents=True)
    for name in manifest["files"]:
        if name != "model.onnx":
            try:
                os.link(artifact_dir / name, out / name)
            except OSError:
                shutil.copy2(artifact_dir / name, out / name)
    onnx.save(model, out / "model.onnx")
    manifest["files"]["model.onnx"] = {
        "size": (out / "model.onnx").stat().st_size,
        "sha256": sha256_file(out / "model.onnx"),
    }
    manifest["profile"]["accuracy_level"] = level
    write_json(out / "manifest.json", manifest)
    return out


def aarch64_logits(artifact: Path, ids: dict[str, list[int]]) -> tuple[dict[str, np.ndarray], float]:
    """Logits per text from the runtime run as aarch64 under qemu-user, and the seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        start = time.perf_counter()
        subprocess.run(
            [str(HERE / "python"), str(Path(__file__).resolve()), "--emit", str(artifact), str(ids_file), tmp],
            check=True,
        )
        seconds = time.perf_counter() - start
        return {name: np.load(Path(tmp) / f"{name}.npy") for name in ids}, seconds


def overall(per_text: dict[str, dict], ids: dict[str, list[int]]) -> dict[str, float]:
    """Position-weighted mean of top-1 agreement and KL over the texts."""
    n = {name: len(seq) for name, seq in ids.items()}
    total = sum(n.values())
    return {k: sum(per_text[t][k] * n[t] for t in ids) / total for k in ("top1_agreement", "mean_kl")}


def measure(artifact_dir: Path, tokens: int, spec: str | None) -> dict:
    """Fidelity of the artifact on x86-64 and on aarch64 against one fp32 reference, and x86 vs aarch64."""
    from edge.check.fidelity import compare
    from qwen_edge.artifact import Artifact
    from qwen_edge.generator import Generator

    artifact = Artifact.open(artifact_dir)
    source = artifact.manifest["source"]
    ids = token_ids(artifact, tokens)
    ref = reference(spec or source["spec"], source.get("sha256", ""), ids)
    start = time.perf_counter()
    gen = Generator(artifact)
    x86 = {name: gen.logits(seq) for name, seq in ids.items()}
    x86_s = time.perf_counter() - start
    arm, arm_s = aarch64_logits(artifact_dir, ids)
    sides = {
        "x86_64": {name: compare(ref[name], x86[name], seq) for name, seq in ids.items()},
        "aarch64": {name: compare(ref[name], arm[name], seq) for name, seq in ids.items()},
        "aarch64_vs_x86_64": {name: compare(x86[name], arm[name], seq) for name, seq in ids.items()},
    }
    return {
        "artifact": str(artifact_dir),
        "tokens": {name: len(seq) for name, seq in ids.items()},
        "seconds": {"x86_64": round(x86_s, 1), "aarch64_emulated": round(arm_s, 1)},
        **{side: {"languages": per, "overall": overall(per, ids)} for side, per in sides.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, nargs="?")
    parser.add_argument("--tokens", type=int, default=256, help="total token budget over the evaluation texts")
    parser.add_argument("--reference", help="source of the fp32 reference (default: the manifest's source spec)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=(0, 1, 2, 3, 4),
        help="score a copy whose MatMulNBits nodes use this accuracy level (default: the artifact's own)",
    )
    parser.add_argument("--emit", nargs=3, metavar=("ARTIFACT", "IDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.emit:
        emit(*args.emit)
        return 0
    if args.artifact is None:
        parser.error("give the artifact directory to measure")
    if args.tokens < 8:
        parser.error("--tokens must be at least 8 (two per evaluation text)")
    if args.accuracy_level is None:
        result = measure(args.artifact, args.tokens, args.reference)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            copy = with_accuracy_level(args.artifact.resolve(), args.accuracy_level, Path(tmp) / "artifact")
            result = measure(copy, args.tokens, args.reference)
        result.update(artifact=str(args.artifact), accuracy_level=args.accuracy_level)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    level = f", accuracy_level {args.accuracy_level}" if args.accuracy_level is not None else ""
    print(f"{result['artifact']}{level}: {sum(result['tokens'].values())} positions {result['tokens']}")
    for side in ("x86_64", "aarch64", "aarch64_vs_x86_64"):
        o = result[side]["overall"]
        print(f"  {side:18} top-1 {o['top1_agreement']:.4f}  KL {o['mean_kl']:.4f}")
    print(f"  seconds: {result['seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
