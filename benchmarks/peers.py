"""edge-vla's decoder against the runtimes a user would pick instead (issue #20), one run on this CPU.

The same decoder weights through every runtime:

    edge-vla fp32 / int8 / int4   the bundle's embed + decoder + lm_head graphs through edge-vla's ONNX
                                  Runtime backend (`OrtBackend.prefill/step/lm_logits`: a free-token decode
                                  step as the runtime runs it, the KV cache in place; no policy loop)
                                  (int8: what `edge-vla export --int8` writes, its decoder's MatMul form
                                  chosen by `--int8-matmul auto`: MatMulInteger for a direct-mode
                                  parallel-action checkpoint, MatMulNBits otherwise)
    edge-vla int8-nbits / -integer  the same export with `--int8-matmul nbits` / `integer` forced
    ort-genai int4 / int8         ONNX Runtime GenAI, its model builder's outputs from the HF weights
    llama.cpp q8_0 / q4_0 / q4_k_m  llama-cpp-python; GGUF from llama.cpp's convert_hf_to_gguf.py,
                                  then llama_model_quantize
    torch eager                   PyTorch fp32, the HF model's forward with a DynamicCache in a greedy
                                  loop (generate()'s inner loop, without its logits processors)
    torch compile                 the same with torch.compile'd forward and a StaticCache
    executorch fp32 / 8da8w / 8da4w  ExecuTorch 1.5.1, XNNPACK-delegated .pte from optimum-executorch's exporter
                                  (`optimum-cli export executorch --recipe xnnpack --use_custom_sdpa
                                  --use_custom_kv_cache [--qlinear 8da8w|8da4w] --max_seq_len 1024`: the static
                                  KV cache and ExecuTorch's custom SDPA inside the program; torchao's
                                  Int8DynamicActivationIntxWeightConfig: 8da8w = int8 weights per output channel,
                                  8da4w = int4 weights in groups of 32 (XNNPACK stores group scales as bf16:
                                  4.5 bits/weight), both with int8 activations quantized per token at run time);
                                  the embedding table stays fp32; run by ExecuTorch's Python runtime (portable_lib)

Models (`--model`): `qwen0.5b` = Qwen2.5-0.5B's decoder layers (hidden 896, 24 layers, 14 heads /
2 KV heads, MLP 4864) with random weights, built offline inside an edge-vla VLA (so its bundles
export) whose vocabulary is the tiny preset's locally trained tokenizer, not Qwen's 151,936 tokens:
the timings are the decoder layers'; `tiny` = the shipped tiny LM (pretrained/tiny-libero-butter/vla).
No peer takes the VLA's image embeddings as a prefix, so every runtime, edge-vla included,
prefills the same `--prompt` token ids (~280: the VLA's image + prompt prefix) and then decodes
`--new` tokens greedily.

The action row (`--rows action`): what one robot action costs, measured as an action. edge-vla runs
`Policy.act` in direct mode on a bundle (the vision prefix graph, one prefill of prefix + prompt positions,
the action tokens through the restricted action head) on a synthetic observation; each peer prefills the
same number of prefix + prompt positions as token ids and decodes the 7 action tokens one by one through
its full head, as OpenVLA does (prefill + 6 decode steps). `--action-decoding` picks edge-vla's rows:
`parallel` (model.parallel_actions, as the lite recipes deploy: the 6 placeholders after the first action
position ride in the prefill, so one decoder pass over the same 292 positions the peers run as a prefill of
286 and 6 steps) and `sequential` (OpenVLA's published way: prefill, then 6 steps). `tiny`: the shipped `vla`
checkpoint, which decodes its whole 4 x 7 chunk in parallel inside the prefill (33 prefix positions; no
sequential row). `qwen0.5b`, parallel: build_parallel_checkpoint (the peers' LM weights and tokenizer, a
one-camera 128 px vision tower, one 7-token chunk), exported whole; sequential: the decode table's bundles
with that vision tower swapped in (build_action_bundle). Both: 256 image positions + proprio + prompt, ~285.
edge-vla pays for its vision tower inside the action; the peers get token ids and no vision. CPU time of
each process (one thread) is the figure; ratios are against the best peer. Each edge-vla row also gives the
CPU ms of each graph in its action (vision, embed, decoder prefill, decoder steps, heads; "other": Python,
image preprocessing, feeds).

Timing: one intra-op thread, a fresh process per runtime per repeat, repeats interleaved (runtime
A, B, C, A, B, C, ...), ratios from this one run. Per runtime: prefill ms (median over repeats),
decode ms/token (median, p95 over every token of every repeat; wall time and the process's CPU time), peak RSS of the process, bytes on
disk, bits per weight (bytes on disk x 8 / decoder parameters), and the fraction of the measured
single-thread copy-bandwidth roofline: (bytes on disk / bandwidth) / decode ms. Bytes on disk
stand in for the bytes a step reads; they overcount where an embedding table is only gathered
(one row per step), which on these small vocabularies is < 1% of the weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers.py --model qwen0.5b --work /tmp/peers/qwen \\
        --llama-src /path/to/llama.cpp [--peers edge-vla-int8,llama.cpp-q8_0] [--rows decode,action] \\
        [--repeats 3] [--action-decoding parallel,sequential] [--out peers.json]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers.py --matmuls    # one MatMul per shape and weight form

llama.cpp needs `pip install llama-cpp-python` (no wheel on this platform: a 20-40 minute build
from source with cmake and a C++ compiler, so it is not in requirements.lock) and a llama.cpp
source tree for its converter (`--llama-src`, or $LLAMA_CPP_SRC; the llama-cpp-python sdist's
vendor/llama.cpp has it). A peer that is not installed is skipped with the reason.

ExecuTorch cannot share the project's venv (executorch 1.5.1 needs numpy >= 2 and torchao 0.18; the LIBERO
stack pins numpy 1.26): it gets its own venv, whose interpreter builds its .pte files and runs its workers
(`--executorch-python PATH`, or $EXECUTORCH_PYTHON). This file imports nothing at module level that venv
lacks (numpy only), so it serves as that venv's worker and exporter entry point too:

    python3.11 -m venv /tmp/peers/et_venv
    # one command, so that torch stays the CPU 2.13 (optimum-executorch alone pulls the newest CUDA torch);
    # optimum-executorch pulls transformers 5.0.0rc1 and optimum 2.0
    /tmp/peers/et_venv/bin/pip install torch==2.13.0 executorch==1.5.1 optimum-executorch==1.1.0
    EXECUTORCH_PYTHON=/tmp/peers/et_venv/bin/python .venv/bin/python benchmarks/peers.py --peers executorch-8da4w ...
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_CKPT = REPO / "pretrained" / "tiny-libero-butter" / "vla"
QWEN05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
           "intermediate_size": 4864}
PEERS = ("edge-vla-fp32", "edge-vla-int8", "edge-vla-int8-nbits", "edge-vla-int8-integer", "edge-vla-int4",
         "edge-vla-int4-b32", "edge-vla-int4-b128", "ort-genai-int8", "ort-genai-int4", "llama.cpp-q8_0",
         "llama.cpp-q4_0", "llama.cpp-q4_k_m", "torch-eager", "torch-compile", "executorch-fp32", "executorch-8da8w",
         "executorch-8da4w")
# Bits per weight of each format as its runtime stores the decoder's matrices (weights + scales).
FORMAT_BITS = {"edge-vla-fp32": "fp32", "edge-vla-int8": "8-bit, the export's --int8-matmul auto form",
               "edge-vla-int8-nbits": "8-bit blocks of 256 (128 at K = 896) + fp32 scale (MatMulNBits)",
               "edge-vla-int8-integer": "8-bit per channel + fp32 scale, uint8 activations per tensor (MatMulInteger)",
               "edge-vla-int4": "4-bit blocks of 64 + fp32 scale", "edge-vla-int4-b32": "4-bit blocks of 32 + fp32 scale",
               "edge-vla-int4-b128": "4-bit blocks of 128 + fp32 scale", "ort-genai-int8": "8-bit blocks of 32 + fp32 scale",
               "ort-genai-int4": "4-bit blocks of 32 + fp32 scale", "llama.cpp-q8_0": "8-bit blocks of 32 + fp16 scale",
               "llama.cpp-q4_0": "4-bit blocks of 32 + fp16 scale", "llama.cpp-q4_k_m": "4/6-bit k-quants",
               "torch-eager": "fp32", "torch-compile": "fp32", "executorch-fp32": "fp32 (XNNPACK)",
               "executorch-8da8w": "8-bit per channel + fp32 scale, int8 activations per token (XNNPACK)",
               "executorch-8da4w": "4-bit groups of 32 + bf16 scale, int8 activations per token (XNNPACK)"}


# --- building every runtime's model from the same weights ------------------------------------------
def build_checkpoint(model: str, work: Path) -> Path:
    """The edge-vla checkpoint whose LM every peer runs."""
    if model == "tiny":
        return TINY_CKPT
    path = work / "ckpt"
    if (path / "config.json").exists():
        return path
    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats

    rng = np.random.default_rng(0)
    stats = ActionStats.from_actions(rng.uniform(-1, 1, (256, 7)))
    overrides = [f"lm.{k}={v}" for k, v in QWEN05B.items()]
    vla = VLA.from_preset("tiny", overrides, texts=["pick up the object and put it in the basket"], action_stats=stats)
    vla.recipe_info = {"name": "ecot", "decode_mode": "full", "max_free_tokens": 250, "inference_prefix": " ACTION:"}
    return vla.save_pretrained(path)


# The action model of `qwen0.5b`: the decode table's bundle with a one-camera 128 px vision tower, no token
# pooling: 256 image positions + proprio + prompt (~280, OpenVLA's 256 patches + prompt).
ACTION_VISION = ["image_size=128", "vision.image_size=128", "token_pool=1", 'cameras=["agentview"]']
OPENVLA_ACTION_TOKENS = 7
# How edge-vla's action row decodes its chunk: in one decoder pass (model.parallel_actions, as the lite recipes
# deploy) or one token at a time (OpenVLA's published way).
ACTION_DECODING = ("parallel", "sequential")


def build_action_bundle(model: str, ckpt: Path, work: Path, fmt: str, decoding: str = "sequential") -> Path:
    """The bundle whose direct-mode action the action row times.

    `tiny`: the decode table's bundle of the shipped `vla` checkpoint, which decodes its chunk in parallel (no
    sequential variant). `qwen0.5b`, `decoding="parallel"`: build_parallel_checkpoint's model exported whole (the
    7 action tokens from one decoder pass). `decoding="sequential"` (OpenVLA's published way): the decode table's
    bundle (embed, decoder, lm_head, action head: the same graphs) with its vision prefix graph replaced by
    ACTION_VISION's, exported alone; its 7 action tokens decode one by one through the restricted head."""
    from edge_vla.errors import EdgeVLAError

    if decoding not in ACTION_DECODING:
        raise EdgeVLAError(f"unknown action decoding {decoding}", f"use {' or '.join(ACTION_DECODING)}")
    if model == "tiny":
        if decoding != "parallel":
            raise EdgeVLAError("the shipped tiny checkpoint decodes its actions in parallel only",
                               "time it with --action-decoding parallel")
        return build_edge_vla(ckpt, work, fmt)
    if decoding == "parallel":
        return build_edge_vla(build_parallel_checkpoint(ckpt, work), work, fmt, name="action-bundle-parallel")
    base = build_edge_vla(ckpt, work, fmt)
    out = work / f"action-bundle-{fmt}"
    if (out / "manifest.json").exists():
        return out
    import tempfile

    from edge_vla.artifacts.bundle import load_bundle, write_bundle
    from edge_vla.export.onnx_export import PrefixEncoder, export_prefix
    from edge_vla.export.quantize import quantize_graph
    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats

    b = load_bundle(base)
    stats = ActionStats.from_actions(np.random.default_rng(0).uniform(-1, 1, (256, 7)))
    # Only the vision tower and projector are exported: a one-layer LM of the same width suffices.
    lm = [f"lm.{k}={v}" for k, v in QWEN05B.items() if k != "num_hidden_layers"] + ["lm.num_hidden_layers=1"]
    light = VLA.from_preset("tiny", lm + ACTION_VISION, texts=["pick up the object"], action_stats=stats)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        staging, fp32 = Path(tmp) / "staging", Path(tmp) / "fp32"
        staging.mkdir(), fp32.mkdir()
        for f in b.path.iterdir():
            if f.name not in ("manifest.json", "prefix.onnx"):
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, staging / f.name)
        g = export_prefix(PrefixEncoder(light), light.config, light.proprio is not None, fp32)
        prec = b.graphs["prefix"].get("precision", "fp32")
        quantize_graph(fp32 / g["file"], staging / g["file"], prec)
        manifest = {k: v for k, v in b.manifest.items() if k not in ("format", "schema_version", "files")}
        cfg = light.config.to_dict()
        manifest["model_config"] = {**b.manifest["model_config"], **{k: cfg[k] for k in (
            "image_size", "token_pool", "cameras", "vision")}}
        manifest["graphs"] = {**b.graphs, "prefix": {**g, "precision": prec}}
        manifest["recipe"] = {**b.recipe, "decode_mode": "direct", "inference_prefix": " ACTION:"}
        write_bundle(out, staging, manifest)
    return out


