"""An OpenVLA-7B-shaped random checkpoint in the released layout, imported and exported (issue #19).

    flock /tmp/edge-vla-heavy.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openvla7b_export.py \\
        --work /tmp/openvla7b [--precisions int4,int8] [--steps write,export-int4,import,export-int8,decode-int4] [--keep] [--out r.json]

1. write:  openvla/openvla-7b's config.json fields (Llama-2-7b text config: hidden 4096, 32 layers,
           32 heads, MLP 11008, vocabulary 32064 = 32000 + pad to a multiple of 64;
           `dinosiglip-vit-so-224px` at 224 px: DINOv2 ViT-L/14 with 4 registers, 24 blocks, and
           SigLIP so400m, 27 blocks with its attention-pooling head; the `fused-gelu-mlp` projector),
           bfloat16 tensors with timm's / the release's key names in ~5 GB shards +
           model.safetensors.index.json, norm_stats of one dataset, a 32000-word Llama-style
           tokenizer (WordLevel: the vocabulary's size and special ids, not Llama's merges).
           Random weights, written shard by shard, tensor by tensor: never the model in memory.
2. export: `edge-vla export SRC --int4|--int8 -o BUNDLE` in a fresh process each (the streaming
           export: edge_vla.export.streaming), from the released directory.
3. step:   one decode step of the bundle's decoder graph (ONNX Runtime, one intra-op thread, a fresh
           process), 256 image + ~20 prompt tokens of context, median of 5 after a warm-up.
4. import: `edge-vla import SRC -o CKPT` in a fresh process (the checkpoint written tensor by tensor).

Every child is run under /usr/bin/time -v: wall time and its peak RSS (the bar: under 16 GB on this
23 GB machine). Bundle bytes on disk, and the export's own parity figures from its manifest.
Working files go under --work (outside the repository; ~15 GB for the checkpoint) and are deleted
at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB, PAD_TO = 32000, 64
HIDDEN, LAYERS, HEADS, MLP = 4096, 32, 32, 11008
DINO = dict(dim=1024, depth=24, mlp=4096, registers=4)
SIGLIP = dict(dim=1152, depth=27, mlp=4304, registers=0)
PX, PATCH = 224, 14
SHARD_BYTES = 5 * 10 ** 9
UNNORM_KEY = "libero_spatial_no_noops"
NORM_STATS = {UNNORM_KEY: {"action": {
    "q01": [-0.7, -0.6, -0.9, -0.1, -0.15, -0.2, -1.0], "q99": [0.9, 0.8, 0.9, 0.1, 0.2, 0.3, 1.0],
    "mean": [0.0] * 7, "std": [0.3] * 7, "min": [-0.9] * 6 + [-1.0], "max": [0.9] * 6 + [1.0],
    "mask": [True] * 6 + [False]}, "num_transitions": 52970}}
PROMPT_WORDS = "In: What action should the robot take to put the bowl on the plate? Out:".split()


def text_config() -> dict:
    return dict(model_type="llama", hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB + PAD_TO,
                max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=VOCAB, hidden_act="silu",
                architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", tie_word_embeddings=False)


def _vit(prefix: str, spec: dict, dino: bool) -> list[tuple[str, tuple, float]]:
    """(name, shape, scale) of a timm ViT's tensors (scale 0: ones, for norms; -1: zeros)."""
    d, m, n = spec["dim"], spec["mlp"], (PX // PATCH) ** 2
    out = [("patch_embed.proj.weight", (d, 3, PATCH, PATCH), 0.02), ("patch_embed.proj.bias", (d,), -1),
           ("pos_embed", (1, n, d), 0.02), ("norm.weight", (d,), 0), ("norm.bias", (d,), -1)]
    if dino:
        out += [("cls_token", (1, 1, d), 0.02), ("reg_token", (1, spec["registers"], d), 0.02)]
    for i in range(spec["depth"]):
        b = f"blocks.{i}."
        out += [(b + "norm1.weight", (d,), 0), (b + "norm1.bias", (d,), -1), (b + "attn.qkv.weight", (3 * d, d), 0.02),
                (b + "attn.qkv.bias", (3 * d,), -1), (b + "attn.proj.weight", (d, d), 0.02), (b + "attn.proj.bias", (d,), -1),
                (b + "norm2.weight", (d,), 0), (b + "norm2.bias", (d,), -1), (b + "mlp.fc1.weight", (m, d), 0.02),
                (b + "mlp.fc1.bias", (m,), -1), (b + "mlp.fc2.weight", (d, m), 0.02), (b + "mlp.fc2.bias", (d,), -1)]
        if dino:  # OpenVLA's HF export names DINOv2's layer scale `scale_factor`
            out += [(b + "ls1.scale_factor", (d,), 0), (b + "ls2.scale_factor", (d,), 0)]
    if not dino:  # SigLIP's attention-pooling head: in the release, never read by the VLA
        out += [("attn_pool.latent", (1, 1, d), 0.02), ("attn_pool.q.weight", (d, d), 0.02), ("attn_pool.q.bias", (d,), -1),
                ("attn_pool.kv.weight", (2 * d, d), 0.02), ("attn_pool.kv.bias", (2 * d,), -1),
                ("attn_pool.proj.weight", (d, d), 0.02), ("attn_pool.proj.bias", (d,), -1),
                ("attn_pool.norm.weight", (d,), 0), ("attn_pool.norm.bias", (d,), -1),
                ("attn_pool.mlp.fc1.weight", (m, d), 0.02), ("attn_pool.mlp.fc1.bias", (m,), -1),
                ("attn_pool.mlp.fc2.weight", (d, m), 0.02), ("attn_pool.mlp.fc2.bias", (d,), -1)]
    return [(prefix + k, s, sc) for k, s, sc in out]


def tensor_plan() -> list[tuple[str, tuple, float]]:
    plan = _vit("vision_backbone.featurizer.", DINO, True) + _vit("vision_backbone.fused_featurizer.", SIGLIP, False)
    v = DINO["dim"] + SIGLIP["dim"]
    plan += [("projector.fc1.weight", (4 * v, v), 1 / math.sqrt(v)), ("projector.fc1.bias", (4 * v,), -1),
             ("projector.fc2.weight", (HIDDEN, 4 * v), 1 / math.sqrt(4 * v)), ("projector.fc2.bias", (HIDDEN,), -1),
             ("projector.fc3.weight", (HIDDEN, HIDDEN), 1 / math.sqrt(HIDDEN)), ("projector.fc3.bias", (HIDDEN,), -1)]
    lm = "language_model."
    plan += [(lm + "model.embed_tokens.weight", (VOCAB + PAD_TO, HIDDEN), 0.02)]
    for i in range(LAYERS):
        p = f"{lm}model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (HIDDEN,), 0), (p + "post_attention_layernorm.weight", (HIDDEN,), 0)]
        plan += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN), 0.02) for n in "qkvo"]
        plan += [(p + "mlp.gate_proj.weight", (MLP, HIDDEN), 0.02), (p + "mlp.up_proj.weight", (MLP, HIDDEN), 0.02),
                 (p + "mlp.down_proj.weight", (HIDDEN, MLP), 0.02)]
    plan += [(lm + "model.norm.weight", (HIDDEN,), 0), (lm + "lm_head.weight", (VOCAB + PAD_TO, HIDDEN), 0.02)]
    return plan


