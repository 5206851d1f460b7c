"""Qualcomm NPU (QNN HTP) artifacts from the QDQ static graphs of ``edge.quantize.qdq``.

- ``capture_feeds``: the inputs of every prefill and decode run of the fp32 static graphs over the
  calibration prompts (what ``edge.quantize.qdq`` calibrates on).
- ``compile_context``: ahead-of-time compilation into EPContext models. Both graphs go into one QNN
  context binary that holds the weights once (``ep.share_ep_contexts``), written beside the two
  small ``.onnx`` files (embed mode 0). ``check_fallback`` first names any operator the NPU would not run.
- ``verify``: the compiled artifact on the HTP (emulated on a host) against the QDQ model on the CPU,
  same inputs, logits compared (``require_agreement`` fails the build on disagreement).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from edge import report
from edge.check import fidelity
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError

# The session config entries that make two sessions of one process share a QNN context.
SHARE = {"ep.share_ep_contexts": "1"}


class QnnError(QwenEdgeError):
    """A graph the QNN HTP cannot take, or a compiled artifact that disagrees with its QDQ model."""


def _graph_paths(directory: Path | str) -> dict[str, Path]:
    """{graph name: path} of the static graphs in `directory`, in the order they run."""
    return {g: Path(directory) / contract.STATIC_GRAPH_FILES[g] for g in contract.STATIC_GRAPHS}


def _profile(provider_options: Mapping | None) -> dict:
    return {
        "execution_provider": "qnn",
        "provider_options": dict(provider_options or {}),
        "graph_optimization_level": "all",
    }


def check_fallback(model_path: Path | str, provider_options: Mapping | None = None) -> None:
    """Raise QnnError naming the op types QNN would leave to the CPU (graph-boundary Q/DQ aside)."""
    from qwen_edge.errors import ArtifactError
    from qwen_edge.session import create_session

    model_path = Path(model_path)
    config = {"session.record_ep_graph_assignment_info": "1", "session.disable_cpu_ep_fallback": "0"}
    try:
        session = create_session(model_path, _profile(provider_options), config)
    except ArtifactError as e:
        raise QnnError(f"QNN cannot compile {model_path.name}: {e}") from None
    fallen: dict[str, int] = {}
    for sub in session.get_provider_graph_assignment_info():
        for node in sub.get_nodes():
            # Graph inputs are quantized and outputs dequantized on the host by design.
            if sub.ep_name != "QNNExecutionProvider" and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                fallen[node.op_type] = fallen.get(node.op_type, 0) + 1
    if fallen:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(fallen.items()))
        raise QnnError(
            f"{model_path.name}: these operators would not run on the QNN HTP: {ops}; "
            "the graph must use only QDQ-wrapped operators the HTP supports"
        )


def compile_context(
    qdq_dir: Path | str, out_dir: Path | str, provider_options: Mapping | None = None, share: bool = True
) -> dict:
    """Compile the prefill and decode graphs of `qdq_dir` into EPContext models in `out_dir`.

    With `share`, both graphs go into one QNN context binary holding the weights once
    (``enable_htp_weight_sharing``, ``ep.share_ep_contexts``, the last session with
    ``ep.stop_share_ep_contexts``); without it each graph gets its own binary (what the host HTP
    emulator can load: it refuses shared contexts). Binaries sit beside the .onnx files (embed mode 0).
    Returns the files with their sizes and the seconds taken.
    """
    from qwen_edge.session import create_session

    qdq_dir, out_dir = Path(qdq_dir), Path(out_dir)
    options = {"enable_htp_weight_sharing": "1" if share else "0", **dict(provider_options or {})}
    reporter = report.current()
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qnn-", dir=out_dir) as tmp:
        sessions = []
        graphs = _graph_paths(qdq_dir)
        for k, (g, path) in enumerate(graphs.items()):
            check_fallback(path, options)
            reporter.status(f"compiling {g} for the QNN HTP")
            config = {
                **(SHARE if share else {}),
                "ep.context_enable": "1",
                "ep.context_embed_mode": "0",
                "ep.context_file_path": str(Path(tmp) / path.name),
            }
            if share and k == len(graphs) - 1:
                config["ep.stop_share_ep_contexts"] = "1"
            sessions.append(create_session(path, _profile(options), config))
        sessions.clear()
        files = {}
        for f in sorted(Path(tmp).iterdir()):
            shutil.move(str(f), out_dir / f.name)
            files[f.name] = (out_dir / f.name).stat().st_size
    binaries = {ref for path in _graph_paths(out_dir).values() for ref in context_binaries(path)}
    missing = binaries - set(files)
    if missing:
        raise QnnError(f"the compiled models refer to {', '.join(sorted(missing))}, which QNN did not write")
    return {"files": files, "binaries": sorted(binaries), "seconds": round(time.perf_counter() - start, 1)}


def context_binaries(ctx_model: Path | str) -> list[str]:
    """The context binary files an EPContext model refers to (main contexts, embed mode 0)."""
    refs = []
    for node in onnx.load(ctx_model, load_external_data=False).graph.node:
        if node.op_type != "EPContext":
            raise QnnError(f"{Path(ctx_model).name} has a {node.op_type} node outside the QNN context; rebuild it")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("embed_mode") == 0 and attrs.get("main_context") == 1:
            refs.append(attrs["ep_cache_context"].decode())
    return refs


def open_compiled(ctx_dir: Path | str, provider_options: Mapping | None = None) -> dict:
    """Sessions on the QNN HTP for the compiled prefill and decode graphs (sharing their context)."""
    from qwen_edge.session import create_session

    return {g: create_session(path, _profile(provider_options), SHARE) for g, path in _graph_paths(ctx_dir).items()}


def compare_logits(reference: np.ndarray, other: np.ndarray) -> dict:
    """Top-1 agreement, max absolute difference and mean KL(reference || other) over the positions of two
    logits arrays ``[..., vocab]`` (agreement and KL as the fidelity check computes them)."""
    a = np.asarray(reference).reshape(-1, reference.shape[-1])
    b = np.asarray(other).reshape(-1, other.shape[-1])
    # fidelity.compare scores next-token perplexity too, on token ids these logits do not have; those go unused.
    m = fidelity.compare(a, b, [0] * a.shape[0])
    return {
        "positions": int(a.shape[0]),
        "top1_agreement": m["top1_agreement"],
        "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max()),
        "mean_kl": m["mean_kl"],
    }


def verify(
    ctx_dir: Path | str,
    qdq_dir: Path | str,
    feeds: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    provider_options: Mapping | None = None,
) -> dict:
    """Run the same captured inputs through the compiled graphs of `ctx_dir` on the QNN HTP and through
    the QDQ graphs on the CPU; compare the logits per graph (``compare_logits``) and time the HTP runs.
    On a host emulator `ctx_dir` must come from ``compile_context(share=False)``."""
    import onnxruntime as ort

    reporter = report.current()
    htp = open_compiled(ctx_dir, provider_options)
    result = {}
    for g in contract.STATIC_GRAPHS:
        if not feeds.get(g):
            continue
        cpu = ort.InferenceSession(str(_graph_paths(qdq_dir)[g]), providers=["CPUExecutionProvider"])
        ref, got, seconds = [], [], 0.0
        for f in feeds[g]:
            ref.append(cpu.run([contract.LOGITS], dict(f))[0])
            reporter.status(f"running {g} on the QNN HTP")
            t = time.perf_counter()
            got.append(htp[g].run([contract.LOGITS], dict(f))[0])
            seconds += time.perf_counter() - t
        result[g] = {
            **compare_logits(np.concatenate(ref, 1), np.concatenate(got, 1)),
            "runs": len(feeds[g]),
            "htp_seconds_per_run": round(seconds / len(feeds[g]), 2),
        }
    return result


NPU_MIN_TOP1 = 0.9  # the compiled graphs must pick the CPU-QDQ run's next token this often


def require_agreement(result: Mapping[str, Mapping], minimum: float = NPU_MIN_TOP1) -> None:
    """Raise QnnError when a graph of `result` (from ``verify``) picks the CPU's next token less often
    than `minimum`."""
    for graph, r in result.items():
        if r["top1_agreement"] < minimum:
            raise QnnError(
                f"the {graph} graph on the NPU agrees with its CPU run on only "
                f"{r['top1_agreement']:.2f} of next tokens; report this with the build log"
            )


def capture_feeds(artifact, prompts: Iterable[Sequence[int]], new_tokens: int = 4) -> dict[str, list[dict]]:
    """The inputs of every prefill and decode run (KV cache included) while the static graphs of
    `artifact` (fp32, CPU) read each prompt and greedily continue it by `new_tokens` tokens."""
    from qwen_edge.generator import Generator
    from qwen_edge.runner import StaticRunner
    from qwen_edge.sampling import SamplingParams

    feeds: dict[str, list[dict]] = {g: [] for g in contract.STATIC_GRAPHS}
    runner = StaticRunner(artifact, on_feeds=lambda name, f: feeds[name].append(f))
    generator = Generator(artifact, runner=runner)
    for ids in prompts:
        generator.generate(list(ids), SamplingParams(), new_tokens, stop_token_ids=()).read()
    return feeds
