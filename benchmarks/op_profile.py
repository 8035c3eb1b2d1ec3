"""Where a bundle's decoder time goes, per ONNX op type, and how far each part is from this CPU's ceiling.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/op_profile.py BUNDLE [--prefill 293] [--past 286] [--json OUT]

Issue #20 asks why edge-vla's action and decode are where they are against the peers. This profiles the
bundle's decoder graph (`decoder.onnx`) in two phases, one intra-op thread, with ONNX Runtime's profiler:

  prefill  --prefill positions into an empty cache: a direct-mode action's one decoder pass
  decode   one position after --past cached ones: one decode step

and measures, in the same process, the two ceilings those phases run into:

  - the int8 GEMM rate: ONNX Runtime's MatMulInteger (MLAS, the kernel under DynamicQuantizeMatMul) alone
    on each of the decoder's own weight shapes at M = --prefill, best of 5 (GOP/s, CPU time);
  - the copy bandwidth (`edge_vla.deploy.roofline.measure_memory_bandwidth`, the peers table's roofline).

Per phase it prints each op type's share of the profiled kernel time and its CPU ms (share x the phase's
median CPU time), then: the weight matmuls' rate (prefill, GOP/s, against the standalone GEMM rate) or
bytes per second (decode, against the bandwidth), and the phase's bound if every other op took no time.
Timings are this run's; the shares and ratios are what carries over.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from edge_vla.artifacts.bundle import decoder_feeds, load_bundle

# Ops that multiply by a weight initializer, and the op types ONNX Runtime's graph fusions run them as
# (its profiler names the fused kernel: MatMulInteger + its activation's DynamicQuantizeLinear and the scale's Mul
# become one DynamicQuantizeMatMul; the quantization of the activation is part of an int8 matmul's cost).
WEIGHT_MATMULS = {"MatMulInteger": ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear"),
                  "MatMulNBits": ("MatMulNBits",),
                  "MatMul": ("MatMul", "FusedMatMul", "Gemm")}


def weight_matmuls(decoder: Path) -> list[dict]:
    """Every matmul by a constant weight in the graph: {name, op, K, N, bytes} (bytes: the weight and its scales)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(decoder), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_MATMULS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        consts = [numpy_helper.to_array(inits[i]) for i in node.input[1:] if i in inits]
        nbytes = int(sum(a.nbytes for a in consts))
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            k, n = int(attrs["K"]), int(attrs["N"])
        else:
            k, n = (int(d) for d in inits[node.input[1]].dims[-2:])
        out.append({"name": node.name, "op": node.op_type, "K": k, "N": n, "bytes": nbytes})
    if not out:
        raise SystemExit(f"{decoder}: no matmul by a constant weight found; is this an edge-vla bundle's decoder.onnx?")
    return out


def _feeds(decoder_info: dict, seq: int, past: int) -> dict:
    """Random new positions after a random cache of `past` positions, as the bundle's decoder takes them."""
    rng = np.random.default_rng(0)
    kv = (1, decoder_info["n_kv_heads"], past, decoder_info["head_dim"])
    cache = [(rng.standard_normal(kv) * 0.1).astype(np.float32) for _ in decoder_info["inputs"][1:]]
    embeds = (rng.standard_normal((1, seq, decoder_info["hidden_size"])) * 0.1).astype(np.float32)
    return decoder_feeds(decoder_info, embeds, cache)


def profile_phase(decoder: Path, decoder_info: dict, seq: int, past: int, runs: int, warmup: int = 2) -> dict:
    """Median CPU ms of `runs` runs, and each op type's share of the profiled kernel time (`decoder_info`: the
    manifest's graphs.decoder)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "prof")
        s = ort.InferenceSession(str(decoder), so, providers=["CPUExecutionProvider"])
        feeds = _feeds(decoder_info, seq, past)
        cpu = []
        for i in range(warmup + runs):
            t0 = time.process_time()
            s.run(None, feeds)
            if i >= warmup:
                cpu.append((time.process_time() - t0) * 1e3)
        events = json.loads(Path(s.end_profiling()).read_text())
    measured = [e for e in events if e.get("name") == "model_run"][warmup:]
    per_op = Counter()
    for run in measured:
        t0, t1 = run["ts"], run["ts"] + run["dur"]
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and t0 <= e["ts"] <= t1:
                per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    return {"positions": seq, "past": past, "cpu_ms": float(np.median(cpu)),
            "share": {op: v / total for op, v in per_op.most_common()}}


def int8_gemm_gops(shapes: set[tuple[int, int]], m: int, repeats: int = 5) -> dict:
    """MatMulInteger alone (uint8 x int8 -> int32, one thread) per (K, N) at M = m: best-of GOP/s, CPU time."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rates = {}
    for k, n in sorted(shapes):
        w = np.random.default_rng(0).integers(-127, 128, (k, n), dtype=np.int8)
        g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "W"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
                              [numpy_helper.from_array(w, "W")])
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                 so, providers=["CPUExecutionProvider"])
        a = np.random.default_rng(1).integers(0, 256, (m, k), dtype=np.uint8)
        s.run(None, {"A": a})
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            s.run(None, {"A": a})
            best = min(best, time.process_time() - t0)
        rates[(k, n)] = 2.0 * m * k * n / best / 1e9
    return rates


