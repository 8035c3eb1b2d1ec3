"""Quantization-aware fine-tuning at 4 bits (issue #20): does it bring full-mode `ecot` to >= 97%?

The experiment behind "Quantization-aware fine-tuning" in docs/results.md (it did not pay, so it is
not a training option). Fake quantization reproduces the INT4 export's own block quantizer exactly:
every LM weight the export writes as MatMulNBits (the decoder's projections, the tied embedding / LM
head) goes through ONNX Runtime's `quantize_matmul_4bits` (edge_vla.export.nbits.pack_matmul:
symmetric, blocks of 32 along K, scale = the block's largest-magnitude value / -8) and is dequantized
back ((q - 8) * scale, what MatMulNBits multiplies with), with a straight-through gradient. A
checkpoint is "baked" by writing the dequantized weights into it: they lie on the 4-bit grid, so the
INT4 export re-quantizes them to themselves (ORT's MatMulNBits packer and its numpy
GatherBlockQuantized quantizer both; before baking the two differ on ~1 weight in 10,000), and the
baked checkpoint's fp32 bundle is the fake-quant forward.

    --stage bake   the shipped checkpoint with its post-training INT4 weights baked in (no training): how
                   far the INT4 bundle is from its own weights' fp32 forward when the weights are exact
                   (what is left: the int8 activation compute, the INT8 vision tower)
    --stage all    also fine-tune the shipped checkpoint with fake-quantized LM weights through the
                   project's trainer, bake it, and score (with --control: the same fine-tune in fp32)
    --stage truth  the bundles of an earlier run in --work against the held-out samples' target actions

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qat_int4.py --data /work/demo_out/data --stage all \
        --control --steps 200 --lr 1e-4 --n-obs 128 --n-tf 128 --work /tmp/qat_int4 --out qat.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qat_int4.py --data /work/demo_out/data --stage truth \
        --truth-of orig,qat,ft --n-obs 128 --work /tmp/qat_int4 --out truth.json

Data: the fine-tunes train on the training episodes of `--data` (the trainer's 10% validation split by
episode, seed 0, held out) and every score is on that validation split (the observations
benchmarks/int4_accuracy.py scores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int4_accuracy as ia  # noqa: E402

RECIPE = "ecot"


def fake_quant_np(w_nk: np.ndarray) -> np.ndarray:
    """A Linear weight (N, K) through the INT4 export's MatMulNBits quantizer and back (its dequantization:
    (q - 8) * scale per block)."""
    from edge_vla.export.nbits import pack_matmul

    p = pack_matmul(np.ascontiguousarray(w_nk.T, np.float32), 4)
    q = np.stack([p.data & 0x0F, p.data >> 4], -1).reshape(p.n, -1)
    q = q[:, :p.scales.shape[1] * p.block].astype(np.float32).reshape(p.n, -1, p.block)
    return ((q - 8) * p.scales[:, :, None]).reshape(p.n, -1)[:, :p.k].astype(np.float32)


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Straight-through: the forward sees the 4-bit weight, the gradient flows to the fp32 one."""
    q = torch.from_numpy(fake_quant_np(w.detach().float().cpu().numpy())).to(w.device, w.dtype)
    return w + (q - w).detach()


def quantized_weights(lm) -> dict[str, torch.nn.Parameter]:
    """The LM weights the INT4 export writes as 4-bit blocks: every Linear in the decoder layers and the
    embedding (tied with the LM head, one tensor)."""
    out = {n: m.weight for n, m in lm.named_modules()
           if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}
    out["embed"] = lm.get_input_embeddings().weight
    return out


def install_fake_quant(lm) -> None:
    """Each decoder Linear, the embedding and the LM head compute with fake-quantized weights
    (instance forwards: the state dict keeps its keys)."""
    import torch.nn.functional as F

    for name, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear) and (".layers." in f".{name}" or m is lm.get_output_embeddings()):
            m.forward = (lambda mod: lambda x: F.linear(x, fake_quant(mod.weight), mod.bias))(m)
    emb = lm.get_input_embeddings()
    emb.forward = lambda ids: F.embedding(ids, fake_quant(emb.weight), emb.padding_idx)


@torch.no_grad()
def bake(model) -> None:
    for w in quantized_weights(model.lm).values():
        w.copy_(torch.from_numpy(fake_quant_np(w.float().numpy())))


