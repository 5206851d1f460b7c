"""Session options and execution provider from the device profile."""

import sys

import onnxruntime as ort
import pytest

from qwen_edge.errors import ArtifactError, RuntimeMissingError
from qwen_edge.session import create_session, provider, session_options


def test_profile_sets_threads_and_optimization_level():
    so = session_options(
        {
            "intra_op_num_threads": 3,
            "graph_optimization_level": "basic",
            "session_config": {"session.intra_op.allow_spinning": "0"},
        }
    )
    assert so.intra_op_num_threads == 3
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (
        session_options({"graph_optimization_level": "ORT_DISABLE_ALL"}).graph_optimization_level
        == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    assert session_options({}).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_bad_optimization_level():
    with pytest.raises(ArtifactError, match="graph_optimization_level 'max' is not one of disable, basic"):
        session_options({"graph_optimization_level": "max"})


def test_cpu_provider():
    assert provider({"execution_provider": "cpu"}) == ("CPUExecutionProvider", {})


def test_missing_provider_names_the_package_to_install(monkeypatch):
    if "DmlExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeMissingError, match="needs DmlExecutionProvider.*install onnxruntime-directml"):
            provider({"execution_provider": "dml"})
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # as if onnxruntime-qnn were not installed
    with pytest.raises(RuntimeMissingError, match="needs QNNExecutionProvider.*pip install onnxruntime-qnn"):
        provider({"execution_provider": "qnn", "provider_options": {"backend_path": "x"}})


def test_unknown_provider():
    with pytest.raises(ArtifactError, match="execution_provider 'tpu' is not one of cpu"):
        provider({"execution_provider": "tpu"})


def test_unloadable_model_is_a_one_line_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(
        ArtifactError, match=r"onnxruntime could not load .*model.onnx: .*rebuild the artifact"
    ) as info:
        create_session(bad, {})
    assert "\n" not in str(info.value)
