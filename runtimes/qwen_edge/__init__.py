"""qwen-edge runtime: load a verified artifact and generate with a KV-cached ONNX Runtime loop."""

from .artifact import Artifact
from .chat import ChatSession
from .errors import ArtifactError, ContextOverflowError, QwenEdgeError, RuntimeMissingError
from .generator import Generator
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "Artifact",
    "ChatSession",
    "Generator",
    "SamplingParams",
    "QwenEdgeError",
    "ArtifactError",
    "ContextOverflowError",
    "RuntimeMissingError",
]
