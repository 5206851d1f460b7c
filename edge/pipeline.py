"""Recipe → artifact: open the source, emit and quantize the graph, check fidelity, write the manifest.

This module only orchestrates: each step is a call into the module that does it (``edge.sources``,
``edge.graph``, ``edge.quantize``, ``edge.npu``, ``edge.backends``, ``edge.check``, ``edge.artifact``).
Everything it and they print goes through the current ``edge.report`` Reporter.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edge import report
from edge.artifact.genai_config import write_genai_config
from edge.artifact.licenses import write_license
from edge.artifact.manifest import model_block, profile_block, write_manifest
from edge.check import preflight
from edge.graph.decoder import GraphOptions, export
from edge.graph.plan import source_grid_summary, weight_plan
from edge.recipe import Profile, Recipe, recipe_profile
from edge.sources import open_source
from edge.sources.adapter import MergedSource, check_tables, load_adapter, read_adapter_config, write_switchable
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError
from qwen_edge.memory import peak_rss_mb

STATIC_WORK = ".static-work"  # fp32 and QDQ graphs while an NPU artifact is built; removed at the end


@dataclass
class BuildResult:
    """Where the artifact went and what the build measured."""

    out_dir: Path
    manifest: dict


def build(recipe: Recipe, *, model: str | None = None, out: Path | None = None, evaluate: bool = True) -> BuildResult:
    """Build the artifact a recipe describes; the directory appears only when everything succeeded.

    Status lines, progress bars and warnings go to the current Reporter: make one current with
    ``edge.report.use(Reporter(quiet=..., stream=...))`` to build quietly or log elsewhere.
    """
    with report.current().hushed_libraries():
        return _build(recipe, model, out, evaluate)


def _build(recipe: Recipe, model: str | None, out: Path | None, evaluate: bool) -> BuildResult:
    reporter = report.current()
    profile: Profile = recipe_profile(recipe)
    out_dir = Path(out or Path("artifacts") / recipe.name).resolve()
    start = time.perf_counter()
    preflight.check_tools(recipe, profile)
    _check_adapter_options(recipe, profile)
    _check_openvino_eval(profile, evaluate and recipe.fidelity.enabled)
    spec = model or recipe.resolve_source()
    reporter.status(f"opening {spec}")
    source = open_source(spec)
    recipe.check_context_length(source.config.max_position_embeddings)
    preflight.check_resources(recipe, profile, source.config, out_dir)
    sizer = _check_size_budget(recipe, source)
    adapters = _load_adapters(recipe, source)
    switchable = adapters if recipe.adapter and recipe.adapter.mode == "switchable" else []
    if adapters and not switchable:
        source = MergedSource(source, adapters[0])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        reporter.line(
            f"building {recipe.name}: {source.config.family} {source.config.num_layers} layers, "
            f"{recipe.precision.weights} ({recipe.precision.method}) from {spec}"
        )
        static = scored = grid = allocation = None
        backend_info = graph_facts = None
        if profile.graph == "static":  # the profile asks for an NPU artifact
            static = _export_static(recipe, profile, source, staging)
            scored = static.pop("scored")
            graph_facts = {"kv_cache": contract.STATIC, contract.STATIC_BLOCK: static}
        elif recipe.backend == "native":
            allocation = _allocate(recipe, source, sizer) if sizer is not None else None
            grid = _export_native(recipe, profile, source, staging, switchable, allocation)
        else:
            backend_info = _export_with_backend(recipe, profile, source, staging)
            graph_facts = backend_info.pop("graph", None)
            source.write_tokenizer(staging)
        write_genai_config(staging, source.config, recipe.context_length, profile, graph=graph_facts)
        license = write_license(source.license_facts(), source.spec, staging)
        export_seconds = time.perf_counter() - start
        export_peak = peak_rss_mb()
        fidelity = None
        if evaluate and recipe.fidelity.enabled:
            fidelity = _check_fidelity(scored or staging, source, recipe, profile, static, switchable)
        if static:
            shutil.rmtree(staging / STATIC_WORK, ignore_errors=True)
        stats = {
            "seconds": round(time.perf_counter() - start, 1),
            "export_seconds": round(export_seconds, 1),
            "export_peak_rss_mb": round(export_peak),
            "peak_rss_mb": round(peak_rss_mb()),
        }
        manifest = write_manifest(
            staging,
            recipe=recipe,
            profile=profile,
            source_fingerprint=source.fingerprint(),
            config=source.config,
            precision=recipe.precision,
            fidelity=fidelity,
            build_stats=stats,
            license=license,
            backend=backend_info,
            static=static,
            adapters={a.name: {"file": contract.adapter_file(a.name), **a.summary()} for a in switchable} or None,
            source_grid=grid,
            allocation=_allocation_block(allocation, fidelity),
        )
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildResult(out_dir, manifest)


def _check_openvino_eval(profile: Profile, evaluate: bool) -> None:
    """An OpenVINO build's fidelity check needs onnxruntime-openvino, whose venv cannot run the QDQ step:
    say so before any export."""
    import onnxruntime

    missing = profile.ort_provider not in onnxruntime.get_available_providers()
    if evaluate and profile.execution_provider == "openvino" and missing:
        raise QwenEdgeError(
            f"profile {profile.name!r} is scored on OpenVINO, which this onnxruntime lacks: build with --no-eval "
            "here, then run `qwen-edge eval ARTIFACT` in the OpenVINO venv (bash scripts/setup.sh openvino)"
        )


def _check_adapter_options(recipe: Recipe, profile: Profile) -> None:
    """The recipe's adapter directories hold LoRA adapters qwen-edge can build (their configs only: cheap)."""
    if recipe.adapter is None:
        return
    if recipe.adapter.mode == "switchable" and (recipe.backend != "native" or profile.graph == "static"):
        raise QwenEdgeError(
            f"recipe {recipe.name!r}: switchable adapters are inputs of qwen-edge's CPU graph; use backend native "
            "with a CPU profile, or adapter mode merged"
        )
    for path in recipe.adapter.paths.values():
        read_adapter_config(path)