def build_parallel_checkpoint(ckpt: Path, work: Path) -> Path:
    """`qwen0.5b`'s parallel-decoding action checkpoint: the decode table's LM (the same weights and tokenizer
    the peers run), ACTION_VISION's tower and projector (random), model.parallel_actions=true with one 7-token
    chunk (the peers' 7 tokens), and the direct `vla` recipe, as the lite recipes deploy. Exported whole by
    build_edge_vla (parity of the one-pass chunk against PyTorch included)."""
    out = work / "ckpt-parallel"
    if (out / "config.json").exists():
        return out
    import dataclasses

    from edge_vla.model.vla import VLA

    src = VLA.from_pretrained(ckpt)
    lm = [f"lm.{k}={v}" for k, v in QWEN05B.items() if k != "num_hidden_layers"] + ["lm.num_hidden_layers=1"]
    light = VLA.from_preset("tiny", lm + ACTION_VISION, texts=["pick up the object"], action_stats=src.action_stats)
    cfg = dataclasses.replace(light.config, lm=src.config.lm, parallel_actions=True, action_chunk=1)
    vla = VLA(cfg, light.vision, src.lm, src.processor.tokenizer, src.action_stats)
    vla.projector, vla.camera_embed, vla.proprio = light.projector, light.camera_embed, light.proprio
    vla.recipe_info = {"name": "vla", "decode_mode": "direct", "max_free_tokens": 0, "inference_prefix": " ACTION:"}
    return vla.save_pretrained(out)


