"""The deployment bar of issue #5, measured in one run on this machine (ratios, never asserted).

    1. ORT INT8 decode vs PyTorch eager fp32 with Hugging Face `generate` (the way ECoT runs),
       ms per token, on a VLA whose decoder has >= 100M parameters (random weights: speed and
       size do not depend on training).
    2. INT4 bundle size vs fp32 bundle size.
    3. `direct` vs `full` mode per action on the same INT8 bundle and inputs (full = ~250
       reasoning tokens, as full ECoT generates).
    4. Fraction of the measured memory-bandwidth roofline that the INT8 decoder reaches.

Every timing runs in a fresh process with one intra-op thread.

What is compared (also written into the JSON under "compared"):
  - HF generate: `lm.generate(inputs_embeds=prefix+prompt, do_sample=False)`, PyTorch eager fp32,
    transformers' DynamicCache, the full LM head on every token; ms/token = (33 tokens - 1 token) / 32.
  - ORT: `edge-vla bench` of the bundle in full mode forced to 32 reasoning tokens: every step runs
    the token embedding graph, the decoder body and the full lm_head (free tokens), the same context
    lengths (prefix + prompt + up to 32); ms/token = decode time of a call / its decode steps (the 7
    action tokens use the restricted action head).
  - Levers (`--levers`): the decoder body graph alone, one step (T=1) at HF's middle context length,
    interleaved rep by rep in one process with HF generate (so the speed-up of each lever over HF
    generate is measured under the same load): the torch-exported graph vs the fused one
    (edge_vla.export.fused_decoder), each at fp32, INT8 as ORT's dynamic MatMulInteger per-channel
    (the old default) and INT8 as 8-bit MatMulNBits blocks with int8 compute (the new default), INT4
    with float compute (accuracy_level 0, the old default) and int8 compute (accuracy_level 4).
Roofline fraction = (bytes of the decoder graphs a step reads / measured copy bandwidth) / ms per step.

The decoder shape (default hidden 1024, 12 layers, 16 heads / 4 KV heads, MLP 2816: 136M
parameters) is a MiniVLA-like Qwen2 decoder scaled under Qwen2.5-0.5B (hidden 896, 24 layers,
MLP 4864, 494M with its 151k vocabulary); the vocabulary is the tiny preset's locally trained
tokenizer (~750 tokens), so the LM head is small here and the timings are the decoder layers'.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deployment_ratios.py [--work DIR] [--layers 12] [--levers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HF_GENERATE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from edge_vla.model.vla import VLA
vla = VLA.from_pretrained(sys.argv[1])
lm = vla.lm.eval()
from edge_vla.data.observations import synthetic_observations
obs = synthetic_observations(vla.config, 1)[0]
pv, ids, st = vla.model_inputs(obs["images"], obs["instruction"], obs["state"])
with torch.no_grad():
    embeds = torch.cat([vla.encode_prefix(pv, st), lm.get_input_embeddings()(ids)], 1)
    context = embeds.shape[1]
    def run(n):
        t = time.perf_counter()
        lm.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=vla.processor.tokenizer.pad_id, eos_token_id=None)
        return time.perf_counter() - t
    run(4)
    short = min(run(1) for _ in range(2)); long = min(run(33) for _ in range(2))
print(json.dumps({"ms_per_token": (long - short) / 32 * 1e3, "params_decoder": sum(p.numel() for p in lm.parameters()),
                  "context_tokens": context, "attn_implementation": lm.config._attn_implementation}))
"""


def build_checkpoint(path: Path, layers: int, hidden: int) -> Path:
    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats

    if (path / "config.json").exists():
        return path
    rng = np.random.default_rng(0)
    stats = ActionStats.from_actions(rng.uniform(-1, 1, (256, 7)))
    overrides = [f"lm.hidden_size={hidden}", f"lm.intermediate_size={int(hidden * 2.75)}",
                 f"lm.num_hidden_layers={layers}", f"lm.num_attention_heads={hidden // 64}",
                 f"lm.num_key_value_heads={max(1, hidden // 256)}"]
    vla = VLA.from_preset("tiny", overrides, texts=["pick up the object and put it in the basket"], action_stats=stats)
    vla.recipe_info = {"name": "ecot", "decode_mode": "full", "max_free_tokens": 250, "inference_prefix": " ACTION:"}
    return vla.save_pretrained(path)


