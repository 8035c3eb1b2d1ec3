"""TensorRT-readiness lint for ONNX graphs: catch here, on a CPU, what would fail on the board.

TensorRT cannot run in this workplace (docs/facts.md), so `edge-vla export --target <jetson|cuda>`
runs this lint instead: every finding names the node and the fix. Errors are what TensorRT's
ONNX parser or builder refuses; warnings are what it accepts with a cast or a slower path.

Checks
- operators the parser has no importer for (`UNSUPPORTED_OPS`), and any node outside the
  default ONNX domain (ONNX Runtime contrib ops such as MatMulNBits, fused com.microsoft ops from
  ORT graph optimisation) - TensorRT would need a plugin for each;
- data types TensorRT has no tensor type for (double, string, complex, 16/32/64-bit unsigned,
  int16); INT64 weights, which TensorRT narrows to INT32 (values out of range are clamped);
- dynamic input dimensions that no optimisation profile covers (a profile gives every dynamic
  dim a min/opt/max);
- Q/DQ placement TensorRT's explicit-quantization path cannot use: non-zero zero-points
  (symmetric only; ONNX Runtime's static quantizer is asymmetric by default), UINT8/INT32 Q/DQ
  (QUInt8 activations, quantized biases), scales that are not build-time constants, per-channel activations, per-channel MatMul
  weights quantized along K, INT4 on activations, Q nodes not followed by DQ, FP8 on a target
  without FP8, and (warning) activation Q/DQ pairs before ops TensorRT cannot fuse them into.

`UNSUPPORTED_OPS` is the "N" rows of onnx-tensorrt's docs/operators.md (TensorRT 8.5 matrix,
github.com/onnx/onnx-tensorrt), minus those later versions added (LayerNormalization, 8.6); INT4
DequantizeLinear with block_size is TensorRT 10's weight-only INT4 path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.deploy.targets import TARGETS, Target, get_target
from edge_vla.tensorrt.int4_rewrite import prepare_for_tensorrt

UNSUPPORTED_OPS = {
    "Bernoulli", "BitShift", "BlackmanWindow", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "Hardmax", "IsInf", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringNormalizer", "TfIdfVectorizer", "Unique",
}
# Why a dynamic-quantization op is there and what to do instead (ORT's CPU quantizers emit these).
_QUANT_FIX = "ONNX Runtime's dynamic INT8 is CPU-only: export with --int8-static (QDQ) or --fp16 for TensorRT targets"
OP_FIXES = {
    "MatMulInteger": _QUANT_FIX, "ConvInteger": _QUANT_FIX, "DynamicQuantizeLinear": _QUANT_FIX,
    "QLinearMatMul": _QUANT_FIX, "QLinearConv": _QUANT_FIX,
    "MatMulNBits": "TensorRT's INT4 path is weight-only DequantizeLinear(int4, block_size) before MatMul: "
                   "export/build-engine rewrite it so (int4_rewrite.prepare_for_tensorrt); lint the prepared graph",
    "GatherBlockQuantized": "TensorRT has no INT4 Gather: prepare_for_tensorrt dequantizes the table to float",
}

# onnx.TensorProto data types
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE, UINT32, UINT64 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
COMPLEX64, COMPLEX128, BFLOAT16 = 14, 15, 16
FLOAT8 = {17, 18, 19, 20}  # e4m3fn, e4m3fnuz, e5m2, e5m2fnuz
UINT4, INT4 = 21, 22
NO_TENSORRT_TYPE = {STRING: "string", COMPLEX64: "complex64", COMPLEX128: "complex128", UINT16: "uint16",
                    UINT32: "uint32", UINT64: "uint64", INT16: "int16", UINT4: "uint4"}
INT32_MAX = 2**31 - 1
INT64_SENTINELS = {2**63 - 1, -(2**63)}  # "to the end" in Slice: the parser clamps these safely

# Where TensorRT fuses an activation Q/DQ pair (into the op's INT8 kernel) or moves DQ through it.
QDQ_FUSES_INTO = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "AveragePool", "GlobalAveragePool",
                  "MaxPool", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                  "Gather", "Split", "Identity", "Relu", "Pad", "QuantizeLinear", "Mul"}


@dataclass
class Finding:
    severity: str  # "error" (TensorRT refuses) | "warning" (accepted with a cast or a slower path)
    code: str
    message: str
    node: str | None = None
    fix: str | None = None

    def line(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        fix = f" — {self.fix}" if self.fix else ""
        return f"{self.severity}: {self.code}{where}: {self.message}{fix}"


@dataclass
class LintReport:
    graph: str
    target: str
    findings: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> set:
        return {f.code for f in self.findings}

    def summary(self, max_nodes: int = 3) -> str:
        """One line per kind of finding; the nodes that share it are listed together."""
        head = f"{self.graph}: {len(self.errors)} error(s), {len(self.warnings)} warning(s) for TensorRT on {self.target}"
        groups: dict[tuple, list] = {}
        for f in self.findings:
            key = (f.severity, f.code, f.message if f.node is None else f.message.replace(f.node, "{}"), f.fix)
            groups.setdefault(key, []).append(f)
        lines = [head]
        for (sev, code, _, fix), fs in groups.items():
            first = fs[0]
            nodes = [f.node for f in fs if f.node]
            where = ""
            if nodes:
                more = f" +{len(nodes) - max_nodes} more" if len(nodes) > max_nodes else ""
                where = f" [{', '.join(nodes[:max_nodes])}{more}]"
            lines.append(f"  {sev}: {code}{where}: {first.message}" + (f" — {fix}" if fix else ""))
        return "\n".join(lines)

    def raise_on_error(self) -> None:
        if self.errors:
            first = self.errors[0]
            more = f" (+{len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise EdgeVLAError(f"{self.graph} is not TensorRT-ready for {self.target}: {first.message}"
                               f"{' at ' + first.node if first.node else ''}{more}", first.fix)

    def to_dict(self) -> dict:
        return {"graph": self.graph, "target": self.target, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings]}


# --- optimisation profiles -----------------------------------------------------------------------


def input_dims(model) -> dict:
    """{input name: [int | symbol | None, ...]} for the graph inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        out[inp.name] = dims
    return out