def build_hf(ckpt: Path, work: Path) -> Path:
    """The checkpoint's LM as a plain Hugging Face directory (what GenAI's builder and llama.cpp read)."""
    out = work / "hf"
    if (out / "config.json").exists():
        return out
    from edge_vla.model.vla import VLA

    lm = VLA.from_pretrained(ckpt).lm.float().eval()
    lm.config.bos_token_id, lm.config.eos_token_id = 1, 2
    lm.save_pretrained(out, safe_serialization=True)
    return out


def n_params(hf: Path) -> int:
    cfg = json.loads((hf / "config.json").read_text())
    from safetensors import safe_open

    total = 0
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "np") as s:
            for k in s.keys():
                total += int(np.prod(s.get_slice(k).get_shape()))
    return total if total else int(cfg.get("num_parameters", 0))


# edge-vla's formats: the export's precision and, for int8, its --int8-matmul choice.
# format -> (precision, --int8-matmul, --int4-block)
EDGE_VLA_FORMATS = {"fp32": ("fp32", "auto", None), "int8": ("int8", "auto", None), "int8-nbits": ("int8", "nbits", None),
                    "int8-integer": ("int8", "integer", None), "int4": ("int4", "auto", None),
                    "int4-b32": ("int4", "auto", 32), "int4-b128": ("int4", "auto", 128)}


def _written_as_now(manifest: dict, precision: str, int4_block: int | None) -> bool:
    """Whether a bundle built before is what the export writes for these settings now: an int8 bundle
    records its MatMul form, an INT4 one its block size (32 before 2026-12-07, when none was recorded)."""
    from edge_vla.export.quantize import INT4_BLOCK

    if precision == "int8":
        return "int8_matmul" in manifest
    if precision == "int4":
        return manifest["graphs"]["decoder"].get("int4_block", 32) == (int4_block or INT4_BLOCK)
    return True


def build_edge_vla(ckpt: Path, work: Path, fmt: str, name: str = "bundle") -> Path:
    """The bundle `edge-vla export` writes for `fmt` (EDGE_VLA_FORMATS), reused when built before as the
    export writes it now (_written_as_now), else exported again."""
    out = work / f"{name}-{fmt}"
    precision, int8_matmul, int4_block = EDGE_VLA_FORMATS[fmt]
    manifest = out / "manifest.json"
    if manifest.exists() and _written_as_now(json.loads(manifest.read_text()), precision, int4_block):
        return out
    from edge_vla.export import export_bundle

    export_bundle(ckpt, out, precision=precision, int8_matmul=int8_matmul, int4_block=int4_block, report=lambda *_: None)
    return out


def build_genai(hf: Path, work: Path, prec: str) -> Path:
    out = work / f"genai-{prec}"
    if not (out / "genai_config.json").exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", prec,
               "-e", "cpu", "-c", str(work / "genai-cache")]
        run = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        if not (out / "genai_config.json").exists():
            raise RuntimeError(f"GenAI builder failed: {(run.stderr or run.stdout).strip().splitlines()[-1:]}")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    # One intra-op thread, like every other runtime; greedy, no early stop at a random EOS.
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 1
    cfg["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


FAKE_VOCAB = r"""
# llama.cpp's converter reads the tokenizer to write a vocabulary; the edge-vla LM has its own tokenizer,
# so the vocabulary is written as SentencePiece-style placeholders (the 256 byte tokens llama.cpp looks up,
# then <tN> up to the model's size). Token ids are what the timing feeds, so the strings do not matter.
import sys, runpy
from pathlib import Path
src = Path(sys.argv[1]); sys.path.insert(0, str(src)); sys.path.insert(1, str(src / "gguf-py"))
import gguf
from conversion import qwen
def set_vocab(self):
    n = self.hparams["vocab_size"]
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"<t{i}>" for i in range(len(toks), n)]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    self.gguf_writer.add_tokenizer_model("llama")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list(toks[:n]); self.gguf_writer.add_token_scores([0.0] * n)
    self.gguf_writer.add_token_types(types[:n])
    self.gguf_writer.add_bos_token_id(1); self.gguf_writer.add_eos_token_id(2); self.gguf_writer.add_unk_token_id(0)
qwen.Qwen2Model.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")
"""


def build_gguf(hf: Path, work: Path, quant: str, llama_src: Path) -> Path:
    f32 = work / "gguf" / "model-f32.gguf"
    out = work / "gguf" / f"model-{quant}.gguf"
    if out.exists():
        return out
    f32.parent.mkdir(parents=True, exist_ok=True)
    if not f32.exists():
        run = subprocess.run([sys.executable, "-c", FAKE_VOCAB, str(llama_src), str(hf), "--outfile", str(f32),
                              "--outtype", "f32"], capture_output=True, text=True, env=_env())
        if not f32.exists():
            raise RuntimeError(f"convert_hf_to_gguf failed: {(run.stderr or run.stdout).strip().splitlines()[-1:]}")
    import llama_cpp

    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
             "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0 or not out.exists():
        raise RuntimeError(f"llama_model_quantize to {quant} returned {rc}")
    return out


# ExecuTorch: optimum-executorch's exporter, as an HF user runs it, under the ExecuTorch venv's interpreter.
EXECUTORCH_MAX_SEQ_LEN = 1024  # the static KV cache's length: prompt + generated tokens must fit
EXECUTORCH_QLINEAR = {"fp32": [], "8da8w": ["--qlinear", "8da8w"], "8da4w": ["--qlinear", "8da4w"]}
EXECUTORCH_VENV = ("executorch needs its own venv (numpy 2): python3.11 -m venv /tmp/peers/et_venv; "
                   "/tmp/peers/et_venv/bin/pip install torch==2.13.0 executorch==1.5.1 optimum-executorch==1.1.0; "
                   "pass --executorch-python or set EXECUTORCH_PYTHON")


def find_executorch_python(path: str | Path | None = None) -> Path | None:
    """The ExecuTorch venv's interpreter: `path`, else $EXECUTORCH_PYTHON, else None."""
    path = path or os.environ.get("EXECUTORCH_PYTHON")
    return Path(path) if path else None


def executorch_export_cmd(python: Path, hf: Path, fmt: str, out: Path) -> list[str]:
    """`optimum-cli export executorch` for `fmt`: XNNPACK, ExecuTorch's custom SDPA and KV cache ops, the static
    cache inside the program; 8da4w's group size is the exporter's (32: its text-generation task ignores
    --qlinear_group_size)."""
    return [str(python), "-m", "optimum.commands.optimum_cli", "export", "executorch", "-m", str(hf), "--task",
            "text-generation", "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache",
            *EXECUTORCH_QLINEAR[fmt], "--max_seq_len", str(EXECUTORCH_MAX_SEQ_LEN), "-o", str(out)]


def build_executorch(hf: Path, work: Path, fmt: str, python: Path) -> Path:
    """The .pte optimum-executorch writes for `fmt` (reused when built before); returns the file."""
    out = work / f"executorch-{fmt}"
    if (out / "model.pte").exists():
        return out / "model.pte"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run = subprocess.run(executorch_export_cmd(python, hf, fmt, tmp), capture_output=True, text=True,
                         env={**_env(), "HF_HUB_OFFLINE": "1"})
    if not (tmp / "model.pte").exists():
        err = [ln for ln in (run.stderr or run.stdout).splitlines() if ln.strip() and "Warning" not in ln]
        raise RuntimeError(f"optimum-cli export executorch failed: {err[-1:] if err else run.returncode}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / "model.pte"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@functools.lru_cache(maxsize=None)
def _has_executorch(python: str) -> bool:
    """Whether the interpreter `python` imports executorch and optimum-executorch (probed once per run, not
    once per executorch peer: a fresh interpreter start each)."""
    probe = ("import importlib.util as u, sys; sys.exit(0 if u.find_spec('executorch') and "
             "u.find_spec('optimum.exporters.executorch') else 1)")
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def missing(peer: str, llama_src: Path | None, et_python: Path | None = None) -> str | None:
    """Why `peer` cannot run here, or None. `et_python`: the ExecuTorch venv's interpreter (find_executorch_python)."""
    import importlib.util

    if peer.startswith("executorch"):
        if et_python is None:
            return EXECUTORCH_VENV
        if not Path(et_python).exists():
            return f"no interpreter at {et_python}: {EXECUTORCH_VENV}"
        if not _has_executorch(str(et_python)):
            return f"{et_python} lacks executorch or optimum-executorch: {EXECUTORCH_VENV}"

    if peer.startswith("ort-genai") and importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai, or the `peers` extra)"
    if peer.startswith("llama.cpp"):
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install llama-cpp-python: builds from source, 20-40 min)"
        if llama_src is None or not (llama_src / "convert_hf_to_gguf.py").exists():
            return "no llama.cpp source tree with convert_hf_to_gguf.py (pass --llama-src or set LLAMA_CPP_SRC)"
    return None