def _load_adapters(recipe: Recipe, source) -> list:
    """The recipe's adapters, read and checked against the source model (shapes, embedding/lm_head use)."""
    if recipe.adapter is None:
        return []
    switchable = recipe.adapter.mode == "switchable"
    adapters = [load_adapter(path, source.config, name) for name, path in recipe.adapter.paths.items()]
    for adapter in adapters:
        check_tables(adapter, source.config, switchable=switchable)
    return adapters


def _check_size_budget(recipe: Recipe, source):
    """The allocator's sizer when the recipe sets ``max_size_mb`` (None otherwise), after checking the budget
    is reachable: graph shapes only, before any weight is read."""
    if recipe.precision.max_size_mb is None:
        return None
    from edge.quantize import allocator

    sizer = allocator.Sizer(source, recipe.precision, recipe.context_length)
    allocator.check_budget(sizer, *_budgets(recipe))
    return sizer


def _budgets(recipe: Recipe) -> tuple[int, int | None]:
    """The allocator's budgets in bytes: the artifact's size and (if set) what a decode step reads."""
    read = recipe.precision.max_read_mb
    return int(recipe.precision.max_size_mb * 1e6), None if read is None else int(read * 1e6)


def _allocate(recipe: Recipe, source, sizer):
    """Each tensor's storage under the recipe's size budget, from the source's measured sensitivity."""
    from edge.check import sensitivity
    from edge.quantize import allocator

    reporter = report.current()
    reporter.status("measuring per-tensor sensitivity on the calibration text")
    measured = sensitivity.measure(source, recipe.precision.symmetric)
    allocation = allocator.allocate(sizer, measured["kl"], *_budgets(recipe))
    read_budget = recipe.precision.max_read_mb
    reporter.line(
        f"allocation: {allocation.predicted_bytes / 1e6:.1f} MB predicted "
        f"(budget {recipe.precision.max_size_mb:g} MB), "
        f"{allocation.predicted_read_bytes / 1e6:.1f} MB read per token"
        + ("" if read_budget is None else f" (budget {read_budget:g} MB)")
        + f", predicted mean KL {allocation.predicted_kl:.4f}"
    )
    return allocation


def _allocation_block(allocation, fidelity: dict | None) -> dict | None:
    """The manifest's ``allocation``: the plan and its predicted loss, beside the fidelity check's measured one."""
    if allocation is None:
        return None
    measured = (fidelity or {}).get("overall", {}).get("mean_kl")
    return {**allocation.manifest_block(), "measured_mean_kl": measured}


