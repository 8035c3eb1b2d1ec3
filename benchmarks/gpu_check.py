"""The GPU half of benchmarks/gpu_check.sh: one step per call, one JSON line out (issue #20).

    python benchmarks/gpu_check.py STEP [--device cuda] [--work DIR]

Steps:
    torch-quant   the MiniVLA-shaped policy (Qwen2.5-0.5B decoder layers, random weights, the tiny
                  preset's vision tower and tokenizer: built offline) on the device: PyTorch fp32, fp16
                  and bitsandbytes INT8 (LLM.int8) / NF4, direct mode and full mode with 32 forced
                  reasoning tokens; ms per call (median, p95) and peak device memory
    ort-gpu       the same checkpoint's INT8 and fp32 bundles through onnxruntime-gpu's CUDA provider
                  (needs onnxruntime-gpu; the CPU onnxruntime package has no CUDA provider)

Each step also runs on `--device cpu` (what tests/test_bench-like checks of this file do here, on the
tiny checkpoint): the code paths are the ones the GPU runs, only the device differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def _timed(policy, obs, calls: int, sync) -> dict:
    for o in obs[:2]:
        policy.act(o)
    times = []
    for i in range(calls):
        sync()
        t = time.perf_counter()
        policy.act(obs[i % len(obs)])
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))]}


def torch_quant(ckpt: Path, device: str, calls: int) -> dict:
    import torch

    from edge_vla.data.observations import synthetic_observations
    from edge_vla.runtime.policy import load_policy

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    for name, opts in (("fp32", {}), ("bnb-int8", {"quantize": "int8"}), ("bnb-nf4", {"quantize": "nf4"})):
        for mode, popts in (("direct", {}), ("full", {"max_free_tokens": 32, "min_free_tokens": 32})):
            key = f"{name}/{mode}"
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                pol = load_policy(ckpt, backend="torch", mode=mode, device=device, **opts, **popts)
                obs = synthetic_observations(pol.processor.config, n=4, seed=1)
                out[key] = _timed(pol, obs, calls, sync)
                if cuda:
                    out[key]["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
                del pol
            except Exception as e:  # each variant reports its own failure; the others still run
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def ort_gpu(ckpt: Path, work: Path, calls: int, provider: str) -> dict:
    import onnxruntime as ort

    from edge_vla.data.observations import synthetic_observations
    from edge_vla.runtime.policy import load_policy

    if provider not in ort.get_available_providers():
        return {"error": f"{provider} not available in onnxruntime {ort.__version__}: {ort.get_available_providers()}"}
    from edge_vla.export import export_bundle

    out = {}
    for prec in ("fp32", "int8"):
        b = work / f"bundle-{prec}"
        try:
            if not (b / "manifest.json").exists():
                export_bundle(ckpt, b, precision=prec, report=lambda *_: None)
            pol = load_policy(b, mode="direct", providers=[provider, "CPUExecutionProvider"])
            obs = synthetic_observations(pol.processor.config, n=4, seed=1)
            out[f"{prec}/direct"] = _timed(pol, obs, calls, lambda: None)
        except Exception as e:
            out[f"{prec}/direct"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["torch-quant", "ort-gpu"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/edge_vla_gpu_check")
    ap.add_argument("--model", default="qwen0.5b", choices=["qwen0.5b", "tiny"])
    ap.add_argument("--calls", type=int, default=10)
    a = ap.parse_args()
    import peers

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = peers.build_checkpoint(a.model, work)
    if a.step == "torch-quant":
        res = torch_quant(ckpt, a.device, a.calls)
    else:
        res = ort_gpu(ckpt, work, a.calls, "CUDAExecutionProvider" if a.device.startswith("cuda") else "CPUExecutionProvider")
    print(json.dumps({"step": a.step, "model": a.model, "device": a.device, "seconds": time.time() - t0, "results": res}))


if __name__ == "__main__":
    main()
