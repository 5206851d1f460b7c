"""Recipe → artifact: open the source, emit and quantize the graph, check fidelity, write the manifest."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
from tqdm import tqdm

from edge.config import QwenConfig
from edge.graph import DecoderGraph, GraphOptions, WeightPlan
from edge.quantize import QuantSpec
from edge.recipe import INT8_LAYER_METHODS, Precision, Profile, Recipe, RecipeError, recipe_profile
from qwen_edge.errors import QwenEdgeError

ALIGNMENT = 4096  # external data aligned for memory mapping


@dataclass
class BuildResult:
    """Where the artifact went and what the build measured."""

    out_dir: Path
    manifest: dict


LINEAR_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def weight_plan(precision: Precision, config: QwenConfig) -> WeightPlan:
    """Translate a recipe's precision block into per-weight storage for the graph."""

    def storage(bits: str, table: bool = False, symmetric: bool = precision.symmetric) -> QuantSpec | str:
        if bits in ("fp32", "fp16"):
            return bits
        n = 4 if bits == "int4" else 8
        # gptq stores the rtn layout; edge.gptq supplies the calibrated values.
        method = "rtn" if precision.method in INT8_LAYER_METHODS else precision.method
        # onnxruntime's HQQ quantizer is 4-bit and for matrices; tables and 8-bit use rtn.
        if method == "hqq" and (table or n == 8):
            method = "rtn"
        return QuantSpec(n, precision.block_size, symmetric and method == "rtn", method)

    if precision.lm_head_int8_rows >= config.vocab_size:
        raise RecipeError(f"precision lm_head_int8_rows {precision.lm_head_int8_rows} covers the whole "
                          f"{config.vocab_size}-token vocabulary; use lm_head: int8 instead")
    overrides = ()
    if precision.method in INT8_LAYER_METHODS:
        names = [f"model.layers.{i}.{part}.weight" for i in range(config.num_layers) for part in LINEAR_PARTS]
        # int8 is near-lossless symmetric; zero points would only add bytes.
        overrides = tuple((n, storage("int8", symmetric=True)) for n in names if precision.bits_for(n) == "int8")
    return WeightPlan(
        linear=storage(precision.weights),
        embedding=storage(precision.embedding_bits, table=True),
        lm_head=storage(precision.lm_head_bits),
        overrides=overrides,
        lm_head_int8_rows=precision.lm_head_int8_rows,
    )


def status(message: str, progress: bool, log=None) -> None:
    """One progress line on stderr (`qwen-edge: message...`) when `progress` is on."""
    if progress:
        print(f"qwen-edge: {message}...", file=log or sys.stderr, flush=True)