def profiles_from_dim_ranges(model, dim_ranges: list[dict]) -> list[dict]:
    """Turn symbol ranges [{"batch": (1,1,1), "seq": (1,64,512)}, ...] into TensorRT profiles.

    Each profile is {input name: (min shape, opt shape, max shape)}, as
    `IOptimizationProfile.set_shape` takes them. A symbol missing from the ranges raises.
    """
    profiles = []
    for ranges in dim_ranges:
        prof = {}
        for name, dims in input_dims(model).items():
            if all(isinstance(d, int) and d > 0 for d in dims):
                continue
            shapes = ([], [], [])
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    lo = opt = hi = d
                elif d in ranges:
                    lo, opt, hi = ranges[d]
                else:
                    raise EdgeVLAError(f"input `{name}` axis {axis} is dynamic (`{d}`) and the profile gives it no range",
                                       f"add `{d}` to the profile's dim ranges")
                for s, v in zip(shapes, (lo, opt, hi)):
                    s.append(int(v))
            prof[name] = tuple(tuple(s) for s in shapes)
        profiles.append(prof)
    return profiles


def _check_profiles(model, profiles: list[dict] | None, report: LintReport) -> None:
    dynamic = {n: d for n, d in input_dims(model).items() if not all(isinstance(x, int) and x > 0 for x in d)}
    if not dynamic:
        return
    if not profiles:
        for name, dims in dynamic.items():
            report.findings.append(Finding(
                "error", "dynamic-shape-uncovered",
                f"input `{name}` has dynamic dims {dims} and no optimisation profile covers them", name,
                "give build-engine profiles (min/opt/max per dynamic input); the bundle's defaults cover prefill and decode"))
        return
    for i, prof in enumerate(profiles):
        for name, dims in dynamic.items():
            if name not in prof:
                report.findings.append(Finding("error", "dynamic-shape-uncovered",
                                               f"profile {i} gives no shapes for dynamic input `{name}` {dims}", name,
                                               "add min/opt/max shapes for it to every profile"))
                continue
            lo, opt, hi = (tuple(s) for s in prof[name])
            if not (len(lo) == len(opt) == len(hi) == len(dims)):
                report.findings.append(Finding("error", "profile-rank", f"profile {i} shapes for `{name}` have rank "
                                               f"{len(lo)}/{len(opt)}/{len(hi)}, the input has rank {len(dims)}", name))
                continue
            for axis, d in enumerate(dims):
                a, o, b = lo[axis], opt[axis], hi[axis]
                if isinstance(d, int) and d > 0 and not (a == o == b == d):
                    report.findings.append(Finding("error", "profile-static-mismatch",
                                                   f"profile {i} sets static axis {axis} of `{name}` to {a}/{o}/{b}, the graph fixes it at {d}", name))
                elif not (0 <= a <= o <= b):
                    report.findings.append(Finding("error", "profile-order",
                                                   f"profile {i} axis {axis} of `{name}` has min/opt/max {a}/{o}/{b}", name,
                                                   "use 0 <= min <= opt <= max"))


