"""The ONNX graphs of an artifact: how each weight is stored (`plan`), the GroupQueryAttention decoder of
the CPU artifact (`decoder`) and the static prefill/decode graphs of an NPU artifact (`static`)."""
