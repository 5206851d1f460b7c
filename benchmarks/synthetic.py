"""A model at Qwen2.5-3B's exact shapes with random bf16 weights, for 3B build-memory, size and speed
numbers (speed and memory do not depend on the weights' values; fidelity is meaningless here).

    python benchmarks/synthetic.py make               # write benchmarks/.cache/synthetic-3b (~6.2 GB)
    python benchmarks/synthetic.py bench [--genai] [--no-qwen-edge]
        # build it with qwen-edge (and/or genai's builder), measure, write benchmarks/results/synthetic-3b-*.json

The weights are written one safetensors shard at a time (a few layers each), so making the model
never holds more than one shard in memory. The tokenizer files are the 0.5B fixture's (same vocabulary).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIG = {  # Qwen2.5-3B-Instruct's config.json shapes
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "attention_bias": True,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
    "torch_dtype": "bfloat16",
}
LAYERS_PER_SHARD = 6
OUT = HERE / ".cache" / "synthetic-3b"
GENAI_RSS_CAP_MB = 20_000  # at most; less when other jobs hold memory (see _rss_cap_mb)


def tensor_shapes(cfg: dict = CONFIG) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Shard file name -> [(HF tensor name, shape)] for a Qwen2 decoder with these hyper-parameters."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    n = cfg["num_hidden_layers"]
    groups = [list(range(s, min(s + LAYERS_PER_SHARD, n))) for s in range(0, n, LAYERS_PER_SHARD)]
    total = len(groups) + 1
    shards = {
        f"model-00001-of-{total:05d}.safetensors": [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,))]
    }
    for k, layers in enumerate(groups, 2):
        items = []
        for L in layers:
            p = f"model.layers.{L}."
            items += [
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.q_proj.bias", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        shards[f"model-{k:05d}-of-{total:05d}.safetensors"] = items
    return shards


def make(out: Path = OUT, seed: int = 0) -> Path:
    """Write the synthetic model (temp dir, renamed at the end); returns its directory. Cached."""
    import torch
    from fixtures import ensure_model
    from safetensors.torch import save_file

    if (out / "done.json").exists():
        return out
    tokenizer_dir = ensure_model("0.5b", progress=False)["hf_dir"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".partial", dir=out.parent))
    try:
        gen = torch.Generator().manual_seed(seed)
        weight_map, total = {}, 0
        for fname, items in tensor_shapes().items():
            tensors = {}
            for name, shape in items:
                if name.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:  # std 0.02 like an initialized checkpoint; biases small too
                    t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                tensors[name] = t
                total += t.numel() * 2
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
            print(f"wrote {fname}", file=sys.stderr, flush=True)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, tmp / name)
        (tmp / "done.json").write_text(json.dumps({"seed": seed, "bytes": total}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _rss_cap_mb() -> float:
    """Kill a build above this: GENAI_RSS_CAP_MB or what is available now minus 3 GB, the smaller."""
    import psutil

    return min(GENAI_RSS_CAP_MB, psutil.virtual_memory().available / 2**20 - 3000)


def bench(genai: bool, qwen_edge: bool, reps: int, nice: int) -> dict:
    """Build the synthetic 3B with qwen-edge (and optionally genai's builder) and measure both."""
    import harness
    import run as runner

    src = make()
    work = runner.CACHE / "artifacts"
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": runner.machine(),
        "source": str(src),
        "source_mb": round(runner._dir_mb(src), 1),
        "systems": {},
    }
    builds = {}
    if qwen_edge:
        builds["qwen-edge-int4"] = [
            runner.QWEN_EDGE,
            "build",
            "qwen2.5-3b-instruct-int4",
            "--model",
            src,
            "--out",
            work / "synthetic-3b-qwen-edge-int4",
            "--no-eval",
            "--quiet",
        ]
    if genai:
        builds["genai-int4"] = [
            runner._python("genai"),
            runner.ANCHORS / "genai.py",
            "build",
            "--input",
            src,
            "--output",
            work / "synthetic-3b-genai-int4",
            "--precision",
            "int4",
            "--quiet",
        ]
    for name, cmd in builds.items():
        art = Path(cmd[cmd.index("--out" if "--out" in cmd else "--output") + 1])
        shutil.rmtree(art, ignore_errors=True)
        runner.log(f"synthetic 3B: building {name}")
        rec = runner.measure_build(cmd, work / f"synthetic-3b-{name}.log", rss_cap_mb=_rss_cap_mb())
        entry = {"build": rec, "built": rec["returncode"] == 0 and art.exists()}
        if entry["built"]:
            entry["artifact_mb"] = round(runner._dir_mb(art), 1)
            runs = []
            for _ in range(reps):
                if name.startswith("qwen-edge"):
                    mcmd = [runner.QWEN_EDGE, "bench", art, "-p", 40, "-n", 64, "-r", 1, "--json"]
                else:
                    ids = work / "synthetic-prompts.json"
                    ids.write_text(json.dumps({"40": list(range(1000, 1040))}))
                    mcmd = [
                        runner._python("genai"),
                        runner.ANCHORS / "genai.py",
                        "run",
                        "--model",
                        art,
                        "--ids-file",
                        ids,
                        "--prompt-tokens",
                        40,
                        "--new-tokens",
                        64,
                        "--warmup-tokens",
                        2,
                    ]
                runs.append(runner._run_json(mcmd, f"{name} synthetic 3B", nice))
            entry["runs"] = runs
            entry["decode_tps"] = harness.spread(r["decode_tps"] for r in runs)
            entry["ttft_ms"] = harness.spread(r["ttft_ms"] for r in runs)
            entry["peak_rss_mb"] = harness.spread(r["peak_rss_mb"] for r in runs)
        else:
            entry["error"] = (
                Path(work / f"synthetic-3b-{name}.log").read_text(errors="replace").strip().splitlines()
                or ["no output"]
            )[-1]
        result["systems"][name] = entry
        runner.log(f"synthetic 3B {name}: {json.dumps({k: v for k, v in entry.items() if k != 'runs'})}")
    runner.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = result["date"].replace(":", "").replace("-", "")[:13]
    path = runner.RESULTS / f"synthetic-3b-{stamp}-{result['machine']['host']}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make", help="write the synthetic model (cached)")
    b = sub.add_parser("bench", help="build and measure it")
    b.add_argument("--genai", action="store_true", help=f"also genai's builder (killed above {GENAI_RSS_CAP_MB} MB)")
    b.add_argument("--no-qwen-edge", action="store_true", help="skip the qwen-edge build")
    b.add_argument("--reps", type=int, default=2)
    b.add_argument("--nice", type=int, default=-15 if os.geteuid() == 0 else 0)
    args = parser.parse_args(argv)
    if args.cmd == "make":
        print(make())
    else:
        bench(args.genai, not args.no_qwen_edge, args.reps, args.nice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
