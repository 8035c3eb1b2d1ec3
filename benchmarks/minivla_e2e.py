"""A MiniVLA-shaped model end to end on this CPU (issue #19): PyTorch fp32 with HF `generate` vs
edge-vla's fp32, INT8 and INT4 bundles, per component and per action, direct vs full CoT.

The model is MiniVLA's real shape with random weights, entered the way a user's MiniVLA enters:

    1. a random run directory in Prismatic's training layout (what openvla-mini writes and MiniVLA
       publishes): `config.json` (base VLM `prism-qwen25-extra-dinosiglip-224px+0_5b`,
       `extra_action_tokenizer`), `dataset_statistics.json`, `checkpoints/step-*.pt` holding the
       `vision_backbone` (timm key names: DINOv2 ViT-L/14 with 4 registers, 24 blocks, + SigLIP
       so400m, 27 blocks, 224 px), `projector` (`fused-gelu-mlp`) and `llm_backbone` state dicts in
       float32, plus a base-LLM directory standing in for Qwen/Qwen2.5-0.5B (its config: hidden 896,
       24 layers, 14 / 2 heads, MLP 4864, tied embeddings; a word-level tokenizer with Qwen's
       151,643 base ids and its 22 special tokens, so MiniVLA's 256 `<|extra_i|>` tokens land at
       the ids they have in Qwen's and the embedding has Qwen's 151,936 rows: the LM head costs
       what it really costs);
    2. `edge-vla import RUN -o CKPT --llm LLM`, as a user would;
    3. `edge-vla export CKPT --fp32 | --int8 | --int4 -o BUNDLE`.
Each of those runs as its own process; its wall time, CPU time and peak RSS are recorded.

Runtimes timed, each in a fresh process with one intra-op thread (OMP_NUM_THREADS=1,
torch.set_num_threads(1), ONNX Runtime intra_op 1), repeats interleaved (A, B, C, D, A, B, ...):

    torch-fp32     PyTorch eager fp32 as a user runs MiniVLA: the imported vision towers +
                   projector (transformers' classes), then `lm.generate(inputs_embeds=prefix +
                   prompt, do_sample=False)` (DynamicCache, sdpa, the full 151,936-row LM head on
                   every token, as `predict_action` decodes)
    edge-vla-fp32 / -int8 / -int4
                   the exported bundle through edge-vla's Policy (ONNX Runtime): the free tokens
                   (reasoning) run the full lm_head graph, the action tokens the fused restricted
                   action head (256 rows)

Per runtime and repeat, one process: a warm-up direct action, then one direct action, one
prefill and one full-mode action, each timed on the wall clock and as this process's CPU time
(every runtime computes on one thread, so CPU time leaves out what the scheduler gave to other
jobs on this shared machine: it is the load-robust figure, and the ratios are given both ways).

    direct   vision prefix + prefill of prefix + prompt + MiniVLA's forced "\\n" + 7 action tokens
    full     vision prefix + prefill of prefix + prompt + exactly R reasoning tokens (default 250,
             what full ECoT writes per action) + " ACTION:" + 7 action tokens. Random weights would
             end the reasoning anywhere, so the count is forced: edge-vla's Policy with
             min_free_tokens = max_free_tokens = R (action tokens and eos are masked until R, the
             same as HF's min_new_tokens), HF generate with min_new_tokens = max_new_tokens =
             R + len(" ACTION:") + 7 and no eos.

Components (medians over repeats): vision (image -> prefix embeddings), prefill (the prompt pass
and its first token's head; HF: `generate(max_new_tokens=1)`), decode ms/token (one reasoning
token: decoder step + full LM head; HF: (full generate - direct generate) / extra tokens), action
(the 7 action tokens after the prefill: 6 decoder steps + heads + de-normalisation; HF: direct
generate - prefill). Peak RSS is the process's VmHWM; bytes on disk are the checkpoint directory
(torch) or the bundle's files.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/minivla_e2e.py --work /tmp/minivla_e2e \\
        [--runtimes torch-fp32,edge-vla-int8,edge-vla-int4,edge-vla-fp32] [--repeats 3] \\
        [--reasoning-tokens 250] [--out results.json] [--lock /tmp/edge-vla-heavy.lock]

Heavy steps (writing the run, import, each export: 5-12 GB at this size) take the lock file's
exclusive flock(2) first, the same lock `flock /tmp/edge-vla-heavy.lock CMD` takes, so they never
overlap another engineer's heavy job; so does the whole timing phase when it includes an fp32
runtime (~5.5 GB), which also keeps the repeats interleaved. The work directory is reused: what
exists there is not rebuilt (its measurements are kept in prepare.json). `--shape tiny` runs the
same code path on a tiny model (tests/test_minivla_bench.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from peers import _now as _clock, _since, peak_rss_mb as _peak_rss_mb  # noqa: E402  (the one set of timing helpers)

HEAVY_LOCK = "/tmp/edge-vla-heavy.lock"
RUNTIMES = ("torch-fp32", "edge-vla-fp32", "edge-vla-int8", "edge-vla-int4")
PRECISIONS = ("int8", "int4", "fp32")  # the bar first: PyTorch fp32 vs the INT8 and INT4 bundles
HEAVY = {"torch-fp32", "edge-vla-fp32"}  # > 4 GB at MiniVLA's size: they take the lock
INSTRUCTION = "put the black bowl on the plate"
BASE_VLM = "prism-qwen25-extra-dinosiglip-224px+0_5b"
# Qwen2.5's 22 added tokens, in id order after its 151,643 byte-level BPE ids.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_PROMPT_WORDS = ("<|im_start|>system You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|> "
                     "<|im_start|>user What action should the robot take to put the black bowl on the plate?<|im_end|> "
                     "<|im_start|>assistant ACTION:").split()
# The shapes: MiniVLA's real one, and a tiny one for the harness's test.
SHAPES = {
    "minivla": dict(
        llm=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=True),
        base_vocab=151643, px=224, patch=14,
        dino=dict(dim=1024, depth=24, mlp=4096), siglip=dict(dim=1152, depth=27, mlp=4304)),
    "tiny": dict(
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1216, max_position_embeddings=1024, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=True),
        base_vocab=930, px=28, patch=14,
        dino=dict(dim=32, depth=3, mlp=128), siglip=dict(dim=48, depth=3, mlp=192)),
}
# libero_90's statistics layout (q01/q99/mask), values of the right kind: speed does not depend on them.
STATS = {"libero_90": {"action": {
    "q01": [-0.7, -0.6, -0.9, -0.1, -0.15, -0.2, -1.0], "q99": [0.9, 0.8, 0.9, 0.1, 0.2, 0.3, 1.0],
    "mean": [0.0] * 7, "std": [0.3] * 7, "min": [-0.9] * 6 + [-1.0], "max": [0.9] * 6 + [1.0],
    "mask": [True] * 6 + [False]}, "num_transitions": 500}}


# --- the released run (Prismatic's training layout), random weights ------------------------------
def _timm_vit(g, dim: int, depth: int, mlp: int, px: int, patch: int, dino: bool) -> dict:
    """A random timm ViT state dict with timm's key names (DINOv2: class token, 4 registers, layer
    scale `gamma` as Prismatic's training code saves it; SigLIP: the attention-pooling head)."""
    import torch

    def r(*shape, s=0.02):
        return torch.empty(*shape).normal_(0.0, s, generator=g)

    n = (px // patch) ** 2
    sd = {"patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "pos_embed": r(1, n, dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if dino:
        sd["cls_token"], sd["reg_token"] = r(1, 1, dim), r(1, 4, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "norm2.weight": 1 + r(dim),
                   b + "norm2.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "mlp.fc1.weight": r(mlp, dim), b + "mlp.fc1.bias": r(mlp),
                   b + "mlp.fc2.weight": r(dim, mlp), b + "mlp.fc2.bias": r(dim)})
        if dino:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = 0.1 + r(dim), 0.1 + r(dim)
    if not dino:  # in the release, never read by the VLA (the importer drops it)
        sd.update({"attn_pool.latent": r(1, 1, dim), "attn_pool.q.weight": r(dim, dim), "attn_pool.q.bias": r(dim)})
    return sd


def _llm_dir(path: Path, shape: dict) -> None:
    """The base LLM's directory (config.json, tokenizer.json, tokenizer_config.json) the import's
    --llm reads: Qwen2.5-0.5B's config, a word-level tokenizer with Qwen's id layout (base ids, then
    the 22 specials), newlines their own tokens as Qwen's pre-tokenizer makes them."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    words = ["\n"] + sorted({w for w in QWEN_PROMPT_WORDS if w not in QWEN_SPECIALS})
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(shape["base_vocab"] - len(vocab)):
        vocab[f"b{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="b0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tok.add_special_tokens([AddedToken(s, special=True) for s in QWEN_SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer"}))
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16",
               **dict(shape["llm"], vocab_size=shape["base_vocab"] + len(QWEN_SPECIALS)))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def write_run(work: Path, shape_name: str, seed: int = 0) -> dict:
    """The random MiniVLA run directory and base-LLM directory under `work`; returns their paths."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES[shape_name]
    llm_dir, run = work / "Qwen2.5-0.5B", work / "prism-qwen25-dinosiglip-224px+0_5b+mx-libero-90"
    _llm_dir(llm_dir, shape)
    g = torch.Generator().manual_seed(seed)
    px, patch = shape["px"], shape["patch"]
    dino = _timm_vit(g, **shape["dino"], px=px, patch=patch, dino=True)
    siglip = _timm_vit(g, **shape["siglip"], px=px, patch=patch, dino=False)
    v, h = shape["dino"]["dim"] + shape["siglip"]["dim"], shape["llm"]["hidden_size"]
    proj = {}  # fused-gelu-mlp: nn.Sequential(Linear(v, 4v), GELU, Linear(4v, h), GELU, Linear(h, h))
    for i, (rows, cols) in zip((0, 2, 4), ((4 * v, v), (h, 4 * v), (h, h))):
        proj[f"projector.{i}.weight"] = torch.empty(rows, cols).normal_(0.0, 1 / math.sqrt(cols), generator=g)
        proj[f"projector.{i}.bias"] = torch.empty(rows).normal_(0.0, 0.02, generator=g)
    torch.manual_seed(seed)
    # MiniVLA's embedding: resize_token_embeddings(len(tokenizer) with the 256 extras,
    # pad_to_multiple_of=64) -> Qwen2.5-0.5B's own 151,936 rows.
    llm_cfg = AutoConfig.for_model("qwen2", **shape["llm"])
    lm = AutoModelForCausalLM.from_config(llm_cfg, dtype=torch.float32)
    with torch.no_grad():  # wider logits than init's: fewer near-ties for the export's greedy parity check
        lm.get_input_embeddings().weight.mul_(8)
    llm_sd = {"llm." + k: t for k, t in lm.state_dict().items() if k != "lm_head.weight"}  # tied
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt = run / "checkpoints" / "step-080000-epoch-40-loss=0.0400.pt"
    torch.save({"model": {"vision_backbone": {**{"dino_featurizer." + k: t for k, t in dino.items()},
                                              **{"siglip_featurizer." + k: t for k, t in siglip.items()}},
                          "projector": proj, "llm_backbone": llm_sd}}, ckpt)
    (run / "config.json").write_text(json.dumps({"vla": {
        "vla_id": run.name, "base_vlm": BASE_VLM, "freeze_vision_backbone": False, "data_mix": "libero_90",
        "action_tokenizer": "extra_action_tokenizer", "image_sequence_len": 1}, "run_id": "minivla-random"}, indent=2))
    (run / "dataset_statistics.json").write_text(json.dumps(STATS, indent=2))
    params = sum(t.numel() for d in (dino, siglip, proj, llm_sd) for t in d.values())
    return {"run": str(run), "llm": str(llm_dir), "pt_bytes": ckpt.stat().st_size, "released_params": params}


# --- measured processes ---------------------------------------------------------------------------
@contextlib.contextmanager
def heavy_lock(path: str | None, log):
    """flock(2) on `path` (the lock `flock PATH CMD` takes), exclusive, for the duration; None: no lock."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"# waiting for {path} (another heavy job holds it) ...")
            t = time.time()
            fcntl.flock(f, fcntl.LOCK_EX)
            log(f"# got {path} after {time.time() - t:.0f} s")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def measured(cmd: list[str], lock: str | None, log, check: bool = True) -> dict:
    """Run `cmd` (under the heavy lock when given); its wall time, CPU time (user + system, its waited
    children included) and peak RSS from wait4's rusage, and its stdout."""
    with heavy_lock(lock, log):
        # Output to files, not pipes: Popen.communicate would reap the child before wait4 reads its rusage.
        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            t = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=_env())
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = rc = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - t
            fo.seek(0), fe.seek(0)
            out, err = fo.read(), fe.read()
    res = {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024.0, "stdout": out}
    if rc:
        tail = [ln for ln in err.splitlines() if ln.strip()][-3:]
        res["error"] = f"{' '.join(cmd[:4])} ... exited {rc}: {' | '.join(tail)}"
        if check:
            raise RuntimeError(res["error"])
    return res


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_vla.cli", *args]