def analyse(bundle: Path, prefill: int, past: int, runs: int) -> dict:
    from edge_vla.deploy.roofline import measure_memory_bandwidth

    decoder = bundle / "decoder.onnx"
    if not decoder.is_file():
        raise SystemExit(f"{bundle}: no decoder.onnx; pass an edge-vla bundle directory (edge-vla export ... -o DIR)")
    info = load_bundle(bundle, verify=False).graphs["decoder"]
    mms = weight_matmuls(decoder)
    ops = {kernel for m in mms for kernel in WEIGHT_MATMULS[m["op"]]}
    pre = profile_phase(decoder, info, prefill, 0, max(1, runs // 4))
    dec = profile_phase(decoder, info, 1, past, runs)
    rates = int8_gemm_gops({(m["K"], m["N"]) for m in mms}, prefill)
    bandwidth = max(measure_memory_bandwidth() for _ in range(3))

    gemm_share_pre = sum(pre["share"].get(op, 0.0) for op in ops)
    gemm_ms_pre = gemm_share_pre * pre["cpu_ms"]
    gop = sum(2.0 * prefill * m["K"] * m["N"] for m in mms) / 1e9
    at_kernel_rate_ms = sum(2.0 * prefill * m["K"] * m["N"] / rates[(m["K"], m["N"])] / 1e6 for m in mms)
    pre["weight_matmuls"] = {
        "ops": sorted(ops), "gop": gop, "cpu_ms": gemm_ms_pre, "gops": gop / gemm_ms_pre * 1e3,
        "standalone_int8_gemm_ms": at_kernel_rate_ms,
        "of_standalone_rate": at_kernel_rate_ms / gemm_ms_pre,
        "other_ops_ms": pre["cpu_ms"] - gemm_ms_pre,
    }
    gemm_share_dec = sum(dec["share"].get(op, 0.0) for op in ops)
    gemm_ms_dec = gemm_share_dec * dec["cpu_ms"]
    weight_bytes = sum(m["bytes"] for m in mms)
    roof_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    dec["weight_matmuls"] = {
        "ops": sorted(ops), "bytes": weight_bytes, "cpu_ms": gemm_ms_dec, "gb_s": weight_bytes / gemm_ms_dec / 1e6,
        "roofline_ms": roof_ms, "of_roofline": roof_ms / gemm_ms_dec, "step_of_roofline": roof_ms / dec["cpu_ms"],
        "other_ops_ms": dec["cpu_ms"] - gemm_ms_dec,
    }
    return {"bundle": str(bundle), "bandwidth_gbs": bandwidth,
            "int8_gemm_gops": {f"{k}x{n}": r for (k, n), r in rates.items()},
            "prefill": pre, "decode": dec}


def report(r: dict) -> str:
    lines = [f"{r['bundle']}: copy bandwidth {r['bandwidth_gbs']:.1f} GB/s; MatMulInteger alone (M={r['prefill']['positions']}): "
             + ", ".join(f"{s} {g:.0f}" for s, g in r["int8_gemm_gops"].items()) + " GOP/s"]
    for phase in ("prefill", "decode"):
        p = r[phase]
        lines.append(f"\n{phase}: {p['positions']} position(s) after {p['past']} cached, {p['cpu_ms']:.2f} ms CPU (median)")
        for op, share in p["share"].items():
            if share >= 0.005:
                lines.append(f"  {op:34s} {share * p['cpu_ms']:9.2f} ms  {100 * share:5.1f}%")
        w = p["weight_matmuls"]
        if phase == "prefill":
            lines.append(f"  weight matmuls: {w['gop']:.1f} GOP at {w['gops']:.0f} GOP/s = {100 * w['of_standalone_rate']:.0f}% of "
                         f"MatMulInteger's standalone rate ({w['standalone_int8_gemm_ms']:.1f} ms); other ops {w['other_ops_ms']:.1f} ms")
        else:
            lines.append(f"  weight matmuls: {w['bytes'] / 1e6:.1f} MB at {w['gb_s']:.1f} GB/s = {100 * w['of_roofline']:.0f}% of the "
                         f"copy roofline ({w['roofline_ms']:.2f} ms); the whole step {100 * w['step_of_roofline']:.0f}%; "
                         f"other ops {w['other_ops_ms']:.2f} ms")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prefill", type=int, default=293, help="positions of the prefill pass (default: a 0.5B VLA's "
                    "257 image + 29 prompt + 7 action placeholders)")
    ap.add_argument("--past", type=int, default=286, help="cached positions before the decode step")
    ap.add_argument("--runs", type=int, default=12, help="decode steps profiled (the prefill: a quarter, at least 1)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    a = ap.parse_args(argv)
    r = analyse(a.bundle, a.prefill, a.past, a.runs)
    print(report(r))
    if a.json:
        from edge_vla.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(r, indent=1))


if __name__ == "__main__":
    sys.exit(main())
