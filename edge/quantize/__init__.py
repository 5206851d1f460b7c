"""Weight quantization: block-wise MatMulNBits blobs (`blockwise`), calibrated GPTQ (`gptq`) and the QDQ
quantization of the static NPU graphs (`qdq`)."""