def prepare(work: Path, shape: str, lock: str | None, log, precisions=PRECISIONS) -> dict:
    """Run dir -> imported checkpoint -> three bundles, each step measured once; reused when present
    (its measurements are kept in work/prepare.json)."""
    work.mkdir(parents=True, exist_ok=True)
    record = work / "prepare.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    if "run" not in done:
        log("# writing the random MiniVLA run (Prismatic training layout) ...")
        m = measured([sys.executable, __file__, "--worker", json.dumps({"kind": "write", "work": str(work),
                                                                         "shape": shape})], lock, log)
        done["run"] = {**json.loads(m.pop("stdout").strip().splitlines()[-1]), **m}
        record.write_text(json.dumps(done, indent=2))
    ckpt = work / "ckpt"
    if "import" not in done:
        log("# edge-vla import ...")
        m = measured(_cli("import", done["run"]["run"], "-o", str(ckpt), "--llm", done["run"]["llm"]), lock, log)
        m.pop("stdout")
        done["import"] = {**m, "bytes": _dir_bytes(ckpt)}
        record.write_text(json.dumps(done, indent=2))
    for prec in precisions:
        key, out = f"export-{prec}", work / f"bundle-{prec}"
        if key not in done:
            log(f"# edge-vla export --{prec} ...")
            # A failed export is reported in its row and the other runtimes still run.
            m = measured(_cli("export", str(ckpt), f"--{prec}", "-o", str(out)), lock, log, check=False)
            m.pop("stdout")
            done[key] = {**m, "bytes": _bundle_bytes(out)} if "error" not in m else m
            record.write_text(json.dumps(done, indent=2))
            log(f"#   {m['wall_s']:.0f} s wall, {m['cpu_s']:.0f} s CPU, peak RSS {m['peak_rss_mb']:.0f} MB, "
                + (f"{done[key]['bytes'] / 1e6:.0f} MB" if "error" not in m else f"FAILED: {m['error']}"))
    return done


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _bundle_bytes(path: Path) -> int:
    from edge_vla.artifacts.bundle import load_bundle

    return load_bundle(path, verify=False).size_bytes


