"""Build-side `qwen-edge` commands: build, eval, recipes, profiles, package (arguments are parsed in qwen_edge.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edge.recipe import list_profiles, list_recipes, load_profile, load_recipe


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def _fidelity_line(fidelity: dict | None) -> str:
    if not fidelity:
        return "fidelity: not checked"
    o = fidelity["overall"]
    line = f"fidelity vs fp32: top-1 {o['top1_agreement']:.3f}, mean KL {o['mean_kl']:.4f}, " \
           f"ppl {o['ppl_artifact']:.2f} (reference {o['ppl_reference']:.2f})"
    if "greedy" in fidelity:
        line += f", greedy match {fidelity['greedy']['match_rate']:.2f}"
    return line


def build(args) -> int:
    """`qwen-edge build RECIPE`: build and print a short summary."""
    from edge.build import build as run_build

    recipe = load_recipe(args.recipe)
    if args.dry_run:
        print(json.dumps(plan(recipe), indent=2))
        return 0
    result = run_build(recipe, model=args.model, out=Path(args.out) if args.out else None,
                       evaluate=not args.no_eval, progress=not args.quiet)
    stats = result.manifest["build"]
    print(f"built {result.out_dir} in {stats['seconds']:.0f} s: {_size_mb(result.out_dir):.0f} MB, "
          f"peak RSS {stats['export_peak_rss_mb']} MB (export) / {stats['peak_rss_mb']} MB (with eval)", file=sys.stderr)
    print(_fidelity_line(result.manifest["fidelity"]), file=sys.stderr)
    return 0


def plan(recipe) -> dict:
    """What `qwen-edge build` would do for a recipe: the resolved recipe, its profile and the backend's plan."""
    from edge.backends import load_backend
    from edge.recipe import recipe_profile

    profile = recipe_profile(recipe)
    if recipe.backend == "native":
        backend = {"name": "native", "steps": ["qwen-edge graph export", f"{recipe.precision.method} quantization"]}
    else:
        backend = {"name": recipe.backend, **load_backend(recipe.backend).describe(recipe, profile)}
    return {"recipe": recipe.model_dump(mode="json"), "profile": profile.model_dump(mode="json"), "backend": backend}


def evaluate(args) -> int:
    """`qwen-edge eval ARTIFACT`: fidelity of an artifact against its fp32 source."""
    from transformers import AutoTokenizer

    from edge import fidelity
    from edge.sources import open_source
    from qwen_edge.artifact import Artifact

    artifact = Artifact.open(args.artifact, verify="size")
    reference_spec = args.reference or artifact.manifest["source"]["spec"]
    reference = open_source(reference_spec).reference_model()
    tokenizer = AutoTokenizer.from_pretrained(str(artifact.root))
    result = fidelity.evaluate(artifact.root, reference, tokenizer)
    result["greedy"] = fidelity.greedy_match(artifact.root, reference, tokenizer)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for lang, m in result["languages"].items():
            print(f"{lang:<10} top-1 {m['top1_agreement']:.3f}  KL {m['mean_kl']:.4f}  "
                  f"ppl {m['ppl_artifact']:.2f} (ref {m['ppl_reference']:.2f})")
        print(_fidelity_line(result))
    return 0


def recipes(args) -> int:
    """`qwen-edge recipes`: the shipped recipes, one line each."""
    for name in list_recipes():
        r = load_recipe(name)
        p = r.precision
        print(f"{name:<36} {p.weights:<5} {p.method:<7} block {p.block_size:<4} ctx {r.context_length:<6} {r.profile}")
    return 0


def profiles(args) -> int:
    """`qwen-edge profiles`: the device profiles, one line each."""
    for name in list_profiles():
        p = load_profile(name)
        print(f"{name:<14} {p.execution_provider:<5} threads {p.intra_op_num_threads or 'all':<4} "
              f"accuracy_level {p.accuracy_level}  memory {p.memory_budget_mb} MB  {p.description.strip()}")
    return 0


def package(args) -> int:
    """`qwen-edge package ARTIFACT --target T`: write the platform bundle and print a one-line summary."""
    import time

    from edge.package import package as run_package

    start = time.perf_counter()
    result = run_package(args.artifact, args.target, args.out, license_file=args.license, license_id=args.license_id)
    print(f"wrote {result.path}: {result.target} bundle, {result.files} files, {result.bytes / 1e6:.1f} MB, "
          f"licence {result.license_id}, in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
