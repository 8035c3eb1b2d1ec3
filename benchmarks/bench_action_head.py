"""Restricted action head vs the full LM head, on a Qwen2.5-0.5B-shaped decoder (random weights).

    .venv/bin/python benchmarks/bench_action_head.py [--past 280] [--reps 20] [--out results.json]

CPU (ONNX Runtime, one intra-op thread), the bar of issue #6:
  1. head only: the full head (MatMul 896 x 151936 + ArgMax) vs the fused action-head graph
     (MatMul 896 x 256 + ArgMax + value Gather + clip), per decoded action token;
  2. direct-mode decode step, split the way a bundle ships it (edge_vla.export.onnx_export:
     the decoder body decoder.onnx + lm_head.onnx + action_head.onnx, via
     edge_vla.kernels.onnx_graph.split_lm_head), past length --past:
       full        body + lm_head (full logits) + argmax over the action block (OrtBackend head="full")
       restricted  body + the fused action-head graph (OrtBackend's default in direct mode)
       unsplit     the schema-1 decoder with the head inside (ORT computes it whatever is requested)
     Bar: restricted >= 1.2x faster than full.
This is the Qwen2.5-0.5B-shaped decoder alone (no vision tower, no VLA export): on a real bundle
the same comparison is `edge-vla bench BUNDLE --compare-head`.
GPU (only when CUDA exists): the fused Triton and CUDA kernels vs the unfused PyTorch path
(full head + argmax over the action block + gather + clip), 7 rows. Bar: >= 5x.

Ratios are measured in one run, interleaving the two variants so both see the same machine
load; absolute times on a shared 2-core machine move, ratios much less.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  max_position_embeddings=32768, rms_norm_eps=1e-6)
N_BINS, D = 256, 7


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def interleaved(fns: dict, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each fn, calls interleaved A, B, A, B ... after a warm-up."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def build_model(seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(**QWEN25_05B)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return model


def value_table(seed: int):
    from edge_vla.kernels import action_value_table
    from edge_vla.tokens.action import ActionStats, ActionTokenizer

    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(1000, D)) * 0.3
    acts[:, -1] = np.sign(acts[:, -1])
    tok = ActionTokenizer(ActionStats.from_actions(acts), first_token_id=QWEN25_05B["vocab_size"] - N_BINS)
    return tok, *action_value_table(tok)


def export_decoder(model, path: Path) -> None:
    """The project's decoder graph (edge_vla.export.onnx_export.DecoderWithCache): hidden, logits, present."""
    import torch

    from edge_vla.export.onnx_export import OPSET, DecoderWithCache, kv_names, kv_shape

    n_layers, n_kv, hd = kv_shape(model.config)
    wrapper = DecoderWithCache(SimpleNamespace(lm=model)).eval()
    # Sample sizes > 1 (batch 2, 4 new tokens, past 3), as edge_vla.export does: size-1 samples
    # specialise the dynamic dims and trip torch.export on SDPA's is_causal.
    past = tuple(torch.zeros(2, n_kv, 3, hd) for _ in range(2 * n_layers))
    emb = torch.zeros(2, 4, model.config.hidden_size)
    batch, seq, past_len = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=4096), \
        torch.export.Dim("past", min=0, max=4096)
    dyn = {"inputs_embeds": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    import contextlib
    import io
    import warnings

    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(wrapper, (emb, past), dynamo=True, opset_version=OPSET,
                                 input_names=["inputs_embeds", *kv_names(n_layers, "past")],
                                 output_names=["hidden", "logits", *kv_names(n_layers, "present")],
                                 dynamic_shapes=dyn, external_data=True, verbose=False)
        prog.save(str(path), external_data=True)


def session(path_or_bytes, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes, opts,
                                providers=["CPUExecutionProvider"])


def full_head_graph(head_weight: np.ndarray):
    """hidden (N, H) -> MatMul(full head^T) -> ArgMax: what a decoder with the full head computes per token."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    v, h = head_weight.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["hidden", "head_t"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["token"], axis=-1, keepdims=0, select_last_index=0)],
        "full_head", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", h])],
        [helper.make_tensor_value_info("token", TensorProto.INT64, ["rows"])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(head_weight.T), "head_t")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m.SerializeToString()


def bench_cpu(args, results: dict) -> None:
    import onnx
    import torch

    from edge_vla.export.onnx_export import kv_names, kv_shape
    from edge_vla.kernels import action_dims, action_head_rows
    from edge_vla.kernels.onnx_graph import build_action_head_graph, split_lm_head

    torch.set_num_threads(1)
    tok, values, low, high = value_table(args.seed)
    say("building the Qwen2.5-0.5B-shaped model (random weights) ...")
    model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.detach().numpy().copy()  # (151936, 896)
    w_act, _ = action_head_rows(head, tok.first_token_id, N_BINS)
    results["model"] = {**QWEN25_05B, "params": n_params}
    say(f"{n_params / 1e6:.0f}M params; head {head.shape[0]} x {head.shape[1]} "
        f"({head.nbytes / 2**20:.0f} MiB), action rows {w_act.shape[0]} ({w_act.nbytes / 2**20:.2f} MiB)")
    n_layers, n_kv, hd = kv_shape(model.config)

    # 1. head only ----------------------------------------------------------------------------
    say("head only: full head + ArgMax vs the fused action-head graph (ORT, 1 thread) ...")
    full = session(full_head_graph(head))
    fused = session(build_action_head_graph(w_act, values, low, high).SerializeToString())
    rng = np.random.default_rng(args.seed)
    h1 = rng.normal(size=(1, head.shape[1])).astype(np.float32)
    d1 = action_dims(1, D)
    t = interleaved({"full": lambda: full.run(None, {"hidden": h1}),
                     "restricted": lambda: fused.run(None, {"hidden": h1, "dim": d1})}, args.reps * 5)
    results["head_only_ms"] = t
    say(f"  full head {t['full']:.3f} ms, restricted fused head {t['restricted']:.4f} ms "
        f"-> {t['full'] / t['restricted']:.1f}x")
    del full, fused
    gc.collect()

    # 2. decode step with the decoder -------------------------------------------------------------
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_action_head_"))
    work.mkdir(parents=True, exist_ok=True)
    dec_path = work / "decoder.onnx"
    if not dec_path.exists():
        say(f"exporting the decoder (KV cache, full head) to {work} (a few minutes) ...")
        t0 = time.perf_counter()
        export_decoder(model, dec_path)
        say(f"  exported in {time.perf_counter() - t0:.0f} s")

    # Torch eager, same model: full head vs restricted rows (secondary number).
    say("torch eager decode step (1 thread): full head vs restricted rows ...")
    from transformers import DynamicCache

    past_t = [(torch.randn(1, n_kv, args.past, hd), torch.randn(1, n_kv, args.past, hd)) for _ in range(n_layers)]
    emb_t = torch.randn(1, 1, model.config.hidden_size)
    dec = model.get_decoder()
    w_act_t = torch.from_numpy(w_act)
    lm_head = model.get_output_embeddings()

    def torch_step(restricted: bool):
        with torch.no_grad():
            cache = DynamicCache([(k, v) for k, v in past_t], config=model.config)
            hid = dec(inputs_embeds=emb_t, cache=cache, use_cache=True).last_hidden_state[:, -1]
            if restricted:
                return (hid @ w_act_t.T).argmax(-1)
            return lm_head(hid)[:, tok.first_token_id:tok.first_token_id + N_BINS].argmax(-1)

    t = interleaved({"full": lambda: torch_step(False), "restricted": lambda: torch_step(True)}, max(5, args.reps // 2),
                    warmup=2)
    results["torch_eager_step_ms"] = t
    say(f"  torch eager step: full {t['full']:.1f} ms, restricted {t['restricted']:.1f} ms "
        f"-> {t['full'] / t['restricted']:.2f}x")
    np.save(work / "head.npy", head)  # for split_lm_head after the torch model is freed
    del model, dec, lm_head, past_t, head
    gc.collect()

    say("splitting the decoder the way bundles ship it: body + lm_head + fused action head ...")
    base = onnx.load(str(dec_path), load_external_data=False)  # weights stay in the side file
    head_w = np.load(work / "head.npy")
    body, lm_head = split_lm_head(base, head_w)
    body_path, lm_path, act_path = work / "decoder_body.onnx", work / "lm_head.onnx", work / "action_head.onnx"
    onnx.save(body, str(body_path))  # refers to decoder.onnx.data by relative path: same directory
    onnx.save(lm_head, str(lm_path))
    onnx.save(build_action_head_graph(w_act, values, low, high), str(act_path))
    del base, body, lm_head, head_w
    gc.collect()

    say(f"loading the graphs in ONNX Runtime (1 intra-op thread), past length {args.past} ...")
    s_body, s_lm, s_act = session(body_path), session(lm_path), session(act_path)
    s_unsplit = session(dec_path)
    past = {n: rng.normal(size=(1, n_kv, args.past, hd)).astype(np.float32) for n in kv_names(n_layers, "past")}
    emb = rng.normal(size=(1, 1, QWEN25_05B["hidden_size"])).astype(np.float32)
    lo = tok.first_token_id

    def step_full():
        hidden = s_body.run(None, {"inputs_embeds": emb, **past})[0]
        b = int(np.argmax(s_lm.run(None, {"hidden": hidden})[0][0, lo:lo + N_BINS]))
        return tok.from_bins(np.array([b]))  # de-tokenize (numpy)

    def step_restricted():
        hidden = s_body.run(None, {"inputs_embeds": emb, **past})[0]
        return s_act.run(None, {"hidden": hidden, "dim": d1})[1]

    def step_unsplit():
        outs = s_unsplit.run(["logits"], {"inputs_embeds": emb, **past})
        return tok.from_bins(np.array([int(np.argmax(outs[0][0, lo:lo + N_BINS]))]))

    # Same token either way (the fused graph computes what the full head + slice + argmax picks).
    hidden = s_body.run(None, {"inputs_embeds": emb, **past})[0]
    full_bin = int(np.argmax(s_lm.run(None, {"hidden": hidden})[0][0, lo:lo + N_BINS]))
    results["same_token"] = full_bin == int(s_act.run(None, {"hidden": hidden, "dim": d1})[0][0])
    t = interleaved({"full": step_full, "restricted": step_restricted, "unsplit": step_unsplit}, args.reps)
    results["ort_decode_step_ms"] = t
    ratio = t["full"] / t["restricted"]
    results["ort_decode_step_speedup"] = ratio
    results["ort_decode_step_speedup_vs_unsplit"] = t["unsplit"] / t["restricted"]
    say(f"  ORT decode step: body + full head {t['full']:.1f} ms, body + restricted head {t['restricted']:.1f} ms "
        f"-> {ratio:.2f}x (bar >= 1.2x: {'PASS' if ratio >= 1.2 else 'FAIL'}); same token: {results['same_token']}")
    say(f"  unsplit (schema-1) decoder {t['unsplit']:.1f} ms -> restricted is {t['unsplit'] / t['restricted']:.2f}x faster")
    del s_body, s_lm, s_act, s_unsplit
    gc.collect()


def bench_gpu(args, results: dict) -> None:
    import torch

    from edge_vla.kernels import available_implementations
    from edge_vla.kernels.reference import action_dims

    if not torch.cuda.is_available():
        results["gpu"] = "no CUDA GPU on this machine: the Triton/CUDA kernel timings are unverified"
        say(results["gpu"])
        return
    tok, values, low, high = value_table(args.seed)
    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    head = (torch.randn(QWEN25_05B["vocab_size"], QWEN25_05B["hidden_size"], generator=g) * 0.02).to(dev)
    lo = tok.first_token_id
    w = head[lo:lo + N_BINS].contiguous()
    h = torch.randn(D, QWEN25_05B["hidden_size"], generator=g).to(dev)
    dim = torch.as_tensor(action_dims(D, D), device=dev)
    vals, lo_t, hi_t = (torch.as_tensor(x, device=dev) for x in (values, low, high))

    def unfused_full():
        logits = h @ head.T
        bins = logits[:, lo:lo + N_BINS].argmax(-1)
        return torch.minimum(torch.maximum(vals[bins, dim], lo_t[dim]), hi_t[dim])

    def unfused_restricted():
        bins = (h @ w.T).argmax(-1)
        return torch.minimum(torch.maximum(vals[bins, dim], lo_t[dim]), hi_t[dim])

    fns = {"unfused_full_head": unfused_full, "unfused_restricted": unfused_restricted}
    status = available_implementations()
    if status["triton"] is None:
        from edge_vla.kernels.triton_kernel import decode_actions_triton

        fns["triton"] = lambda: decode_actions_triton(h, w, dim, vals, lo_t, hi_t)
    from edge_vla.kernels.cuda_loader import available_loaders, decode_actions_cuda

    for name, why in available_loaders().items():
        if why is None:
            fns[f"cuda_{name}"] = (lambda n: lambda: decode_actions_cuda(h, w, dim, vals, lo_t, hi_t, loader=n))(name)

    def timed(f, reps=200):
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            f()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    t = {k: timed(f) for k, f in fns.items()}
    results["gpu_ms"] = {**t, "device": torch.cuda.get_device_name()}
    for k, v in t.items():
        say(f"  GPU {k}: {v * 1e3:.1f} us ({t['unfused_full_head'] / v:.1f}x vs unfused full head)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--past", type=int, default=280, help="KV-cache length at the decode step (image + prompt tokens)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the exported graphs go (reused when present); default a temp dir")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--out", help="write an edge-vla results JSON (kind bench) here")
    args = p.parse_args(argv)
    results: dict = {}
    if not args.skip_cpu:
        bench_cpu(args, results)
    bench_gpu(args, results)
    if args.out:
        from edge_vla.eval.results import write_results

        write_results(args.out, "bench", {"benchmark": "action_head", **vars(args)}, [results],
                      summary={"ort_decode_step_speedup": results.get("ort_decode_step_speedup")})
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
