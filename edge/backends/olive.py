"""Recipe backend 'olive': the recipe as a Microsoft Olive workflow, its output normalized into our artifact.

The recipe's precision block becomes a chain of Olive passes on a Hugging Face fp32 directory:

- conversion: ``OnnxConversion`` with the torch dynamo exporter, a plain-op decoder with inputs
  ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/.value`` and outputs
  ``logits``, ``present.{i}.key/.value`` whose past grows by the new tokens each step;
- ``rtn`` (int4 or int8): ``OnnxBlockWiseRtnQuantization`` on every MatMul and the embedding Gather
  (MatMulNBits / GatherBlockQuantized); with tied embeddings, Olive's PyTorch ``Rtn`` pass first
  unties and quantizes the lm_head (the ONNX pass cannot see a weight reached through a Transpose);
- ``hqq`` (int4): ``OnnxHqqQuantization`` on the MatMuls, then RTN for the embedding (int8: RTN, as
  the native backend does);
- ``kquant``: ``OnnxKQuantQuantization``, then RTN for whatever it leaves (the embedding);
- ``gptq``: Olive's ``Gptq`` pass on the PyTorch model before conversion (decoder linears and lm_head,
  calibrated on the shipped text ``edge/data/calibration`` through the dataset this module registers
  with Olive), then RTN for the embedding; ``int8_layers`` become per-module overrides;
- ``mixed``: Olive's PyTorch ``Rtn`` pass with ``int8_layers`` as overrides, then RTN for the embedding.

Olive keeps the q/k/v projections of a layer at one precision, so an int8 ``v_proj`` makes that
layer's ``q_proj`` and ``k_proj`` int8 as well. The embedding and lm_head take the weights' bits
(except a tied lm_head under ``hqq`` or ``kquant``, which stays fp32: the graph facts say so).

After the run, the model is re-saved as the artifact's graph and external data files
(contract.MODEL_FILE, contract.MODEL_DATA_FILE, aligned for memory mapping), the logits output gets
back the name Olive's quantizers change, and every MatMulNBits gets the profile's ``accuracy_level``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from edge import report
from edge.backends.base import BackendMissingError, add_logits_to_keep, count_layers
from edge.graph.plan import LINEAR_PARTS
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError

EXTRA = "olive"
CALIBRATION_DATASET = "qwen_edge_calibration"
TASK = "text-generation-with-past"
MODEL_FILE, DATA_FILE = contract.MODEL_FILE, contract.MODEL_DATA_FILE
PLACEHOLDER_MODEL, PLACEHOLDER_OUT = "<hf-fp32-model-dir>", "<output-dir>"
_QUANT_SUFFIX = re.compile(r"_Q\d+$")
_VERSIONED = ("olive-ai", "torch", "transformers", "onnxruntime", "onnxscript", "onnx-ir")


class OliveBackendError(QwenEdgeError):
    """Olive cannot express the recipe, or failed to produce a model."""


def check_installed() -> None:
    """Raise BackendMissingError if olive-ai is not importable, naming the extra to install."""
    if importlib.util.find_spec("olive") is None:
        raise BackendMissingError(
            f"recipe backend 'olive' needs olive-ai, which is not installed: pip install 'qwen-edge[{EXTRA}]'"
        )


# ----- the workflow --------------------------------------------------------------------------------
def workflow(recipe, profile, model_dir: Path, out_dir: Path) -> dict:
    """The Olive workflow config (JSON-able) the recipe becomes, reading `model_dir` and writing under `out_dir`.

    It runs as is with ``olive run --config <file>`` (Olive writes the model to ``out_dir``).
    """
    precision = recipe.precision
    _check_supported(precision)
    bits = {"int4": 4, "int8": 8}.get(precision.weights)
    model_dir, out_dir = str(model_dir), str(out_dir)
    passes: dict[str, dict] = {}
    data_configs: list[dict] = []
    method = precision.method

    hf_config = _hf_config(model_dir)
    # A tied lm_head reaches the ONNX graph as Transpose(embedding), which no ONNX weight quantizer
    # matches; Olive's PyTorch passes untie it and quantize it before conversion instead.
    torch_rtn = method == "mixed" or (method == "rtn" and hf_config.get("tie_word_embeddings", False))
    if bits is not None and (method == "gptq" or torch_rtn):
        torch_pass = {
            "bits": bits,
            "group_size": precision.block_size,
            "sym": precision.symmetric,
            "lm_head": True,
            "overrides": _int8_overrides(precision, hf_config.get("num_hidden_layers")),
        }
        if method == "gptq":
            from edge.quantize import gptq

            tokens = precision.calibration_tokens or gptq.DEFAULT_TOKENS
            data_configs.append(calibration_data_config(model_dir, tokens, min(gptq.SEQ_LEN, tokens)))
            passes["gptq"] = {
                "type": "Gptq",
                **torch_pass,
                "damp_percent": gptq.PERCDAMP,
                "data_config": CALIBRATION_DATASET,
            }
        else:
            passes["rtn_torch"] = {"type": "Rtn", **torch_pass}

    passes["conversion"] = {
        "type": "OnnxConversion",
        "use_dynamo_exporter": True,
        "torch_dtype": "float32",
        **_external_data(),
    }

    if bits is not None:
        rtn = {
            "type": "OnnxBlockWiseRtnQuantization",
            "bits": bits,
            "block_size": precision.block_size,
            "is_symmetric": precision.symmetric,
            "accuracy_level": profile.accuracy_level,
            **_external_data(),
        }
        if method == "hqq" and bits == 4:
            passes["hqq"] = {
                "type": "OnnxHqqQuantization",
                "block_size": precision.block_size,
                "accuracy_level": profile.accuracy_level,
                **_external_data(),
            }
        elif method == "kquant":
            passes["kquant"] = {
                "type": "OnnxKQuantQuantization",
                "bits": bits,
                "block_size": precision.block_size,
                "accuracy_level": profile.accuracy_level,
                **_external_data(),
            }
            rtn["is_symmetric"] = False  # as the native backend stores a kquant recipe's embedding
        passes["rtn"] = rtn

    return {
        "workflow_id": f"qwen-edge-{recipe.name}",
        "input_model": {"type": "HfModel", "model_path": model_dir, "task": TASK},
        "data_configs": data_configs,
        "passes": passes,
        "engine": {
            "output_dir": out_dir,
            "cache_dir": str(Path(out_dir) / ".olive-cache"),
            "evaluate_input_model": False,
            "log_severity_level": 1,
        },
    }


def describe(recipe, profile) -> dict:
    """`workflow` with placeholder paths, for a dry run without the model at hand."""
    return workflow(recipe, profile, Path(PLACEHOLDER_MODEL), Path(PLACEHOLDER_OUT))


def calibration_data_config(model_dir: str, tokens: int, seq_len: int) -> dict:
    """An Olive data config yielding the shipped calibration text as sequences of `seq_len` tokens."""
    return {
        "name": CALIBRATION_DATASET,
        "user_script": str(Path(__file__).resolve()),
        "load_dataset_config": {
            "type": CALIBRATION_DATASET,
            "params": {"model_dir": model_dir, "tokens": tokens, "seq_len": seq_len},
        },
        "pre_process_data_config": {"type": "skip_pre_process"},
        "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": 1}},
    }


def calibration_dataset(model_dir: str, tokens: int, seq_len: int) -> list:
    """Olive dataset component: (inputs, label) pairs of the shipped calibration text in the model's tokens."""
    import torch

    from edge.quantize.gptq import calibration_ids
    from edge.sources import open_source

    if model_dir == PLACEHOLDER_MODEL:
        raise OliveBackendError(f"replace {PLACEHOLDER_MODEL} in the workflow with the model directory")
    ids = calibration_ids(open_source(model_dir), tokens=tokens, seq_len=seq_len)
    return [({"input_ids": row, "attention_mask": torch.ones_like(row)}, 0) for row in ids]


