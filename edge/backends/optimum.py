"""Recipe backend ``optimum``: optimum-onnx exports the fp32 graph, then the recipe's precision is applied.

The export is optimum-onnx's ``text-generation-with-past`` task: a plain-op decoder (no contrib
attention) that takes ``position_ids`` and a past KV cache of any length and returns ``present.*`` as
past + new (a growing cache, not a shared buffer). Quantization, by the recipe's ``weights``:

- ``int4`` / ``int8``: qwen-edge's block-wise quantizer (``edge.quantize.blockwise``, the same kernels and
  methods as the native backend: rtn, hqq, kquant, mixed) turns every MatMul into MatMulNBits and the
  embedding Gather into GatherBlockQuantized (as ``precision.embedding`` / ``lm_head`` ask).
- ``int8`` with method ``dynamic``: Optimum's own int8 dynamic preset (ORTQuantizer,
  ``AutoQuantizationConfig.avx2``: per-channel int8 weights, activations quantized per tensor at run
  time); ``block_size`` and ``symmetric`` do not apply, the embedding stays fp32.
- ``fp32``: the export as it is.

The graph then gets the optional ``num_logits_to_keep`` input of docs/ARCHITECTURE.md (the last k
positions go through lm_head; 0, the default, keeps all) and is saved with external data.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edge import report
from edge.backends.base import (
    BackendMissingError,
    add_logits_to_keep,
    count_layers,
    initializer,
)
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError

NAME = "optimum"
TASK = "text-generation-with-past"
DIST = "optimum-onnx"
MS = "com.microsoft"
GRAPH = {"kv_cache": contract.GROWING, "position_ids": True, "num_logits_to_keep": True}
_LAYER_NODE = re.compile(r"^/(model/layers\.\d+/(?:self_attn|mlp)/\w+_proj|lm_head)/MatMul$")


def _missing(reason: str) -> BackendMissingError:
    return BackendMissingError(
        f"recipe backend 'optimum' needs {DIST}, which {reason}: pip install 'qwen-edge[optimum]' "
        "(it needs transformers<4.58: use a separate virtual environment)"
    )


def check_installed() -> None:
    """Raise BackendMissingError unless optimum-onnx and a transformers it supports are installed."""
    from packaging.requirements import Requirement

    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        raise _missing("is not installed") from None
    if importlib.util.find_spec("optimum.exporters.onnx") is None:
        raise _missing("is not importable here")
    for line in requires:
        req = Requirement(line)
        if req.name == "transformers" and not req.marker:
            have = metadata.version("transformers")
            if not req.specifier.contains(have, prereleases=True):
                raise _missing(f"does not support the installed transformers {have} (it needs {req.specifier})")


def versions() -> dict[str, str | None]:
    """Versions of the tools this backend runs."""
    out = {}
    for dist in (DIST, "optimum", "transformers", "torch", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _check_precision(precision) -> None:
    if precision.weights not in ("int4", "int8", "fp32"):
        raise QwenEdgeError(
            f"recipe backend 'optimum' builds weights int4, int8 or fp32, not {precision.weights}; "
            "change precision.weights or use backend: native"
        )
    if precision.method == "gptq":
        raise QwenEdgeError(
            "precision method 'gptq' needs backend: native (the optimum backend quantizes "
            "with rtn, hqq, kquant, mixed or dynamic)"
        )
    if precision.method == "dynamic" and precision.weights != "int8":
        raise QwenEdgeError("precision method 'dynamic' (Optimum's int8 preset) needs weights: int8")


def describe(recipe, profile) -> dict:
    """What `export` will run for this recipe: exporter, task, quantization steps, graph layout."""
    p = recipe.precision
    _check_precision(p)
    steps = [f"optimum-onnx main_export task={TASK} fp32"]
    if p.weights in ("int4", "int8") and p.method != "dynamic":
        steps.append(
            f"qwen-edge block-wise {p.weights} ({p.method}, block_size {p.block_size}, "
            f"{'symmetric' if p.symmetric else 'asymmetric'}, accuracy_level {profile.accuracy_level}): "
            f"MatMul -> MatMulNBits, embedding {p.embedding_bits}, lm_head {p.lm_head_bits}"
        )
    elif p.weights == "int8":
        steps.append(
            "optimum ORTQuantizer int8 dynamic (AutoQuantizationConfig.avx2, is_static=False): MatMul weights"
            + ("" if p.lm_head_bits != "fp32" else ", lm_head kept fp32")
            + "; embedding fp32"
        )
    steps.append("add num_logits_to_keep before lm_head; save with external data")
    return {"backend": NAME, "task": TASK, "steps": steps, "graph": dict(GRAPH)}


def export(recipe, profile, model_dir: Path, out_dir: Path) -> dict:
    """Export `model_dir` (an HF fp32 directory) to the artifact's graph + external data in `out_dir`,
    quantized as the recipe asks; return the backend, tool versions, steps run and the graph layout.
    Optimum's and transformers' logs and warnings show unless the current Reporter is quiet."""
    check_installed()
    p = recipe.precision
    description = describe(recipe, profile)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with tempfile.TemporaryDirectory(prefix=".optimum-", dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        fp32_dir = tmp / "fp32"
        _main_export(_exportable_dir(model_dir, tmp / "source"), fp32_dir)
        model = ir.load(fp32_dir / contract.MODEL_FILE)
        _check_io(model.graph, fp32_dir / contract.MODEL_FILE)
        add_logits_to_keep(model.graph)
        if p.weights in ("int4", "int8") and p.method != "dynamic":
            from edge.config import QwenConfig
            from edge.graph.plan import weight_plan

            config = QwenConfig.from_hf(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
            quantize_weights(model, weight_plan(p, config), profile.accuracy_level)
        elif p.weights == "int8":
            model = _optimum_int8(model, fp32_dir, tmp / "int8", keep_lm_head=p.lm_head_bits == "fp32")
        save_model(model, out_dir)
    return {"backend": NAME, "versions": versions(), "steps": description["steps"], "graph": dict(GRAPH)}


def save_model(model: ir.Model, out_dir: Path) -> None:
    """Write `model` as the artifact's graph + external data in out_dir, every tensor read from wherever it lies now.

    Small initializers and Constant tensors stay in the graph; those the exporter put in its own
    external file are read into memory first, or they would keep pointing there.
    """
    size_threshold = 256
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= size_threshold:
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    for node in model.graph.all_nodes():
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.Tensor(attr.value.numpy(), name=attr.value.name))
    ir.save(
        model,
        Path(out_dir) / contract.MODEL_FILE,
        external_data=contract.MODEL_DATA_FILE,
        size_threshold_bytes=size_threshold,
        alignment=contract.ALIGNMENT,
    )


def _exportable_dir(model_dir: Path, work: Path) -> Path:
    """`model_dir`, or a linked copy whose config.json also carries `rope_theta`: a config written by
    transformers 5 keeps it only in `rope_parameters`, which transformers <4.58 ignores (it would
    silently fall back to theta 10000)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise QwenEdgeError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in config or "rope_theta" not in rope:
        return model_dir
    if rope.get("rope_type", "default") != "default":
        raise QwenEdgeError(
            f"{config_path}: rope_type {rope['rope_type']!r} is not supported by the optimum "
            "backend; use backend: native"
        )
    work.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (work / f.name).symlink_to(f.resolve())
    (work / "config.json").write_text(json.dumps({**config, "rope_theta": rope["rope_theta"]}, indent=2))
    return work