def _random(shape, scale: float, seed: int) -> torch.Tensor:
    if scale == 0:
        return torch.ones(shape, dtype=torch.bfloat16)
    if scale == -1:
        return torch.zeros(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)


def _tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 29871}
    for w in PROMPT_WORDS:
        vocab.setdefault(w, len(vocab) + 10)
    free = (i for i in range(VOCAB) if i not in set(vocab.values()))
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = next(free)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<PAD>", special=True)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": "<PAD>", "tokenizer_class": "LlamaTokenizer"}))


def write_checkpoint(path: Path) -> dict:
    """The released layout at `path`, one shard and one tensor at a time (edge_vla's streaming
    safetensors writer: the header first, then each tensor generated, written, dropped)."""
    from edge_vla.artifacts.checkpoint import write_safetensors_streaming

    path.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan()
    shards, cur, size = [], [], 0
    for entry in plan:
        n = math.prod(entry[1]) * 2
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(entry)
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for s, entries in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        seeds = {k: plan.index((k, sh, sc)) for k, sh, sc in entries}
        write_safetensors_streaming(path / name, [(k, "bfloat16", sh, lambda sh=sh, sc=sc, k=k: _random(sh, sc, seeds[k]))
                                                  for k, sh, sc in entries])
        weight_map.update({k: name for k, _, _ in entries})
        total += sum(math.prod(sh) * 2 for _, sh, _ in entries)
        print(f"  wrote {name} ({len(entries)} tensors)", flush=True)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    cfg = {
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "model_type": "openvla", "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive", "text_config": text_config(), "llm_max_length": 2048,
        "pad_token_id": VOCAB, "pad_to_multiple_of": PAD_TO, "output_projector_states": False,
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None], "image_sizes": [PX, PX],
        "hf_llm_id": "meta-llama/Llama-2-7b-hf", "n_action_bins": 256, "norm_stats": NORM_STATS,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _tokenizer(path)
    return {"params": sum(math.prod(sh) for _, sh, _ in plan), "bytes": total, "shards": len(shards)}


