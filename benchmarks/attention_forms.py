"""One decode step's attention, two ways, on this CPU: is a faster attention than ORT's GroupQueryAttention within reach?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attention_forms.py [--past 290 560] [--layers 24] [--repeats 3]

The op profile (`benchmarks/op_profile.py`) puts ONNX Runtime's CPU GroupQueryAttention at ~13% of an INT8
decode step of the Qwen2.5-0.5B-shaped decoder, and it is the part between MatMulNBits (86% of the copy
roofline) and the issue's 80%-of-roofline bar. This builds `--layers` attention-only layers chained in one
graph (Qwen2.5-0.5B's 14 query / 2 KV heads of 64, rotary included, one new token after `--past` cached
ones) and times, fresh data, one intra-op thread, CPU time:

  gqa     GroupQueryAttention (rotary inside) with the cache in place: one buffer per layer bound as both
          past and present (IOBinding), what `OrtBackend` runs
  matmul  plain ops: RotaryEmbedding on q and k, the 14 queries grouped as 7 per KV head so one batched
          MatMul reads each KV head once (no repeat of the cache), keys cached transposed (B, kv, d, L),
          Softmax, MatMul; the new key and value appended by Concat (the cache fed back, copied each step)

Both give the same output (checked to 1e-5). Attention alone, with the cache hot in the caches; in a real
step the weights stream through between layers, so what the table says is an upper bound on the gain.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _rope(head_dim: int, positions: int, theta: float = 1e6):
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    ang = np.outer(np.arange(positions), inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def build(form: str, layers: int, heads: int, kv_heads: int, head_dim: int, positions: int):
    """The chained attention-only graph: each layer's output is the next layer's query, key and value source."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    f = TP.FLOAT
    group = heads // kv_heads
    cos, sin = _rope(head_dim, positions)

    def i64(name, values):
        return h.make_tensor(name, TP.INT64, [len(values)], values)

    inits = [i64("c/0", [0]), i64("c/kv", [kv_heads * head_dim]), i64("c/ax2", [2]),
             h.make_tensor("cos", f, cos.shape, cos.ravel()), h.make_tensor("sin", f, sin.shape, sin.ravel())]
    if form == "matmul":
        inits += [i64("shape/q", [1, kv_heads, group, head_dim]), i64("shape/k", [1, kv_heads, head_dim, 1]),
                  i64("shape/v", [1, kv_heads, 1, head_dim]), i64("shape/o", [1, 1, heads * head_dim]),
                  h.make_tensor("scale", f, [], [head_dim ** -0.5])]
    inputs = [h.make_tensor_value_info("x", f, [1, 1, heads * head_dim])]
    inputs += ([h.make_tensor_value_info("seqlens_k", TP.INT32, [1]), h.make_tensor_value_info("total_len", TP.INT32, [])]
               if form == "gqa" else [h.make_tensor_value_info("pos", TP.INT64, [1, 1])])
    nodes, outputs, x = [], [], "x"
    for j in range(layers):
        p = f"l{j}/"
        # k and v: the first kv_heads*head_dim features of the previous output (any fixed slice will do).
        nodes += [h.make_node("Slice", [x, "c/0", "c/kv", "c/ax2"], [p + "k"]),
                  h.make_node("Slice", [x, "c/0", "c/kv", "c/ax2"], [p + "v"])]
        if form == "gqa":
            nodes.append(h.make_node(
                "GroupQueryAttention", [x, p + "k", p + "v", p + "pk", p + "pv", "seqlens_k", "total_len", "cos", "sin"],
                [p + "o", p + "prk", p + "prv"], domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                do_rotary=1, rotary_interleaved=0, scale=head_dim ** -0.5))
            cache_shape = [1, kv_heads, "L", head_dim]
            inputs += [h.make_tensor_value_info(p + n, f, cache_shape) for n in ("pk", "pv")]
            outputs += [h.make_tensor_value_info(p + n, f, cache_shape) for n in ("prk", "prv")]
        else:
            nodes += [
                h.make_node("RotaryEmbedding", [x, "pos", "cos", "sin"], [p + "qr"], domain="com.microsoft", num_heads=heads),
                h.make_node("RotaryEmbedding", [p + "k", "pos", "cos", "sin"], [p + "kr"], domain="com.microsoft",
                            num_heads=kv_heads),
                h.make_node("Reshape", [p + "qr", "shape/q"], [p + "q4"]),
                h.make_node("Reshape", [p + "kr", "shape/k"], [p + "k4"]),
                h.make_node("Reshape", [p + "v", "shape/v"], [p + "v4"]),
                h.make_node("Concat", [p + "pkt", p + "k4"], [p + "kt"], axis=3),
                h.make_node("Concat", [p + "pv", p + "v4"], [p + "va"], axis=2),
                h.make_node("MatMul", [p + "q4", p + "kt"], [p + "scores"]),
                h.make_node("Mul", [p + "scores", "scale"], [p + "scaled"]),
                h.make_node("Softmax", [p + "scaled"], [p + "probs"], axis=-1),
                h.make_node("MatMul", [p + "probs", p + "va"], [p + "o4"]),
                h.make_node("Reshape", [p + "o4", "shape/o"], [p + "o"]),
            ]
            inputs += [h.make_tensor_value_info(p + "pkt", f, [1, kv_heads, head_dim, "L"]),
                       h.make_tensor_value_info(p + "pv", f, [1, kv_heads, "L", head_dim])]
            outputs += [h.make_tensor_value_info(p + "kt", f, [1, kv_heads, head_dim, "L1"]),
                        h.make_tensor_value_info(p + "va", f, [1, kv_heads, "L1", head_dim])]
        x = p + "o"
    outputs.insert(0, h.make_tensor_value_info(x, f, [1, 1, heads * head_dim]))
    graph = h.make_graph(nodes, form, inputs, outputs, initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]), x


