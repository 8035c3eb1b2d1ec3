"""Quantize exported ONNX graphs with ONNX Runtime's quantizers.

    fp32         unchanged
    fp16         float16 weights and compute, float32 graph inputs/outputs kept
    int8         dynamic INT8: MatMul weights in symmetric 8-bit blocks of 256 along K (smaller where
                 that stores fewer bytes: block_for) (MatMulNBits,
                 accuracy_level 4: activations quantized to int8 on the fly, int8 dot products);
                 Gemm/Conv/Gather dynamic INT8 per-channel. The CPU default.
    int8-static  static QDQ INT8 with activation ranges calibrated on real inputs (accelerators)
    int4         weight-only 4-bit blocks (MatMulNBits, block 64, symmetric, int8 compute), embedding
                 Gather too; optionally the decoder MatMuls most sensitive to 4-bit rounding at 8 bits
                 (matmul_sensitivity, measured on held-out inputs)

Measured on this kind of CPU (AVX-512 VNNI, 1 thread, a 136M fused decoder, 100 tokens of
context): 8-bit MatMulNBits decodes ~2x faster than ORT's MatMulInteger/DynamicQuantizeMatMul
form of the same weights (6.8 vs 12.4 ms per step); at a prefill's ~292 rows the MatMulInteger form
is ~2x faster instead (0.5B-shaped gate+up 13.6 vs 30.2 ms), so a CPU export whose action is one
prefill (direct mode, parallel actions) ships its int8 decoder in that form (`int8_matmul="integer"`,
edge_vla.export.steps.choose_int8_matmul); INT4 with int8 compute (accuracy_level 4)
~3x faster than with float compute (accuracy_level 0). For TensorRT targets `int8` keeps the
MatMulInteger form (`for_tensorrt=True`), which the TensorRT lint names with its fix; static QDQ
drifts most (docs/facts.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_vla import notices
from edge_vla.deploy import memory_fit
from edge_vla.errors import EdgeVLAError

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
INT4_BLOCK = memory_fit.INT4_BLOCK  # 64: see there
INT8_BLOCK = 256
# MatMulNBits accuracy_level 4: int8 activations and int8 dot products (VNNI/AVX2 kernels); 0 would
# dequantize the weights to float32 and run float MatMuls.
INT_COMPUTE = 4
# int8's two MatMul forms and the ONNX op each writes: MatMulNBits blocks (the default) and ORT's
# MatMulInteger (quantize_dynamic).
INT8_MATMUL_OPS = {"nbits": "MatMulNBits", "integer": "MatMulInteger"}


def check_precision(precision: str, what: str = "precision") -> str:
    if precision not in PRECISIONS:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error(what, precision, list(PRECISIONS))
    return precision


def check_int4_block(block: int) -> int:
    """An INT4 block size MatMulNBits and GatherBlockQuantized take: a power of two from 16 to 256."""
    if not isinstance(block, int) or block < 16 or block > 256 or block & (block - 1):
        raise EdgeVLAError(f"INT4 block size {block!r} is not a power of two from 16 to 256",
                           "use 64 (the default: 4.5 bits per weight, llama.cpp Q4_0's), 32 or 128")
    return block


def quantize_graph(src: Path, dst: Path, precision: str, calibration: list[dict] | None = None,
                   for_tensorrt: bool = False, int8_matmul: str = "nbits", int4_block: int = INT4_BLOCK,
                   int8_nodes: list[str] | None = None) -> None:
    """Write `src` quantized to `precision` at `dst` (`calibration`: input feeds, int8-static only;
    `for_tensorrt`: int8 in ORT's MatMulInteger form, which the TensorRT lint recognises and refuses;
    `int8_matmul`: int8's MatMul form on ONNX Runtime targets, "nbits" (MatMulNBits blocks) or "integer"
    (the MatMulInteger form, faster at a prefill's hundreds of rows); `int4_block`: INT4's block size
    (larger blocks decode faster on a CPU, docs/results.md#decode-re-measured-two-runs-in-one-session));
    `int8_nodes`: int4 only, MatMuls (by node name) kept at 8 bits (mixed precision, `most_sensitive`)."""
    check_precision(precision)
    check_int4_block(int4_block)
    if int8_nodes and precision != "int4":
        raise EdgeVLAError(f"MatMuls kept at 8 bits are a mixed INT4 format; {src} is being quantized to {precision}",
                           "pass int8_nodes with precision int4 only")
    if int8_matmul not in INT8_MATMUL_OPS:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error("INT8 MatMul form", int8_matmul, INT8_MATMUL_OPS)
    notices.silence("", "onnxruntime.quantization.matmul_nbits_quantizer")
    src, dst = Path(src), Path(dst)
    integer = precision == "int8" and (for_tensorrt or int8_matmul == "integer")
    quantizer = _int8_dynamic if integer else QUANTIZERS[precision]
    try:
        with notices.root_logger_kept():
            if precision == "int4":
                _int4(src, dst, calibration, block=int4_block, int8_nodes=int8_nodes)
            else:
                quantizer(src, dst, calibration)
    except EdgeVLAError:
        raise
    except Exception as e:
        raise EdgeVLAError(f"{precision} quantization of {src.name} failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})", "try another precision") from None


def external_data_files(path: Path) -> list[str]:
    """The side files (relative to the graph's folder) holding the weights of a graph saved with
    external data, the form a graph over protobuf's 2 GB cap takes (a MiniVLA vision tower)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})


def _copy(src, dst, _):
    shutil.copyfile(src, dst)
    for name in external_data_files(src):
        shutil.copyfile(Path(src).parent / name, Path(dst).parent / name)


def _fp16(src, dst, _):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, str(dst))


def _int8_dynamic(src, dst, _, op_types=("MatMul", "Gemm", "Conv", "Gather")):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=list(op_types), extra_options={"MatMulConstBOnly": True})


def block_for(k: int, block: int, bits: int) -> int:
    """The block size a K-row weight of `bits` bits gets: of the powers of two from `block` (or, where K is
    smaller, the largest <= K: ORT's quantizer leaves a MatMul whose K is below the block size in float)
    down to 16, the one that stores the fewest bytes, padding included (ties: the larger). MatMulNBits pads
    K up to whole blocks and reads the padding at every decode step: Qwen2.5-0.5B's hidden size 896 in 8-bit
    blocks of 256 is 1024 rows, 14% more than its weights, where blocks of 128 divide it (one more fp32
    scale per 128 weights: 3%); SigLIP's 4304 (16 x 269) stays at 256 (1% padding beats 25% in scales).
    The whole-graph quantizer here and the weight-by-weight packer (edge_vla.export.nbits) both use it."""
    k = int(k)
    first = block if k >= block else max(16, 1 << (k.bit_length() - 1))

    def stored(b: int) -> float:
        n_blocks = -(-k // b)
        return n_blocks * (b * bits / 8 + 4)  # packed weights (padding included) + one fp32 scale per block

    candidates = [first >> i for i in range(first.bit_length()) if first >> i >= 16] or [first]
    return min(candidates, key=lambda b: (stored(b), -b))


def _matmul_blocks(model, block: int, bits: int) -> dict[str, int]:
    """Block size per constant-weight MatMul (block_for)."""
    inits = {i.name: i.dims for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2:
            out[n.name] = block_for(int(inits[n.input[1]][0]), block, bits)
    return out


# Weight-only algorithms of ONNX Runtime's MatMulNBitsQuantizer (`algo`): "default" rounds each block to
# the nearest level of a max-abs scale; "hqq" (half-quadratic, asymmetric with zero points) and "k_quant"
# (llama.cpp-style search for the scale) fit the scale without data; "rtn" is round-to-nearest through ORT's
# vendored Intel Neural Compressor code; "gptq" corrects the rounding error column by column on the
# Hessian of calibration inputs (`calibration`: the graph's recorded feeds).
NBITS_ALGOS = ("default", "hqq", "rtn", "k_quant", "gptq")


def _nbits(model, bits: int, block: int, op_types=("MatMul",), nodes_to_exclude=None, algo: str = "default",
           symmetric: bool = True, node_bits: dict[str, int] | None = None, calibration: list[dict] | None = None,
           accuracy_level: int = INT_COMPUTE):
    """MatMulNBits (and GatherBlockQuantized for "Gather") of every constant-weight op of `op_types`, in
    `bits`-bit blocks of `block` with `algo`; `node_bits` names nodes (by ONNX node name) quantized at other
    widths (mixed precision: e.g. the most sensitive MatMuls at 8 bits), always with the default algorithm.
    `accuracy_level`: MatMulNBits' compute (4: int8 activations and dot products; 0: float)."""
    if algo not in NBITS_ALGOS:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error("weight-only algorithm", algo, list(NBITS_ALGOS))
    for i, n in enumerate(model.graph.node):  # the quantizer selects nodes by name
        n.name = n.name or f"node_{n.op_type}_{i}"
    exclude = set(nodes_to_exclude or [])
    other = {n: b for n, b in (node_bits or {}).items() if b != bits}
    unknown = set(other) - {n.name for n in model.graph.node}
    if unknown:
        raise EdgeVLAError(f"no node named {sorted(unknown)[0]!r} in the graph to quantize at {other[sorted(unknown)[0]]} bits",
                           "name MatMul nodes of the graph (onnx.load(path).graph.node)")
    model = _nbits_pass(model, bits, block, op_types, exclude | set(other), algo, symmetric, calibration)
    for b in sorted(set(other.values()), reverse=True):
        names = {n for n, x in other.items() if x == b}
        rest = {n.name for n in model.graph.node} - names
        model = _nbits_pass(model, b, block, ("MatMul", "Gather"), rest | exclude, "default", True, None)
    for n in model.graph.node:  # one compute for every algorithm (HQQ and GPTQ leave it unset: float compute)
        if n.op_type == "MatMulNBits":
            _set_int_attr(n, "accuracy_level", accuracy_level)
    return model


def _set_int_attr(node, name: str, value: int) -> None:
    import onnx

    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _nbits_pass(model, bits, block, op_types, exclude, algo, symmetric, calibration):
    """One quantizer run per block size: `block` first (Gather too), then MatMuls whose K is below it."""
    import contextlib
    import io
    import logging
    import warnings

    import numpy as np

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    blocks = _matmul_blocks(model, block, bits)
    # It logs every node it visits at INFO; the vendored Neural Compressor code (rtn, k_quant, gptq) logs a
    # "consider cupy" line per node and prints a progress bar; HQQ warns that torch wraps a read-only array.
    logs = [logging.getLogger(n) for n in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.WARNING)
    try:
        for b in sorted(set(blocks.values()) | {block}, reverse=True):
            skip = set(exclude) | {name for name, nb in blocks.items() if nb != b}
            ops = tuple(op_types) if b == block else ("MatMul",)
            # The named algorithms quantize MatMuls; an embedding Gather always takes the default blocks.
            passes = [(algo, ("MatMul",)), ("default", ("Gather",))] if algo != "default" else [("default", ops)]
            for a, o in passes:
                o = tuple(x for x in o if x in ops)
                if not o:
                    continue
                q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=b, is_symmetric=symmetric,
                                             accuracy_level=INT_COMPUTE, nodes_to_exclude=sorted(skip),
                                             op_types_to_quantize=o, quant_axes=(("MatMul", 0), ("Gather", 1)),
                                             algo_config=_algo_config(a, bits, b, o, calibration))
                # All-zero rows (a released vocabulary padded past its tokenizer) divide 0 by a 0 scale:
                # numpy warns, the rows are never looked up.
                with np.errstate(divide="ignore", invalid="ignore"), contextlib.redirect_stdout(io.StringIO()), \
                        warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    q.process()
                model = q.model.model if hasattr(q.model, "model") else q.model
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return model


def _algo_config(algo, bits, block, op_types, calibration):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if algo == "default":
        return None  # the quantizer builds DefaultWeightOnlyQuantConfig from its own arguments
    if algo == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=op_types)
    if bits != 4:
        raise EdgeVLAError(f"the {algo} algorithm writes 4-bit weights only", "use algo default or hqq for 8 bits")
    if algo == "rtn":
        return mnq.RTNWeightOnlyQuantConfig(op_types_to_quantize=op_types)
    if algo == "k_quant":
        return mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
    if not calibration:
        raise EdgeVLAError("GPTQ needs calibration inputs", "record the graph's feeds on held-out data")
    return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Feeds(calibration), op_types_to_quantize=op_types)


def quantize_nbits(src: Path, dst: Path, bits: int = 4, block: int = 32, algo: str = "default",
                   symmetric: bool = True, gather: bool = True, node_bits: dict[str, int] | None = None,
                   calibration: list[dict] | None = None, accuracy_level: int = INT_COMPUTE) -> None:
    """Write `src` with its constant MatMul weights (and the embedding Gather with `gather`) as `bits`-bit
    blocks: the levers the INT4 format is tuned with (benchmarks/int4_accuracy.py)."""
    import onnx

    notices.silence("", "onnxruntime.quantization.matmul_nbits_quantizer")
    with notices.root_logger_kept():
        model = _nbits(onnx.load(str(src)), bits, block, ("MatMul", "Gather") if gather else ("MatMul",),
                       algo=algo, symmetric=symmetric, node_bits=node_bits, calibration=calibration,
                       accuracy_level=accuracy_level)
    onnx.save(model, str(dst))


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
    """onnxruntime CalibrationDataReader over a list of input dicts (iterable too: GPTQ iterates a copy)."""

    def __init__(self, feeds):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):
        return iter(self._feeds)