def prepare(peer: str, ckpt: Path, hf: Path, work: Path, llama_src: Path | None, et_python: Path | None = None) -> Path:
    """Build (or reuse) the model files `peer` runs; returns the path its worker loads."""
    fmt = peer.rsplit("-", 1)[1]
    if peer.startswith("executorch"):
        return build_executorch(hf, work, fmt, et_python)
    if peer.startswith("edge-vla"):
        return build_edge_vla(ckpt, work, peer.removeprefix("edge-vla-"))
    if peer.startswith("ort-genai"):
        return build_genai(hf, work, fmt)
    if peer.startswith("llama.cpp"):
        return build_gguf(hf, work, peer.split("-", 1)[1], llama_src)
    return hf


def disk_bytes(peer: str, path: Path) -> int:
    if peer.startswith("edge-vla"):  # the graphs a free-token step runs (the vision prefix is not the LM)
        m = json.loads((path / "manifest.json").read_text())["graphs"]
        files = [m[r]["file"] for r in ("embed", "decoder", "lm_head")]
        return sum(f.stat().st_size for f in path.iterdir() if any(f.name.startswith(Path(x).stem) for x in files))
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data", ".safetensors", ".bin")
               or f.name.endswith(".onnx.data"))


# --- the worker: one runtime, one fresh process ----------------------------------------------------
def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) since t0: every runtime computes on one thread, so CPU time is its
    compute time without what the scheduler gave other processes on a shared machine."""
    return (time.perf_counter() - t0[0]) * 1e3, (time.process_time() - t0[1]) * 1e3


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _time_edge_vla(path: Path, ids: list[int], new: int) -> tuple[float, list[float], list[int]]:
    """edge-vla's runtime (OrtBackend: its KV cache kept in place where the decoder allows) on the prompt ids
    (no image prefix), then `new` greedy tokens through the full LM head."""
    from edge_vla.runtime.ort_backend import OrtBackend

    be = OrtBackend.load(path, threads=1)
    no_prefix = np.zeros((1, 0, be.bundle.graphs["decoder"]["hidden_size"]), np.float32)

    def run():
        t = _now()
        hidden, _, cache = be.prefill(no_prefix, ids)
        tok = int(np.argmax(be.lm_logits(hidden)))
        prefill = _since(t)
        steps, toks = [], [tok]
        for _ in range(new):
            t = _now()
            hidden, _, cache = be.step([tok], cache)
            tok = int(np.argmax(be.lm_logits(hidden)))
            steps.append(_since(t))
            toks.append(tok)
        return prefill, steps, toks

    run()  # warm-up: ORT plans its kernels on the first runs
    return run()


class _CpuTimedSession:
    """An onnxruntime session that adds each run's CPU ms to `parts[name]` (the decoder's first run of an
    action, the prefill, apart from its later runs, the decode steps)."""

    def __init__(self, session, parts: dict, role: str):
        self._s, self._parts, self._role = session, parts, role

    def run(self, outputs, feeds):
        return self._timed(self._s.run, outputs, feeds)

    def run_with_iobinding(self, binding):  # the decoder of an in-place KV cache
        return self._timed(self._s.run_with_iobinding, binding)

    def io_binding(self):
        return self._s.io_binding()

    def _timed(self, fn, *args):
        t = time.process_time()
        out = fn(*args)
        name = self._role
        if name == "decoder":
            name = "decoder_steps" if "decoder_prefill" in self._parts else "decoder_prefill"
        self._parts[name] = self._parts.get(name, 0.0) + (time.process_time() - t) * 1e3
        return out


def _time_edge_vla_action(path: Path, actions: int) -> tuple[list[tuple[float, float]], dict]:
    """`actions` direct-mode actions of the bundle's Policy on one synthetic observation, after a warm-up;
    with the CPU ms of each graph of the last action (the rest: Python, image preprocessing, feeds)."""
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.data.observations import synthetic_observations
    from edge_vla.runtime.policy import load_policy

    pol = load_policy(str(path), mode="direct")
    obs = synthetic_observations(load_bundle(path).config, n=1)[0]
    r = pol.act(obs)  # warm-up: ORT plans its kernels on the first runs
    parts: dict[str, float] = {}
    sessions = pol.backend.sessions
    for role in list(sessions):
        sessions[role] = _CpuTimedSession(sessions[role], parts, role)
    times = []
    for _ in range(actions):
        parts.clear()
        t = _now()
        r = pol.act(obs)
        times.append(_since(t))
    names = {"prefix": "vision", "embed": "embed", "decoder_prefill": "decoder_prefill",
             "decoder_steps": "decoder_steps", "lm_head": "lm_head", "action_head": "action_head"}
    comp = {names[k]: round(v, 2) for k, v in parts.items()}
    comp["other"] = round(times[-1][1] - sum(parts.values()), 2)
    return times, {"tokens": [int(x) for x in r.info["action_token_ids"]], "components_cpu_ms": comp}


def action_positions(bundle: Path) -> dict:
    """The positions a direct-mode action of `bundle` prefills: vision/proprio prefix, prompt, the inference
    prefix (" ACTION:"), and the chunk's placeholders (all but the first action token ride in the prefill)."""
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.data.observations import synthetic_observations
    from edge_vla.runtime.policy import load_policy

    pol = load_policy(str(bundle), mode="direct")
    obs = synthetic_observations(load_bundle(bundle).config, n=1)[0]
    pv, state, prompt = pol._inputs(obs)
    prefix = pol.backend.encode_prefix(pv, state)
    n_prefix = int(np.asarray(prefix).shape[-2])
    return {"prefix": n_prefix, "prompt": len(prompt) + len(pol.inference_prefix_ids),
            "action_tokens": pol.n_action_tokens, "parallel": bool(pol.parallel)}


