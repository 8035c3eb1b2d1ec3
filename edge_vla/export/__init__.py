"""Export: checkpoint -> verified, quantized ONNX bundle (`edge-vla export`).

    steps.py          the export as named steps (load, graphs, parity, calibrate, quantize, lint,
                      accuracy, write) and `export_bundle`, which runs them
    onnx_export.py    the fp32 graphs; fused_decoder.py the decoder body ONNX Runtime runs fastest
    quantize.py       per-graph quantization; accuracy.py parity and accuracy measurements

Kept import-light (no torch at module level): importing `edge_vla.export` costs nothing.
"""

from __future__ import annotations

from edge_vla.export.steps import export_bundle

__all__ = ["export_bundle"]
