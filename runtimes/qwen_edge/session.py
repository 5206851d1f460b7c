"""Build an ONNX Runtime InferenceSession from an artifact's device profile.

The CPU provider is built into onnxruntime. QNN (Qualcomm NPUs) is a plugin provider shipped by the
``onnxruntime-qnn`` package: its library is registered once per process and the session is bound to
the QNN devices it exposes, with CPU fallback disabled so that a graph the NPU cannot run fails to load
instead of silently running on the CPU. OpenVINO (Intel NPUs, CPUs and GPUs) ships as ``onnxruntime-openvino``,
a build of onnxruntime with the provider inside; its ``device_type`` option picks the device, and CPU fallback is
disabled the same way.
"""

from __future__ import annotations

import threading
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


QNN_BACKENDS = ("htp", "cpu", "gpu")  # provider option backend_type -> onnxruntime_qnn.get_qnn_<type>_path()
_qnn_lock = threading.Lock()


def qnn_devices() -> list:
    """The QNN plugin provider's devices, registering its library on first use; RuntimeMissingError without it."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise RuntimeMissingError(
            "the artifact's profile needs QNNExecutionProvider (Qualcomm NPU); pip install onnxruntime-qnn"
        ) from None
    name = PROVIDERS["qnn"][0]
    with _qnn_lock:
        if not any(d.ep_name == name for d in ort.get_ep_devices()):
            ort.register_execution_provider_library(name, onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        raise RuntimeMissingError(
            f"onnxruntime-qnn {onnxruntime_qnn.__version__} exposes no QNN device here; "
            "run on a Snapdragon device or an x86-64/arm64 host with its HTP emulator"
        )
    return devices


def qnn_options(options: dict) -> dict[str, str]:
    """QNN provider options with ``backend_type`` (htp by default) resolved to the bundled backend library."""
    import onnxruntime_qnn

    options = {str(k): str(v) for k, v in options.items()}
    backend = options.pop("backend_type", "htp").lower()
    if backend not in QNN_BACKENDS:
        raise ArtifactError(
            f"profile provider_options backend_type {backend!r} is not one of "
            f"{', '.join(QNN_BACKENDS)}; fix the profile and rebuild"
        )
    if "backend_path" not in options:
        path = getattr(onnxruntime_qnn, f"get_qnn_{backend}_path")()
        if not Path(path).is_file():
            raise RuntimeMissingError(
                f"onnxruntime-qnn {onnxruntime_qnn.__version__} has no QNN {backend} backend "
                f"({Path(path).name}); use backend_type htp or install a build that ships it"
            )
        options["backend_path"] = path
    return options


def provider(profile: dict) -> tuple[str, dict]:
    """The provider name and its options for the profile; RuntimeMissingError if it is not installed."""
    ep = str(profile.get("execution_provider", "cpu")).lower()
    if ep not in PROVIDERS:
        raise ArtifactError(
            f"profile execution_provider {ep!r} is not one of {', '.join(PROVIDERS)}; fix the profile and rebuild"
        )
    name, package = PROVIDERS[ep]
    if ep == "qnn":
        qnn_devices()
        return name, qnn_options(profile.get("provider_options") or {})
    if name not in ort.get_available_providers():
        raise RuntimeMissingError(
            f"the artifact's profile needs {name}, which this onnxruntime does not have; install {package} "
            f"(available here: {', '.join(ort.get_available_providers())})"
        )
    options = {str(k): str(v) for k, v in (profile.get("provider_options") or {}).items()}
    return name, options


def create_session(model_path: str | Path, profile: dict, config: dict | None = None) -> ort.InferenceSession:
    """An InferenceSession for `model_path` configured by the device profile.

    `config` adds session config entries for this session only (e.g. ``ep.context_enable`` while
    compiling, ``ep.share_ep_contexts`` for graphs that share one QNN context).
    """
    name, options = provider(profile)
    qnn = name == PROVIDERS["qnn"][0]
    so = session_options(profile)
    # A graph the NPU (or OpenVINO's device) cannot run whole fails to load rather than running partly on the CPU.
    whole = qnn or name == PROVIDERS["openvino"][0]
    config = {"session.disable_cpu_ep_fallback": "1", **(config or {})} if whole else (config or {})
    for key, value in config.items():
        so.add_session_config_entry(str(key), str(value))
    try:
        if qnn:
            so.add_provider_for_devices(qnn_devices(), options)
            return ort.InferenceSession(str(model_path), sess_options=so)
        return ort.InferenceSession(str(model_path), sess_options=so, providers=[(name, options)])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"onnxruntime could not load {model_path}: {first}; rebuild the artifact or re-copy it"
        ) from None