def _time_genai(path: Path, ids: list[int], new: int) -> tuple[float, list[float], list[int]]:
    import onnxruntime_genai as og

    model = og.Model(str(path))

    def run():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new + 1, min_length=len(ids) + new + 1, do_sample=False)
        gen = og.Generator(model, params)
        t = _now()
        gen.append_tokens(np.asarray([ids], dtype=np.int32))  # the prefill runs here
        # The first call only picks the token from the prefill's logits; each later call runs the model on
        # the last token, then picks: so the prefill's token belongs to the prefill, as in the other runtimes.
        gen.generate_next_token()
        prefill = _since(t)
        steps = []
        for _ in range(new):
            t = _now()
            gen.generate_next_token()
            steps.append(_since(t))
        return prefill, steps, [int(x) for x in gen.get_sequence(0)[len(ids):]]

    run()
    return run()


def _time_llama(path: Path, ids: list[int], new: int) -> tuple[float, list[float], list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + new + 16, n_threads=1, n_threads_batch=1,
                          n_batch=512, n_ubatch=512, verbose=False)

    def last_argmax() -> int:
        # llama-cpp-python keeps logits in .scores only with logits_all=True (which would compute every
        # prompt position's logits): read the last position's from the context instead.
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    def run():
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = _now()
        llm.eval(ids)
        prefill = _since(t)
        steps, toks = [], []
        for _ in range(new):
            tok = last_argmax()
            toks.append(tok)
            t = _now()
            llm.eval([tok])
            steps.append(_since(t))
        toks.append(last_argmax())
        return prefill, steps, toks

    run()
    return run()


