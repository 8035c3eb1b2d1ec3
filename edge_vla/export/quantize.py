"""Quantize exported ONNX graphs with ONNX Runtime's quantizers.

    fp32         unchanged
    fp16         float16 weights and compute, float32 graph inputs/outputs kept
    int8         dynamic INT8: MatMul weights in symmetric 8-bit blocks of 256 along K (MatMulNBits,
                 accuracy_level 4: activations quantized to int8 on the fly, int8 dot products);
                 Gemm/Conv/Gather dynamic INT8 per-channel. The CPU default.
    int8-static  static QDQ INT8 with activation ranges calibrated on real inputs (accelerators)
    int4         weight-only 4-bit blocks (MatMulNBits, block 32, symmetric, int8 compute), embedding
                 Gather too

Measured on this kind of CPU (AVX-512 VNNI, 1 thread, a 136M fused decoder, 100 tokens of
context): 8-bit MatMulNBits decodes ~2x faster than ORT's MatMulInteger/DynamicQuantizeMatMul
form of the same weights (6.8 vs 12.4 ms per step); INT4 with int8 compute (accuracy_level 4)
~3x faster than with float compute (accuracy_level 0). For TensorRT targets `int8` keeps the
MatMulInteger form (`for_tensorrt=True`), which the TensorRT lint names with its fix; static QDQ
drifts most (docs/facts.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_vla import notices
from edge_vla.errors import EdgeVLAError

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
INT4_BLOCK = 32
INT8_BLOCK = 256
# MatMulNBits accuracy_level 4: int8 activations and int8 dot products (VNNI/AVX2 kernels); 0 would
# dequantize the weights to float32 and run float MatMuls.
INT_COMPUTE = 4


def check_precision(precision: str, what: str = "precision") -> str:
    if precision not in PRECISIONS:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error(what, precision, list(PRECISIONS))
    return precision


def quantize_graph(src: Path, dst: Path, precision: str, calibration: list[dict] | None = None,
                   for_tensorrt: bool = False) -> None:
    """Write `src` quantized to `precision` at `dst` (`calibration`: input feeds, int8-static only;
    `for_tensorrt`: int8 in ORT's MatMulInteger form, which the TensorRT lint recognises and refuses)."""
    check_precision(precision)
    notices.silence("", "onnxruntime.quantization.matmul_nbits_quantizer")
    src, dst = Path(src), Path(dst)
    quantizer = _int8_dynamic if precision == "int8" and for_tensorrt else QUANTIZERS[precision]
    try:
        with notices.root_logger_kept():
            quantizer(src, dst, calibration)
    except EdgeVLAError:
        raise
    except Exception as e:
        raise EdgeVLAError(f"{precision} quantization of {src.name} failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})", "try another precision") from None


def _copy(src, dst, _):
    shutil.copyfile(src, dst)


def _fp16(src, dst, _):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, str(dst))


def _int8_dynamic(src, dst, _, op_types=("MatMul", "Gemm", "Conv", "Gather")):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=list(op_types), extra_options={"MatMulConstBOnly": True})


def _matmul_blocks(model, block: int) -> dict[str, int]:
    """Block size per constant-weight MatMul: `block`, or the largest power of two <= K (>= 16) where K is
    smaller (ORT's quantizer leaves a MatMul whose K is below the block size in float)."""
    inits = {i.name: i.dims for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2:
            k = int(inits[n.input[1]][0])
            out[n.name] = block if k >= block else max(16, 1 << (k.bit_length() - 1))
    return out


def _nbits(model, bits: int, block: int, op_types=("MatMul",), nodes_to_exclude=None):
    """MatMulNBits (and GatherBlockQuantized for "Gather") of every constant-weight op of `op_types`."""
    import logging

    import numpy as np

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for i, n in enumerate(model.graph.node):  # the quantizer selects nodes by name
        n.name = n.name or f"node_{n.op_type}_{i}"
    blocks = _matmul_blocks(model, block)
    exclude = set(nodes_to_exclude or [])
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        # One pass per block size: the requested one first (with Gather), then any smaller-K MatMuls.
        for b in sorted(set(blocks.values()) | {block}, reverse=True):
            skip = exclude | {name for name, nb in blocks.items() if nb != b}
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=b, is_symmetric=True, accuracy_level=INT_COMPUTE,
                                     op_types_to_quantize=tuple(op_types) if b == block else ("MatMul",),
                                     nodes_to_exclude=sorted(skip), quant_axes=(("MatMul", 0), ("Gather", 1)))
            # All-zero rows (a released vocabulary padded past its tokenizer) divide 0 by a 0 scale:
            # numpy warns, the rows are never looked up.
            with np.errstate(divide="ignore", invalid="ignore"):
                q.process()
            model = q.model.model
    finally:
        log.setLevel(level)
    return model


def _int8_blocks(src, dst, _):
    import tempfile

    import onnx

    model = _nbits(onnx.load(str(src)), bits=8, block=INT8_BLOCK)
    rest = {n.op_type for n in model.graph.node} & {"Gemm", "Conv", "Gather"}
    if not rest:
        onnx.save(model, str(dst))
        return
    with tempfile.TemporaryDirectory(dir=Path(dst).parent) as tmp:
        mid = Path(tmp) / "matmul_int8.onnx"
        onnx.save(model, str(mid))
        _int8_dynamic(mid, dst, None, op_types=sorted(rest))


class _Feeds:
    """onnxruntime CalibrationDataReader over a list of input dicts."""

    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _int8_static(src, dst, calibration):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise EdgeVLAError("static INT8 needs calibration inputs", "pass --data with held-out samples (or use --int8)")
    quantize_static(str(src), str(dst), _Feeds(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"MatMulConstBOnly": True})


def _int4(src, dst, _):
    import onnx

    onnx.save(_nbits(onnx.load(str(src)), bits=4, block=INT4_BLOCK, op_types=("MatMul", "Gather")), str(dst))


QUANTIZERS = {"fp32": _copy, "fp16": _fp16, "int8": _int8_blocks, "int8-static": _int8_static, "int4": _int4}