def export(source, out_dir: Path, plan: WeightPlan, options: GraphOptions, progress: bool = True,
           quantized=None) -> None:
    """Write model.onnx + model.onnx.data and the tokenizer files of `source` into `out_dir`.

    `quantized(key)` may supply precomputed blobs for packed linears (see DecoderGraph).
    """
    graph = DecoderGraph(source.config, source.tensor, plan, options, quantized=quantized).build()
    bar = tqdm(total=len(graph.graph.initializers), desc="export+quantize", unit="tensor", disable=not progress)
    try:
        ir.save(graph, out_dir / "model.onnx", external_data="model.onnx.data",
                callback=lambda tensor, info: bar.update(1), alignment=ALIGNMENT)
    finally:
        bar.close()
    status("writing the tokenizer", progress)
    source.write_tokenizer(out_dir)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(recipe: Recipe, *, model: str | None = None, out: Path | None = None, evaluate: bool = True,
          progress: bool = True, log=None) -> BuildResult:
    """Build the artifact a recipe describes; the directory appears only when everything succeeded."""
    log = log or sys.stderr
    from edge.manifest import write_genai_config, write_manifest
    from edge.sources import open_source

    profile: Profile = recipe_profile(recipe)
    out_dir = Path(out or Path("artifacts") / recipe.name).resolve()
    start = time.perf_counter()
    spec = model or recipe.resolve_source(progress=progress)
    status(f"opening {spec}", progress, log)
    source = open_source(spec, progress=progress)
    recipe.check_context_length(source.config.max_position_embeddings)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        print(f"building {recipe.name}: {source.config.family} {source.config.num_layers} layers, "
              f"{recipe.precision.weights} ({recipe.precision.method}) from {spec}", file=log)
        static = scorer = None
        backend_info = graph_facts = None
        if profile.graph == "static":
            static = _export_static(recipe, profile, source, staging, progress, log)
            scorer = static.pop("scorer")
            graph_facts = {"kv_cache": "static", "static": static}
        elif recipe.backend == "native":
            _export_native(recipe, profile, source, staging, progress)
        else:
            backend_info = _export_with_backend(recipe, profile, source, staging, progress, log)
            graph_facts = backend_info.pop("graph", None)
            source.write_tokenizer(staging)
        write_genai_config(staging, source.config, recipe.context_length, profile, graph=graph_facts)
        license = _write_license(source, staging, log)
        export_seconds = time.perf_counter() - start
        export_peak = peak_rss_mb()
        fidelity = None
        if evaluate and recipe.fidelity.enabled:
            fidelity = _check_fidelity(staging, source, recipe, profile, progress, scorer)
        if static:
            shutil.rmtree(staging / STATIC_WORK, ignore_errors=True)
        stats = {"seconds": round(time.perf_counter() - start, 1), "export_seconds": round(export_seconds, 1),
                 "export_peak_rss_mb": round(export_peak), "peak_rss_mb": round(peak_rss_mb())}
        manifest = write_manifest(staging, recipe=recipe, profile=profile, source_fingerprint=source.fingerprint(),
                                  config=source.config, precision=recipe.precision, fidelity=fidelity,
                                  build_stats=stats, license=license, backend=backend_info, static=static)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildResult(out_dir, manifest)


def _export_native(recipe: Recipe, profile: Profile, source, staging: Path, progress: bool) -> None:
    """qwen-edge's own exporter: GPTQ calibration when the recipe asks for it, then the graph."""
    plan = weight_plan(recipe.precision, source.config)
    options = GraphOptions(context_length=recipe.context_length, accuracy_level=profile.accuracy_level)
    calibrated = None
    if recipe.precision.method == "gptq":
        from edge import gptq

        tokens = recipe.precision.calibration_tokens or gptq.DEFAULT_TOKENS
        calibrated = gptq.calibrate(source, plan, staging / ".gptq", tokens=tokens, lm_head=True, progress=progress)
    try:
        export(source, staging, plan, options, progress, quantized=calibrated)
    finally:
        if calibrated is not None:
            calibrated.close()


STATIC_WORK = ".static-work"  # fp32 and QDQ graphs while an NPU artifact is built; removed at the end


def _export_static(recipe: Recipe, profile: Profile, source, staging: Path, progress: bool, log) -> dict:
    """NPU artifact: static fp32 graphs → calibration feeds → QDQ → compiled context binaries → the
    compiled graphs checked on the NPU backend against the QDQ graphs on the CPU.

    Returns the manifest's ``static`` block (with ``npu_check``: NPU vs CPU agreement), plus ``scorer``
    (the QDQ graphs on the CPU, for the fidelity check against fp32), which the caller pops.
    """
    from tokenizers import Tokenizer

    from edge import qnn, static_graph
    from edge.manifest import model_block
    from qwen_edge.artifact import Artifact
    from qwen_edge.static_generator import StaticGenerator

    work = staging / STATIC_WORK
    fp32, qdq, check = work / "fp32", work / "qdq", work / "unshared"
    bits = {"int4": 4, "int8": 8}
    options = qnn.QdqOptions(profile.activation_bits, bits[recipe.precision.weights], bits[recipe.precision.lm_head_bits])
    info = static_graph.export_static(source, fp32, chunk=profile.chunk, context_length=recipe.context_length,
                                      progress=progress)
    source.write_tokenizer(fp32)
    source.write_tokenizer(staging)
    manifest = {"model": model_block(source.config, recipe.context_length), "profile": {}, "static": info}
    status("capturing calibration inputs of the fp32 graphs", progress, log)
    tokenizer = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
    feeds = qnn.capture_feeds(Artifact(fp32, manifest), qnn.calibration_prompts(tokenizer, 2 * profile.chunk))
    quantized = qnn.quantize(fp32, qdq, feeds, options, progress)
    shutil.rmtree(fp32)
    compiled = qnn.compile_context(qdq, staging, profile.provider_options, share=profile.share_weights,
                                   progress=progress)
    # The host HTP emulator cannot load a context shared by two graphs: check an unshared compile of the same graphs.
    target = staging
    if profile.share_weights:
        qnn.compile_context(qdq, check, profile.provider_options, share=False, progress=progress)
        target = check
    sample = {"prefill": feeds["prefill"][:1], "decode": feeds["decode"][:3]}
    npu_check = qnn.verify(target, qdq, sample, profile.provider_options, progress)
    for graph, result in npu_check.items():
        if result["top1_agreement"] < NPU_MIN_TOP1:
            raise qnn.QnnError(f"the {graph} graph on the NPU agrees with its CPU run on only "
                               f"{result['top1_agreement']:.2f} of next tokens; report this with the build log")
    source.write_tokenizer(qdq)  # the scorer runs the QDQ graphs as an artifact of their own
    scorer = StaticGenerator(Artifact(qdq, manifest),
                             session_factory=lambda path, _: _cpu_session(path)).logits
    return {**info, "files": compiled["files"], "binaries": compiled["binaries"],
            "share_weights": profile.share_weights, "activation_bits": options.activation_bits,
            "weight_bits": options.weight_bits, "lm_head_bits": options.lm_head_bits,
            "compile_seconds": compiled["seconds"], "quantize_seconds": quantized["seconds"],
            "scorer": scorer, "npu_check": npu_check}