def _register_with_olive() -> None:
    # Olive imports this file as the calibration data's user_script (after its registry is loaded);
    # imported by qwen-edge itself before Olive, it registers nothing and costs nothing.
    registry = sys.modules.get("olive.data.registry")
    if registry is not None:
        registry.Registry.register_dataset(CALIBRATION_DATASET)(calibration_dataset)


_register_with_olive()


def _check_supported(precision) -> None:
    if precision.weights == "fp16":
        raise OliveBackendError(
            "backend 'olive' builds fp32, int8 or int4 weights; set precision.weights to one of "
            "them or use backend 'native'"
        )
    if precision.weights == "fp32" and precision.method not in ("rtn", "mixed"):
        raise OliveBackendError(
            f"precision.method {precision.method!r} needs int4 or int8 weights; set "
            "precision.weights or use method 'rtn'"
        )
    for key in ("embedding", "lm_head"):
        bits = getattr(precision, f"{key}_bits")
        if bits != precision.weights:
            raise OliveBackendError(
                f"backend 'olive' stores the {key} with the weights' precision ({precision.weights}); set "
                f"precision.{key} to 'same' or use backend 'native' for a {bits} {key}"
            )


def _int8_overrides(precision, num_layers: int | None) -> dict | str:
    """Olive per-module overrides for the linears `int8_layers` keeps in int8 (HF module names).

    Without the model (a dry run) the layer count is unknown: a placeholder names the patterns.
    """
    if num_layers is None:
        from edge.recipe import DEFAULT_INT8_LAYERS

        patterns = (
            precision.int8_layers
            if precision.int8_layers is not None
            else (DEFAULT_INT8_LAYERS if precision.method == "mixed" else ())
        )
        if precision.weights != "int4" or not patterns:
            return {}
        return f"<int8, symmetric, for every module matching {', '.join(patterns)}, listed once the model is known>"
    names = [f"model.layers.{i}.{part}" for i in range(num_layers) for part in LINEAR_PARTS]
    return {
        n: {"bits": 8, "symmetric": True}
        for n in names
        if precision.weights == "int4" and precision.bits_for(f"{n}.weight") == "int8"
    }