LEVER_TIMER = r"""
# Decoder-body step of each graph and HF generate's per-token time, interleaved rep by rep in this one
# process (both see the same machine load), plus the copy bandwidth re-measured every rep (best kept).
import json, sys, time, numpy as np, onnxruntime as ort, torch
torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
from edge_vla.model.vla import VLA
from edge_vla.data.observations import synthetic_observations
from edge_vla.deploy.roofline import measure_memory_bandwidth
vla = VLA.from_pretrained(spec["ckpt"])
lm = vla.lm.eval()
obs = synthetic_observations(vla.config, 1)[0]
pv, ids, st = vla.model_inputs(obs["images"], obs["instruction"], obs["state"])
with torch.no_grad():
    embeds = torch.cat([vla.encode_prefix(pv, st), lm.get_input_embeddings()(ids)], 1)
context = embeds.shape[1] + 16  # the middle of HF's 33 generated tokens
def generate(n):
    t, c = time.perf_counter(), time.thread_time()
    with torch.no_grad():
        lm.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=vla.processor.tokenizer.pad_id, eos_token_id=None)
    return time.perf_counter() - t, time.thread_time() - c
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1; so.log_severity_level = 3
rng = np.random.default_rng(0)
sessions, feeds = {}, {}
for name, path in spec["graphs"].items():
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ins = s.get_inputs()
    f = {ins[0].name: rng.standard_normal((1, 1, ins[0].shape[-1])).astype(np.float32)}
    for x in ins[1:]:
        if x.name == "past_len":  # the fused decoder's cache length
            f[x.name] = np.array([context], np.int64)
            continue
        f[x.name] = rng.standard_normal((1, spec["kv_heads"], context, spec["head_dim"])).astype(np.float32)
    sessions[name], feeds[name] = s, f
# Wall time and this thread's CPU time (one intra-op thread: ORT and torch compute in the calling
# thread): on a shared machine the CPU time leaves out the time the scheduler gave to others.
times = {k: [] for k in sessions}
cpu = {k: [] for k in sessions}
hf, hf_cpu, bw = [], [], 0.0
generate(4)
for i in range(spec["warmup"] + spec["reps"]):
    for k, s in sessions.items():
        for _ in range(spec["steps"]):
            t, c = time.perf_counter(), time.thread_time()
            s.run(None, feeds[k])
            dt, dc = time.perf_counter() - t, time.thread_time() - c
            if i >= spec["warmup"]:
                times[k].append(dt * 1e3)
                cpu[k].append(dc * 1e3)
    if i >= spec["warmup"]:
        short, long = generate(1), generate(33)
        hf.append((long[0] - short[0]) / 32 * 1e3)
        hf_cpu.append((long[1] - short[1]) / 32 * 1e3)
        bw = max(bw, measure_memory_bandwidth(repeats=2))
out = {"ms": {k: float(np.median(v)) for k, v in times.items()}, "hf_generate_ms_per_token": float(np.median(hf)),
       "cpu_ms": {k: float(np.median(v)) for k, v in cpu.items()}, "hf_generate_cpu_ms_per_token": float(np.median(hf_cpu)),
       "context_tokens": context, "bandwidth_gbs": bw}
print(json.dumps(out))
"""


