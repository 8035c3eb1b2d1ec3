"""Accuracy at equal bits (issue #20): which 4-bit format keeps the fp32 actions, recipe by recipe.

For each shipped tiny checkpoint (`--pretrained`, default pretrained/tiny-libero-butter; {vla,ecot,ecot-lite-dropout}) the fp32
bundle is exported once, then every variant below quantizes its graphs (the decoder body, the embedding,
the LM head, the vision prefix; the action head stays fp32) and decodes the same held-out observations
as the fp32 bundle, free-running and teacher-forced, in the recipe's own mode (`ecot`: full, reasoning
first; the others: direct). The fp32 decodes are computed once per recipe and shared by every variant.
Per variant: action-token agreement free-running / teacher-forced (reasoning-token agreement in full
mode), bytes of the LM graphs (embed + decoder + lm_head) and bits per LM weight, bytes of the bundle.

Variants (`--variants`, default all):

    int8, int4              the export's --int8 / --int4 (vision at its default, int8)
    int8-vis32, fp32-vis8   which part drifts: the LM at INT8 with an fp32 vision tower; the INT8 vision alone
    fp16                    the LM in fp16 (vision fp32): the floor a near-lossless format reaches
    int8-fcomp, int4-fcomp  MatMulNBits with float compute (accuracy_level 0) instead of int8 activations
    int8-w, int4-w          the same with the vision prefix in fp32: the weights' rounding alone, the footing
                            on which `--peer-formats` measures llama.cpp's and GenAI's formats
    int4-vis32              --int4 with the vision prefix in fp32: how much of the loss is the vision's
    int4-b16/-b32/-b64/-b128  4-bit blocks of 16 / 32 / 64 / 128 (the export's default is 64 since 2026-12-07)
    int4-asym               asymmetric 4-bit blocks (zero points)
    int4-hqq/-rtn/-kquant   ONNX Runtime's HQQ, RTN, k-quant weight-only algorithms (MatMulNBitsQuantizer
                            algo_config), block 32
    int4-gptq               GPTQ on the decoder body with calibration feeds recorded on other held-out
                            observations (never the scored ones)
    int4-b64-head8, int4-hqq-b64, int4-hqq-b64-head8   combinations at about the INT4 size
    int4-head8              LM head in 8-bit blocks of 32, embedding INT8 per row (GatherBlockQuantized
                            takes 4 bits only), decoder body 4-bit
    int4-ends8              the first and last decoder layers' MatMuls at 8 bits
    int4-sens8              the K most sensitive decoder MatMuls at 8 bits (`--sens-k`), sensitivity =
                            relative error of the decoder's hidden output when only that MatMul is 4-bit,
                            on recorded feeds
    int4-sens8-head8        both

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int4_accuracy.py --data demo_out/data --n-obs 96 \\
        [--recipes ecot,vla] [--variants int4,int4-head8] [--out int4.json]

`--margins` (ecot): the fp32 reasoning tokens' top-1/top-2 logit margins and the INT4/INT8 logit error and
argmax flips at the same positions: why full mode's free-running figure falls so far below the per-token one.
`--peer-formats`: llama.cpp's and ONNX Runtime GenAI's formats, measured on their weights (see below).

Data: `--data` is a dataset of `edge-vla data generate` whose validation episodes are the held-out
observations (spread evenly; the shipped checkpoints were trained on seed 0, so the demo's seed-1 data is
held out for them). `--generate` writes one where `--data` is missing, with the demo's own settings
(edge_vla.pipeline.DemoConfig: the butter task, 40 demos, 64 px, seed 1; ~7 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = REPO / "pretrained" / "tiny-libero-butter"
RECIPES = ("vla", "ecot", "ecot-lite-dropout")
LM_ROLES = ("embed", "decoder", "lm_head")
B4 = {"bits": 4, "block": 32}
B8 = {"bits": 8, "block": 32}
# variant -> {graph role: a precision name of the export, or quantize_nbits arguments}; roles not named
# take the export's --int4 choice ("int4"; the prefix "int8").
VARIANTS: dict[str, dict] = {
    "int8": {"embed": "int8", "decoder": "int8", "lm_head": "int8"},
    "int8-vis32": {"embed": "int8", "decoder": "int8", "lm_head": "int8", "prefix": "fp32"},
    "fp32-vis8": {"embed": "fp32", "decoder": "fp32", "lm_head": "fp32"},
    "fp16": {"embed": "fp16", "decoder": "fp16", "lm_head": "fp16", "prefix": "fp32"},
    "int4": {},
    "int4-vis32": {"prefix": "fp32"},
    "int4-vis16": {"prefix": "fp16"},
    "int8-w": {r: {"bits": 8, "block": 256, "accuracy_level": 0} for r in ("decoder", "lm_head")}
    | {"embed": "int8", "prefix": "fp32"},
    "int4-w": {r: {**B4, "accuracy_level": 0} for r in LM_ROLES} | {"prefix": "fp32"},
    "int8-fcomp": {r: {"bits": 8, "block": 256, "accuracy_level": 0} for r in ("decoder", "lm_head")} | {"embed": "int8"},
    "int4-fcomp": {r: {**B4, "accuracy_level": 0} for r in LM_ROLES},
    "int4-b16": {r: {**B4, "block": 16} for r in LM_ROLES},
    "int4-b32": {r: dict(B4) for r in LM_ROLES},
    "int4-b64": {r: {**B4, "block": 64} for r in LM_ROLES},
    "int4-b128": {r: {**B4, "block": 128} for r in LM_ROLES},
    "int4-asym": {r: {**B4, "symmetric": False} for r in LM_ROLES},
    "int4-hqq": {r: {**B4, "algo": "hqq"} for r in LM_ROLES},
    "int4-rtn": {r: {**B4, "algo": "rtn"} for r in LM_ROLES},
    "int4-kquant": {r: {**B4, "algo": "k_quant"} for r in LM_ROLES},
    "int4-gptq": {"decoder": {**B4, "algo": "gptq"}},
    "int4-head8": {"embed": "int8", "lm_head": B8},
    "int4-b64-head8": {"decoder": {**B4, "block": 64}, "embed": "int8", "lm_head": B8},
    "int4-hqq-b64": {r: {**B4, "block": 64, "algo": "hqq"} for r in ("decoder", "lm_head")},
    "int4-hqq-b64-head8": {"decoder": {**B4, "block": 64, "algo": "hqq"}, "embed": "int8", "lm_head": B8},
    "int4-ends8": {"decoder": {**B4, "node_bits": "ends"}},
    "int4-sens8": {"decoder": {**B4, "node_bits": "sensitive"}},
    "int4-sens8-head8": {"decoder": {**B4, "node_bits": "sensitive"}, "embed": "int8", "lm_head": B8},
}
DEFAULT_ROLES = {"prefix": "int8", "embed": "int4", "decoder": "int4", "lm_head": "int4", "action_head": "fp32"}


def held_out(data: Path, generate: bool) -> Path:
    if (data / "manifest.json").exists():
        return data
    if not generate:
        from edge_vla.errors import EdgeVLAError

        raise EdgeVLAError(f"no dataset at {data}", "pass --data DIR of `edge-vla data generate`, or --generate")
    from edge_vla.data.generate import generate_dataset
    from edge_vla.pipeline import DemoConfig

    cfg = DemoConfig()
    generate_dataset(data, suite=cfg.suite, tasks=list(cfg.tasks), demos_per_task=cfg.demos_per_task,
                     image_size=cfg.image_size, workers=cfg.workers, seed=cfg.data_seed)
    return data


def fp32_bundle(src: Path, work: Path, obs: list[dict]):
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.export import export_bundle

    out = work / src.name / "fp32"
    if not (out / "manifest.json").exists():
        export_bundle(src, out, precision="fp32", parity_samples=obs[:4], calibration_data=obs[:4],
                      report=lambda *_: None)
    return load_bundle(out)


def record_feeds(bundle, obs: list[dict], mode: str, keep: int = 96) -> list[dict]:
    """The decoder graph's inputs while the fp32 policy decodes `obs` in `mode` (about `keep`, evenly spaced:
    a full-mode decode runs ~270 steps per observation, a parallel direct one a single prefill)."""
    from edge_vla.export.steps import _RecordingSession
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy

    feeds: list[dict] = []
    backend = OrtBackend(bundle)
    backend.sessions["decoder"] = _RecordingSession(backend.sessions["decoder"], feeds)
    pol = Policy(backend, mode=mode)
    for o in obs:
        pol.act(o)
    return feeds[::max(1, len(feeds) // keep)]


def build_variant(fp32, name: str, work: Path, node_sets: dict, calibration: list[dict]):
    """The bundle of variant `name` (quantized from the fp32 bundle's graphs), in memory: not hashed."""
    from edge_vla.artifacts.bundle import TOKENIZER_DIR, Bundle
    from edge_vla.export.quantize import quantize_graph, quantize_nbits

    out = work / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(fp32.path / TOKENIZER_DIR, out / TOKENIZER_DIR)
    graphs = json.loads(json.dumps(fp32.graphs))
    spec = {**DEFAULT_ROLES, **VARIANTS[name]}
    for role, g in graphs.items():
        s = spec[role]
        src, dst = fp32.path / g["file"], out / g["file"]
        if isinstance(s, str):
            quantize_graph(src, dst, s)
            g["precision"] = s
        else:
            kw = dict(s)
            if isinstance(kw.get("node_bits"), str):
                kw["node_bits"] = {n: 8 for n in node_sets[kw["node_bits"]]}
            if kw.get("algo") == "gptq":
                kw["calibration"] = calibration
            quantize_nbits(src, dst, gather=role == "embed", **kw)
            g["precision"] = f"{kw['bits']}-bit b{kw['block']}" + (f" {kw['algo']}" if kw.get("algo") else "")
    return Bundle(out, {**fp32.manifest, "graphs": graphs, "files": {}})


def lm_params(bundle) -> int:
    import onnx
    from onnx import numpy_helper

    total = 0
    for role in LM_ROLES:
        m = onnx.load(str(bundle.graph_path(role)))
        # the weight matrices: a MatMul's constant B, an embedding Gather's table (not rotary tables)
        used = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"} | \
               {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
        total += sum(numpy_helper.to_array(i).size for i in m.graph.initializer
                     if i.name in used and i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2)
    return total


def sizes(bundle) -> dict:
    lm = sum(bundle.graph_path(r).stat().st_size for r in LM_ROLES)
    total = sum(f.stat().st_size for f in bundle.path.rglob("*") if f.is_file())
    return {"lm_bytes": lm, "bundle_bytes": total}


def observations(src: Path, data: Path, n_obs: int, n_cal: int) -> tuple[list[dict], list[dict]]:
    """`n_obs` scored and `n_cal` calibration observations, spread evenly over the held-out episodes and
    interleaved (never the same sample)."""
    from edge_vla.data.dataset import open_dataset, pick_evenly
    from edge_vla.data.observations import sample_to_obs

    cams = tuple(json.loads((src / "config.json").read_text()).get("cameras", ()))
    ds = open_dataset(data, split="val", cameras=cams or None, action_chunk=4)
    picked = pick_evenly(ds, min(len(ds), n_obs + n_cal))
    idx = np.linspace(0, len(picked) - 1, min(n_obs, len(picked))).round().astype(int)
    chosen = set(idx.tolist())
    return [sample_to_obs(picked[i]) for i in idx], [sample_to_obs(s) for i, s in enumerate(picked)
                                                    if i not in chosen][:n_cal]


def run(recipes, variants, data: Path, n_obs: int, n_cal: int, work: Path, sens_k: int, log=print,
        pretrained: Path = PRETRAINED) -> dict:
    from edge_vla.export import accuracy as acc
    from edge_vla.export.quantize import matmul_sensitivity, most_sensitive, weight_matmuls
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy

    results: dict = {"n_observations": n_obs, "data": str(data), "pretrained": str(pretrained), "recipes": {}}
    for recipe in recipes:
        obs, cal = observations(pretrained / recipe, data, n_obs, n_cal)
        fp32 = fp32_bundle(pretrained / recipe, work, obs)
        mode = fp32.recipe.get("decode_mode", "direct")
        t = time.time()
        ref_policy = Policy(OrtBackend(fp32), mode=mode)
        reference = acc.reference_results(ref_policy, obs, modes=(mode,))
        feeds = record_feeds(fp32, cal, mode)
        log(f"# {recipe}: {len(obs)} scored observations, {mode} mode, fp32 decoded in {time.time() - t:.0f} s; "
            f"{len(feeds)} decoder feeds recorded on {len(cal)} other observations")
        matmuls = weight_matmuls(fp32.graph_path("decoder"))
        last = max(int(n.split("/")[0][1:]) for n in matmuls)  # the fused decoder names them l<i>/...
        node_sets = {"ends": [n for n in matmuls if n.split("/")[0] in ("l0", f"l{last}")]}
        if any("sens" in v for v in variants):
            # blocks of 32: the block of the variants it serves (B4); the export ranks at its own block
            sens = matmul_sensitivity(fp32.graph_path("decoder"), feeds, work / recipe, bits=4, block=32)
            node_sets["sensitive"] = most_sensitive(sens, sens_k)
            log(f"#   sensitivity: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(sens.items(), key=lambda kv: -kv[1])))
        params = lm_params(fp32)
        # What is not a weight matrix (rotary tables, norms, the graph itself) is the same in every variant:
        # bits per weight count the rest.
        other = sizes(fp32)["lm_bytes"] - 4 * params
        rows = {"fp32": {**sizes(fp32), "bits_per_lm_weight": 32.0}}
        for v in variants:
            t = time.time()
            try:
                b = build_variant(fp32, v, work / recipe, node_sets, feeds)
            except Exception as e:  # a quantizer that fails here is a finding, not the end of the run
                rows[v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"{recipe:18s} {v:18s} failed: {rows[v]['error']}")
                continue
            rep = acc.accuracy_report(ref_policy, Policy(OrtBackend(b), mode=mode), obs, modes=(mode,),
                                      reference=reference)[mode]
            sz = sizes(b)
            rows[v] = {"free": rep["action_token_agreement"], "tf": rep["action_token_agreement_tf"],
                       "free_se": rep["action_token_agreement_se"],
                       "reasoning_free": rep.get("reasoning_token_agreement"),
                       "reasoning_tf": rep.get("reasoning_token_agreement_tf"), "action_l1": rep["action_l1"],
                       "n_action_tokens": rep["n_action_tokens"], **sz, "bits_per_lm_weight": (sz["lm_bytes"] - other) * 8 / params,
                       "node_bits_8": node_sets.get(VARIANTS[v].get("decoder", {}).get("node_bits"))
                       if isinstance(VARIANTS[v].get("decoder"), dict) else None}
            r = rows[v]
            log(f"{recipe:18s} {v:18s} free {100 * r['free']:6.2f}% (se {100 * r['free_se']:.1f})  tf {100 * r['tf']:6.2f}%"
                + (f"  reasoning {100 * r['reasoning_free']:6.2f}% / {100 * r['reasoning_tf']:6.2f}%"
                   if r["reasoning_free"] is not None else "")
                + f"  LM {r['lm_bytes'] / 1e3:7.1f} kB {r['bits_per_lm_weight']:5.2f} b/w  bundle "
                  f"{r['bundle_bytes'] / 1e6:5.2f} MB  ({time.time() - t:.0f} s)")
            shutil.rmtree(b.path, ignore_errors=True)
        results["recipes"][recipe] = {"mode": mode, "lm_params": params, "lm_other_bytes": other, "rows": rows,
                                      "node_sets": node_sets}
    return results


# --- the peers' formats at equal bits --------------------------------------------------------------------
# llama.cpp and ONNX Runtime GenAI cannot take the VLA's image-prefix embeddings, so their formats are
# measured on the weights: each format's quantized LM weights, read back and dequantized to fp32 (llama.cpp's
# own quantizer, then the `gguf` package's numpy dequantizers; the GenAI builder's MatMulNBits blocks,
# dequantized here), are loaded into the checkpoint, exported as an fp32 bundle and scored like the variants.
# That is the format's rounding with float compute: the runtimes' own kernels also quantize activations
# (llama.cpp to Q8 blocks, MatMulNBits accuracy_level 4 to int8), which the int8/int4-w rows measure for edge-vla.
PEER_FORMATS = ("llama.cpp-q8_0", "llama.cpp-q4_0", "llama.cpp-q4_k_m", "ort-genai-int8", "ort-genai-int4")
GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_name(gguf_name: str) -> str:
    """llama.cpp's Qwen2 tensor name -> the Hugging Face parameter name (Qwen2 is converted unpermuted)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, kind, leaf = gguf_name.split(".")
    return f"model.layers.{layer}.{GGUF_NAMES[kind]}.{leaf}"


def gguf_weights(path: Path) -> tuple[dict, dict]:
    """{HF name: fp32 array} dequantized from a GGUF file, and {type: (matrix elements, bytes)}."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    weights, kinds = {}, {}
    for t in GGUFReader(str(path)).tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        weights[_hf_name(t.name)] = w
        if w.ndim == 2:
            n, b = kinds.get(t.tensor_type.name, (0, 0))
            kinds[t.tensor_type.name] = (n + w.size, b + int(t.n_bytes))
    return weights, kinds


def genai_weights(model_dir: Path, hf_state: dict) -> tuple[dict, dict]:
    """{HF name: fp32 array} of the GenAI builder's quantized MatMuls (MatMulNBits: uint blocks along K, one
    fp32 scale per block, zero point 2^(bits-1) when none is stored; QKV fused along N), and the byte count."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(model_dir / "model.onnx"))  # external data is read from beside the file
    inits = {i.name: i for i in m.graph.initializer}
    out, elems, nbytes = {}, 0, 0
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        k, nn, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
        q = numpy_helper.to_array(inits[n.input[1]]).reshape(nn, -1)
        scales = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32).reshape(nn, -1)
        if bits == 4:
            q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(nn, -1)  # low nibble first
        q = q[:, :scales.shape[1] * block].astype(np.float32)
        if len(n.input) > 3 and n.input[3]:
            raise NotImplementedError("zero points in the GenAI model: not read here")
        w = ((q.reshape(nn, -1, block) - 2 ** (bits - 1)) * scales[..., None]).reshape(nn, -1)[:, :k]  # (N, K)
        elems += w.size
        nbytes += sum(inits[x].ByteSize() for x in n.input[1:] if x)
        name = n.name.split("/")  # /model/layers.0/attn/qkv_proj/MatMul_Q4, /lm_head/MatMul_Q4
        if name[1] == "lm_head":
            out["lm_head.weight"] = w
            continue
        layer, proj = name[2].split(".")[1], name[4]
        prefix = f"model.layers.{layer}." + ("self_attn." if name[3] == "attn" else "mlp.")
        if proj == "qkv_proj":
            sizes = [hf_state[prefix + f"{x}_proj.weight"].shape[0] for x in "qkv"]
            for x, part in zip("qkv", np.split(w, np.cumsum(sizes)[:-1], axis=0)):
                out[prefix + f"{x}_proj.weight"] = part
        else:
            out[prefix + f"{proj}.weight"] = w
    if "lm_head.weight" in out and "model.embed_tokens.weight" not in out:
        out["model.embed_tokens.weight"] = out["lm_head.weight"]  # tied: the builder quantizes one copy
    return out, {"MatMulNBits": (elems, nbytes)}


def peer_checkpoint(src: Path, fmt: str, work: Path, llama_src: Path | None) -> tuple[Path, dict]:
    """The recipe's checkpoint with its LM weights round-tripped through `fmt`; and the format's bits."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import peers
    import torch

    from edge_vla.model.vla import VLA

    recipe = src.name
    w = work / recipe / "peers"
    w.mkdir(parents=True, exist_ok=True)
    hf = peers.build_hf(src, w)
    vla = VLA.from_pretrained(src)
    state = {k: v.detach().float().numpy() for k, v in vla.lm.state_dict().items()}
    if fmt.startswith("llama.cpp"):
        if llama_src is None:
            raise RuntimeError("no llama.cpp source tree (--llama-src) for convert_hf_to_gguf.py")
        f32, _ = gguf_weights(peers.build_gguf(hf, w, "q8_0", llama_src).parent / "model-f32.gguf")
        for k, v in f32.items():  # the conversion itself must be lossless, or the names/layout are wrong
            if not np.array_equal(v, state[k].reshape(v.shape)):
                raise RuntimeError(f"the f32 GGUF's {k} differs from the checkpoint's")
        weights, kinds = gguf_weights(peers.build_gguf(hf, w, fmt.split("-", 1)[1], llama_src))
    else:
        weights, kinds = genai_weights(peers.build_genai(hf, w, fmt.rsplit("-", 1)[1]), state)
    missing = [k for k in state if k.endswith("proj.weight") and k not in weights]
    if missing:
        raise RuntimeError(f"{fmt}: no quantized weight for {missing[0]}")
    new = {k: torch.from_numpy(np.ascontiguousarray(weights.get(k, state[k]).reshape(state[k].shape)))
           for k in state}
    vla.lm.load_state_dict(new)
    out = work / recipe / f"ckpt-{fmt}"
    if out.exists():
        shutil.rmtree(out)
    vla.save_pretrained(out)
    elems = sum(n for n, _ in kinds.values())
    return out, {"types": {k: n / elems for k, (n, _) in kinds.items()},
                 "bits_per_weight": sum(b for _, b in kinds.values()) * 8 / elems}


def run_peer_formats(recipes, formats, data: Path, n_obs: int, n_cal: int, work: Path, llama_src, log=print,
                     pretrained: Path = PRETRAINED) -> dict:
    """Each peer format's LM weights (dequantized) in an fp32 bundle, scored against the fp32 bundle."""
    from edge_vla.export import accuracy as acc
    from edge_vla.export import export_bundle
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy

    results: dict = {"n_observations": n_obs, "pretrained": str(pretrained), "recipes": {}}
    for recipe in recipes:
        obs, _ = observations(pretrained / recipe, data, n_obs, n_cal)
        fp32 = fp32_bundle(pretrained / recipe, work, obs)
        mode = fp32.recipe.get("decode_mode", "direct")
        ref_policy = Policy(OrtBackend(fp32), mode=mode)
        reference = acc.reference_results(ref_policy, obs, modes=(mode,))
        rows = {}
        for fmt in formats:
            try:
                ckpt, bits = peer_checkpoint(pretrained / recipe, fmt, work, llama_src)
                out = work / recipe / f"bundle-{fmt}"
                export_bundle(ckpt, out, precision="fp32", parity_samples=obs[:4], calibration_data=obs[:4],
                              report=lambda *_: None, overwrite=True)
            except Exception as e:
                rows[fmt] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"{recipe:18s} {fmt:18s} failed: {rows[fmt]['error']}")
                continue
            rep = acc.accuracy_report(ref_policy, Policy(OrtBackend(load_bundle(out)), mode=mode), obs, modes=(mode,),
                                      reference=reference)[mode]
            rows[fmt] = {"free": rep["action_token_agreement"], "tf": rep["action_token_agreement_tf"],
                         "free_se": rep["action_token_agreement_se"],
                         "reasoning_free": rep.get("reasoning_token_agreement"),
                         "reasoning_tf": rep.get("reasoning_token_agreement_tf"), **bits}
            r = rows[fmt]
            log(f"{recipe:18s} {fmt:18s} free {100 * r['free']:6.2f}% (se {100 * r['free_se']:.1f})  tf "
                f"{100 * r['tf']:6.2f}%" + (f"  reasoning {100 * r['reasoning_free']:6.2f}% / {100 * r['reasoning_tf']:6.2f}%"
                                            if r["reasoning_free"] is not None else "")
                + f"  {r['bits_per_weight']:5.2f} b/w  " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["types"].items()))
        results["recipes"][recipe] = {"mode": mode, "rows": rows}
    return results