# --- the workers: one runtime, one fresh process ---------------------------------------------------
def _observation(config) -> dict:
    from edge_vla.data.observations import synthetic_observations

    return dict(synthetic_observations(config, n=1, seed=1)[0], instruction=INSTRUCTION)


def worker_torch(ckpt: str, reasoning: int) -> dict:
    """PyTorch fp32 eager: vision towers + projector, then HF generate on inputs_embeds."""
    import torch

    torch.set_num_threads(1)
    from edge_vla.model.vla import VLA

    t_load = time.perf_counter()
    vla = VLA.from_pretrained(ckpt).eval()
    load_s = time.perf_counter() - t_load
    lm, proc = vla.lm, vla.processor
    obs = _observation(vla.config)
    recipe = vla.recipe_info or {}
    prompt = proc.prompt_ids(obs["instruction"])
    direct_ids = prompt + list(recipe.get("inference_prefix_ids") or [])  # MiniVLA's forced "\n"
    full_ids = prompt + list(recipe.get("reasoning_prefix_ids") or [])  # what edge-vla's full mode prefills
    n_act = vla.config.n_action_tokens
    n_full = reasoning + len(proc.tokenizer.encode(" ACTION:")) + n_act
    pv = torch.from_numpy(proc.images(obs["images"]))[None]
    pad = proc.tokenizer.pad_id

    def vision():
        t = _clock()
        with torch.no_grad():
            prefix = vla.encode_prefix(pv, None)
        return prefix, _since(t)

    def generate(prefix, ids, n):
        t = _clock()
        with torch.no_grad():
            embeds = torch.cat([prefix, lm.get_input_embeddings()(torch.tensor([ids]))], 1)
            out = lm.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=pad, eos_token_id=None)
        assert out.shape[-1] == n, out.shape  # inputs_embeds only: generate returns the new tokens
        return _since(t)

    prefix, _ = vision()  # warm-up: a direct action
    generate(prefix, direct_ids, n_act)
    prefix, vis = vision()
    direct_gen = generate(prefix, direct_ids, n_act)
    prefill = generate(prefix, direct_ids, 1)
    prefix, vis2 = vision()
    full_gen = generate(prefix, full_ids, n_full)
    res = {}
    for i, k in enumerate(("", "_cpu")):  # wall, then CPU time
        res["vision_ms" + k] = float(np.median([vis[i], vis2[i]]))
        res["prefill_ms" + k] = prefill[i]
        res["action_ms" + k] = direct_gen[i] - prefill[i]
        res["decode_ms_per_token" + k] = (full_gen[i] - direct_gen[i]) / (n_full - n_act)
        res["direct_ms" + k] = vis[i] + direct_gen[i]
        res["full_ms" + k] = vis2[i] + full_gen[i]
    return {**res, "reasoning_tokens": reasoning, "generated_tokens_full": n_full, "action_tokens": n_act,
            "context_tokens": int(prefix.shape[1] + len(direct_ids)), "load_s": load_s,
            "attn_implementation": lm.config._attn_implementation}


