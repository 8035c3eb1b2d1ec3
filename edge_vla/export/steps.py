"""`edge-vla export`: checkpoint -> verified, quantized ONNX bundle, as named steps.

    load       the checkpoint, checked for what export needs; memory fit on the target board
    graphs     fp32 ONNX graphs (prefix, embed, decoder body, lm_head, action_head) + tokenizer
    parity     the fp32 graphs against PyTorch on the same tokens; refuse on failure
    calibrate  record the fp32 graphs' inputs on held-out data (static INT8 only)
    quantize   each graph to its precision (the action head stays fp32)
    lint       TensorRT targets: what the engine builder will parse, refused before the board sees it
    accuracy   the quantized bundle against its fp32 graphs, free-running in the recipe's own mode
    write      the bundle, atomically, with every file's sha256 in its manifest

Nothing here imports torch at module level: the package is imported by torch-free tools.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edge_vla.errors import EdgeVLAError
from edge_vla.export.quantize import INT4_BLOCK, INT8_MATMUL_OPS

PARITY_OBSERVATIONS = 8
HELD_OUT_OBSERVATIONS = 64

# The INT8 kernel of a CPU export's decoder MatMuls (`--int8-matmul`). "nbits": MatMulNBits, 8-bit blocks of 256
# (smaller where that stores fewer bytes: quantize.block_for) with int8 compute, faster per single-token decode
# step; "integer": ONNX Runtime's MatMulInteger form (per-channel int8 weights, activations quantized per tensor
# on the fly, MLAS's QGEMM), ~2x faster at a prefill's hundreds of rows. "auto": integer when the deployed
# action is one prefill (direct mode, parallel actions), nbits otherwise.
INT8_MATMULS = ("auto", *INT8_MATMUL_OPS)


def _uses_tensorrt(target: str) -> bool:
    from edge_vla.deploy.targets import get_target

    return get_target(target).uses_tensorrt


def load_checkpoint(ckpt_dir, target: str):
    """The VLA at `ckpt_dir`, refused early when export cannot serve it on `target`."""
    from edge_vla.model.vla import VLA

    vla = VLA.from_pretrained(ckpt_dir)
    if vla.action_stats is None:
        raise EdgeVLAError(f"checkpoint {ckpt_dir} has no action_stats.json", "train it on a dataset first")
    if vla.config.parallel_actions and _uses_tensorrt(target):
        raise EdgeVLAError(f"checkpoint {ckpt_dir} decodes actions in parallel, which the TensorRT engines of target "
                           f"`{target}` do not run yet", "export for an ONNX Runtime target (cpu)")
    return vla


def export_fp32_graphs(vla, out_dir: Path, for_tensorrt: bool) -> dict:
    """fp32 graphs and the tokenizer in `out_dir`; returns the manifest's `graphs`.

    TensorRT parses only standard ops: its targets keep the torch-exported decoder; ONNX Runtime
    targets get the fused one (edge_vla.export.fused_decoder), ~1.25x faster INT8 decode steps."""
    from edge_vla.artifacts.bundle import TOKENIZER_DIR
    from edge_vla.export.onnx_export import export_graphs

    graphs = export_graphs(vla, out_dir, fused_decoder=not for_tensorrt)
    vla.processor.tokenizer.save(out_dir / TOKENIZER_DIR)
    return graphs


def choose_int8_matmul(requested: str, precision: str, config, recipe: dict | None, target: str,
                       streaming: bool = False) -> dict | None:
    """The decoder's INT8 MatMul form and why: the manifest's `int8_matmul` (None where the decoder is not
    int8 and nothing was asked). An explicit choice the export cannot honour is refused, never ignored."""
    if requested not in INT8_MATMULS:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error("INT8 MatMul form (--int8-matmul)", requested, INT8_MATMULS)
    explicit = requested != "auto"
    if precision != "int8":
        if explicit:
            raise EdgeVLAError(f"--int8-matmul {requested} applies to --int8 exports, not {precision}",
                               "export with --int8, or leave --int8-matmul out")
        return None
    if _uses_tensorrt(target):
        if explicit:
            raise EdgeVLAError(f"--int8-matmul {requested} applies to ONNX Runtime targets, not TensorRT target "
                               f"`{target}`", "leave --int8-matmul out for TensorRT targets")
        return _int8_record(requested, "integer", "TensorRT target: int8 keeps ONNX Runtime's MatMulInteger form "
                                                  "on every graph (the TensorRT lint names it with its fix)")
    if streaming:
        if requested == "integer":
            raise EdgeVLAError("--int8-matmul integer is not written by the streaming export (it packs the "
                               "decoder's weights one at a time as MatMulNBits)",
                               "export in memory (--no-streaming) where the model fits, or use --int8-matmul nbits")
        return _int8_record(requested, "nbits", "the streaming export packs the decoder's weights one at a time "
                                                "as MatMulNBits (edge_vla.export.nbits)" if not explicit else "asked for")
    if explicit:
        return _int8_record(requested, requested, "asked for")
    mode = (recipe or {}).get("decode_mode") or "direct"  # the Policy's default mode
    parallel = bool(getattr(config, "parallel_actions", False))
    if mode == "direct" and parallel:
        return _int8_record(requested, "integer", "direct mode with parallel actions: the deployed action is one "
                                                  "prefill, no decode steps, where MatMulInteger's QGEMM is faster")
    why = (f"decode mode {mode}: the model decodes token by token" if mode != "direct" else
           "sequential actions: each action token is a single-row decode step")
    return _int8_record(requested, "nbits", why + ", where MatMulNBits' steps are faster")


def _int8_record(requested: str, form: str, reason: str) -> dict:
    return {"requested": requested, "decoder": form, "op": INT8_MATMUL_OPS[form], "reason": reason}


def check_parity(vla, fp32_backend, observations: list[dict], atol: float, report) -> dict:
    """Logits and greedy tokens of the fp32 graphs against PyTorch; refuses on failure."""
    from edge_vla.export import accuracy as acc
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.torch_backend import TorchBackend

    torch_backend = TorchBackend(vla)
    par = acc.parity(torch_backend, fp32_backend, observations, atol=atol, rtol=atol)
    # The actions each side decodes in the recipe's own mode, compared as vectors.
    ref_p, test_p = Policy(torch_backend), Policy(fp32_backend)
    par.update(acc.action_similarity([ref_p.act(o).action for o in observations],
                                     [test_p.act(o).action for o in observations]))
    report(f"parity vs PyTorch: max logit diff {par['max_logit_diff']:.2e} (logit scale {par['logit_scale']:.1f}), "
           f"greedy-token agreement {100 * par['token_agreement']:.1f}% over {par['n_tokens']} tokens, "
           f"action cosine {par['action_cosine']:.6f}, max action error {par['action_max_abs_err']:.2e}")
    if vla.config.parallel_actions:  # the one-pass chunk (hidden_all) must decode what PyTorch decodes
        ref_p, test_p = Policy(torch_backend, mode="direct"), Policy(fp32_backend, mode="direct")
        same = [ref_p.act(o).info["action_token_ids"] == test_p.act(o).info["action_token_ids"] for o in observations]
        par["parallel_chunk_agreement"] = sum(same) / len(same)
        par["passed"] = par["passed"] and all(same)
    if not par["passed"]:
        raise EdgeVLAError(f"the exported graphs disagree with PyTorch (max logit diff {par['max_logit_diff']:.2e}, "
                           f"token agreement {100 * par['token_agreement']:.1f}%"
                           + (f", parallel chunks equal {100 * par['parallel_chunk_agreement']:.0f}%"
                              if "parallel_chunk_agreement" in par else "") + "); no bundle written",
                           "report the model config; the graphs are not trustworthy")
    return par


class _RecordingSession:
    """Wraps an onnxruntime session and keeps every feed it sees (calibration for static INT8)."""

    def __init__(self, session, feeds: list):
        self._s, self._feeds = session, feeds

    def run(self, outputs, feeds):
        self._feeds.append({k: v.copy() for k, v in feeds.items()})
        return self._s.run(outputs, feeds)


def calibrate(fp32_bundle, observations: list[dict], roles=("prefix", "embed", "decoder", "lm_head")) -> dict:
    """{role: [feeds]}: what each fp32 graph of `roles` sees while the policy decodes `observations`."""
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy

    calibration: dict[str, list] = {role: [] for role in roles}
    # head="full": action tokens go through lm_head too, so it sees the decoder's real hidden states; the cache
    # fed back as arrays (not kept in place), so that every decoder feed is a plain dict to record.
    backend = OrtBackend(fp32_bundle, head="full", in_place_kv=False)
    for role in calibration:
        backend.sessions[role] = _RecordingSession(backend.sessions[role], calibration[role])
    policy = Policy(backend, mode="direct")
    for obs in observations:
        policy.act(obs)
    return calibration


def graph_precisions(graphs: dict, precision: str, vision_precision: str) -> dict[str, str]:
    """The action head is 256 x hidden weights: it stays fp32 (its argmax decides every action).
    lm_head (vocab x hidden, a large share of a real model's weights) takes the decoder's precision."""
    return {role: {"prefix": vision_precision, "action_head": "fp32"}.get(role, precision) for role in graphs}


def quantize_graphs(src: Path, dst: Path, graphs: dict, precisions: dict, calibration: dict | None,
                    for_tensorrt: bool, report, int8_matmul: dict | None = None, int4_block: int | None = None,
                    int8_nodes: list[str] | None = None) -> None:
    """`int8_matmul` (choose_int8_matmul): the int8 decoder's MatMul form; the other graphs keep the default.
    `int4_block`: the INT4 graphs' block size (recorded on each; default INT4_BLOCK). `int8_nodes`: the INT4
    decoder's MatMuls kept at 8 bits (sensitive_matmuls; recorded on the decoder graph)."""
    from edge_vla.export.quantize import quantize_graph

    int4_block = int4_block or INT4_BLOCK

    for role, g in graphs.items():
        p = precisions[role]
        chosen = int8_matmul if int8_matmul and role == "decoder" and p == "int8" else None
        keep8 = int8_nodes if role == "decoder" and p == "int4" and int8_nodes else None
        report(f"quantizing {role} graph to {p}" + (f" ({chosen['op']})" if chosen else "")
               + (f" ({len(keep8)} MatMuls at 8 bits)" if keep8 else "") + " ...")
        quantize_graph(src / g["file"], dst / g["file"], p, calibration and calibration.get(role),
                       for_tensorrt=for_tensorrt, int8_matmul=chosen["decoder"] if chosen else "nbits",
                       int4_block=int4_block, int8_nodes=keep8)
        g["precision"] = p
        if p == "int4":
            g["int4_block"] = int4_block
        if keep8:
            g["int8_nodes"] = list(keep8)
        if chosen:
            g["int8_matmul"] = chosen["decoder"]


def sensitive_matmuls(fp32_bundle, observations: list[dict], k: int, block: int, work: Path, report,
                      max_feeds: int = 16) -> tuple[list[str], dict[str, float]]:
    """The `k` decoder MatMuls whose 4-bit rounding (blocks of `block`) moves the fp32 decoder's output most
    while the policy decodes `observations` (up to `max_feeds` of the decoder's inputs, evenly spaced), and
    every MatMul's score. More than the decoder has is refused with the count."""
    from edge_vla.export.quantize import matmul_sensitivity, most_sensitive

    feeds = calibrate(fp32_bundle, observations, roles=("decoder",))["decoder"]
    feeds = feeds[::max(1, len(feeds) // max_feeds)][:max_feeds]
    scores = matmul_sensitivity(fp32_bundle.graph_path("decoder"), feeds, work, bits=4, block=block)
    if k > len(scores):
        raise EdgeVLAError(f"--int4-keep8 {k} asks for more MatMuls than the decoder has ({len(scores)})",
                           f"pass at most {len(scores)}")
    chosen = most_sensitive(scores, k)
    report(f"decoder MatMuls most sensitive to 4 bits (on {len(feeds)} decoder inputs of {len(observations)} "
           f"observations), kept at 8 bits: " + ", ".join(f"{n} {scores[n]:.4f}" for n in chosen))
    return chosen, scores


def measure_accuracy(fp32_backend, test_backend, observations: list[dict], recipe: dict, precision: str,
                     min_agreement: float | None, report) -> dict:
    """Action-token agreement of the quantized bundle with its fp32 graphs, free-running.

    The floor applies where the model acts: a full-CoT model's direct decoding is off its training path."""
    from edge_vla.export import accuracy as acc
    from edge_vla.runtime.policy import Policy

    modes = ("direct", "full") if recipe.get("decode_mode") == "full" else ("direct",)
    report(f"accuracy of the {precision} bundle vs fp32 on {len(observations)} held-out observations:")
    rep = acc.accuracy_report(Policy(fp32_backend), Policy(test_backend), observations, modes=modes)
    report(acc.format_report(rep))
    acc.require(rep[modes[-1]]["action_token_agreement"], min_agreement, f"{modes[-1]}-mode action-token agreement")
    return rep


def _report_int8_matmul(mm: dict | None, report) -> None:
    if mm:
        report(f"int8 decoder MatMuls: {mm['op']} ({'auto: ' if mm['requested'] == 'auto' else ''}{mm['reason']})")


def export_bundle(ckpt_dir, out_dir, precision: str = "int8", calibration_data=None, target: str = "cpu",
                  parity_samples=None, vision_precision: str | None = None, min_action_agreement: float | None = None,
                  parity_atol: float = 1e-3, report=print, overwrite: bool = False, streaming: bool | None = None,
                  int8_matmul: str = "auto", int4_block: int | None = None, int4_keep8: int = 0) -> Path:
    """Export the checkpoint `ckpt_dir` to a bundle at `out_dir` (the steps above, in order).

    `parity_samples` (Samples, obs dicts or a dataset path; synthetic observations when None) check
    the fp32 graphs; `calibration_data` (held-out samples; the parity samples when None) calibrate
    static INT8 and measure the quantized bundle's accuracy. Decoder, embedding and lm_head take
    `precision`; the vision graph `vision_precision` (default: the target's choice for `precision`).
    `out_dir` may be missing, empty or a bundle; another directory only with `overwrite`; never
    the checkpoint or the data (edge_vla.io.check_output_dir, refused before the slow steps).
    `streaming` (None: above STREAM_ABOVE_PARAMS parameters) exports without loading the model
    (edge_vla.export.streaming: weights read from the shards, graphs quantized as they are built).
    `int8_matmul` ("auto", "nbits", "integer"): the int8 decoder's MatMul form (choose_int8_matmul).
    `int4_block`: the INT4 graphs' block size (None: INT4_BLOCK, 64; the in-memory export only).
    `int4_keep8`: an INT4 decoder keeps its `int4_keep8` MatMuls most sensitive to 4-bit rounding, measured on
    the held-out observations, at 8 bits (sensitive_matmuls; the in-memory export only).
    """
    from edge_vla import __version__
    from edge_vla.artifacts.bundle import TOKENIZER_DIR, Bundle, write_bundle
    from edge_vla.data.observations import load_observations, synthetic_observations
    from edge_vla.deploy.memory_fit import check_export_fits
    from edge_vla.deploy.targets import default_vision_precision, get_target
    from edge_vla.environment import environment_report
    from edge_vla.export.quantize import check_precision
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.tensorrt.lint import lint_for_target

    from edge_vla.artifacts.bundle import BUNDLE_FORMAT
    from edge_vla.io import check_output_dir, clean_staging, jsonable

    out = Path(out_dir)
    inputs = [p for p in (ckpt_dir, calibration_data, parity_samples) if isinstance(p, (str, Path))]
    check_output_dir(out, BUNDLE_FORMAT, overwrite, inputs)
    check_precision(precision)
    get_target(target)  # an unknown name is refused with the close ones
    vision_precision = check_precision(vision_precision or default_vision_precision(target, precision),
                                       "vision precision")
    choose_int8_matmul(int8_matmul, precision, None, None, target)  # a bad value is refused before the slow steps
    if int4_block is not None:
        from edge_vla.export.quantize import check_int4_block

        check_int4_block(int4_block)
        if "int4" not in (precision, vision_precision):
            raise EdgeVLAError(f"--int4-block sets INT4 blocks, and this {precision} export has no INT4 graph",
                               "add --int4, or drop --int4-block")
    if streaming is None:
        from edge_vla.export.streaming import STREAM_ABOVE_PARAMS, checkpoint_params

        streaming = (checkpoint_params(ckpt_dir) or 0) > STREAM_ABOVE_PARAMS
    if int4_keep8:
        if not isinstance(int4_keep8, int) or int4_keep8 < 0:
            raise EdgeVLAError(f"--int4-keep8 {int4_keep8!r} is not a count of MatMuls", "pass a whole number, e.g. 4")
        if precision != "int4":
            raise EdgeVLAError(f"--int4-keep8 keeps some of an INT4 decoder's MatMuls at 8 bits, and this export is {precision}",
                               "add --int4, or drop --int4-keep8")
        if _uses_tensorrt(target):
            raise EdgeVLAError(f"--int4-keep8 writes 8-bit MatMulNBits, and TensorRT's INT4 path (target {target}) "
                               "takes 4-bit blocks only", "drop --int4-keep8 for this target, or export --fp16")
        if streaming:
            raise EdgeVLAError("--int4-keep8 applies to the in-memory export (it measures the fp32 decoder first)",
                               "drop --int4-keep8, or pass --no-streaming where the model fits in memory")
    if streaming and int4_block is not None:
        raise EdgeVLAError(f"--int4-block applies to the in-memory export; the streaming one writes blocks of {INT4_BLOCK}",
                           "drop --int4-block, or pass --no-streaming where the model fits in memory")
    if streaming:
        from edge_vla.export import streaming as st

        src = st.open_source(ckpt_dir)
        parity_obs = (load_observations(parity_samples, src.config, limit=PARITY_OBSERVATIONS)
                      or synthetic_observations(src.config))
        held_out = load_observations(calibration_data, src.config, limit=HELD_OUT_OBSERVATIONS) or parity_obs
        mm = choose_int8_matmul(int8_matmul, precision, src.config, src.recipe_info, target, streaming=True)
        _report_int8_matmul(mm, report)
        return st.export_bundle_streaming(src, ckpt_dir, out, precision,
                                          graph_precisions({r: {} for r in st.ROLES}, precision, vision_precision),
                                          target, parity_obs, held_out, min_action_agreement, parity_atol, report,
                                          overwrite, inputs, extra_manifest={"int8_matmul": mm} if mm else None)
    vla = load_checkpoint(ckpt_dir, target)
    memory_fit = check_export_fits(vla, precision, target, report)  # refuses before the slow export
    parity_obs = (load_observations(parity_samples, vla.config, limit=PARITY_OBSERVATIONS)
                  or synthetic_observations(vla.config))
    held_out = load_observations(calibration_data, vla.config, limit=HELD_OUT_OBSERVATIONS) or parity_obs
    for_tensorrt = _uses_tensorrt(target)
    mm = choose_int8_matmul(int8_matmul, precision, vla.config, vla.recipe_info, target)
    _report_int8_matmul(mm, report)

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_staging(out)  # what an export killed before its cleanup left
    # The pid in the name tells clean_staging whether its writer still runs.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export.pid{os.getpid()}.") as work:
        fp32_dir, final_dir = Path(work) / "fp32", Path(work) / "final"
        report(f"exporting ONNX graphs of {ckpt_dir} ...")
        graphs = export_fp32_graphs(vla, fp32_dir, for_tensorrt)
        manifest = {"edge_vla_version": __version__, "source_checkpoint": str(Path(ckpt_dir).resolve()),
                    "model_config": vla.config.to_dict(), "action_stats": vla.action_stats.to_dict(),
                    "recipe": dict(vla.recipe_info or {}), "target": target, "graphs": graphs}
        fp32_bundle = Bundle(fp32_dir, {**manifest, "files": {}})
        fp32_backend = OrtBackend(fp32_bundle)
        parity = check_parity(vla, fp32_backend, parity_obs, parity_atol, report)

        calibration = calibrate(fp32_bundle, held_out) if "int8-static" in (precision, vision_precision) else None
        keep8 = None
        if int4_keep8:
            keep8, scores = sensitive_matmuls(fp32_bundle, held_out, int4_keep8, int4_block or INT4_BLOCK, Path(work),
                                              report)
            manifest["int4_sensitivity"] = {"scores": scores, "observations": len(held_out), "kept_8bit": keep8}
        final_dir.mkdir()
        shutil.copytree(fp32_dir / TOKENIZER_DIR, final_dir / TOKENIZER_DIR)
        quantize_graphs(fp32_dir, final_dir, graphs, graph_precisions(graphs, precision, vision_precision),
                        calibration, for_tensorrt, report, mm, int4_block, keep8)
        if mm:
            manifest["int8_matmul"] = mm
        manifest.update(graphs=graphs, precision=precision, parity=parity, memory_fit=memory_fit,
                        tensorrt_lint=lint_for_target(final_dir, graphs, vla.config, target, report))

        test_backend = OrtBackend(Bundle(final_dir, {**manifest, "files": {}}))
        if precision != "fp32" or vision_precision != "fp32":
            manifest["accuracy"] = measure_accuracy(fp32_backend, test_backend, held_out, manifest["recipe"],
                                                    precision, min_action_agreement, report)
        else:
            from edge_vla.runtime.policy import Policy

            Policy(test_backend).act(held_out[0])  # smoke: the bundle decodes
            manifest["accuracy"] = None
        manifest["environment"] = environment_report()
        bundle = write_bundle(out, final_dir, jsonable(manifest),
                              overwrite=overwrite, inputs=inputs)
    report(f"wrote {out} ({bundle.size_bytes / 1e6:.2f} MB)")
    return out
