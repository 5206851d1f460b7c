"""Qualcomm NPU (QNN HTP) artifacts from the static prefill/decode graphs of ``edge.static_graph``.

Three steps, each a function:

1. ``quantize``: QDQ quantization with onnxruntime.quantization for the HTP: 16-bit activations,
   8-bit (or 4-bit) symmetric per-channel weights for every MatMul, 16-bit for the small tensors
   (norm weights, biases, rotary tables) where 8 bits would cost accuracy for no size. Each graph is
   calibrated on its own captured inputs, but the KV tensors that flow between the graphs
   (``present_*`` of one run become ``past_*`` of the next, in either graph) get one range computed
   over both, so a cached value is re-quantized without loss.
2. ``compile_context``: ahead-of-time compilation into EPContext models. Both graphs go into one QNN
   context binary that holds the weights once (``ep.share_ep_contexts``), written beside the two
   small ``.onnx`` files (embed mode 0). ``check_fallback`` first names any operator the NPU would not run.
3. ``verify``: the compiled artifact on the HTP (emulated on a host) against the QDQ model on the CPU,
   same inputs, logits compared.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from edge.build import status
from qwen_edge.errors import QwenEdgeError

GRAPHS = ("prefill", "decode")
# The session config entries that make two sessions of one process share a QNN context.
SHARE = {"ep.share_ep_contexts": "1"}


class QnnError(QwenEdgeError):
    """A graph the QNN HTP cannot take, or a compiled artifact that disagrees with its QDQ model."""


@dataclass(frozen=True)
class QdqOptions:
    """Quantization of the static graphs: activation and weight bits (lm_head may differ)."""

    activation_bits: int = 16
    weight_bits: int = 8
    lm_head_bits: int = 8

    def __post_init__(self):
        if self.activation_bits not in (8, 16):
            raise QnnError(f"activation_bits must be 8 or 16 for the QNN HTP, not {self.activation_bits}")
        for name in ("weight_bits", "lm_head_bits"):
            if getattr(self, name) not in (4, 8):
                raise QnnError(f"{name} must be 4 or 8 for the QNN HTP, not {getattr(self, name)}")


def _qtypes():
    from onnxruntime.quantization import QuantType

    return {"a16": QuantType.QUInt16, "a8": QuantType.QUInt8, "w8": QuantType.QInt8, "w4": QuantType.QInt4}


# Operators whose quantized output reuses their input's scale and zero point (data movement only).
PASS_THROUGH = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


def kv_groups(model: onnx.ModelProto, num_layers: int) -> dict[str, list[str]]:
    """Per cache tensor (``key_{i}``/``value_{i}``), the tensors whose quantization must be the same: the
    past input, the Concat of past and present inside the graph, and the tensor the present output takes
    its scale from (through data-movement operators, which reuse their input's)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    groups = {}
    for i in range(num_layers):
        for kv in ("key", "value"):
            past, root = f"past_{kv}_{i}", f"present_{kv}_{i}"
            while root in producer and producer[root].op_type in PASS_THROUGH:
                root = producer[root].input[0]
            names = [past, root]
            names += [out for node in model.graph.node if node.op_type == "Concat" and past in node.input
                      for out in node.output]
            groups[f"{kv}_{i}"] = names
    return groups


def _num_layers(model: onnx.ModelProto) -> int:
    return sum(1 for i in model.graph.input if i.name.startswith("past_key_"))


def _weight_overrides(model: onnx.ModelProto, options: QdqOptions) -> dict[str, list[dict]]:
    """Per-channel symmetric integer weights for every MatMul; 16-bit for the other float initializers."""
    q = _qtypes()
    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    overrides: dict[str, list[dict]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            bits = options.lm_head_bits if node.input[1].startswith(("lm_head", "model.embed_tokens")) else options.weight_bits
            overrides[node.input[1]] = [{"quant_type": q[f"w{bits}"], "symmetric": True, "axis": 1}]
    act = q[f"a{options.activation_bits}"]
    for name in inits:
        if name not in overrides:
            overrides[name] = [{"quant_type": act}]
    return overrides


class _Feeds:
    """A CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self.feeds, self.i = list(feeds), 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return dict(self.feeds[self.i - 1])

    def rewind(self):
        self.i = 0

    def __len__(self):
        return len(self.feeds)


def calibrate(model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]], work_dir: Path):
    """MinMax ranges (onnxruntime TensorsData) of every float tensor of the graph over `feeds`, on the CPU."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    if not feeds:
        raise QnnError(f"no calibration inputs for {model_path.name}; capture at least one run of the graph")
    calibrator = create_calibrator(model_path, None, augmented_model_path=str(work_dir / f"{model_path.stem}.aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                                   providers=["CPUExecutionProvider"])
    calibrator.collect_data(_Feeds(feeds))
    return calibrator.compute_data()


def shared_kv_ranges(ranges: Mapping[str, object], groups: Mapping[str, Mapping[str, list[str]]]) -> dict[str, tuple]:
    """One (rmin, rmax) per tensor of each KV group: the union over every member in every graph.

    `ranges` maps graph name -> TensorsData, `groups` graph name -> ``kv_groups`` of that graph.
    """
    shared = {}
    for key in next(iter(groups.values())):
        lo, hi = np.float32(np.inf), np.float32(-np.inf)
        for graph, members in groups.items():
            for name in members[key]:
                rmin, rmax = (np.float32(np.asarray(v).reshape(-1)[0]) for v in ranges[graph].data[name].range_value)
                lo, hi = min(lo, rmin), max(hi, rmax)
        for members in groups.values():
            for name in members[key]:
                shared[name] = (np.array(lo, np.float32), np.array(hi, np.float32))
    return shared


def quantize(src_dir: Path | str, out_dir: Path | str, feeds: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
             options: QdqOptions = QdqOptions(), progress: bool = True) -> dict:
    """Write ``prefill.onnx`` and ``decode.onnx`` (QDQ, weights in ``<name>.onnx.data``) into `out_dir`.

    `src_dir` holds the fp32 static graphs; `feeds` maps each graph name to captured inputs of that
    graph (see ``capture_feeds``). Returns the KV ranges used and the seconds taken.
    """
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    start = time.perf_counter()
    q = _qtypes()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qdq-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        models = {g: onnx.load(src_dir / f"{g}.onnx", load_external_data=False) for g in GRAPHS}
        groups = {g: kv_groups(m, _num_layers(m)) for g, m in models.items()}
        ranges = {}
        for g in GRAPHS:
            status(f"calibrating {g} on {len(feeds.get(g, ()))} captured runs", progress)
            ranges[g] = calibrate(src_dir / f"{g}.onnx", feeds.get(g, ()), tmp)
        kv = shared_kv_ranges(ranges, groups)
        for g in GRAPHS:
            status(f"quantizing {g}", progress)
            overrides = _weight_overrides(models[g], options)
            for name, (lo, hi) in kv.items():
                if name in ranges[g].data:
                    overrides[name] = [{"rmin": lo, "rmax": hi}]
            cache = tmp / f"{g}.calibration.json"
            save_tensors_data(ranges[g], cache)
            config = get_qnn_qdq_config(src_dir / f"{g}.onnx", None,
                                        activation_type=q[f"a{options.activation_bits}"], weight_type=q["w8"],
                                        init_overrides=overrides)
            quantize_static(src_dir / f"{g}.onnx", tmp / f"{g}.onnx", None, quant_format=config.quant_format,
                            op_types_to_quantize=config.op_types_to_quantize, per_channel=config.per_channel,
                            activation_type=config.activation_type, weight_type=config.weight_type,
                            nodes_to_exclude=config.nodes_to_exclude, use_external_data_format=True,
                            calibrate_method=config.calibrate_method, extra_options=config.extra_options,
                            calibration_cache_path=cache)
        for g in GRAPHS:
            _move_model(tmp / f"{g}.onnx", out_dir / f"{g}.onnx")
    return {"kv_ranges": {k: [float(v[0]), float(v[1])] for k, v in kv.items() if k.startswith("past_")},
            "seconds": round(time.perf_counter() - start, 1)}


def _move_model(src: Path, dst: Path) -> None:
    """Re-save `src` with its weights in ``<dst>.data`` (one file, aligned) and remove the source files."""
    model = onnx.load(src)
    onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data",
              size_threshold=1024)
    for f in (dst, dst.with_name(dst.name + ".data")):
        f.chmod(0o644)


def unwrapped_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Compute nodes of a QDQ graph with a float input not coming from DequantizeLinear or an output not
    going only to QuantizeLinear, by op type; empty when every compute node is QDQ-wrapped."""
    ints = {i.name for i in model.graph.input if i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT}
    ints |= {t.name for t in model.graph.initializer if t.data_type != onnx.TensorProto.FLOAT}
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    bare: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ok = all(i in ints or producer.get(i) == "DequantizeLinear" for i in n.input if i)
        ok = ok and all(consumers.get(o) and set(consumers[o]) == {"QuantizeLinear"} for o in n.output)
        if not ok:
            bare.setdefault(n.op_type, []).append(n.name or n.output[0])
    return bare


def _profile(provider_options: Mapping | None) -> dict:
    return {"execution_provider": "qnn", "provider_options": dict(provider_options or {}),
            "graph_optimization_level": "all"}


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
        raise QnnError(f"{model_path.name}: these operators would not run on the QNN HTP: {ops}; "
                       "the graph must use only QDQ-wrapped operators the HTP supports")


def compile_context(qdq_dir: Path | str, out_dir: Path | str, provider_options: Mapping | None = None,
                    share: bool = True, progress: bool = True) -> dict:
    """Compile ``prefill.onnx`` and ``decode.onnx`` of `qdq_dir` into EPContext models in `out_dir`.

    With `share`, both graphs go into one QNN context binary holding the weights once
    (``enable_htp_weight_sharing``, ``ep.share_ep_contexts``, the last session with
    ``ep.stop_share_ep_contexts``); without it each graph gets its own binary (what the host HTP
    emulator can load: it refuses shared contexts). Binaries sit beside the .onnx files (embed mode 0).
    Returns the files with their sizes and the seconds taken.
    """
    from qwen_edge.session import create_session

    qdq_dir, out_dir = Path(qdq_dir), Path(out_dir)
    options = {"enable_htp_weight_sharing": "1" if share else "0", **dict(provider_options or {})}
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qnn-", dir=out_dir) as tmp:
        sessions = []
        for k, g in enumerate(GRAPHS):
            check_fallback(qdq_dir / f"{g}.onnx", options)
            status(f"compiling {g} for the QNN HTP", progress)
            config = {**(SHARE if share else {}), "ep.context_enable": "1", "ep.context_embed_mode": "0",
                      "ep.context_file_path": str(Path(tmp) / f"{g}.onnx")}
            if share and k == len(GRAPHS) - 1:
                config["ep.stop_share_ep_contexts"] = "1"
            sessions.append(create_session(qdq_dir / f"{g}.onnx", _profile(options), config))
        sessions.clear()
        files = {}
        for f in sorted(Path(tmp).iterdir()):
            shutil.move(str(f), out_dir / f.name)
            files[f.name] = (out_dir / f.name).stat().st_size
    binaries = {ref for g in GRAPHS for ref in context_binaries(out_dir / f"{g}.onnx")}
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
    """Sessions on the QNN HTP for the compiled ``prefill.onnx`` and ``decode.onnx`` (sharing their context)."""
    from qwen_edge.session import create_session

    return {g: create_session(Path(ctx_dir) / f"{g}.onnx", _profile(provider_options), SHARE) for g in GRAPHS}


def compare_logits(reference: np.ndarray, other: np.ndarray) -> dict:
    """Top-1 agreement, max absolute difference and mean KL(reference || other) over the positions of two
    logits arrays ``[..., vocab]``."""
    a = np.asarray(reference, np.float64).reshape(-1, reference.shape[-1])
    b = np.asarray(other, np.float64).reshape(-1, other.shape[-1])
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return {"positions": int(a.shape[0]), "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "max_abs_diff": float(np.abs(a - b).max()), "mean_kl": float((np.exp(la) * (la - lb)).sum(-1).mean())}


def verify(ctx_dir: Path | str, qdq_dir: Path | str, feeds: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
           provider_options: Mapping | None = None, progress: bool = True) -> dict:
    """Run the same captured inputs through the compiled graphs of `ctx_dir` on the QNN HTP and through
    the QDQ graphs on the CPU; compare the logits per graph (``compare_logits``) and time the HTP runs.
    On a host emulator `ctx_dir` must come from ``compile_context(share=False)``."""
    import onnxruntime as ort

    htp = open_compiled(ctx_dir, provider_options)
    result = {}
    for g in GRAPHS:
        if not feeds.get(g):
            continue
        cpu = ort.InferenceSession(str(Path(qdq_dir) / f"{g}.onnx"), providers=["CPUExecutionProvider"])
        ref, got, seconds = [], [], 0.0
        for f in feeds[g]:
            ref.append(cpu.run(["logits"], dict(f))[0])
            status(f"running {g} on the QNN HTP", progress)
            t = time.perf_counter()
            got.append(htp[g].run(["logits"], dict(f))[0])
            seconds += time.perf_counter() - t
        result[g] = {**compare_logits(np.concatenate(ref, 1), np.concatenate(got, 1)), "runs": len(feeds[g]),
                     "htp_seconds_per_run": round(seconds / len(feeds[g]), 2)}
    return result


def calibration_prompts(tokenizer, tokens_per_text: int) -> list[list[int]]:
    """Token ids of each shipped calibration text (edge/data/calibration), cut to `tokens_per_text`."""
    from edge.gptq import CALIBRATION_DIR

    texts = [p.read_text(encoding="utf-8") for p in sorted(CALIBRATION_DIR.glob("*.txt"))]
    return [list(getattr(ids := tokenizer.encode(t), "ids", ids))[:tokens_per_text] for t in texts]


def capture_feeds(artifact, prompts: Iterable[Sequence[int]], new_tokens: int = 4) -> dict[str, list[dict]]:
    """The inputs of every prefill and decode run (KV cache included) while the static graphs of
    `artifact` (fp32, CPU) read each prompt and greedily continue it by `new_tokens` tokens."""
    from qwen_edge.sampling import SamplingParams
    from qwen_edge.static_generator import StaticGenerator

    feeds: dict[str, list[dict]] = {g: [] for g in GRAPHS}
    generator = StaticGenerator(artifact, on_feeds=lambda name, f: feeds[name].append(f))
    for ids in prompts:
        generator.generate(list(ids), SamplingParams(), new_tokens, stop_token_ids=()).read()
    return feeds