def _export_native(
    recipe: Recipe, profile: Profile, source, staging: Path, switchable=(), allocation=None
) -> dict | None:
    """qwen-edge's own exporter: GPTQ calibration when the recipe asks for it, then the graph (with LoRA
    inputs and one file per adapter when `switchable` adapters are given). Returns the manifest's
    ``source_grid`` account for precision method ``gguf``, else None. An `allocation` (edge.quantize.allocator)
    supplies the plan when the recipe sets a size budget."""
    from edge.quantize import head_rows
    from edge.sources.gguf import GGUFSource

    types = source.tensor_types() if isinstance(source, GGUFSource) else None
    plan = allocation.plan if allocation is not None else weight_plan(recipe.precision, source.config, types)
    plan = head_rows.with_int8_ids(source, plan)
    options = GraphOptions(
        context_length=recipe.context_length,
        accuracy_level=profile.accuracy_level,
        lora=frozenset().union(*(a.slots for a in switchable)),
    )
    calibrated = None
    if recipe.precision.method == "gptq":
        from edge.quantize import gptq

        tokens = recipe.precision.calibration_tokens or gptq.DEFAULT_TOKENS
        calibrated = gptq.calibrate(source, plan, staging / ".gptq", tokens=tokens, lm_head=True)
    try:
        export(source, staging, plan, options, quantized=calibrated)
    finally:
        if calibrated is not None:
            calibrated.close()
    for adapter in switchable:
        write_switchable(adapter, staging / contract.adapter_file(adapter.name))
    return source_grid_summary(plan, source.config, types) if recipe.precision.method == "gguf" else None


def _export_static(recipe: Recipe, profile: Profile, source, staging: Path) -> dict:
    """NPU artifact: static fp32 graphs → calibration feeds → QDQ → compiled context binaries → the
    compiled graphs checked on the NPU backend against the QDQ graphs on the CPU. For OpenVINO the QDQ
    graphs are the artifact (its provider compiles them for the device when a session loads them).

    Returns the manifest's ``static`` block (with ``npu_check``: NPU vs CPU agreement), plus ``scored``
    (the directory of compiled graphs the host's NPU backend can load, for the fidelity check against
    fp32: the artifact's own, or its unshared twin when it shares weights), which the caller pops.
    """
    from tokenizers import Tokenizer

    from edge.graph.static import export_static
    from edge.npu import qnn
    from edge.quantize import qdq
    from qwen_edge.artifact import Artifact

    work = staging / STATIC_WORK
    fp32, qdq_dir, check = work / "fp32", work / "qdq", work / "unshared"
    bits = {"int4": 4, "int8": 8}
    options = qdq.QdqOptions(
        profile.activation_bits, bits[recipe.precision.weights], bits[recipe.precision.lm_head_bits]
    )
    info = export_static(source, fp32, chunk=profile.chunk, context_length=recipe.context_length)
    source.write_tokenizer(fp32)
    source.write_tokenizer(staging)
    manifest = {"model": model_block(source.config, recipe.context_length), "profile": {}, contract.STATIC_BLOCK: info}
    report.current().status("capturing calibration inputs of the fp32 graphs")
    tokenizer = Tokenizer.from_file(str(fp32 / contract.TOKENIZER_FILE))
    feeds = qnn.capture_feeds(Artifact(fp32, manifest), qdq.calibration_prompts(tokenizer, 2 * profile.chunk))
    quantized = qdq.quantize(fp32, qdq_dir, feeds, options)
    shutil.rmtree(fp32)
    if profile.execution_provider == "openvino":  # OpenVINO compiles the QDQ graphs when it loads them
        files = {}
        for f in sorted(qdq_dir.iterdir()):
            shutil.move(str(f), staging / f.name)
            files[f.name] = (staging / f.name).stat().st_size
        return {
            **info,
            "files": files,
            "activation_bits": options.activation_bits,
            "weight_bits": options.weight_bits,
            "lm_head_bits": options.lm_head_bits,
            "quantize_seconds": quantized["seconds"],
            "scored": staging,
        }
    compiled = qnn.compile_context(qdq_dir, staging, profile.provider_options, share=profile.share_weights)
    # The host HTP emulator cannot load a context shared by two graphs: check an unshared compile of the same graphs.
    target = staging
    if profile.share_weights:
        qnn.compile_context(qdq_dir, check, profile.provider_options, share=False)
        target = check
    prefill, decode = contract.STATIC_GRAPHS
    sample = {prefill: feeds[prefill][:1], decode: feeds[decode][:3]}
    npu_check = qnn.verify(target, qdq_dir, sample, profile.provider_options)
    qnn.require_agreement(npu_check)
    if target != staging:
        source.write_tokenizer(target)  # the twin is scored as an artifact of its own
    return {
        **info,
        "files": compiled["files"],
        "binaries": compiled["binaries"],
        "share_weights": profile.share_weights,
        "activation_bits": options.activation_bits,
        "weight_bits": options.weight_bits,
        "lm_head_bits": options.lm_head_bits,
        "compile_seconds": compiled["seconds"],
        "quantize_seconds": quantized["seconds"],
        "scored": target,
        "npu_check": npu_check,
    }