def timed(cmd: list[str], what: str) -> dict:
    """Run `cmd` under /usr/bin/time -v in a fresh process: wall seconds, peak RSS, its output tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    out = {"wall_s": round(wall, 1), "peak_rss_gb": round(int(rss.group(1)) / 1e6, 2) if rss else None,
           "returncode": p.returncode}
    print(f"{what}: {out}", flush=True)
    tail = (p.stdout + p.stderr).strip().splitlines()
    if p.returncode:
        print("\n".join(tail[-40:]), flush=True)
        raise SystemExit(f"{what} failed")
    out["log_tail"] = [line for line in tail if not line.startswith("\t")][-30:]
    out["stdout"] = p.stdout
    return out


def decode_step(out: Path, prec: str) -> dict:
    step = timed([sys.executable, "-c", STEP_SCRIPT, str(out), "276"], f"decode step {prec}")
    return json.loads(step["stdout"].strip().splitlines()[-1]) | {"peak_rss_gb": step["peak_rss_gb"]}


STEP_SCRIPT = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
from edge_vla.artifacts.bundle import decoder_feeds, load_bundle
b = load_bundle(sys.argv[1], verify=False)
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1; so.log_severity_level = 3
t0 = time.perf_counter()
s = ort.InferenceSession(str(b.graph_path("decoder")), so, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t0
d = b.graphs["decoder"]
ctx = int(sys.argv[2])
rng = np.random.default_rng(0)
past = [(rng.standard_normal((1, d["n_kv_heads"], ctx, d["head_dim"])) * 0.5).astype(np.float32) for _ in d["inputs"][1:]]
feed = decoder_feeds(d, (rng.standard_normal((1, 1, d["hidden_size"])) * 0.02).astype(np.float32), past)
outs = [o.name for o in s.get_outputs() if not o.name.startswith("present")][:1]
s.run(outs, feed)
ts = []
for _ in range(5):
    t = time.perf_counter(); s.run(None, feed); ts.append(1e3 * (time.perf_counter() - t))
print(json.dumps({"decode_step_ms": float(np.median(ts)), "steps_ms": ts, "context": ctx, "session_load_s": load_s}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/openvla7b"))
    ap.add_argument("--precisions", default="int4")
    ap.add_argument("--steps", default="write,import,export")
    ap.add_argument("--keep", action="store_true", help="keep the working files")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if ROOT in a.work.resolve().parents:
        raise SystemExit("--work must be outside the repository")
    src, res = a.work / "openvla-7b-random", {"machine": os.uname().machine, "cpus": os.cpu_count()}
    steps = a.steps.split(",")
    edge = [sys.executable, "-m", "edge_vla.cli"]
    try:
        if "write" in steps and not (src / "config.json").is_file():
            t0 = time.perf_counter()
            res["checkpoint"] = write_checkpoint(src)
            res["checkpoint"]["write_s"] = round(time.perf_counter() - t0, 1)
            print(f"checkpoint: {res['checkpoint']}", flush=True)
        # Steps run in the order given: "export" expands to one export per --precisions entry.
        order = [x for st in steps for x in ([f"export-{p}" for p in a.precisions.split(",")] if st == "export" else [st])]
        for st in order:
            if st.startswith("export-"):
                prec = st[len("export-"):]
                out = a.work / f"bundle-{prec}"
                shutil.rmtree(out, ignore_errors=True)
                r = timed([*edge, "export", str(src), f"--{prec}", "-o", str(out)], f"export --{prec}")
                r["bundle_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                r["graph_bytes"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
                m = json.loads((out / "manifest.json").read_text())
                r["parity"], r["streaming"] = m.get("parity"), m.get("streaming")
                res[f"export_{prec}"] = r
                r["decode_step"] = decode_step(out, prec)
                print(json.dumps({k: v for k, v in r.items() if k not in ("log_tail", "stdout")}, indent=1, default=str),
                      flush=True)
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)
            elif st.startswith("decode-"):  # the decode step of a bundle kept from an earlier run (--keep)
                res[f"decode_{st[len('decode-'):]}"] = decode_step(a.work / f"bundle-{st[len('decode-'):]}", st)
                print(res[f"decode_{st[len('decode-'):]}"], flush=True)
            elif st == "import":
                ckpt = a.work / "imported"
                shutil.rmtree(ckpt, ignore_errors=True)
                res["import"] = timed([*edge, "import", str(src), "-o", str(ckpt)], "import")
                res["import"]["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
                shutil.rmtree(ckpt, ignore_errors=True)
            if a.out:
                a.out.write_text(json.dumps(res, indent=2, default=str))
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
        if a.out:  # what was measured, also when a later step failed
            a.out.write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
