"""About a board, not about ONNX: target profiles, memory fit and roofline latency projection."""