def reasoning_margins(src: Path, data: Path, n_obs: int, work: Path, variants=("int4", "int8"), log=print) -> dict:
    """Why full mode drifts: the fp32 reasoning tokens' top-1/top-2 logit margins, and each variant's logit
    error and argmax flips at the same positions (teacher-forced on the fp32 tokens)."""
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy

    obs, _ = observations(src, data, n_obs, 0)
    fp32 = fp32_bundle(src, work, obs)
    backends = {"fp32": OrtBackend(fp32)}
    for v in variants:
        backends[v] = OrtBackend(build_variant(fp32, v, work / src.name / "margins", {}, []))
    pol = Policy(backends["fp32"], mode="full")
    logits: dict[str, list] = {k: [] for k in backends}
    for o in obs:
        r = pol.act(o)
        pv, state, prompt = pol._inputs(o)
        forced = list(pol.reasoning_prefix_ids)
        for name, be in backends.items():
            h, _, c = be.prefill(be.encode_prefix(pv, state), prompt + forced)
            for tok in r.info["free_token_ids"][len(forced):]:
                logits[name].append(np.asarray(be.lm_logits(h), np.float64))
                h, _, c = be.step([tok], c)
    ref = np.array(logits["fp32"])
    top = np.sort(ref, axis=1)
    margin = top[:, -1] - top[:, -2]
    out = {"positions": int(margin.size), "per_observation": margin.size / len(obs),
           "margin_below": {str(t): float((margin < t).mean()) for t in (0.05, 0.1, 0.25, 0.5, 1.0)}}
    for v in variants:
        q = np.array(logits[v])
        err = np.abs(q - ref).max(1)
        out[v] = {"logit_err_median": float(np.median(err)), "logit_err_p95": float(np.percentile(err, 95)),
                  "flips": int((q.argmax(1) != ref.argmax(1)).sum())}
    log(json.dumps(out, indent=1))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="demo_out/data")
    ap.add_argument("--pretrained", default=str(PRETRAINED),
                    help="the shipped set whose checkpoints are scored (a directory of recipe checkpoints)")
    ap.add_argument("--generate", action="store_true", help="generate the demo's dataset at --data if missing")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-obs", type=int, default=96, help="held-out observations scored per recipe")
    ap.add_argument("--n-cal", type=int, default=8, help="other held-out observations for sensitivity and GPTQ")
    ap.add_argument("--sens-k", type=int, default=4, help="decoder MatMuls kept at 8 bits by int4-sens8")
    ap.add_argument("--work", default="/tmp/edge_vla_int4_accuracy")
    ap.add_argument("--peer-formats", default=None,
                    help="instead of the variants: these peer formats' weights, dequantized, comma-separated from "
                         + ", ".join(PEER_FORMATS))
    ap.add_argument("--llama-src", default=None, help="llama.cpp source tree with convert_hf_to_gguf.py")
    ap.add_argument("--margins", action="store_true",
                    help="instead of the variants: full mode's reasoning margins and the int4/int8 logit error (ecot)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from edge_vla.errors import EdgeVLAError

    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(str(EdgeVLAError(f"unknown variant {unknown[0]}", f"use some of {', '.join(VARIANTS)}")))
    data = held_out(Path(a.data), a.generate)
    pretrained = Path(a.pretrained)
    work = Path(a.work) / pretrained.name  # a bundle built from one set is never reused for another
    if a.margins:
        res = reasoning_margins(pretrained / "ecot", data, a.n_obs, work)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2))
        return
    if a.peer_formats:
        res = run_peer_formats(a.recipes.split(","), a.peer_formats.split(","), data, a.n_obs, a.n_cal, work,
                               Path(a.llama_src) if a.llama_src else None, pretrained=pretrained)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2, default=str))
        return
    res = run(a.recipes.split(","), a.variants.split(","), data, a.n_obs, a.n_cal, work, a.sens_k,
              pretrained=pretrained)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