def _int8_static(src, dst, calibration):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise EdgeVLAError("static INT8 needs calibration inputs", "pass --data with held-out samples (or use --int8)")
    quantize_static(str(src), str(dst), _Feeds(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"MatMulConstBOnly": True})


def _int4(src, dst, _, block: int = INT4_BLOCK, int8_nodes: list[str] | None = None):
    import onnx

    onnx.save(_nbits(onnx.load(str(src)), bits=4, block=block, op_types=("MatMul", "Gather"),
                     node_bits={n: 8 for n in int8_nodes or ()}), str(dst))


def weight_matmuls(path: Path) -> list[str]:
    """The names of the graph's MatMuls with a constant weight: what weight-only quantization rounds."""
    import onnx

    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def matmul_sensitivity(src: Path, feeds: list[dict], work: Path, bits: int = 4, block: int = INT4_BLOCK) -> dict[str, float]:
    """{MatMul name: how far the graph's first output moves (relative L2 error, mean over `feeds`) when only
    that MatMul's weight is `bits`-bit blocks of `block`}: the ranking mixed-precision export keeps at 8 bits.
    `work`: a directory for the one-MatMul graphs (each removed after use)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    if not feeds:
        raise EdgeVLAError(f"no inputs to measure {Path(src).name}'s sensitivity on", "pass held-out observations")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    ref = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    ref_out = [ref.run(None, f)[0] for f in feeds]
    names = weight_matmuls(src)
    out: dict[str, float] = {}
    for name in names:
        m = onnx.load(str(src))
        dst = Path(work) / f".sensitivity-{len(out)}.onnx"
        side = dst.with_name(dst.name + ".data")
        try:
            with notices.root_logger_kept():  # importing ORT's quantizer sets the root logger to INFO
                one = _nbits(m, bits, block, ("MatMul",), nodes_to_exclude=[n.name for n in m.graph.node if n.name != name])
            # external data: the graph is still almost all fp32, and protobuf caps a file at 2 GB
            onnx.save(one, str(dst), save_as_external_data=True, location=side.name)
            sess = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
            err = [np.linalg.norm(sess.run(None, f)[0] - r) / max(float(np.linalg.norm(r)), 1e-9)
                   for f, r in zip(feeds, ref_out)]
        finally:
            dst.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
        out[name] = float(np.mean(err))
    return out


def most_sensitive(scores: dict[str, float], k: int) -> list[str]:
    """The `k` names with the largest scores, most sensitive first."""
    return sorted(scores, key=lambda n: -scores[n])[:k]


QUANTIZERS = {"fp32": _copy, "fp16": _fp16, "int8": _int8_blocks, "int8-static": _int8_static, "int4": _int4}
