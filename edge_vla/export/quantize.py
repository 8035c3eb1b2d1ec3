"""Quantize exported ONNX graphs with ONNX Runtime's quantizers.

    fp32         unchanged
    fp16         float16 weights and compute, float32 graph inputs/outputs kept
    int8         dynamic INT8, per-channel weights (MatMul/Gemm/Conv/Gather): the CPU default
    int8-static  static QDQ INT8 with activation ranges calibrated on real inputs (accelerators)
    int4         weight-only 4-bit blocks (MatMulNBits, block 32, symmetric), embedding Gather too

Measured on this kind of CPU (FACTS.md): dynamic INT8 per-channel is the fastest accurate CPU
path; static QDQ drifts most; INT4 gives the smallest file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_vla.errors import EdgeVLAError

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
INT4_BLOCK = 32


def check_precision(precision: str, what: str = "precision") -> str:
    if precision not in PRECISIONS:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error(what, precision, list(PRECISIONS))
    return precision


def quantize_graph(src: Path, dst: Path, precision: str, calibration: list[dict] | None = None) -> None:
    """Write `src` quantized to `precision` at `dst` (`calibration`: input feeds, int8-static only)."""
    check_precision(precision)
    src, dst = Path(src), Path(dst)
    try:
        QUANTIZERS[precision](src, dst, calibration)
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


def _int8_dynamic(src, dst, _):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm", "Conv", "Gather"],
                     extra_options={"MatMulConstBOnly": True})


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
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                             op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


QUANTIZERS = {"fp32": _copy, "fp16": _fp16, "int8": _int8_dynamic, "int8-static": _int8_static, "int4": _int4}
