"""What the external recipe backends share: their missing-tool error and the graph edits that bring an
exported decoder to the artifact's layout."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError

INT64_MAX = np.iinfo(np.int64).max


class BackendMissingError(QwenEdgeError):
    """A recipe backend whose tool is not installed (or not usable) in this environment."""


def count_layers(input_names) -> int:
    """How many past-key inputs (contract.PAST_KEY, one per layer) a decoder's input names hold."""
    names = set(input_names)
    return sum(1 for i in range(len(names)) if contract.PAST_KEY % i in names)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a constant tensor in `graph` and return its value."""
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def add_logits_to_keep(graph: ir.Graph) -> None:
    """Add the scalar int64 input contract.LOGITS_TO_KEEP (initializer default 0 = every position): only
    the last k positions of the final hidden state reach lm_head."""
    logits = next(v for v in graph.outputs if v.name == contract.LOGITS)
    head = logits.producer()
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        raise QwenEdgeError(
            f"the exported logits come from {head.op_type if head else 'nothing'}, not the lm_head "
            "MatMul; use a supported version of the backend's tool"
        )
    keep = initializer(graph, contract.LOGITS_TO_KEEP, np.array(0, np.int64))
    graph.inputs.append(keep)
    axis0 = initializer(graph, "qwen_edge.keep.axis0", np.array([0], np.int64))
    end = initializer(graph, "qwen_edge.keep.end", np.array([INT64_MAX], np.int64))
    seq_axis = initializer(graph, "qwen_edge.keep.seq_axis", np.array([1], np.int64))
    neg = ir.node("Neg", [keep], name="/lm_head/keep/Neg")
    start = ir.node("Unsqueeze", [neg.outputs[0], axis0], name="/lm_head/keep/Unsqueeze")
    kept = ir.node("Slice", [head.inputs[0], start.outputs[0], end, seq_axis], name="/lm_head/keep/Slice")
    graph.insert_before(head, [neg, start, kept])
    head.replace_input_with(0, kept.outputs[0])