def _hf_config(model_dir: str) -> dict:
    if model_dir == PLACEHOLDER_MODEL:
        return {}  # a dry run without the model: no per-layer overrides, untied embeddings assumed
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        int(config["num_hidden_layers"])
        return config
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OliveBackendError(
            f"{model_dir}/config.json: cannot read num_hidden_layers ({e}); give a Hugging Face model directory"
        ) from None


def _external_data() -> dict:
    return {"save_as_external_data": True, "all_tensors_to_one_file": True, "external_data_name": DATA_FILE}


# ----- running it ----------------------------------------------------------------------------------
def export(recipe, profile, model_dir: Path, out_dir: Path) -> dict:
    """Run the recipe's Olive workflow on `model_dir` and write the artifact's graph and its external data
    into `out_dir` (Olive logs unless the current Reporter is quiet).

    Returns the backend, tool versions, the passes run, and the graph facts genai_config needs.
    """
    check_installed()
    reporter = report.current()
    out_dir = Path(out_dir)
    config = workflow(recipe, profile, Path(model_dir), out_dir)
    passes = [p["type"] for p in config["passes"].values()]
    reporter.status(f"running Olive: {' -> '.join(passes)}")
    with tempfile.TemporaryDirectory(prefix=".olive-", dir=out_dir) as work:
        work = Path(work)
        config["engine"].update(
            output_dir=str(work / "output"),
            cache_dir=str(work / "cache"),
            log_severity_level=1 if reporter.verbose else 3,
        )
        produced = _run(config, work)
        reporter.status("normalizing the Olive model into the artifact layout")
        graph = _normalize(produced, out_dir, profile.accuracy_level)
    return {"backend": "olive", "versions": _versions(), "passes": passes, "graph": graph}


