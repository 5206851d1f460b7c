"""QDQ quantization of the static prefill/decode graphs (``edge.graph.static``) for the Qualcomm NPU (QNN HTP).

onnxruntime.quantization with the HTP's settings: 16-bit activations, 8-bit (or 4-bit) symmetric
per-channel weights for every MatMul, 16-bit for the small tensors (norm weights, biases, rotary
tables) where 8 bits would cost accuracy for no size. Each graph is calibrated on its own captured
inputs (``edge.npu.qnn.capture_feeds``), but the KV tensors that flow between the graphs
(``present_*`` of one run become ``past_*`` of the next, in either graph) get one range computed over
both, so a cached value is re-quantized without loss. ``edge.npu.qnn`` compiles the result.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edge import report
from edge.npu.qnn import QnnError
from qwen_edge import contract

PAST = {"key": contract.STATIC_PAST_KEY, "value": contract.STATIC_PAST_VALUE}
PRESENT = {"key": contract.STATIC_PRESENT_KEY, "value": contract.STATIC_PRESENT_VALUE}


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
            past, root = PAST[kv] % i, PRESENT[kv] % i
            while root in producer and producer[root].op_type in PASS_THROUGH:
                root = producer[root].input[0]
            names = [past, root]
            names += [
                out
                for node in model.graph.node
                if node.op_type == "Concat" and past in node.input
                for out in node.output
            ]
            groups[f"{kv}_{i}"] = names
    return groups


def _num_layers(model: onnx.ModelProto) -> int:
    inputs = [i.name for i in model.graph.input]
    return sum(1 for i in range(len(inputs)) if contract.STATIC_PAST_KEY % i in inputs)


def _weight_overrides(model: onnx.ModelProto, options: QdqOptions) -> dict[str, list[dict]]:
    """Per-channel symmetric integer weights for every MatMul; 16-bit for the other float initializers."""
    q = _qtypes()
    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    overrides: dict[str, list[dict]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            bits = (
                options.lm_head_bits
                if node.input[1].startswith(("lm_head", "model.embed_tokens"))
                else options.weight_bits
            )
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
    calibrator = create_calibrator(
        model_path,
        None,
        augmented_model_path=str(work_dir / f"{model_path.stem}.aug.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        providers=["CPUExecutionProvider"],
    )
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


def quantize(
    src_dir: Path | str,
    out_dir: Path | str,
    feeds: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    options: QdqOptions = QdqOptions(),
) -> dict:
    """Write the prefill and decode graphs (QDQ, contract.STATIC_GRAPH_FILES, weights in ``<file>.data``) into
    `out_dir`.

    `src_dir` holds the fp32 static graphs; `feeds` maps each graph name to captured inputs of that
    graph (see ``capture_feeds``). Returns the KV ranges used and the seconds taken.
    """
    import onnxruntime

    try:
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.calibrate import save_tensors_data
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
    except ImportError as e:  # onnxruntime-openvino 1.24 ships older quantization tools
        raise QnnError(
            f"onnxruntime {onnxruntime.__version__}'s quantization tools are too old for the QDQ step ({e}); "
            "build static artifacts in the dev venv (bash scripts/setup.sh) and run them in this one"
        ) from None

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    reporter = report.current()
    start = time.perf_counter()
    q = _qtypes()
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs, files = contract.STATIC_GRAPHS, contract.STATIC_GRAPH_FILES
    with tempfile.TemporaryDirectory(prefix=".qdq-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        models = {g: onnx.load(src_dir / files[g], load_external_data=False) for g in graphs}
        groups = {g: kv_groups(m, _num_layers(m)) for g, m in models.items()}
        ranges = {}
        for g in graphs:
            reporter.status(f"calibrating {g} on {len(feeds.get(g, ()))} captured runs")
            ranges[g] = calibrate(src_dir / files[g], feeds.get(g, ()), tmp)
        kv = shared_kv_ranges(ranges, groups)
        for g in graphs:
            reporter.status(f"quantizing {g}")
            overrides = _weight_overrides(models[g], options)
            for name, (lo, hi) in kv.items():
                if name in ranges[g].data:
                    overrides[name] = [{"rmin": lo, "rmax": hi}]
            cache = tmp / f"{g}.calibration.json"
            save_tensors_data(ranges[g], cache)
            config = get_qnn_qdq_config(
                src_dir / files[g],
                None,
                activation_type=q[f"a{options.activation_bits}"],
                weight_type=q["w8"],
                init_overrides=overrides,
            )
            quantize_static(
                src_dir / files[g],
                tmp / files[g],
                None,
                quant_format=config.quant_format,
                op_types_to_quantize=config.op_types_to_quantize,
                per_channel=config.per_channel,
                activation_type=config.activation_type,
                weight_type=config.weight_type,
                nodes_to_exclude=config.nodes_to_exclude,
                use_external_data_format=True,
                calibrate_method=config.calibrate_method,
                extra_options=config.extra_options,
                calibration_cache_path=cache,
            )
        for g in graphs:
            _move_model(tmp / files[g], out_dir / files[g])
    pasts = set(contract.past_names(_num_layers(models[graphs[0]]), static=True))
    return {
        "kv_ranges": {k: [float(v[0]), float(v[1])] for k, v in kv.items() if k in pasts},
        "seconds": round(time.perf_counter() - start, 1),
    }


def _move_model(src: Path, dst: Path) -> None:
    """Re-save `src` with its weights in ``<dst>.data`` (one file, aligned) and remove the source files."""
    model = onnx.load(src)
    onnx.save(
        model,
        dst,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
        size_threshold=1024,
    )
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


def calibration_prompts(tokenizer, tokens_per_text: int) -> list[list[int]]:
    """Token ids of each shipped calibration text (edge/data/calibration), cut to `tokens_per_text`."""
    from edge.quantize.gptq import CALIBRATION_DIR

    texts = [p.read_text(encoding="utf-8") for p in sorted(CALIBRATION_DIR.glob("*.txt"))]
    return [list(getattr(ids := tokenizer.encode(t), "ids", ids))[:tokens_per_text] for t in texts]
