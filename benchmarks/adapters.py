"""LoRA adapter costs: decode tok/s and peak RSS of the base artifact, the merged one, and the switchable
one with no adapter and with one; adapter file sizes; the time a switch takes.

    python benchmarks/adapters.py --base A --merged B --switchable C --adapter NAME [--reps 3] [--json OUT]

Each (artifact, adapter) is measured in its own process (peak RSS is per process), the kinds
interleaved round by round so machine load hits them alike; tok/s is greedy decode of `-n` tokens
after a `-p`-token prompt, eos ignored. Ratios are against the base artifact of the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import interleave, spread  # noqa: E402

PROMPT = "Write a Python class for a binary search tree with insert, delete and an in-order iterator."


def child(artifact: str, adapter: str | None, prompt_tokens: int, new_tokens: int) -> dict:
    """One process: open, (bind the adapter,) one warm-up and one timed greedy generation."""
    from qwen_edge.artifact import Artifact
    from qwen_edge.generator import Generator
    from qwen_edge.memory import peak_rss_mb

    gen = Generator(Artifact.open(artifact, verify="size"), max_length=prompt_tokens + new_tokens + 8)
    ids = (gen.encode(PROMPT) * prompt_tokens)[:prompt_tokens]
    out = {}
    if adapter:
        t = time.perf_counter()
        gen.set_adapter(adapter)  # cold: read the file, fuse, bind
        out["switch_cold_s"] = time.perf_counter() - t
        warm = []
        for name in (None, adapter) * 5:  # warm: tensors already made, rebind only
            t = time.perf_counter()
            gen.set_adapter(name)
            warm.append(time.perf_counter() - t)
        out["switch_warm_s"] = sorted(warm)[len(warm) // 2]
    gen.generate(ids, max_new_tokens=4, stop_token_ids=()).read()
    gen.reset()
    result = gen.generate(ids, max_new_tokens=new_tokens, stop_token_ids=())
    result.read()
    return {
        **out,
        "decode_tps": result.stats.decode_tps,
        "prefill_tps": result.stats.prefill_tps,
        "peak_rss_mb": peak_rss_mb(),
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the artifact built without an adapter")
    parser.add_argument("--merged", type=Path, default=None, help="the same recipe with adapter mode merged")
    parser.add_argument("--switchable", type=Path, required=True, help="the same recipe with adapter mode switchable")
    parser.add_argument("--adapter", required=True, help="the switchable artifact's adapter to measure")
    parser.add_argument("--peft", type=Path, default=None, help="the PEFT adapter directory (for its size)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("-p", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("-n", type=int, default=64, help="generated tokens (default 64)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here too")
    parser.add_argument("--child", nargs=2, metavar=("ARTIFACT", "ADAPTER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] or None, args.p, args.n)))
        return 0
    kinds = {
        "base": (args.base, ""),
        **({"merged": (args.merged, "")} if args.merged else {}),
        "switchable, no adapter": (args.switchable, ""),
        f"switchable, {args.adapter}": (args.switchable, args.adapter),
    }
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep, _, kind in interleave(list(kinds), ["decode"], args.reps):
        artifact, adapter = kinds[kind]
        cmd = [sys.executable, __file__, "--base", "-", "--switchable", "-", "--adapter", "-"]
        cmd += ["-p", str(args.p), "-n", str(args.n), "--child", str(artifact), adapter]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[kind].append(json.loads(out.strip().splitlines()[-1]))
        print(f"rep {rep} {kind}: {runs[kind][-1]['decode_tps']:.1f} tok/s", file=sys.stderr)
    base_tps = spread(r["decode_tps"] for r in runs["base"])["median"]
    rows = {}
    for kind, rs in runs.items():
        tps = spread(r["decode_tps"] for r in rs)
        rows[kind] = {
            "decode_tps": tps,
            "decode_vs_base": tps["median"] / base_tps,
            "prefill_tps": spread(r["prefill_tps"] for r in rs),
            "peak_rss_mb": spread(r["peak_rss_mb"] for r in rs),
            **{k: spread(r[k] for r in rs) for k in ("switch_cold_s", "switch_warm_s") if k in rs[0]},
        }
    sizes = {
        "base_artifact_bytes": _size(args.base),
        **({"merged_artifact_bytes": _size(args.merged)} if args.merged else {}),
        "switchable_artifact_bytes": _size(args.switchable),
        "adapter_file_bytes": _size(args.switchable / "adapters" / f"{args.adapter}.npz"),
    }
    if args.peft is not None:
        sizes["peft_safetensors_bytes"] = _size(args.peft / "adapter_model.safetensors")
    result = {"prompt_tokens": args.p, "new_tokens": args.n, "reps": args.reps, "rows": rows, "sizes": sizes}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
