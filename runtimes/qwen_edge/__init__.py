"""qwen-edge runtime: load a verified artifact and generate with a KV-cached ONNX Runtime loop."""

__version__ = "0.1.0"