def _record_calls(backend, log: list) -> None:
    """Time every engine call the Policy makes on `backend` (wall and CPU ms, in order), so that each
    component's CPU time is measured, not apportioned. The calls themselves are unchanged."""
    def timed(name, fn):
        def call(*args, **kwargs):
            t = _clock()
            out = fn(*args, **kwargs)
            log.append((name, *_since(t)))
            return out
        return call

    for name in ("encode_prefix", "prefill", "step", "lm_logits", "action_bin", "action_bins", "action_logits"):
        if hasattr(backend, name):
            setattr(backend, name, timed(name, getattr(backend, name)))


def worker_bundle(bundle: str, reasoning: int) -> dict:
    """An edge-vla bundle through the Policy (ONNX Runtime, one intra-op thread)."""
    from edge_vla.runtime.policy import Policy, load_policy

    t_load = time.perf_counter()
    direct = load_policy(bundle, mode="direct", threads=1)
    load_s = time.perf_counter() - t_load
    # The same backend (sessions) in full mode, forced to exactly `reasoning` free tokens.
    full = Policy(direct.backend, mode="full", max_free_tokens=reasoning, min_free_tokens=reasoning)
    obs = _observation(direct.processor.config)
    direct.act(obs)  # warm-up: ONNX Runtime plans its kernels on the first runs
    calls: list = []
    _record_calls(direct.backend, calls)

    def act(policy):
        calls.clear()
        t = _clock()
        r = policy.act(obs)
        return r, _since(t), list(calls)

    rd, (d_wall, d_cpu), cd = act(direct)
    rf, (f_wall, f_cpu), cf = act(full)
    # The Policy counts what it forces at the start of full mode (MiniVLA's prompt-ending newline) as
    # reasoning; it is prefilled, not decoded.
    forced = len(full.reasoning_prefix_ids)
    if rf.tokens["reasoning"] != reasoning + forced:
        raise RuntimeError(f"full mode wrote {rf.tokens['reasoning'] - forced} reasoning tokens, not {reasoning}")

    def component(calls, names, i):  # summed ms (i: 1 wall, 2 CPU) of the calls named
        return sum(c[i] for c in calls if c[0] in names)

    # Full mode: the first `reasoning` steps feed the free tokens, each after its lm_logits call.
    steps = [c for c in cf if c[0] == "step"][:reasoning]
    heads = [c for c in cf if c[0] == "lm_logits"][:reasoning]
    after_prefill = [c for c in cd if c[0] not in ("encode_prefix", "prefill")]
    res = {"direct_ms": d_wall, "full_ms": f_wall, "direct_ms_cpu": d_cpu, "full_ms_cpu": f_cpu}
    for i, k in ((1, ""), (2, "_cpu")):
        res["vision_ms" + k] = component(cd, ("encode_prefix",), i)
        res["prefill_ms" + k] = component(cd, ("prefill",), i)
        res["action_ms" + k] = sum(c[i] for c in after_prefill)
        res["decode_ms_per_token" + k] = float(np.median([s[i] + h[i] for s, h in zip(steps, heads)]))
    return {**res, "reasoning_tokens": rf.tokens["reasoning"] - forced, "action_tokens": rd.tokens["action"],
            "context_tokens": None, "load_s": load_s}