NPU_MIN_TOP1 = 0.9  # the compiled graphs must pick the CPU-QDQ run's next token this often


def _cpu_session(path):
    from qwen_edge.session import create_session

    return create_session(path, {"execution_provider": "cpu"})


def _export_with_backend(recipe: Recipe, profile: Profile, source, staging: Path, progress: bool, log) -> dict:
    """Hand the export to Olive or Optimum; they read a Hugging Face fp32 directory (written for GGUF
    sources, then removed). Returns the backend's account: name, versions, steps, graph facts."""
    from edge.backends import load_backend
    from edge.sources import write_hf_directory

    backend = load_backend(recipe.backend)
    model_dir = getattr(source, "path", None)
    scratch = None
    if model_dir is None:
        status(f"writing an fp32 Hugging Face copy of the model for {recipe.backend}", progress, log)
        scratch = write_hf_directory(source, staging.with_name(staging.name + ".hf"), progress)
        model_dir = scratch
    try:
        status(f"exporting with {recipe.backend}", progress, log)
        info = backend.export(recipe, profile, Path(model_dir), staging, progress)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return info


def _check_fidelity(artifact_dir: Path, source, recipe: Recipe, profile: Profile, progress: bool,
                    logits=None) -> dict:
    from transformers import AutoTokenizer

    from edge import fidelity

    status("loading the fp32 reference for the fidelity check", progress)
    reference = source.reference_model()
    tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir))
    result = fidelity.evaluate(artifact_dir, reference, tokenizer, progress=progress,
                               max_tokens=recipe.fidelity.max_tokens, logits=logits)
    result["greedy"] = fidelity.greedy_match(artifact_dir, reference, tokenizer, progress=progress, logits=logits)
    del reference
    fidelity.check_threshold(result, profile)
    return result


def _write_license(source, out_dir: Path, log) -> dict | None:
    """Copy the model's licence text into the artifact and return its manifest entry; a licence whose
    text is not at hand is recorded by id alone, with a warning (`qwen-edge package` asks for it)."""
    from edge.licenses import LICENSE_FILE, choose, identify

    facts = source.license_facts()
    try:
        license_id, text = choose(facts, None, None, source.spec)
    except QwenEdgeError as e:
        print(f"qwen-edge: warning: {e}", file=log)
        license_id = identify(facts)
        return {"id": license_id, "file": None} if license_id else None
    (out_dir / LICENSE_FILE).write_bytes(text)
    return {"id": license_id, "file": LICENSE_FILE}


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if not (out_dir / "manifest.json").exists() and any(out_dir.iterdir()):
            raise QwenEdgeError(f"{out_dir} exists and is not a qwen-edge artifact; choose another --out")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