# --- the lint ------------------------------------------------------------------------------------


def _load(model_or_path):
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("onnx", "the TensorRT lint", "pip install 'edge-vla[export]'") from None
    if isinstance(model_or_path, (str, Path)):
        p = Path(model_or_path)
        if not p.is_file():
            raise EdgeVLAError(f"no ONNX graph at {p}", "pass a .onnx file from a bundle")
        try:
            # Weights in side files are needed for the INT64/zero-point value checks.
            return onnx.load(str(p), load_external_data=True), p.name
        except Exception as e:
            raise EdgeVLAError(f"{p} is not a readable ONNX graph ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                               "re-export it") from None
    return model_or_path, model_or_path.graph.name or "graph"


def _all_nodes(graph):
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def lint_onnx(model_or_path, target: str | Target = "orin-agx-64", profiles: list[dict] | None = None,
              dim_ranges: list[dict] | None = None) -> LintReport:
    """Lint one ONNX graph (path or ModelProto) for TensorRT on `target`.

    `profiles`: TensorRT optimisation profiles ({input: (min, opt, max)}) or `dim_ranges`:
    symbol ranges ({"batch": (1, 1, 1), ...}) turned into profiles; without either, every
    dynamic input is reported.
    """
    from onnx import numpy_helper

    t = get_target(target)
    model, name = _load(model_or_path)
    report = LintReport(graph=name, target=t.name)
    add = report.findings.append
    graph = model.graph

    consts = {i.name: i for i in graph.initializer}
    for node in _all_nodes(graph):
        if node.op_type == "Constant" and node.output:
            v = _attr(node, "value")
            if v is not None:
                consts[node.output[0]] = v
    consumers: dict[str, list] = {}
    for node in _all_nodes(graph):
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    # 1. operators
    for node in _all_nodes(graph):
        label = node.name or node.op_type
        if node.domain not in ("", "ai.onnx"):
            add(Finding("error", "custom-op", f"{node.domain}::{node.op_type} is not an ONNX standard op", label,
                        OP_FIXES.get(node.op_type, "TensorRT needs a plugin for it; export without ONNX Runtime "
                                     "graph optimisations (they fuse into com.microsoft ops)")))
        elif node.op_type in UNSUPPORTED_OPS:
            add(Finding("error", "unsupported-op", f"TensorRT's ONNX parser does not import {node.op_type}", label,
                        OP_FIXES.get(node.op_type, "replace it with supported ops before export")))

    # 2. data types: tensors the network would carry, and weights
    typed = list(graph.input) + list(graph.output) + list(graph.value_info)
    for vi in typed:
        et = vi.type.tensor_type.elem_type
        if et in NO_TENSORRT_TYPE:
            add(Finding("error", "unsupported-dtype", f"tensor `{vi.name}` is {NO_TENSORRT_TYPE[et]}", vi.name,
                        "cast to int32/float in the exporter"))
        elif et == DOUBLE:
            add(Finding("error", "unsupported-dtype", f"tensor `{vi.name}` is float64", vi.name, "use float32"))
        elif et in FLOAT8 and "fp8" not in t.precisions:
            add(Finding("error", "precision-unsupported", f"tensor `{vi.name}` is FP8; {t.name} has no FP8", vi.name,
                        "export int8 or int4 for this target"))
    for node in _all_nodes(graph):
        if node.op_type == "Cast" and _attr(node, "to") in (set(NO_TENSORRT_TYPE) | {DOUBLE}):
            add(Finding("error", "unsupported-dtype", f"Cast to an unsupported type ({_attr(node, 'to')})",
                        node.name or "Cast", "cast to float32/int32 instead"))
    int64_ok = 0
    for init in graph.initializer:
        if init.data_type in NO_TENSORRT_TYPE:
            add(Finding("error", "unsupported-dtype", f"weight `{init.name}` is {NO_TENSORRT_TYPE[init.data_type]}",
                        init.name))
        elif init.data_type == DOUBLE:
            add(Finding("warning", "double-weights", f"weight `{init.name}` is float64; the parser casts it to float32",
                        init.name, "store it as float32"))
        elif init.data_type == INT64:
            vals = numpy_helper.to_array(init).ravel()
            bad = [int(v) for v in vals if abs(int(v)) > INT32_MAX and int(v) not in INT64_SENTINELS]
            if bad:
                add(Finding("error", "int64-out-of-range",
                            f"INT64 weight `{init.name}` holds {bad[0]}, outside INT32; TensorRT narrows INT64 weights "
                            "to INT32 and would clamp it", init.name, "store it as int32 within range"))
            else:
                int64_ok += 1
    if int64_ok:
        add(Finding("warning", "int64-weights", f"{int64_ok} INT64 weight(s) (shape constants, indices); "
                    "TensorRT narrows them to INT32 (values are in range)", None,
                    "harmless; export int32 constants to silence it"))

    # 3. dynamic shapes vs optimisation profiles
    if dim_ranges is not None:
        profiles = profiles_from_dim_ranges(model, dim_ranges)
    _check_profiles(model, profiles, report)

    # 4. quantization placement
    producers = {o: n for n in _all_nodes(graph) for o in n.output}

    def is_weight(tensor: str) -> bool:
        # a constant, or a constant fed through QuantizeLinear (the Q->DQ weight form TensorRT folds)
        if tensor in consts:
            return True
        q = producers.get(tensor)
        return q is not None and q.op_type == "QuantizeLinear" and q.input[0] in consts

    for node in _all_nodes(graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = node.name or node.op_type
        is_dq = node.op_type == "DequantizeLinear"
        data_name = node.input[0]
        scale_name = node.input[1] if len(node.input) > 1 else ""
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if scale_name not in consts:
            add(Finding("error", "qdq-scale-not-constant", f"{node.op_type} scale `{scale_name}` is computed at run time",
                        label, "TensorRT needs build-time constant scales: fold them into initializers"))
            continue
        scale = numpy_helper.to_array(consts[scale_name])
        # The quantized type: the zero-point's type; else Q's output_dtype (default uint8), DQ's constant input.
        qtype = None
        if zp_name and zp_name in consts:
            qtype = consts[zp_name].data_type
            if numpy_helper.to_array(consts[zp_name]).astype("int64").any():
                add(Finding("error", "qdq-zero-point", f"{node.op_type} has a non-zero zero-point (asymmetric)", label,
                            "TensorRT quantizes symmetrically: quantize with ActivationSymmetric/WeightSymmetric and int8"))
        elif not is_dq:
            qtype = _attr(node, "output_dtype") or UINT8
        elif data_name in consts:
            qtype = consts[data_name].data_type
        weight = is_weight(data_name)
        if qtype == UINT8:
            add(Finding("error", "qdq-uint8", f"{node.op_type} is UINT8 (activation_type=QUInt8)", label,
                        "use int8 Q/DQ: quantize_static(..., activation_type=QInt8, weight_type=QInt8)"))
        elif qtype == INT32:
            add(Finding("error", "qdq-int32", f"{node.op_type} on INT32 (a quantized bias)", label,
                        "leave biases in float: quantize with extra_options={'QuantizeBias': False}"))
        elif qtype in FLOAT8 and "fp8" not in t.precisions:
            add(Finding("error", "precision-unsupported", f"FP8 {node.op_type} on {t.name}, which has no FP8", label,
                        "export int8 or int4 for this target"))
        elif qtype in (INT4, UINT4):
            if not weight:
                add(Finding("error", "qdq-int4-activation", f"INT4 {node.op_type} on an activation", label,
                            "TensorRT's INT4 is weight-only: quantize weights only"))
            elif qtype == UINT4:
                add(Finding("error", "qdq-uint4", "UINT4 weights", label, "use signed int4 with zero-point 0"))
            elif "int4" not in t.precisions:
                add(Finding("error", "precision-unsupported", f"INT4 weights on {t.name}", label))
        blocked = bool(_attr(node, "block_size", 0))
        if scale.size > 1 and not weight:
            add(Finding("error", "qdq-per-channel-activation",
                        f"{node.op_type} quantizes an activation per channel ({scale.size} scales)", label,
                        "TensorRT takes per-tensor scales for activations"))
        if is_dq and weight and scale.size > 1 and not blocked:
            axis = _attr(node, "axis", 1)
            src = consts[data_name] if data_name in consts else consts[producers[data_name].input[0]]
            w_rank = len(src.dims)
            for c in consumers.get(node.output[0], []):
                if c.op_type in ("MatMul", "Gemm") and len(c.input) > 1 and c.input[1] == node.output[0]:
                    out_axis = 0 if c.op_type == "Gemm" and _attr(c, "transB", 0) else w_rank - 1
                    if axis % w_rank != out_axis:
                        add(Finding("error", "qdq-weight-axis",
                                    f"per-channel weight scales along axis {axis} (K) of a {c.op_type} weight", label,
                                    f"quantize per output channel (axis {out_axis})"))
        if not is_dq:
            nxt = consumers.get(node.output[0], [])
            if not nxt or any(c.op_type != "DequantizeLinear" for c in nxt):
                add(Finding("error", "qdq-dangling-q", "QuantizeLinear output does not go (only) into DequantizeLinear",
                            label, "TensorRT runs Q/DQ in pairs: put a DequantizeLinear right after every QuantizeLinear"))
            if weight:
                continue
            for dq in nxt:
                if dq.op_type != "DequantizeLinear":
                    continue
                users = consumers.get(dq.output[0], [])
                lonely = [u.op_type for u in users if u.op_type not in QDQ_FUSES_INTO]
                if users and len(lonely) == len(users):
                    add(Finding("warning", "qdq-unfusable",
                                f"Q/DQ pair feeds only {sorted(set(lonely))}, which TensorRT cannot run in INT8", label,
                                "drop this pair (it only costs reformat kernels) or quantize the op's other inputs"))
    return report


def lint_graphs(graph_paths: dict, target: str | Target, dim_ranges: list[dict] | None = None) -> dict:
    """Lint several graphs ({name: path}); returns {name: LintReport}."""
    return {name: lint_onnx(p, target, dim_ranges=dim_ranges) for name, p in graph_paths.items()}


# Step tokens the decode profile allows: one generated token, or a forced multi-token prefix
# (" ACTION:" or a thinking recipe's filler) appended in one step.
MAX_STEP_TOKENS = 8


def default_dim_ranges(model, max_free_tokens: int = 512, max_prompt_tokens: int = 128) -> list[dict]:
    """Two optimisation profiles for the bundle graphs' symbolic dims (`batch`, `seq`, `past`).

    prefill: the prefix + prompt (+ " ACTION:") in one call with an empty cache;
    decode:  1..MAX_STEP_TOKENS new tokens on a cache up to the longest full-mode sequence.
    opt values are the typical call (memory_fit's default prompt and reasoning lengths).
    """
    from edge_vla.deploy.memory_fit import ACTION_PREFIX_TOKENS, model_shape, sequence_length

    shape = model_shape(model)
    prefill_opt = sequence_length(shape, "direct")["prefill"]
    prefill_max = shape.prefix_tokens + max_prompt_tokens + ACTION_PREFIX_TOKENS
    total_opt = sequence_length(shape, "full")["total"]
    total_max = prefill_max + max_free_tokens + ACTION_PREFIX_TOKENS + shape.n_action_tokens
    # The standalone action-head graph (edge_vla.kernels.onnx_graph) takes 1..n_action_tokens hidden rows.
    n_act = shape.n_action_tokens
    rows = (1, 1, max(n_act, 1))
    return [
        {"batch": (1, 1, 1), "seq": (1, prefill_opt, prefill_max), "past": (0, 0, 0), "rows": rows, "tokens": rows},
        {"batch": (1, 1, 1), "seq": (1, 1, MAX_STEP_TOKENS), "past": (1, total_opt, total_max), "rows": rows,
         "tokens": rows},
    ]


def lint_for_target(graph_dir, graphs: dict, model_config, target: str, report=print) -> dict | None:
    """`edge-vla export --target NAME` for a TensorRT target: lint every graph, refuse on errors.

    Returns {role: LintReport.to_dict()} for the manifest; None for targets without TensorRT.
    """
    if target not in TARGETS or not get_target(target).uses_tensorrt:
        return None
    import onnx


    ranges = default_dim_ranges(model_config)
    reports = {}
    for role, g in graphs.items():
        # What build-engine will parse: ONNX Runtime's INT4 ops rewritten into TensorRT's INT4 form.
        model, notes = prepare_for_tensorrt(onnx.load(str(Path(graph_dir) / g["file"])))
        model.graph.name = g["file"]
        reports[role] = lint_onnx(model, target, dim_ranges=ranges)
        for note in notes[:1]:
            report(f"TensorRT prep: {note}")
    for r in reports.values():
        report(f"TensorRT lint: {r.summary()}")
    for r in reports.values():
        r.raise_on_error()
    return {role: r.to_dict() for role, r in reports.items()}