def session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def cpu_ms(fn, n: int) -> float:
    for _ in range(5):
        fn()
    t = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t) / n * 1e3


def measure(past: int, layers: int, repeats: int, steps: int, heads=14, kv_heads=2, head_dim=64):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 1, heads * head_dim)) * 0.1).astype(np.float32)
    keys = [rng.standard_normal((1, kv_heads, past, head_dim)).astype(np.float32) for _ in range(layers)]
    values = [rng.standard_normal((1, kv_heads, past, head_dim)).astype(np.float32) for _ in range(layers)]
    positions = past + 64

    gqa, out_g = build("gqa", layers, heads, kv_heads, head_dim, positions)
    mm, out_m = build("matmul", layers, heads, kv_heads, head_dim, positions)
    s_gqa, s_mm = session(gqa), session(mm)

    io = s_gqa.io_binding()
    io.bind_cpu_input("x", x)
    io.bind_cpu_input("seqlens_k", np.array([past], np.int32))
    io.bind_cpu_input("total_len", np.array(past + 1, np.int32))
    bufs = []
    for j in range(layers):
        for name, src in (("k", keys[j]), ("v", values[j])):
            buf = np.zeros((1, kv_heads, positions, head_dim), np.float32)
            buf[:, :, :past] = src
            val = ort.OrtValue.ortvalue_from_numpy(buf)
            bufs.append(val)
            io.bind_ortvalue_input(f"l{j}/p{name}", val)
            io.bind_ortvalue_output(f"l{j}/pr{name}", val)
    io.bind_output(out_g)
    feeds = {"x": x, "pos": np.array([[past]], np.int64)}
    for j in range(layers):
        feeds[f"l{j}/pkt"] = np.ascontiguousarray(keys[j].transpose(0, 1, 3, 2))
        feeds[f"l{j}/pv"] = values[j]

    # The in-place run rewrites position `past` with the same key and value every time: each run is the same step.
    s_gqa.run_with_iobinding(io)
    o_gqa = next(o for o in io.copy_outputs_to_cpu() if o.shape == x.shape)
    o_mm = s_mm.run([out_m], feeds)[0]
    err = float(np.abs(o_gqa - o_mm).max())
    if err > 1e-5:
        raise SystemExit(f"the two forms disagree by {err:.2e} at {past} cached positions")
    rows = []
    for _ in range(repeats):  # interleaved, so load drifts hit both
        rows.append((cpu_ms(lambda: s_gqa.run_with_iobinding(io), steps), cpu_ms(lambda: s_mm.run([out_m], feeds), steps)))
    return err, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", type=int, nargs="+", default=[290, 560], help="cached positions (290: a direct-mode "
                    "prompt of the MiniVLA-shaped model; 560: after ~270 reasoning tokens)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="steps timed per repeat")
    a = ap.parse_args()
    print(f"{a.layers} chained decode-step attentions, 14 query / 2 KV heads of 64, one thread, CPU ms per step")
    print(f"{'past':>5s} {'gqa in place':>13s} {'matmul form':>12s} {'gqa / matmul':>13s}  max |diff|")
    for past in a.past:
        err, rows = measure(past, a.layers, a.repeats, a.steps)
        for g, m in rows:
            print(f"{past:5d} {g:13.2f} {m:12.2f} {g / m:13.2f}  {err:.1e}")


if __name__ == "__main__":
    main()