def decoder_levers(ckpt: Path, work: Path, reps: int) -> dict:
    """Decoder-body step time of each graph form x quantization, interleaved in one fresh process."""
    import edge_vla.export.quantize as quant
    from edge_vla.export.onnx_export import export_graphs, kv_shape
    from edge_vla.model.vla import VLA

    vla = VLA.from_pretrained(ckpt)
    _, n_kv, head_dim = kv_shape(vla.lm.config)
    graphs = {}
    for form, fused in (("torch-export", False), ("fused", True)):
        d = work / "levers" / form
        if not (d / "decoder.onnx").exists():
            export_graphs(vla, d, fused_decoder=fused)
        fp32 = d / "decoder.onnx"
        variants = {"fp32": None, "int8-matmulinteger": quant._int8_dynamic, "int8-nbits": quant._int8_blocks,
                    "int4-float-compute": "int4-0", "int4-int8-compute": "int4-4"}
        for name, fn in variants.items():
            out = fp32 if fn is None else d / f"decoder-{name}.onnx"
            if not out.exists():
                if isinstance(fn, str):  # INT4 at an accuracy level
                    level, quant.INT_COMPUTE = quant.INT_COMPUTE, int(fn[-1])
                    try:
                        quant._int4(fp32, out, None)
                    finally:
                        quant.INT_COMPUTE = level
                else:
                    fn(fp32, out, None)
            graphs[f"{form}/{name}"] = str(out)
    spec = {"graphs": graphs, "kv_heads": n_kv, "head_dim": head_dim, "ckpt": str(ckpt), "reps": reps, "steps": 8,
            "warmup": 1}
    run = subprocess.run([sys.executable, "-c", LEVER_TIMER, json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode:
        sys.exit(run.stderr[-2000:])
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ms, bw, hf = got["ms"], got["bandwidth_gbs"], got["hf_generate_ms_per_token"]
    rows = {}
    for k, path in graphs.items():
        size = Path(path).stat().st_size
        rows[k] = {"ms_per_step": ms[k], "bytes": size, "roofline_fraction": size / (bw * 1e9) * 1e3 / ms[k],
                   "speedup_vs_hf_generate": hf / ms[k], "cpu_ms_per_step": got["cpu_ms"][k],
                   "cpu_speedup_vs_hf_generate": got["hf_generate_cpu_ms_per_token"] / got["cpu_ms"][k],
                   "cpu_roofline_fraction": size / (bw * 1e9) * 1e3 / got["cpu_ms"][k]}
    return {"context_tokens": got["context_tokens"], "reps": reps, "steps_per_rep": spec["steps"], "bandwidth_gbs": bw,
            "hf_generate_ms_per_token": hf, "hf_generate_cpu_ms_per_token": got["hf_generate_cpu_ms_per_token"], "rows": rows,
            "note": "decoder body only (no embed/lm_head graphs, no Python policy loop); HF generate includes its head "
                    "and generate()'s per-token overhead, measured interleaved in the same process"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edge_vla_deploy_bench")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--reasoning-tokens", type=int, default=250)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--levers", action="store_true", help="also time the decoder body per graph form x quantization")
    ap.add_argument("--lever-reps", type=int, default=6)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from edge_vla.eval.bench import bench_artifacts
    from edge_vla.export import export_bundle

    t0 = time.time()
    ckpt = build_checkpoint(work / "ckpt", args.layers, args.hidden)
    bundles = {}
    for prec in ("fp32", "int8", "int4"):
        out = work / f"bundle-{prec}"
        if not (out / "manifest.json").exists():
            export_bundle(ckpt, out, precision=prec, report=lambda *_: None)
        bundles[prec] = out
    print(f"# built checkpoint and bundles in {time.time() - t0:.0f} s")

    hf = subprocess.run([sys.executable, "-c", HF_GENERATE, str(ckpt)], capture_output=True, text=True,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    if hf.returncode:
        sys.exit(hf.stderr[-2000:])
    hf = json.loads(hf.stdout.strip().splitlines()[-1])

    # Per-token decode and full mode: random weights would stop reasoning at a random point, so
    # min_free_tokens makes every call decode exactly max_free_tokens reasoning tokens.
    tok = bench_artifacts([bundles["int8"], bundles["int4"], bundles["fp32"]], mode="full", calls=args.calls, warmup=1,
                          opts={"max_free_tokens": 32, "min_free_tokens": 32})
    per_mode = bench_artifacts([bundles["int8"]], mode="full", calls=args.calls, warmup=1,
                               opts={"max_free_tokens": args.reasoning_tokens, "min_free_tokens": args.reasoning_tokens})
    direct = bench_artifacts([bundles["int8"]], mode="direct", calls=args.calls, warmup=1)
    s8, s4, s32 = (r["summary"] for r in tok["rows"])
    full_ms = per_mode["rows"][0]["summary"]["per_action_ms"]["median"]
    direct_ms = direct["rows"][0]["summary"]["per_action_ms"]["median"]
    size = {p: sum((b / f).stat().st_size for f in json.loads((b / "manifest.json").read_text())["files"])
            for p, b in bundles.items()}
    from edge_vla.model.vla import VLA

    lm_cfg = VLA.from_pretrained(ckpt).config.lm
    shape = {k: lm_cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                     "intermediate_size", "vocab_size")}
    forms = {p: json.loads((b / "manifest.json").read_text())["graphs"]["decoder"].get("form", "torch-export")
             for p, b in bundles.items()}
    res = {
        "compared": {
            "hf_generate": f"PyTorch eager fp32 lm.generate (attn {hf['attn_implementation']}, DynamicCache, full LM head "
                           f"every token), context {hf['context_tokens']}..{hf['context_tokens'] + 33} tokens",
            "ort": "edge-vla bench full mode, 32 forced reasoning tokens: embed graph + decoder body + full lm_head per "
                   "free token, same observation and prompt; ms/token = decode ms / decode steps of a call",
            "decoder_form": forms,
        },
        "decoder_shape": shape,
        "decoder_params": hf["params_decoder"],
        "hf_generate_fp32_ms_per_token": hf["ms_per_token"],
        "ort_fp32_ms_per_token": s32["decode_ms_per_token"],
        "ort_int8_ms_per_token": s8["decode_ms_per_token"],
        "ort_int4_ms_per_token": s4["decode_ms_per_token"],
        "int8_speedup_vs_hf_generate": hf["ms_per_token"] / s8["decode_ms_per_token"],
        "bundle_bytes": size,
        "int4_size_ratio_vs_fp32": size["int4"] / size["fp32"],
        "int8_size_ratio_vs_fp32": size["int8"] / size["fp32"],
        "full_ms_per_action": full_ms, "full_reasoning_tokens": per_mode["rows"][0]["summary"]["reasoning_tokens_per_call"],
        "direct_ms_per_action": direct_ms, "direct_speedup_vs_full": full_ms / direct_ms,
        "bandwidth_gbs": tok["bandwidth_gbs"],
        "int8_roofline_fraction": s8["roofline_fraction"], "int4_roofline_fraction": s4["roofline_fraction"],
        "fp32_roofline_fraction": s32["roofline_fraction"],
    }
    if args.levers:
        res["levers"] = decoder_levers(ckpt, work, args.lever_reps)
    print(f"decoder parameters: {res['decoder_params'] / 1e6:.0f}M {shape}; memory bandwidth {res['bandwidth_gbs']:.1f} GB/s")
    print(f"ms/token: HF generate fp32 {res['hf_generate_fp32_ms_per_token']:.2f} | ORT fp32 {res['ort_fp32_ms_per_token']:.2f}"
          f" | ORT int8 {res['ort_int8_ms_per_token']:.2f} | ORT int4 {res['ort_int4_ms_per_token']:.2f}")
    print(f"ORT INT8 vs HF generate fp32: {res['int8_speedup_vs_hf_generate']:.2f}x faster per token (bar >= 4x)")
    print(f"INT4 bundle / fp32 bundle: {res['int4_size_ratio_vs_fp32']:.3f} (bar <= 0.2); INT8: {res['int8_size_ratio_vs_fp32']:.3f}")
    print(f"direct vs full per action: {direct_ms:.1f} ms vs {full_ms:.1f} ms ({res['full_reasoning_tokens']:.0f} reasoning tokens)"
          f" = {res['direct_speedup_vs_full']:.1f}x (bar >= 10x)")
    print(f"roofline fraction of decode: int8 {100 * res['int8_roofline_fraction']:.0f}% (bar >= 50%), "
          f"int4 {100 * res['int4_roofline_fraction']:.0f}%, fp32 {100 * res['fp32_roofline_fraction']:.0f}%")
    if args.levers:
        lv = res["levers"]
        print(f"decoder body, one step at {lv['context_tokens']} tokens of context, interleaved in one process with HF "
              f"generate ({lv['hf_generate_ms_per_token']:.2f} ms/token) and the bandwidth ({lv['bandwidth_gbs']:.1f} GB/s):")
        base = lv["rows"]["torch-export/int8-matmulinteger"]["ms_per_step"]
        for k, r in lv["rows"].items():
            print(f"  {k:38s} {r['ms_per_step']:7.2f} ms  {r['bytes'] / 1e6:7.1f} MB  roofline {100 * r['roofline_fraction']:3.0f}%"
                  f"  vs HF generate {r['speedup_vs_hf_generate']:.2f}x  vs old int8 {base / r['ms_per_step']:.2f}x"
                  f"  | CPU time {r['cpu_ms_per_step']:6.2f} ms, vs HF {r['cpu_speedup_vs_hf_generate']:.2f}x,"
                  f" roofline {100 * r['cpu_roofline_fraction']:3.0f}%")
        print(f"  (HF generate CPU time {lv['hf_generate_cpu_ms_per_token']:.2f} ms/token)")
    if args.out:
        from edge_vla.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
