"""The deployment bar of issue #5, measured in one run on this machine (ratios, never asserted).

    1. ORT INT8 decode vs PyTorch eager fp32 with Hugging Face `generate` (the way ECoT runs),
       ms per token, on a VLA whose decoder has >= 100M parameters (random weights: speed and
       size do not depend on training).
    2. INT4 bundle size vs fp32 bundle size.
    3. `direct` vs `full` mode per action on the same INT8 bundle and inputs (full = ~250
       reasoning tokens, as full ECoT generates).
    4. Fraction of the measured memory-bandwidth roofline that the INT8 decoder reaches.

Every timing runs in a fresh process with one intra-op thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deployment_ratios.py [--work DIR] [--layers 12]
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
from edge_vla.export.accuracy import synthetic_observations
obs = synthetic_observations(vla.config, 1)[0]
pv, ids, st = vla.model_inputs(obs["images"], obs["instruction"], obs["state"])
with torch.no_grad():
    embeds = torch.cat([vla.encode_prefix(pv, st), lm.get_input_embeddings()(ids)], 1)
    def run(n):
        t = time.perf_counter()
        lm.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=vla.processor.tokenizer.pad_id, eos_token_id=None)
        return time.perf_counter() - t
    run(4)
    short = min(run(1) for _ in range(2)); long = min(run(33) for _ in range(2))
print(json.dumps({"ms_per_token": (long - short) / 32 * 1e3, "params_decoder": sum(p.numel() for p in lm.parameters())}))
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edge_vla_deploy_bench")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--reasoning-tokens", type=int, default=250)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from edge_vla.eval.bench import bench_artifacts
    from edge_vla.export import export_checkpoint

    t0 = time.time()
    ckpt = build_checkpoint(work / "ckpt", args.layers, args.hidden)
    bundles = {}
    for prec in ("fp32", "int8", "int4"):
        out = work / f"bundle-{prec}"
        if not (out / "manifest.json").exists():
            export_checkpoint(ckpt, out, precision=prec, report=lambda *_: None)
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
    res = {
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
    print(f"decoder parameters: {res['decoder_params'] / 1e6:.0f}M; memory bandwidth {res['bandwidth_gbs']:.1f} GB/s")
    print(f"ms/token: HF generate fp32 {res['hf_generate_fp32_ms_per_token']:.2f} | ORT fp32 {res['ort_fp32_ms_per_token']:.2f}"
          f" | ORT int8 {res['ort_int8_ms_per_token']:.2f} | ORT int4 {res['ort_int4_ms_per_token']:.2f}")
    print(f"ORT INT8 vs HF generate fp32: {res['int8_speedup_vs_hf_generate']:.2f}x faster per token (bar >= 4x)")
    print(f"INT4 bundle / fp32 bundle: {res['int4_size_ratio_vs_fp32']:.3f} (bar <= 0.2); INT8: {res['int8_size_ratio_vs_fp32']:.3f}")
    print(f"direct vs full per action: {direct_ms:.1f} ms vs {full_ms:.1f} ms ({res['full_reasoning_tokens']:.0f} reasoning tokens)"
          f" = {res['direct_speedup_vs_full']:.1f}x (bar >= 10x)")
    print(f"roofline fraction of decode: int8 {100 * res['int8_roofline_fraction']:.0f}% (bar >= 50%), "
          f"int4 {100 * res['int4_roofline_fraction']:.0f}%, fp32 {100 * res['fp32_roofline_fraction']:.0f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