def bake_checkpoint(src: Path, dst: Path) -> Path:
    from edge_vla.model.vla import VLA

    m = VLA.from_pretrained(src)
    bake(m)
    return m.save_pretrained(dst, overwrite=True)


def qat(src: Path, data: Path, out: Path, steps: int, lr: float, batch_size: int, fake: bool = True) -> Path:
    """Fine-tune `src` with fake-quantized LM weights (`fake`; without: the plain fp32 fine-tune, the control)
    through the project's trainer; returns its final checkpoint (fp32 master weights, not baked)."""
    from edge_vla.train import trainer
    from edge_vla.train.config import TrainConfig

    orig = trainer.apply_trainable

    def with_fake_quant(model, cfg):
        model = orig(model, cfg)
        if fake:
            install_fake_quant(model.lm)
        return model

    trainer.apply_trainable = with_fake_quant
    cfg = TrainConfig(recipe=RECIPE, init_from=str(src), action_chunk=4, lr=lr, warmup_steps=min(20, steps // 10),
                      steps=steps, batch_size=batch_size, val_max_samples=8, log_every=10,
                      model={"parallel_actions": False})
    try:
        return trainer.train(cfg, str(data), out, overwrite=True, show_progress=False)
    finally:
        trainer.apply_trainable = orig


def teacher_forced(ckpt: Path, data: Path, n: int) -> dict:
    """Teacher-forced metrics (and the trainer's free-running decode) on `n` held-out samples."""
    from edge_vla.model.vla import VLA
    from edge_vla.train.data import open_split
    from edge_vla.train.evaluate import evaluate
    from edge_vla.train.recipes import get_recipe

    m = VLA.from_pretrained(ckpt)
    val = open_split(str(data), "val", 0.1, 4, True, 0)
    return evaluate(m, get_recipe(RECIPE), val, max_samples=n, decode=False)


def score(ckpts: dict[str, Path], data: Path, n_obs: int, work: Path, pairs, log=print) -> dict:
    """Free-running and teacher-forced agreement of each (test, reference) pair: tests are `<ckpt>:<variant>`
    (variant of int4_accuracy.VARIANTS, or fp32), references `<ckpt>` (its fp32 bundle)."""
    from edge_vla.export import accuracy as acc
    from edge_vla.export import export_bundle
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy

    obs, _ = ia.observations(RECIPE, data, n_obs, 0)
    fp32, refs = {}, {}
    for name, c in ckpts.items():
        out = work / name / "fp32"
        if not (out / "manifest.json").exists():
            export_bundle(c, out, precision="fp32", parity_samples=obs[:4], calibration_data=obs[:4], report=lambda *_: None)
        fp32[name] = load_bundle(out)
    mode = next(iter(fp32.values())).recipe.get("decode_mode", "direct")
    rows = {}
    for test, ref in pairs:
        t = time.time()
        if ref not in refs:
            pol = Policy(OrtBackend(fp32[ref]), mode=mode)
            refs[ref] = (pol, acc.reference_results(pol, obs, modes=(mode,)))
        name, variant = test.split(":")
        b = fp32[name] if variant == "fp32" else ia.build_variant(fp32[name], variant, work / name, {}, [])
        rep = acc.accuracy_report(refs[ref][0], Policy(OrtBackend(b), mode=mode), obs, modes=(mode,),
                                  reference=refs[ref][1])[mode]
        r = rows[f"{test} vs {ref}"] = {k: rep.get(k) for k in ("action_token_agreement", "action_token_agreement_tf",
                                                                "action_token_agreement_se", "reasoning_token_agreement",
                                                                "reasoning_token_agreement_tf", "action_l1")}
        log(f"{test:22s} vs {ref:10s} free {100 * r['action_token_agreement']:6.2f}% (se "
            f"{100 * r['action_token_agreement_se']:.1f})  tf {100 * r['action_token_agreement_tf']:6.2f}%  reasoning "
            f"{100 * (r['reasoning_token_agreement'] or 0):6.2f}% / {100 * (r['reasoning_token_agreement_tf'] or 0):6.2f}%"
            f"  ({time.time() - t:.0f} s)")
    return rows


def against_truth(names, data: Path, n: int, work: Path, variants=("fp32", "int4"), log=print) -> dict:
    """Each bundle's free-running action tokens against the held-out samples' own target bins (not against
    another bundle): whether a bundle that disagrees with fp32 decodes worse actions or only other ones.
    Standard errors over observations; `diff_se`: of the paired difference from the same checkpoint's fp32."""
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.data.dataset import pick_evenly
    from edge_vla.data.observations import sample_to_obs
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy
    from edge_vla.train.data import open_split

    samples = pick_evenly(open_split(str(data), "val", 0.1, 4, True, 0), n)
    out = {}
    for name in names:
        fp32 = load_bundle(work / name / "fp32")
        mode = fp32.recipe.get("decode_mode", "direct")
        per_obs = {}
        for v in variants:
            b = fp32 if v == "fp32" else ia.build_variant(fp32, v, work / name, {}, [])
            pol = Policy(OrtBackend(b), mode=mode)
            hits, l1 = [], []
            for s in samples:
                r = pol.act(sample_to_obs(s))
                target = pol.action_tokenizer.encode(np.asarray(s.action)).reshape(-1)
                hits.append(float((np.asarray(r.info["action_token_ids"]) == target).mean()))
                l1.append(float(np.abs(r.action - np.asarray(s.action)).mean()))
            per_obs[v] = np.array(hits)
            diff = per_obs[v] - per_obs["fp32"] if "fp32" in per_obs else per_obs[v] * 0
            r = out[f"{name}:{v}"] = {"action_token_acc": float(np.mean(hits)),
                                      "se": float(np.std(hits, ddof=1) / np.sqrt(len(hits))),
                                      "diff_vs_fp32": float(diff.mean()),
                                      "diff_se": float(np.std(diff, ddof=1) / np.sqrt(len(diff))),
                                      "action_l1": float(np.mean(l1))}
            log(f"{name}:{v:12s} vs targets: action tokens {100 * r['action_token_acc']:6.2f}% (se {100 * r['se']:.1f}; "
                f"vs fp32 {100 * r['diff_vs_fp32']:+.2f}, se {100 * r['diff_se']:.2f})  L1 {r['action_l1']:.4f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/demo_out/data")
    ap.add_argument("--work", default="/tmp/qat_int4")
    ap.add_argument("--stage", default="all", choices=("bake", "all", "truth"),
                    help="truth: the bundles of an earlier run in --work against the targets only")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-obs", type=int, default=128)
    ap.add_argument("--n-tf", type=int, default=128, help="held-out samples for teacher-forced action accuracy")
    ap.add_argument("--truth-of", default="orig,ptq,qat,ft", help="the checkpoints --stage truth scores")
    ap.add_argument("--control", action="store_true", help="also the same fine-tune in fp32 (no fake quantization)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    data, work = Path(a.data), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = ia.PRETRAINED / RECIPE
    res: dict = {"args": vars(a)}
    if a.stage == "truth":
        names = [n for n in a.truth_of.split(",") if (work / n / "fp32" / "manifest.json").exists()]
        res["truth"] = against_truth(names, data, a.n_obs, work)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2, default=str))
        return
    ckpts = {"orig": src, "ptq": bake_checkpoint(src, work / "ckpt-ptq")}
    pairs = [("orig:int4", "orig"), ("ptq:int4", "ptq"), ("ptq:int4-fcomp", "ptq")]
    if a.stage == "all":
        t = time.time()
        final = qat(src, data, work / "qat-run", a.steps, a.lr, a.batch_size)
        res["qat_wall_s"] = time.time() - t
        ckpts["qat"] = bake_checkpoint(final, work / "ckpt-qat")
        pairs += [("qat:int4", "qat"), ("qat:int4-fcomp", "qat"), ("qat:int4", "orig"), ("qat:fp32", "orig")]
    if a.control:
        t = time.time()
        ckpts["ft"] = qat(src, data, work / "ft-run", a.steps, a.lr, a.batch_size, fake=False)
        res["ft_wall_s"] = time.time() - t
        pairs += [("ft:fp32", "orig"), ("ft:int4", "ft"), ("qat:fp32", "ft")]
    if a.stage == "bake":
        pairs = pairs[1:]
    res["teacher_forced"] = {k: teacher_forced(c, data, a.n_tf) for k, c in ckpts.items()}
    print(json.dumps(res["teacher_forced"], indent=1))
    res["agreement"] = score(ckpts, data, a.n_obs, work, pairs)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