def _main_export(model_dir: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    verbose = report.current().verbose
    quiet = [logging.getLogger(n) for n in ("optimum", "transformers")] if not verbose else []
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:  # the tracer's warnings about data-dependent branches are expected
                warnings.simplefilter("ignore")
            # Validation is skipped: the build's fidelity check compares the finished artifact instead.
            main_export(str(model_dir), output=out, task=TASK, device="cpu", do_validation=False)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def _check_io(graph: ir.Graph, path: Path) -> None:
    """The exported names must be the runtime's (docs/ARCHITECTURE.md plus position_ids)."""
    inputs = {v.name for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    layers = count_layers(inputs)
    want_in = {contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS, *contract.past_names(layers)}
    want_out = {contract.LOGITS, *contract.present_names(layers)}
    if not layers or inputs != want_in or outputs != want_out:
        raise QwenEdgeError(
            f"{path}: optimum-onnx exported inputs {sorted(inputs)[:5]}... / outputs {sorted(outputs)[:3]}..., "
            f"not the decoder layout qwen-edge runs; use a supported optimum-onnx version ({versions()[DIST]} here)"
        )


def _hf_weight(node_name: str) -> str | None:
    """The Hugging Face weight name of an exported linear's MatMul node (None if not a linear)."""
    m = _LAYER_NODE.match(node_name)
    return m.group(1).replace("/", ".") + ".weight" if m else None


def quantize_weights(model: ir.Model, plan, accuracy_level: int) -> None:
    """Replace each linear MatMul by MatMulNBits and the embedding Gather by GatherBlockQuantized, as
    `plan` (an edge.graph.plan.WeightPlan) stores them; float storages are left as exported."""
    from onnx_ir.convenience import replace_nodes_and_values
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from edge.quantize.blockwise import QuantSpec, quantize

    graph = model.graph
    for node in list(graph):
        if node.op_type == "MatMul":
            name = _hf_weight(node.name)
            storage = plan.lm_head if name == "lm_head.weight" else plan.for_linear([name])
        elif (
            node.op_type == "Gather"
            and node.inputs[0] is not None
            and node.inputs[0].name == "model.embed_tokens.weight"
        ):
            name, storage = "model.embed_tokens.weight", plan.embedding
        else:
            continue
        weight = node.inputs[0] if node.op_type == "Gather" else node.inputs[1]
        if name is None or not isinstance(storage, QuantSpec) or weight.const_value is None:
            continue
        array = weight.const_value.numpy()
        if node.op_type == "Gather":
            new = _gather_block_quantized(graph, node, name, array, storage)
        else:
            k, n = array.shape
            q = quantize(np.ascontiguousarray(array.T), storage)
            zp = None if q.zero_points is None else initializer(graph, f"{name}.zero_points", q.zero_points)
            attrs = {
                "K": k,
                "N": n,
                "bits": storage.bits,
                "block_size": storage.block_size,
                "accuracy_level": accuracy_level,
            }
            new = [
                ir.node(
                    "MatMulNBits",
                    [
                        node.inputs[0],
                        initializer(graph, f"{name}.qweight", q.packed),
                        initializer(graph, f"{name}.scales", q.scales),
                        zp,
                    ],
                    attributes=attrs,
                    domain=MS,
                    name=f"{node.name}NBits",
                )
            ]
        replace_nodes_and_values(graph, node, [node], new, [node.outputs[0]], [new[-1].outputs[0]])
    graph.opset_imports[MS] = 1
    RemoveUnusedNodesPass()(model)


def _gather_block_quantized(graph: ir.Graph, node: ir.Node, name: str, table: np.ndarray, spec) -> list[ir.Node]:
    """GatherBlockQuantized over the block-quantized rows of the embedding table, reshaped to [b, s, hidden]
    (float16 scales on disk cast to float32 by an initializer-only Cast folded at load, float32 rows: like the
    native graph's table of its own)."""
    from edge.quantize.blockwise import quantize

    vocab, hidden = table.shape
    if hidden % spec.block_size:
        raise QwenEdgeError(
            f"hidden size {hidden} is not a multiple of block_size {spec.block_size}; "
            "choose a smaller block_size in the recipe"
        )
    q = quantize(table, spec)
    half = initializer(graph, f"{name}.scales", q.scales[:, :, None].astype(np.float16))
    scales = ir.node("Cast", [half], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}BlockQuantized/Scales")
    inputs = [initializer(graph, f"{name}.qweight", q.packed), node.inputs[1], scales.outputs[0]]
    if q.zero_points is not None:
        inputs.append(initializer(graph, f"{name}.gather_zero_points", q.zero_point_values()[:, :, None]))
    attrs = {"gather_axis": 0, "quantize_axis": 2, "block_size": spec.block_size, "bits": spec.bits}
    gather = ir.node("GatherBlockQuantized", inputs, attributes=attrs, domain=MS, name=f"{node.name}BlockQuantized")
    shape = initializer(graph, f"{name}.hidden_shape", np.array([0, 0, hidden], np.int64))
    reshape = ir.node("Reshape", [gather.outputs[0], shape], name=f"{node.name}BlockQuantized/Reshape")
    return [scales, gather, reshape]


def _optimum_int8(model: ir.Model, fp32_dir: Path, work: Path, keep_lm_head: bool) -> ir.Model:
    """Optimum's int8 dynamic preset over `model` (saved next to the export's config.json first)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    src = work / "fp32"
    src.mkdir(parents=True)
    shutil.copy(fp32_dir / "config.json", src / "config.json")
    save_model(model, src)
    del model
    exclude = ["/lm_head/MatMul"] if keep_lm_head else []
    config = AutoQuantizationConfig.avx2(is_static=False, nodes_to_exclude=exclude)
    quantizer = ORTQuantizer.from_pretrained(src, file_name=contract.MODEL_FILE)
    out = work / "out"
    path = quantizer.quantize(save_dir=out, quantization_config=config, use_external_data_format=True)
    files = sorted(Path(path).glob("*.onnx"))
    if len(files) != 1:
        raise QwenEdgeError(
            f"optimum's int8 quantization wrote {[f.name for f in files]} in {path}; expected one model"
        )
    return ir.load(files[0])