def worker(spec: dict) -> dict:
    if spec["kind"] == "write":
        return write_run(Path(spec["work"]), spec["shape"])
    t0 = time.perf_counter()
    if spec["kind"] == "torch-fp32":
        out = worker_torch(spec["path"], spec["reasoning"])
    else:
        out = worker_bundle(spec["path"], spec["reasoning"])
    return {**out, "peak_rss_mb": _peak_rss_mb(), "process_cpu_s": time.process_time(),
            "process_wall_s": time.perf_counter() - t0}


# --- the driver -------------------------------------------------------------------------------------
COMPONENTS = ("vision_ms", "prefill_ms", "decode_ms_per_token", "action_ms", "direct_ms", "full_ms")


def run_benchmark(work: str | Path = "/tmp/minivla_e2e", shape: str = "minivla", repeats: int = 3,
                  reasoning_tokens: int = 250, lock: str | None = HEAVY_LOCK, runtimes=RUNTIMES, log=print) -> dict:
    """Build (or reuse) the run, checkpoint and bundles under `work`, time every runtime interleaved."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape}: use one of {', '.join(SHAPES)}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    unknown = [rt for rt in runtimes if rt not in RUNTIMES]
    if unknown:
        raise SystemExit(f"unknown runtime {unknown[0]}: use some of {', '.join(RUNTIMES)}")
    precisions = [p for p in PRECISIONS if f"edge-vla-{p}" in runtimes]
    prep = prepare(work, shape, lock, log, precisions)
    paths = {"torch-fp32": work / "ckpt", **{f"edge-vla-{p}": work / f"bundle-{p}" for p in PRECISIONS}}
    skipped = {rt: prep[f"export-{rt.rsplit('-', 1)[1]}"]["error"] for rt in runtimes
               if rt != "torch-fp32" and "error" in prep[f"export-{rt.rsplit('-', 1)[1]}"]}
    runtimes = [rt for rt in runtimes if rt not in skipped]
    runs: dict[str, list] = {rt: [] for rt in runtimes}
    # One lock for the whole timing phase when a heavy runtime is in it: the repeats stay interleaved
    # (another heavy job cannot take the machine between them) and no heavy job competes for memory.
    with heavy_lock(lock if HEAVY & set(runtimes) else None, log):
        for r in range(repeats):
            for rt in runtimes:
                spec = {"kind": rt, "path": str(paths[rt]), "reasoning": reasoning_tokens}
                m = measured([sys.executable, __file__, "--worker", json.dumps(spec)], None, log)
                got = json.loads(m["stdout"].strip().splitlines()[-1])
                runs[rt].append(got)
                log(f"# repeat {r + 1}/{repeats} {rt}: direct {got['direct_ms']:.0f} ms ({got['direct_ms_cpu']:.0f} CPU), "
                    f"full {got['full_ms'] / 1e3:.1f} s ({got['full_ms_cpu'] / 1e3:.1f} CPU), "
                    f"{got['decode_ms_per_token']:.1f} ms/token, peak {got['peak_rss_mb']:.0f} MB")
    rows = {}
    for rt, rr in runs.items():
        row = {k + s: float(np.median([x[k + s] for x in rr])) for k in COMPONENTS for s in ("", "_cpu")}
        row.update(peak_rss_mb=max(x["peak_rss_mb"] for x in rr),
                   process_cpu_s=float(np.median([x["process_cpu_s"] for x in rr])),
                   load_s=float(np.median([x["load_s"] for x in rr])), repeats=len(rr),
                   reasoning_tokens=rr[0]["reasoning_tokens"], action_tokens=rr[0]["action_tokens"],
                   disk_bytes=prep["import"]["bytes"] if rt == "torch-fp32" else prep[f"export-{rt.rsplit('-', 1)[1]}"]["bytes"])
        row["full_vs_direct"] = row["full_ms"] / row["direct_ms"]
        row["full_vs_direct_cpu"] = row["full_ms_cpu"] / row["direct_ms_cpu"]
        if rt == "torch-fp32":
            row.update(context_tokens=rr[0]["context_tokens"], attn_implementation=rr[0]["attn_implementation"],
                       generated_tokens_full=rr[0]["generated_tokens_full"])
        rows[rt] = row
    base = rows.get("torch-fp32")
    if base:
        for row in rows.values():  # > 1: faster (or smaller) than PyTorch fp32
            row["speedup_vs_torch"] = {k + s: base[k + s] / row[k + s] for k in COMPONENTS for s in ("", "_cpu")}
            row["size_vs_torch"] = row["disk_bytes"] / base["disk_bytes"]
    steps = {k: {kk: v for kk, v in prep[k].items() if kk in ("wall_s", "cpu_s", "peak_rss_mb", "bytes", "error")}
             for k in ("run", "import", *[f"export-{p}" for p in precisions])}
    steps["run"]["bytes"] = prep["run"]["pt_bytes"]
    return {"shape": shape, "config": SHAPES[shape], "released_params": prep["run"]["released_params"],
            "reasoning_tokens": reasoning_tokens, "repeats": repeats, "runtimes": list(runtimes), "rows": rows,
            "skipped": skipped,
            "steps": steps, "load_avg": os.getloadavg(),
            "note": "1 intra-op thread, a fresh process per runtime per repeat, repeats interleaved; medians; CPU "
                    "time = the worker process's user + system time (the load-robust figure on a shared machine)"}


def format_report(res: dict) -> str:
    lines = [f"MiniVLA-shaped ({res['shape']}): {res['released_params'] / 1e6:.0f}M parameters in the released run; "
             f"{res['repeats']} interleaved repeats, 1 thread; full mode = {res['reasoning_tokens']} reasoning tokens",
             "wall ms (CPU ms)        vision            prefill      decode ms/tok        action       direct/action"
             "           full/action   full/direct  peak MB   disk MB  x torch direct (CPU)  x torch full (CPU)"
             "  x torch ms/tok (CPU)  process CPU s"]
    for rt, r in res["rows"].items():
        sp = r.get("speedup_vs_torch", {})
        cell = lambda k: f"{r[k]:8.1f} ({r[k + '_cpu']:8.1f})"  # noqa: E731
        lines.append(f"{rt:14s} {cell('vision_ms')} {cell('prefill_ms')} {cell('decode_ms_per_token')} "
                     f"{cell('action_ms')} {cell('direct_ms')} {cell('full_ms')} {r['full_vs_direct_cpu']:8.1f}x "
                     f"{r['peak_rss_mb']:8.0f} {r['disk_bytes'] / 1e6:9.1f} "
                     f"{sp.get('direct_ms', float('nan')):6.2f} ({sp.get('direct_ms_cpu', float('nan')):5.2f}) "
                     f"{sp.get('full_ms', float('nan')):9.2f} ({sp.get('full_ms_cpu', float('nan')):5.2f}) "
                     f"{sp.get('decode_ms_per_token', float('nan')):9.2f} ({sp.get('decode_ms_per_token_cpu', float('nan')):5.2f}) "
                     f"{r['process_cpu_s']:10.1f}")
    for rt, why in res.get("skipped", {}).items():
        lines.append(f"{rt:14s} skipped: {why}")
    for k, s in res["steps"].items():
        lines.append(f"{k:14s} {s.get('wall_s', 0):7.0f} s wall, {s.get('cpu_s', 0):7.0f} s CPU, peak RSS "
                     f"{s.get('peak_rss_mb', 0):7.0f} MB, " + (f"{s.get('bytes', 0) / 1e6:8.1f} MB written"
                                                            if "error" not in s else "FAILED"))
    return "\n".join(lines)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/minivla_e2e", help="build directory (several GB at MiniVLA's size)")
    ap.add_argument("--shape", default="minivla", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reasoning-tokens", type=int, default=250)
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of " + ", ".join(RUNTIMES))
    ap.add_argument("--lock", default=HEAVY_LOCK, help="flock file heavy steps take ('' for none)")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--prepare-only", action="store_true", help="build the run, checkpoint and bundles, time nothing")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    if a.prepare_only:
        rts = a.runtimes.split(",")
        print(json.dumps(prepare(Path(a.work), a.shape, a.lock or None, print,
                                 [p for p in PRECISIONS if f"edge-vla-{p}" in rts]), indent=2))
        return
    res = run_benchmark(a.work, a.shape, a.repeats, a.reasoning_tokens, a.lock or None, tuple(a.runtimes.split(",")))
    print(format_report(res))
    if a.out:
        from edge_vla.io import atomic_write_text

        atomic_write_text(a.out, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