def _time_torch(path: Path, ids: list[int], new: int, compiled: bool) -> tuple[float, list[float], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if compiled:
        from transformers import StaticCache

        fwd = torch.compile(model.forward, dynamic=False)
    else:
        fwd = model.forward

    def run():
        if compiled:  # a static cache: fixed shapes, so one compiled graph for prefill, one for decode
            cache = StaticCache(config=model.config, max_cache_len=len(ids) + new + 1)
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
        with torch.no_grad():
            x = torch.tensor([ids])
            pos = torch.arange(len(ids))
            t = _now()
            out = fwd(input_ids=x, past_key_values=cache, use_cache=True, cache_position=pos, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            prefill = _since(t)
            steps, toks = [], [tok]
            for i in range(new):
                t = _now()
                out = fwd(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                          cache_position=torch.tensor([len(ids) + i]), logits_to_keep=1)
                tok = int(out.logits[0, -1].argmax())
                steps.append(_since(t))
                toks.append(tok)
        return prefill, steps, toks

    run()  # warm-up (torch.compile compiles here)
    return run()


def _time_executorch(path: Path, ids: list[int], new: int) -> tuple[float, list[float], list[int]]:
    """The .pte's `forward(input_ids, cache_position) -> logits` in ExecuTorch's Python runtime: the prefill
    in one call (in chunks of the program's longest input only where the prompt is longer), then one call per
    token; the KV cache lives in the program (its mutable buffers)."""
    import torch
    from executorch.extension.pybindings import portable_lib

    # Kernels the program names outside XNNPACK: the quantized ops' and ExecuTorch's LLM ops (llama::custom_sdpa,
    # llama::update_cache: the KV cache), registered by importing their modules, as optimum-executorch does.
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401

    torch.set_num_threads(1)
    # XNNPACK and the custom SDPA op run on ExecuTorch's own threadpool, sized to the cores by default.
    portable_lib._unsafe_reset_threadpool(1)
    assert portable_lib._threadpool_get_thread_count() == 1
    model = portable_lib._load_for_executorch(str(path))
    max_len = int(model.run_method("get_max_seq_len", ())[0])
    if len(ids) + new + 1 > max_len:
        raise RuntimeError(f"{len(ids)} prompt + {new + 1} tokens exceed the program's KV cache of {max_len}")
    chunk = int(model.method_meta("forward").input_tensor_meta(0).sizes()[1])

    def forward(tokens: list[int], start: int) -> int:
        out = None
        for i in range(0, len(tokens), chunk):
            part = tokens[i:i + chunk]
            out = model.forward((torch.tensor([part], dtype=torch.long),
                                 torch.arange(start + i, start + i + len(part), dtype=torch.long)))[0]
        return int(out[0, -1].argmax())

    def run():
        t = _now()
        tok = forward(ids, 0)
        prefill = _since(t)
        steps, toks = [], [tok]
        for i in range(new):
            t = _now()
            tok = forward([tok], len(ids) + i)
            steps.append(_since(t))
            toks.append(tok)
        return prefill, steps, toks

    run()  # warm-up; the second run overwrites the cache from position 0 (attention reads only up to its position)
    return run()


def _time_peer(peer: str, path: Path, ids: list[int], new: int) -> tuple[float, list[float], list[int]]:
    """One prefill of `ids` and `new` greedy decode steps through `peer`'s runtime (each timer's contract)."""
    if peer.startswith("edge-vla"):
        return _time_edge_vla(path, ids, new)
    if peer.startswith("ort-genai"):
        return _time_genai(path, ids, new)
    if peer.startswith("llama.cpp"):
        return _time_llama(path, ids, new)
    if peer.startswith("executorch"):
        return _time_executorch(path, ids, new)
    return _time_torch(path, ids, new, compiled=peer == "torch-compile")


def worker(spec: dict) -> dict:
    peer, path, ids, new = spec["peer"], Path(spec["path"]), spec["ids"], spec["new"]
    t0 = time.perf_counter()
    if spec.get("row") == "action":
        return action_worker(spec)
    prefill, steps, toks = _time_peer(peer, path, ids, new)
    # tokens: the greedy continuation (new + 1 tokens: the prefill's, then one per decode step)
    return {"prefill_ms": prefill[0], "prefill_cpu_ms": prefill[1], "decode_ms": [x[0] for x in steps],
            "decode_cpu_ms": [x[1] for x in steps], "tokens": toks[:new + 1], "peak_rss_mb": peak_rss_mb(),
            "wall_s": time.perf_counter() - t0}


def action_worker(spec: dict) -> dict:
    """One process: warm-up, then `actions` actions; each action's wall and CPU ms."""
    peer, path, actions = spec["peer"], Path(spec["path"]), spec["actions"]
    if peer.startswith("edge-vla"):
        times, info = _time_edge_vla_action(path, actions)
    else:
        # A peer's action: prefill of the prefix positions, then the action tokens one by one (the prefill
        # yields the first, each decode step one more). Each timed run is a fresh prefill after a warm-up run.
        times, info = [], {}
        for _ in range(actions):
            new = spec["tokens"] - 1
            prefill, steps, toks = _time_peer(peer, path, spec["ids"], new)
            times.append((prefill[0] + sum(x[0] for x in steps), prefill[1] + sum(x[1] for x in steps)))
            info = {"tokens": toks[:spec["tokens"]]}
    return {"action_ms": [t[0] for t in times], "action_cpu_ms": [t[1] for t in times],
            "peak_rss_mb": peak_rss_mb(), **info}


# --- the driver ----------------------------------------------------------------------------------
def run_peers(model: str = "tiny", work: str | Path = "/tmp/edge_vla_peers", peers: tuple[str, ...] = PEERS,
              prompt: int = 280, new: int = 16, repeats: int = 3, llama_src: str | Path | None = None,
              log=print, rows: tuple[str, ...] = ("decode",), action_decoding: tuple[str, ...] | None = None,
              executorch_python: str | Path | None = None) -> dict:
    """Build every available peer's model from the same weights, time them interleaved; returns the table
    (`rows`: "decode", the prefill + decode table; "action", one measured action per runtime, edge-vla's
    once per `action_decoding`: ACTION_DECODING for qwen0.5b, parallel for tiny, whose checkpoint has no other).
    `executorch_python`: the ExecuTorch venv's interpreter (default $EXECUTORCH_PYTHON), which builds and runs
    the executorch peers."""
    from edge_vla.deploy.roofline import measure_memory_bandwidth
    from edge_vla.errors import EdgeVLAError

    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise EdgeVLAError(f"unknown peer {unknown[0]}", f"use some of {', '.join(PEERS)}")
    if model not in ("tiny", "qwen0.5b"):
        raise EdgeVLAError(f"unknown model {model}", "use tiny or qwen0.5b")
    if not rows or set(rows) - {"decode", "action"}:
        raise EdgeVLAError(f"unknown rows {','.join(rows)}", "use decode, action or both")
    action_decoding = tuple(action_decoding or (("parallel",) if model == "tiny" else ACTION_DECODING))
    if set(action_decoding) - set(ACTION_DECODING):
        raise EdgeVLAError(f"unknown action decoding {','.join(action_decoding)}",
                           f"use {' or '.join(ACTION_DECODING)}, or both")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    src = llama_src or os.environ.get("LLAMA_CPP_SRC")
    src = Path(src) if src else None
    et_python = find_executorch_python(executorch_python)
    ckpt = build_checkpoint(model, work)
    hf = build_hf(ckpt, work)
    params = n_params(hf)
    cfg = json.loads((hf / "config.json").read_text())
    vocab = cfg["vocab_size"]
    # Prompt ids: deterministic, past the special tokens, inside every runtime's vocabulary.
    ids = [int(x) for x in np.random.default_rng(0).integers(3, vocab, prompt)]
    skipped, paths = {}, {}
    for p in peers:
        why = missing(p, src, et_python)
        if why is None and p.startswith("edge-vla") and "decode" not in rows:
            paths[p] = None  # the action row builds edge-vla's action bundles itself (prepare_action)
            continue
        if why is None:
            try:
                t = time.time()
                paths[p] = prepare(p, ckpt, hf, work, src, et_python)
                log(f"# {p}: model ready ({time.time() - t:.0f} s)")
            except Exception as e:  # a peer that fails to build is reported, not fatal to the others
                why = f"build failed: {type(e).__name__}: {str(e)[:200]}"
        if why is not None:
            skipped[p] = why
            log(f"# {p}: skipped: {why}")
    action = None
    if "action" in rows:
        action = prepare_action(model, work, peers, paths, skipped, log, action_decoding, et_python)
    if "decode" not in rows:
        return {"model": model, "decoder_params": params, "config": {k: cfg.get(k) for k in (*QWEN05B, "vocab_size")},
                "repeats": repeats, "rows": {}, "skipped": skipped,
                "action": run_actions(action, repeats, skipped, log) if action else None}
    bandwidth = measure_memory_bandwidth()
    results: dict[str, list] = {p: [] for p in paths}
    for r in range(repeats):
        for p, path in paths.items():
            spec = json.dumps({"peer": p, "path": str(path), "ids": ids, "new": new})
            run = subprocess.run([_interpreter(p, et_python), __file__, "--worker", spec], capture_output=True,
                                 text=True, env=_env())
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
            if run.returncode or not lines:
                err = [ln for ln in (run.stderr or "").splitlines() if ln.strip()]
                skipped[p] = f"run failed: {err[-1][:200] if err else 'no output'}"
                log(f"# {p}: {skipped[p]}")
                continue
            results[p].append(json.loads(lines[-1]))
        bandwidth = max(bandwidth, measure_memory_bandwidth(repeats=2))
    rows = {}
    for p, runs in results.items():
        if not runs or p in skipped:
            continue
        dec = np.concatenate([np.asarray(x["decode_ms"]) for x in runs])
        cpu = np.concatenate([np.asarray(x["decode_cpu_ms"]) for x in runs])
        size = disk_bytes(p, paths[p])
        med = float(np.median(dec))
        rows[p] = {"prefill_ms": float(np.median([x["prefill_ms"] for x in runs])), "decode_ms_median": med,
                   "prefill_cpu_ms": float(np.median([x["prefill_cpu_ms"] for x in runs])),
                   "decode_cpu_ms_median": float(np.median(cpu)),
                   "cpu_roofline_fraction": size / (bandwidth * 1e9) * 1e3 / float(np.median(cpu)),
                   "decode_ms_p95": float(np.percentile(dec, 95)), "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
                   "disk_bytes": size, "bits_per_weight": size * 8 / params,
                   "roofline_fraction": size / (bandwidth * 1e9) * 1e3 / med, "format": FORMAT_BITS[p],
                   "repeats": len(runs), "tokens": runs[0]["tokens"]}
    if rows:
        best_dec = min(r["decode_ms_median"] for r in rows.values())
        best_pre = min(r["prefill_ms"] for r in rows.values())
        best_cpu = min(r["decode_cpu_ms_median"] for r in rows.values())
        for r in rows.values():
            r["decode_vs_best"] = r["decode_ms_median"] / best_dec
            r["prefill_vs_best"] = r["prefill_ms"] / best_pre
            r["decode_cpu_vs_best"] = r["decode_cpu_ms_median"] / best_cpu
    return {"model": model, "decoder_params": params, "config": {k: cfg.get(k) for k in (*QWEN05B, "vocab_size")},
            "prompt_tokens": prompt, "new_tokens": new, "repeats": repeats, "bandwidth_gbs": bandwidth,
            "rows": rows, "skipped": skipped, "action": run_actions(action, repeats, skipped, log) if action else None,
            "note": "same token ids for every runtime (no peer takes image embeddings); 1 intra-op thread, a fresh "
                    "process per runtime per repeat, repeats interleaved"}


def _interpreter(peer: str, et_python: Path | None) -> str:
    """The Python a peer's worker runs under: the ExecuTorch venv's for the executorch peers, else this one."""
    return str(et_python) if peer.startswith("executorch") else sys.executable


def prepare_action(model: str, work: Path, peers, paths: dict, skipped: dict, log,
                   decodings: tuple[str, ...] = ACTION_DECODING, et_python: Path | None = None) -> dict:
    """What the action row runs: edge-vla's action bundles (build_action_bundle), one row per precision and
    decoding ("edge-vla-int8-parallel"), and the peers' models (the decode table's) with the same number of
    prefix + prompt positions as token ids."""
    from edge_vla.errors import EdgeVLAError

    ckpt = build_checkpoint(model, work)
    specs, positions = {}, {}
    for p in peers:
        if p in skipped or p not in paths:
            continue
        if not p.startswith("edge-vla"):
            specs[p] = {"path": str(paths[p]), "peer": p, "python": _interpreter(p, et_python)}
            continue
        for d in decodings:
            row = f"{p}-{d}"
            try:
                path = build_action_bundle(model, ckpt, work, p.removeprefix("edge-vla-"), d)
                log(f"# {row}: action bundle ready")
            except Exception as e:
                skipped[row + " (action)"] = f"build failed: {type(e).__name__}: {str(e)[:200]}"
                log(f"# {row} action: {skipped[row + ' (action)']}")
                continue
            specs[row] = {"path": str(path), "peer": p, "decoding": d, "format": bundle_format(path, p)}
            positions[row] = action_positions(path)
    if not positions:  # positions come from an edge-vla action bundle
        positions["probe"] = action_positions(build_action_bundle(model, ckpt, work, "fp32", decodings[0]))
    pos = next(iter(positions.values()))
    # Same prompt for every row: every edge-vla bundle prefills the same prefix + prompt positions.
    if len({(q["prefix"], q["prompt"]) for q in positions.values()}) != 1:
        raise EdgeVLAError(f"the action bundles prefill different positions: {positions}",
                           "build them with the same vision tower and prompt")
    n = pos["prefix"] + pos["prompt"]
    vocab = json.loads((build_hf(ckpt, work) / "config.json").read_text())["vocab_size"]
    ids = [int(x) for x in np.random.default_rng(1).integers(3, vocab, n)]
    for row, q in positions.items():
        log(f"# action {row}: {q['prefix']} prefix + {q['prompt']} prompt positions; {q['action_tokens']} action "
            f"tokens {'in one pass' if q['parallel'] else 'one by one'}; peers {OPENVLA_ACTION_TOKENS} one by one")
    for row, q in positions.items():
        if row in specs:
            specs[row]["positions"] = q
    return {"positions": {k: v for k, v in pos.items() if k in ("prefix", "prompt")}, "ids": ids, "specs": specs}


def bundle_format(bundle: Path, peer: str) -> str:
    """FORMAT_BITS of an edge-vla row, with the decoder's int8 MatMul form the export chose (its manifest)."""
    mm = json.loads((Path(bundle) / "manifest.json").read_text()).get("int8_matmul")
    if not mm:
        return FORMAT_BITS[peer]
    form = FORMAT_BITS["edge-vla-int8-" + mm["decoder"]]
    return f"{form}, --int8-matmul {mm['requested']}" if mm["requested"] == "auto" else form


def run_actions(action: dict, repeats: int, skipped: dict, log, per_process: int = 1) -> dict:
    """Each runtime's action in fresh one-thread processes, repeats interleaved; CPU ms per action."""
    runs: dict[str, list] = {p: [] for p in action["specs"]}
    for _ in range(repeats):
        for p, sp in action["specs"].items():
            spec = json.dumps({"row": "action", "peer": sp["peer"], "path": sp["path"], "ids": action["ids"],
                               "new": 0, "tokens": OPENVLA_ACTION_TOKENS, "actions": per_process})
            run = subprocess.run([sp.get("python", sys.executable), __file__, "--worker", spec], capture_output=True,
                                 text=True, env=_env())
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
            if run.returncode or not lines:
                err = [ln for ln in (run.stderr or "").splitlines() if ln.strip()]
                skipped[p + " (action)"] = f"run failed: {err[-1][:200] if err else 'no output'}"
                log(f"# {p} action: {skipped[p + ' (action)']}")
                continue
            runs[p].append(json.loads(lines[-1]))
    rows = {}
    for p, rs in runs.items():
        if not rs:
            continue
        cpu = np.concatenate([r["action_cpu_ms"] for r in rs])
        wall = np.concatenate([r["action_ms"] for r in rs])
        rows[p] = {"action_cpu_ms": float(np.median(cpu)), "action_ms": float(np.median(wall)),
                   "action_cpu_ms_min": float(cpu.min()), "action_cpu_ms_max": float(cpu.max()),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "actions": int(cpu.size),
                   "tokens": rs[0].get("tokens"),
                   "format": action["specs"][p].get("format") or FORMAT_BITS[action["specs"][p]["peer"]],
                   "decoding": action["specs"][p].get("decoding", "sequential"),
                   "positions": action["specs"][p].get("positions")}
        if rs[0].get("components_cpu_ms"):  # edge-vla: where its action's CPU time goes (median per part)
            rows[p]["components_cpu_ms"] = {k: float(np.median([r["components_cpu_ms"][k] for r in rs]))
                                            for k in rs[0]["components_cpu_ms"]}
    peers_only = [r["action_cpu_ms"] for p, r in rows.items() if not p.startswith("edge-vla")]
    best_peer = min(peers_only) if peers_only else None
    for r in rows.values():
        r["vs_best_peer"] = best_peer / r["action_cpu_ms"] if best_peer else None  # > 1: faster than the best peer
    return {**{k: v for k, v in action.items() if k != "specs" and k != "ids"}, "rows": rows,
            "best_peer_cpu_ms": best_peer, "repeats": repeats}


def format_action_table(res: dict) -> str:
    a = res.get("action")
    if not a:
        return ""
    pos = a["positions"]
    lines = [f"one action: {pos['prefix']} prefix + {pos['prompt']} prompt positions; edge-vla: Policy.act, direct "
             f"mode, its action tokens through the restricted head, parallel (one decoder pass) or sequential (one "
             f"by one), vision tower included; peers: prefill + {OPENVLA_ACTION_TOKENS} tokens one by one (no "
             f"vision); {a['repeats']} interleaved fresh processes, 1 thread",
             f"{'runtime':30s} {'tokens':>6s} {'cpu ms':>9s} {'min':>9s} {'max':>9s} {'wall ms':>9s} "
             f"{'best peer / this':>16s}  format"]
    for p, r in sorted(a["rows"].items(), key=lambda kv: kv[1]["action_cpu_ms"]):
        ratio = f"{r['vs_best_peer']:.2f}x" if r["vs_best_peer"] else "-"
        n = (r.get("positions") or {}).get("action_tokens", OPENVLA_ACTION_TOKENS)
        lines.append(f"{p:30s} {n:6d} {r['action_cpu_ms']:9.1f} {r['action_cpu_ms_min']:9.1f} "
                     f"{r['action_cpu_ms_max']:9.1f} {r['action_ms']:9.1f} {ratio:>16s}  {r['format']}")
    for p, r in a["rows"].items():
        if r.get("components_cpu_ms"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["components_cpu_ms"].items())
            lines.append(f"  {p} CPU ms by part: {parts}")
    return "\n".join(lines)


# The 0.5B-shaped decoder's MatMuls: fused gate+up, down, fused QKV (K x N).
DECODER_MATMULS = {"gate+up": (896, 9728), "down": (4864, 896), "qkv": (896, 1152)}


def matmul_forms(rows: tuple[int, ...] = (292, 1), repeats: int = 5, shapes: dict | None = None) -> list[dict]:
    """One MatMul of each decoder shape in ONNX Runtime, one thread, best-of-`repeats` CPU ms per form: fp32,
    edge-vla's int8 (MatMulNBits, blocks of 256) and int4, and int8 in the MatMulInteger form (what
    `--int8-matmul integer` writes), all written by edge_vla.export.quantize.quantize_graph from one random fp32
    weight. `rows`: 292 is an action's one-pass prefill, 1 a decode step."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_vla.export.quantize import quantize_graph

    forms = {"fp32": None, "int8": ("int8", "nbits"), "int4": ("int4", "nbits"), "int8-integer": ("int8", "integer")}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, (k, n) in (shapes or DECODER_MATMULS).items():
            w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32), "W")
            g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], [w])
            onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "fp32.onnx"))
            for f, q in forms.items():
                if q:
                    quantize_graph(d / "fp32.onnx", d / f"{f}.onnx", q[0], int8_matmul=q[1])
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
            sess = {f: ort.InferenceSession(str(d / f"{f}.onnx"), so, providers=["CPUExecutionProvider"]) for f in forms}
            for m in rows:
                x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
                row = {"matmul": name, "k": k, "n": n, "rows": m}
                for f, s in sess.items():
                    s.run(None, {"x": x})  # warm-up
                    best = float("inf")
                    for _ in range(repeats):
                        t = time.process_time()
                        s.run(None, {"x": x})
                        best = min(best, time.process_time() - t)
                    row[f] = best * 1e3
                out.append(row)
    return out


def format_matmuls(rows: list[dict]) -> str:
    lines = [f"{'matmul':8s} {'K x N':>11s} {'rows':>5s} " + " ".join(f"{f:>9s}" for f in ("fp32", "int8", "int4",
                                                                                          "int8-integer"))
             + "   (CPU ms, best of repeats, 1 thread)"]
    for r in rows:
        lines.append(f"{r['matmul']:8s} {r['k']:>5d} x {r['n']:<5d} {r['rows']:5d} "
                     + " ".join(f"{r[f]:9.2f}" for f in ("fp32", "int8", "int4", "int8-integer")))
    return "\n".join(lines)


def format_table(res: dict) -> str:
    lines = [f"model {res['model']}: {res['decoder_params'] / 1e6:.0f}M parameters {res['config']}; prompt "
             f"{res['prompt_tokens']} tokens, {res['new_tokens']} generated, {res['repeats']} interleaved repeats, "
             f"1 thread; copy bandwidth {res['bandwidth_gbs']:.1f} GB/s",
             f"{'runtime':18s} {'prefill ms':>10s} {'x best':>6s} {'ms/tok p50':>10s} {'p95':>7s} {'x best':>6s} "
             f"{'cpu ms/tok':>10s} {'x best':>6s} {'peak MB':>8s} {'disk MB':>8s} {'bits/w':>6s} {'roof%':>5s} "
             f"{'cpu roof%':>9s}  format"]
    for p, r in sorted(res["rows"].items(), key=lambda kv: kv[1]["decode_ms_median"]):
        lines.append(f"{p:18s} {r['prefill_ms']:10.1f} {r['prefill_vs_best']:6.2f} {r['decode_ms_median']:10.2f} "
                     f"{r['decode_ms_p95']:7.2f} {r['decode_vs_best']:6.2f} {r['decode_cpu_ms_median']:10.2f} "
                     f"{r['decode_cpu_vs_best']:6.2f} {r['peak_rss_mb']:8.0f} "
                     f"{r['disk_bytes'] / 1e6:8.1f} {r['bits_per_weight']:6.2f} {100 * r['roofline_fraction']:5.0f} "
                     f"{100 * r['cpu_roofline_fraction']:9.0f}  {r['format']}")
    for p, why in res["skipped"].items():
        lines.append(f"{p:18s} skipped: {why}")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen0.5b", choices=["qwen0.5b", "tiny"])
    ap.add_argument("--work", default=None, help="build directory (default /tmp/edge_vla_peers/MODEL)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of: " + ", ".join(PEERS))
    ap.add_argument("--prompt", type=int, default=280)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-src", default=None)
    ap.add_argument("--rows", default="decode,action", help="decode (prefill + decode table), action, or both")
    ap.add_argument("--action-decoding", default=None,
                    help="edge-vla's action rows: parallel (the whole chunk in one decoder pass), sequential (one "
                         "token at a time, as OpenVLA), or both (default: both for qwen0.5b, parallel for tiny)")
    ap.add_argument("--executorch-python", default=None,
                    help="the ExecuTorch venv's python, which builds and runs the executorch peers (default "
                         "$EXECUTORCH_PYTHON; executorch needs numpy 2, so not this venv: see the docstring)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--matmuls", action="store_true",
                    help="only time one MatMul per decoder shape in each edge-vla weight form (matmul_forms)")
    a = ap.parse_args()
    if a.matmuls:
        print(format_matmuls(matmul_forms()))
        return
    res = run_peers(a.model, a.work or f"/tmp/edge_vla_peers/{a.model}", tuple(a.peers.split(",")), a.prompt, a.new,
                    a.repeats, a.llama_src, rows=tuple(a.rows.split(",")),
                    action_decoding=tuple(a.action_decoding.split(",")) if a.action_decoding else None,
                    executorch_python=a.executorch_python)
    if res["rows"]:
        print(format_table(res))
    if res.get("action"):
        print(format_action_table(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