class _FailureLog(logging.Handler):
    """Keeps the last exception Olive logged (it reports a failed pass as a warning, not an exception)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.error = record.exc_info[1]


def _run(config: dict, work: Path) -> Path:
    from olive.workflows import run

    failures = _FailureLog()
    logger = logging.getLogger("olive")
    logger.addHandler(failures)
    process_tempdir = tempfile.tempdir  # Olive points the whole process's tempfile root at `tempdir`
    try:
        with _torch_export_dynamic_cache_shapes():
            output = run(config, tempdir=str(work))
    finally:
        tempfile.tempdir = process_tempdir
        logger.removeHandler(failures)
    model = Path(config["engine"]["output_dir"]) / MODEL_FILE
    if output is None or not output.has_output_model() or not model.is_file():
        cause = f": {type(failures.error).__name__}: {_first_line(failures.error)}" if failures.error else ""
        raise OliveBackendError(f"Olive produced no model{cause}; rerun without --quiet to see Olive's log")
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


@contextmanager
def _torch_export_dynamic_cache_shapes():
    """Give torch.export the past_key_values dynamic shapes in the form it matches against a DynamicCache.

    olive-ai 0.13 describes them as ``{"cache": [(key, value), ...]}``, the cache's flattened dict;
    torch 2.13 matches a registered pytree class against the list of its children, so the export
    fails with "Node type mismatch; expected list, but got dict". This wraps Olive's converter for the
    duration of one run.
    """
    from olive.passes.onnx import conversion

    original = conversion._convert_dynamic_shapes_for_dynamic_cache

    def children_form(dynamic_shapes: dict) -> dict:
        converted = original(dynamic_shapes)
        past = converted.get("past_key_values")
        if isinstance(past, dict) and set(past) == {"cache"}:
            converted["past_key_values"] = [past["cache"]]
        return converted

    conversion._convert_dynamic_shapes_for_dynamic_cache = children_form
    try:
        yield
    finally:
        conversion._convert_dynamic_shapes_for_dynamic_cache = original


def _normalize(model_path: Path, out_dir: Path, accuracy_level: int) -> dict:
    """Re-save Olive's model as the artifact's graph + external data in out_dir (aligned); return its graph facts."""
    import onnx_ir as ir

    model = ir.load(model_path)
    for value in model.graph.outputs:
        # Olive's weight quantizers rename a quantized MatMul's output ("logits" -> "logits_Q4").
        value.name = _QUANT_SUFFIX.sub("", value.name)
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    layers = count_layers(inputs)
    expected_in = [contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS] + contract.past_names(layers)
    expected_out = [contract.LOGITS] + contract.present_names(layers)
    if layers == 0 or sorted(inputs) != sorted(expected_in) or sorted(outputs) != sorted(expected_out):
        raise OliveBackendError(
            f"Olive's model has inputs {inputs} and outputs {outputs}, not the decoder layout "
            "qwen-edge runs; report this with the recipe"
        )
    logits = next(v for v in model.graph.outputs if v.name == contract.LOGITS)
    quantized = 0
    for node in model.graph.all_nodes():
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", accuracy_level)
            quantized += 1
    add_logits_to_keep(model.graph)
    for name in (MODEL_FILE, DATA_FILE):
        (out_dir / name).unlink(missing_ok=True)
    ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE, alignment=contract.ALIGNMENT)
    return {
        "kv_cache": contract.GROWING,
        "position_ids": True,
        "num_logits_to_keep": True,
        "layers": layers,
        "inputs": inputs,
        "outputs": outputs,
        "matmulnbits": quantized,
        "lm_head_quantized": logits.producer() is not None and logits.producer().op_type == "MatMulNBits",
        "gather_block_quantized": sum(1 for n in model.graph.all_nodes() if n.op_type == "GatherBlockQuantized"),
        "opset": model.opset_imports.get("", None),
    }


def _versions() -> dict:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