def _export_with_backend(recipe: Recipe, profile: Profile, source, staging: Path) -> dict:
    """Hand the export to Olive or Optimum; they read a Hugging Face fp32 directory (written for GGUF
    sources, then removed). Returns the backend's account: name, versions, steps, graph facts."""
    from edge.backends import load_backend
    from edge.sources.base import write_hf_directory

    reporter = report.current()
    backend = load_backend(recipe.backend)
    model_dir = getattr(source, "path", None)  # a Hugging Face directory; a GGUF file is one file
    scratch = None
    if model_dir is None or not Path(model_dir).is_dir():
        reporter.status(f"writing an fp32 Hugging Face copy of the model for {recipe.backend}")
        scratch = write_hf_directory(source, staging.with_name(staging.name + ".hf"))
        model_dir = scratch
    try:
        reporter.status(f"exporting with {recipe.backend}")
        info = backend.export(recipe, profile, Path(model_dir), staging)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return info


def _check_fidelity(
    artifact_dir: Path, source, recipe: Recipe, profile: Profile, static: dict | None, switchable=()
) -> dict:
    """The artifact in `artifact_dir`, run by the runtime with the profile it ships with, against the
    fp32 reference (what `qwen-edge eval` repeats on the finished artifact): a merged adapter's
    reference is transformers + peft; each switchable adapter is checked against the peft reference
    with that adapter active (``adapters`` in the result)."""
    from transformers import AutoTokenizer

    from edge.check import fidelity
    from edge.sources.adapter import peft_reference
    from qwen_edge.artifact import Artifact
    from qwen_edge.generator import Generator

    report.current().status("loading the fp32 reference for the fidelity check")
    reference = source.reference_model()
    tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir))
    manifest = {"model": model_block(source.config, recipe.context_length), "profile": profile_block(profile)}
    if static is not None:
        manifest[contract.STATIC_BLOCK] = {**static, "share_weights": False}  # scored graphs are unshared
    if switchable:
        manifest[contract.ADAPTERS_BLOCK] = {a.name: {"file": contract.adapter_file(a.name)} for a in switchable}
    artifact = Artifact(artifact_dir, manifest)
    logits = fidelity.scorer(artifact)
    result = fidelity.check(logits, reference, tokenizer, profile, max_tokens=recipe.fidelity.max_tokens)
    if profile.task_check is not None:
        from edge.check import tasks

        report.current().status("task check against the fp32 reference")
        options = profile.task_check
        checked = tasks.check(tasks.session(artifact), reference, options.full, options.max_drop)
        # replies stay out of the manifest
        result["tasks"] = {k: checked[k] for k in ("form", "suites", "overall", "change")}
    if switchable:
        generator = Generator(artifact)
        reference = peft_reference(reference, switchable)
        result["adapters"] = {}
        for adapter in switchable:
            report.current().status(f"fidelity check of adapter {adapter.name}")
            reference.set_adapter(adapter.name)
            generator.set_adapter(adapter.name)
            result["adapters"][adapter.name] = fidelity.check(
                generator.logits, reference, tokenizer, profile, max_tokens=recipe.fidelity.max_tokens
            )
    del reference
    return result


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if not (out_dir / contract.MANIFEST).exists() and any(out_dir.iterdir()):
            raise QwenEdgeError(f"{out_dir} exists and is not a qwen-edge artifact; choose another --out")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
