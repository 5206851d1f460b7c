"""Build an ONNX Runtime InferenceSession from an artifact's device profile."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .errors import ArtifactError, RuntimeMissingError

# profile name -> (ONNX Runtime provider, the package that ships it)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "xnnpack": ("XnnpackExecutionProvider", "onnxruntime (a build with XNNPACK, e.g. onnxruntime-android)"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime (macOS wheel)"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn"),
}
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(profile: dict) -> ort.SessionOptions:
    """SessionOptions from the profile keys intra_op_num_threads, inter_op_num_threads,
    graph_optimization_level (disable/basic/extended/all) and session_config (extra config entries)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(profile.get("intra_op_num_threads") or 0)
    so.inter_op_num_threads = int(profile.get("inter_op_num_threads") or 0)
    level = str(profile.get("graph_optimization_level", "all")).lower().removeprefix("ort_enable_")
    if level == "ort_disable_all":
        level = "disable"
    if level not in OPT_LEVELS:
        raise ArtifactError(
            f"profile graph_optimization_level {profile.get('graph_optimization_level')!r} is not one of "
            f"{', '.join(OPT_LEVELS)}; fix the profile and rebuild the artifact"
        )
    so.graph_optimization_level = OPT_LEVELS[level]
    for key, value in (profile.get("session_config") or {}).items():
        so.add_session_config_entry(str(key), str(value))
    so.log_severity_level = 3
    return so


def provider(profile: dict) -> tuple[str, dict]:
    """The provider name and its options for the profile; RuntimeMissingError if it is not installed."""
    ep = str(profile.get("execution_provider", "cpu")).lower()
    if ep not in PROVIDERS:
        raise ArtifactError(
            f"profile execution_provider {ep!r} is not one of {', '.join(PROVIDERS)}; fix the profile and rebuild"
        )
    name, package = PROVIDERS[ep]
    if name not in ort.get_available_providers():
        raise RuntimeMissingError(
            f"the artifact's profile needs {name}, which this onnxruntime does not have; install {package} "
            f"(available here: {', '.join(ort.get_available_providers())})"
        )
    options = {str(k): str(v) for k, v in (profile.get("provider_options") or {}).items()}
    return name, options


def create_session(model_path: str | Path, profile: dict) -> ort.InferenceSession:
    """An InferenceSession for `model_path` configured by the device profile."""
    name, options = provider(profile)
    so = session_options(profile)
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=[(name, options)])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"onnxruntime could not load {model_path}: {first}; rebuild the artifact or re-copy it"
        ) from None
