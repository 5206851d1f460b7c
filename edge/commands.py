"""Build-side `qwen-edge` commands: build, eval, recipes, profiles, package (arguments are parsed in qwen_edge.cli)."""

from __future__ import annotations

import json
from pathlib import Path

from edge import report
from edge.recipe import list_profiles, list_recipes, load_profile, load_recipe


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def _fidelity_line(fidelity: dict | None) -> str:
    if not fidelity:
        return "fidelity: not checked"
    o = fidelity["overall"]
    line = (
        f"fidelity vs fp32: top-1 {o['top1_agreement']:.3f}, mean KL {o['mean_kl']:.4f}, "
        f"ppl {o['ppl_artifact']:.2f} (reference {o['ppl_reference']:.2f})"
    )
    if "greedy" in fidelity:
        line += f", greedy match {fidelity['greedy']['match_rate']:.2f}"
    return line


def build(args) -> int:
    """`qwen-edge build RECIPE`: build and print a short summary (with --quiet: nothing but errors)."""
    recipe = load_recipe(args.recipe)
    if args.dry_run:
        print(json.dumps(plan(recipe), indent=2))
        return 0
    from edge.check import preflight
    from edge.recipe import recipe_profile

    preflight.check_tools(recipe, recipe_profile(recipe))  # before the graph modules load (seconds of imports)
    key = _signing_key(args)  # an unusable key fails now, not after the build
    from edge.pipeline import build as run_build

    with report.use(report.Reporter(quiet=args.quiet)) as reporter:
        result = run_build(
            recipe, model=args.model, out=Path(args.out) if args.out else None, evaluate=not args.no_eval
        )
        if key is not None:
            from qwen_edge.signing import key_id, sign_artifact

            reporter.line(f"signed {sign_artifact(result.out_dir, key)} with key {key_id(key.public_key())}")
        stats = result.manifest["build"]
        reporter.line(
            f"built {result.out_dir} in {stats['seconds']:.0f} s: {_size_mb(result.out_dir):.0f} MB, "
            f"peak RSS {stats['export_peak_rss_mb']} MB (export) / {stats['peak_rss_mb']} MB (with eval)"
        )
        reporter.line(_fidelity_line(result.manifest["fidelity"]))
    return 0


def _signing_key(args):
    """The Ed25519 private key of `--sign`, or None."""
    if not getattr(args, "sign", None):
        return None
    from qwen_edge.signing import load_private_key

    return load_private_key(args.sign)


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
    """`qwen-edge eval ARTIFACT`: the build's fidelity check again, on the finished artifact of any kind
    (native, plain-graph or static), with the profile and token budget it was built with."""
    from transformers import AutoTokenizer

    from edge.check import fidelity
    from edge.recipe import Profile, RecipeError
    from edge.sources import open_source
    from qwen_edge.artifact import Artifact

    if getattr(args, "full", False) and not getattr(args, "tasks", False):
        raise RecipeError("--full selects the full task suites; add --tasks")
    artifact = Artifact.open(args.artifact, verify="size")
    try:
        profile = Profile.model_validate(artifact.profile)
    except ValueError as e:
        raise RecipeError(
            f"{artifact.root}: the manifest's profile is not valid ({e}); rebuild the artifact"
        ) from None
    if getattr(args, "tasks", False):
        return _evaluate_tasks(args, artifact, profile)
    recipe = artifact.manifest.get("recipe") or {}
    max_tokens = (recipe.get("fidelity") or {}).get("max_tokens") if isinstance(recipe, dict) else None
    logits = fidelity.scorer(artifact)  # loads the runtime first: a missing provider fails before the reference
    reference_spec = args.reference or artifact.manifest["source"]["spec"]
    with report.use(report.Reporter(quiet=args.json)) as reporter:
        with reporter.hushed_libraries():
            reference = open_source(reference_spec).reference_model()
            tokenizer = AutoTokenizer.from_pretrained(str(artifact.root))
            try:
                result = fidelity.check(logits, reference, tokenizer, profile, max_tokens=max_tokens)
            except fidelity.FidelityError as e:
                if hasattr(e, "result"):
                    _print_fidelity(e.result, args.json)
                raise
    _print_fidelity(result, args.json)
    return 0


def _evaluate_tasks(args, artifact, profile) -> int:
    """`qwen-edge eval ARTIFACT --tasks [--full]`: the task suites on the artifact and on its fp32
    reference, with the profile's allowed drop when it sets task_check."""
    from edge.check import tasks
    from edge.sources import open_source

    chat = tasks.session(artifact)
    max_drop = profile.task_check.max_drop if profile.task_check else None
    with report.use(report.Reporter(quiet=args.json)) as reporter:
        with reporter.hushed_libraries():
            reference = open_source(args.reference or artifact.manifest["source"]["spec"]).reference_model()
            try:
                result = tasks.check(chat, reference, full=args.full, max_drop=max_drop)
            except tasks.TaskCheckError as e:
                if hasattr(e, "result"):
                    _print_tasks(e.result, args.json)
                raise
    _print_tasks(result, args.json)
    return 0


def _print_tasks(result: dict, as_json: bool) -> None:
    from edge.check.tasks import format_rates

    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else "\n".join(format_rates(result)))


def _print_fidelity(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for lang, m in result["languages"].items():
        print(
            f"{lang:<10} top-1 {m['top1_agreement']:.3f}  KL {m['mean_kl']:.4f}  "
            f"ppl {m['ppl_artifact']:.2f} (ref {m['ppl_reference']:.2f})"
        )
    print(_fidelity_line(result))


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
        print(
            f"{name:<14} {p.execution_provider:<5} threads {p.intra_op_num_threads or 'all':<4} "
            f"accuracy_level {p.accuracy_level}  memory {p.memory_budget_mb} MB  {p.description.strip()}"
        )
    return 0


def package(args) -> int:
    """`qwen-edge package ARTIFACT --target T`: write the platform bundle and print a one-line summary."""
    import time

    from edge.artifact.package import package as run_package

    key = _signing_key(args)
    start = time.perf_counter()
    result = run_package(
        args.artifact, args.target, args.out, license_file=args.license, license_id=args.license_id, sign_key=key
    )
    seconds = time.perf_counter() - start
    report.current().line(
        f"wrote {result.path}: {result.target} bundle, {result.files} files, "
        f"{result.bytes / 1e6:.1f} MB, licence {result.license_id}, in {seconds:.1f} s"
        + (f", signed with key {result.key_id}" if result.key_id else "")
    )
    return 0
