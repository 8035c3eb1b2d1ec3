"""Export: checkpoint -> verified, quantized ONNX bundle (`edge-vla export`).

Kept import-light: `edge_vla.export.bundle` is read by the torch-free runtime, so nothing here
imports torch at module level.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from edge_vla.errors import EdgeVLAError

DEFAULT_TARGETS = ("cpu", "cuda")


def _check_target(target: str) -> str:
    # The targets engineer's registry (edge_vla.export.targets.TARGETS) extends this when present.
    try:
        from edge_vla.export.targets import TARGETS  # type: ignore

        names = list(TARGETS)
    except ImportError:
        names = list(DEFAULT_TARGETS)
    names = sorted(set(names) | set(DEFAULT_TARGETS))
    if target not in names:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error("target", target, names)
    return target


def _uses_tensorrt(target: str) -> bool:
    from edge_vla.export.targets import TARGETS, get_target

    return target in TARGETS and get_target(target).uses_tensorrt


def load_observations(data, config, limit: int | None = None) -> list[dict]:
    """Observations from a list of Samples/obs dicts, or a dataset path read by edge_vla.data."""
    import numpy as np

    from edge_vla.export.accuracy import sample_to_obs

    if data is None:
        return []
    if isinstance(data, (str, Path)):
        # Held-out (validation) episodes of the dataset training reads, spread evenly over it.
        from edge_vla.data.dataset import open_dataset

        ds = open_dataset(data, split="val", cameras=tuple(config.cameras), action_chunk=config.action_chunk)
        if len(ds) == 0:
            raise EdgeVLAError(f"dataset {data} has no held-out (validation) samples", "pass a dataset with several episodes")
        n = min(len(ds), limit or len(ds))
        data = [ds[int(i)] for i in np.linspace(0, len(ds) - 1, n).round().astype(int)]
    obs = [d if isinstance(d, dict) else sample_to_obs(d) for d in data]
    return obs[:limit] if limit else obs


class _RecordingSession:
    """Wraps an onnxruntime session and keeps every feed it sees (calibration for static INT8)."""

    def __init__(self, session, feeds: list):
        self._s, self._feeds = session, feeds

    def run(self, outputs, feeds):
        self._feeds.append({k: v.copy() for k, v in feeds.items()})
        return self._s.run(outputs, feeds)


def export_checkpoint(ckpt_dir, out_dir, precision: str = "int8", calibration_data=None, target: str = "cpu",
                      parity_samples=None, vision_precision: str | None = None, min_action_agreement: float | None = None,
                      parity_atol: float = 1e-3, report=print) -> Path:
    """Export `ckpt_dir` to a bundle at `out_dir`.

    Steps: load the checkpoint; export fp32 graphs; check parity against PyTorch on
    `parity_samples` (Samples or obs dicts; synthetic observations when None) and refuse on
    failure; quantize (decoder/embed/lm_head at `precision`, action_head fp32, vision at `vision_precision`, default the
    same); measure the accuracy of the quantized bundle against the fp32 graphs on
    `calibration_data` (held-out samples) or the parity samples; write the bundle atomically.
    """
    import numpy as np

    from edge_vla import __version__
    from edge_vla.environment import environment_report
    from edge_vla.export import accuracy as acc
    from edge_vla.export.bundle import TOKENIZER_DIR, Bundle, write_bundle
    from edge_vla.export.onnx_export import export_graphs
    from edge_vla.export.quantize import check_precision, quantize_graph
    from edge_vla.model.vla import VLA
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.torch_backend import TorchBackend

    check_precision(precision)
    from edge_vla.export.targets import default_vision_precision

    vision_precision = check_precision(vision_precision or default_vision_precision(target, precision),
                                       "vision precision")
    _check_target(target)
    vla = VLA.from_pretrained(ckpt_dir)
    if vla.action_stats is None:
        raise EdgeVLAError(f"checkpoint {ckpt_dir} has no action_stats.json", "train it on a dataset first")
    if vla.config.parallel_actions and _uses_tensorrt(target):
        raise EdgeVLAError(f"checkpoint {ckpt_dir} decodes actions in parallel, which the TensorRT engines of target "
                           f"`{target}` do not run yet", "export for an ONNX Runtime target (cpu, cuda)")
    from edge_vla.export.memory_fit import check_export_fits
    from edge_vla.export.trt_lint import lint_for_target

    memory_fit = check_export_fits(vla, precision, target, report)  # refuses before the slow export
    parity_obs = load_observations(parity_samples, vla.config, limit=8) or acc.synthetic_observations(vla.config)
    held_out = load_observations(calibration_data, vla.config, limit=64) or parity_obs

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export.") as work:
        fp32_dir, final_dir = Path(work) / "fp32", Path(work) / "final"
        report(f"exporting ONNX graphs of {ckpt_dir} ...")
        # TensorRT parses only standard ops: its targets keep the torch-exported decoder; ONNX Runtime
        # targets get the fused one (edge_vla.export.fused_decoder), ~1.25x faster INT8 decode steps.
        for_tensorrt = _uses_tensorrt(target)
        graphs = export_graphs(vla, fp32_dir, fused_decoder=not for_tensorrt)
        vla.processor.tokenizer.save(fp32_dir / TOKENIZER_DIR)
        manifest = {"edge_vla_version": __version__, "source_checkpoint": str(Path(ckpt_dir).resolve()),
                    "model_config": vla.config.to_dict(), "action_stats": vla.action_stats.to_dict(),
                    "recipe": dict(vla.recipe_info or {}), "target": target, "graphs": graphs}
        fp32_bundle = Bundle(fp32_dir, {**manifest, "files": {}})
        fp32_backend = OrtBackend(fp32_bundle)

        torch_backend = TorchBackend(vla)
        par = acc.parity(torch_backend, fp32_backend, parity_obs, atol=parity_atol, rtol=parity_atol)
        report(f"parity vs PyTorch: max logit diff {par['max_logit_diff']:.2e} (logit scale {par['logit_scale']:.1f}), "
               f"greedy-token agreement {100 * par['token_agreement']:.1f}% over {par['n_tokens']} tokens")
        if vla.config.parallel_actions:  # the one-pass chunk (hidden_all) must decode what PyTorch decodes
            ref_p, test_p = Policy(torch_backend, mode="direct"), Policy(fp32_backend, mode="direct")
            same = [ref_p.act(o).info["action_token_ids"] == test_p.act(o).info["action_token_ids"] for o in parity_obs]
            par["parallel_chunk_agreement"] = sum(same) / len(same)
            par["passed"] = par["passed"] and all(same)
        if not par["passed"]:
            raise EdgeVLAError(f"the exported graphs disagree with PyTorch (max logit diff {par['max_logit_diff']:.2e}, "
                               f"token agreement {100 * par['token_agreement']:.1f}%"
                               + (f", parallel chunks equal {100 * par['parallel_chunk_agreement']:.0f}%"
                                  if "parallel_chunk_agreement" in par else "") + "); no bundle written",
                               "report the model config; the graphs are not trustworthy")

        calibration = None
        if "int8-static" in (precision, vision_precision):
            calibration = {"prefix": [], "embed": [], "decoder": [], "lm_head": []}
            # head="full": action tokens go through lm_head too, so it sees the decoder's real hidden states.
            fp32_backend = OrtBackend(fp32_bundle, head="full")
            for role in calibration:
                fp32_backend.sessions[role] = _RecordingSession(fp32_backend.sessions[role], calibration[role])
            rec_policy = Policy(fp32_backend, mode="direct")
            for obs in held_out:
                rec_policy.act(obs)
            fp32_backend = OrtBackend(fp32_bundle)

        final_dir.mkdir()
        shutil.copytree(fp32_dir / TOKENIZER_DIR, final_dir / TOKENIZER_DIR)
        for role, g in graphs.items():
            # The action head is 256 x hidden weights: it stays fp32 (its argmax decides every action).
            # lm_head (vocab x hidden, a large share of a real model's weights) takes the decoder's precision.
            p = {"prefix": vision_precision, "action_head": "fp32"}.get(role, precision)
            report(f"quantizing {role} graph to {p} ...")
            quantize_graph(fp32_dir / g["file"], final_dir / g["file"], p, calibration and calibration.get(role),
                           for_tensorrt=for_tensorrt)
            g["precision"] = p
        manifest["graphs"] = graphs
        manifest["precision"] = precision
        manifest["parity"] = par
        manifest["memory_fit"] = memory_fit
        manifest["tensorrt_lint"] = lint_for_target(final_dir, graphs, vla.config, target, report)

        test_policy = Policy(OrtBackend(Bundle(final_dir, {**manifest, "files": {}})))
        if precision != "fp32" or vision_precision != "fp32":
            ref_policy = Policy(fp32_backend)
            modes = ("direct", "full") if (vla.recipe_info or {}).get("decode_mode") == "full" else ("direct",)
            report(f"accuracy of the {precision} bundle vs fp32 on {len(held_out)} held-out observations:")
            rep = acc.accuracy_report(ref_policy, test_policy, held_out, modes=modes)
            report(acc.format_report(rep))
            manifest["accuracy"] = rep
            # The floor applies where the model acts: a full-CoT model's direct decoding is off its training path.
            acc.require(rep[modes[-1]]["action_token_agreement"], min_action_agreement,
                        f"{modes[-1]}-mode action-token agreement")
        else:
            test_policy.act(held_out[0])  # smoke: the bundle decodes
            manifest["accuracy"] = None
        manifest["environment"] = environment_report()
        bundle = write_bundle(out, final_dir, json.loads(json.dumps(manifest, default=_jsonable)))
    report(f"wrote {out} ({bundle.size_bytes / 1e6:.2f} MB)")
    return out


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


__all__ = ["export_checkpoint", "load_observations"]
