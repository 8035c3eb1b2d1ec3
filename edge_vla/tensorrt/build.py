"""`edge-vla build-engine BUNDLE`: TensorRT engines from a bundle's ONNX graphs, built ON the target.

TensorRT engines are specific to one TensorRT version and one GPU, so they are built where they
run (a Jetson, or the CUDA machine), never here: TensorRT cannot be installed in this workplace
(docs/facts.md) and nothing in this module that touches `tensorrt` has been run yet.
Everything that does not need TensorRT (lint, profiles, the manifest record, the version/GPU
check at load) is plain Python and tested on CPU.

Per graph (prefix, embed, decoder):
- lint first (edge_vla.tensorrt.lint): refuse before spending minutes in the builder;
- ONNX Runtime's INT4 ops (MatMulNBits, GatherBlockQuantized) rewritten into TensorRT's INT4
  form (`prepare_for_tensorrt`; the rewritten graph ships in engines/ for refits);
- network from the ONNX parser (`parse_from_file`, so weights in side files are read in place);
- optimisation profiles: prefill (prompt length, empty cache) and decode (1..8 new tokens on a
  cache up to the longest full-mode call), from `edge_vla.tensorrt.lint.default_dim_ranges`;
- precision flags: FP16 always on GPU targets (unquantized layers); INT8 for the QDQ graph
  (explicit quantization: TensorRT takes the scales from the graph, no calibrator); INT4
  weight-only from DequantizeLinear(int4, block_size) where the TensorRT version has it (10+);
- a timing cache shared by the graphs and kept in the bundle, so a rebuild is fast;
- weight-stripped plans on targets that ask for external weights (8 GB boards): the runtime
  refits them from the ONNX file at load.
Engines land in `engines/` with a manifest record (TensorRT version, GPU name, compute
capability, precision, profiles, sha256); `check_engine_record` refuses a mismatch at load.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.deploy.targets import Target, get_target
from edge_vla.runtime.tensorrt_backend import ENGINE_DIR, ROLES, gpu_identity, import_tensorrt
from edge_vla.tensorrt.int4_rewrite import prepare_for_tensorrt
from edge_vla.tensorrt.lint import default_dim_ranges, lint_onnx, profiles_from_dim_ranges

TIMING_CACHE = "timing.cache"
# The exporter's precision names -> what the TensorRT builder must enable.
BUILDER_PRECISION = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "int8-static": "int8",
                     "int4": "int4"}


def engine_profiles(onnx_path: Path, model_config, max_free_tokens: int = 512) -> list[dict]:
    """TensorRT profiles ({input: (min, opt, max)}) for one bundle graph; identical ones merged."""
    import onnx


    model = onnx.load(str(onnx_path), load_external_data=False)
    out: list[dict] = []
    for p in profiles_from_dim_ranges(model, default_dim_ranges(model_config, max_free_tokens)):
        if p and p not in out:
            out.append(p)
    return out


def record_engines(bundle_dir: str | Path, engines: dict, records: dict, timing_cache: bytes | None = None,
                   extra_files: dict | None = None):
    """Add engine files (`{role: bytes}`) and their records to a bundle, rewriting its manifest and hashes atomically.

    `extra_files` ({path relative to the bundle: bytes}) go in too, e.g. graphs rewritten for TensorRT.
    """
    from edge_vla.artifacts.bundle import MANIFEST, load_bundle, write_bundle

    bundle = load_bundle(bundle_dir)
    src = bundle.path
    # Named as edge_vla.io names a writer's staging, so the next write cleans it if this one is killed.
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=f".{src.name}.pid{os.getpid()}.", suffix=".tmp") as work:
        staging = Path(work) / "staging"
        # Hard links where possible: the graphs can be GBs and do not change.
        shutil.copytree(src, staging, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MANIFEST))
        edir = staging / ENGINE_DIR
        edir.mkdir(exist_ok=True)
        for role, data in engines.items():
            (edir / records[role]["file"].split("/", 1)[1]).write_bytes(data)
        if timing_cache is not None:
            (edir / TIMING_CACHE).write_bytes(timing_cache)
        for rel, data in (extra_files or {}).items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "schema_version", "files")}
        manifest["engines"] = {**(manifest.get("engines") or {}), **records}
        return write_bundle(src, staging, manifest)


def _link_or_copy(s, d):
    try:
        os.link(s, d)
    except OSError:
        shutil.copy2(s, d)


def _build_one(trt, logger, onnx_path: Path, precision: str, profiles: list[dict], target: Target,
               cache_blob: bytes | None):
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x; implicit in 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EdgeVLAError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errs)[:400]}",
                           "run `edge-vla export --target ...` so the lint catches this before the board")
    config = builder.create_builder_config()
    settings = target.tensorrt
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * 2**30))
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = settings.optimization_level
    if precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16)  # layers the graph leaves in float run in FP16
    if precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the QDQ nodes
    if precision == "int4":
        if not hasattr(trt.BuilderFlag, "INT4"):
            raise EdgeVLAError(f"TensorRT {trt.__version__} has no weight-only INT4", "use TensorRT 10+ or --int8")
        config.set_flag(trt.BuilderFlag.INT4)
    if settings.external_weights and hasattr(trt.BuilderFlag, "STRIP_PLAN"):
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)  # weights stay in the ONNX file; refit at load
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(cache_blob or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EdgeVLAError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)",
                           "try a larger workspace: --workspace-gib, or another precision")
    return bytes(plan), bytes(cache.serialize())


def lint_bundle(bundle, target: Target, max_free_tokens: int = 512) -> dict:
    """{role: (LintReport, profiles, prepared ModelProto | None, notes)} for the graphs build-engine parses."""
    import onnx


    out = {}
    for role in ROLES:
        path = bundle.graph_path(role)
        profiles = engine_profiles(path, bundle.config, max_free_tokens)
        original = onnx.load(str(path))
        model, notes = prepare_for_tensorrt(original)
        model.graph.name = path.name
        out[role] = (lint_onnx(model, target, profiles=profiles), profiles, None if model is original else model, notes)
    return out


def build_engines(bundle_dir: str | Path, target: str | Target | None = None, max_free_tokens: int = 512,
                  workspace_gib: float | None = None, report=print) -> dict:
    """Build one engine per bundle graph on this machine and record them in the bundle. Returns the records."""
    import dataclasses

    from edge_vla.artifacts.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    t = get_target(target or bundle.manifest.get("target") or "cuda-gpu")
    if not t.uses_tensorrt:
        raise EdgeVLAError(f"target {t.name} does not run TensorRT", "pass --target orin-agx-64|orin-nx-16|orin-nano-8|cuda-gpu")
    if workspace_gib:
        t = dataclasses.replace(t, tensorrt=dataclasses.replace(t.tensorrt, workspace_gib=workspace_gib))
    plans: dict[str, list] = {}
    prepared: dict[str, bytes] = {}  # graphs rewritten for TensorRT (ONNX Runtime INT4 ops), kept in engines/
    for role, (lint, profiles, model, notes) in lint_bundle(bundle, t, max_free_tokens).items():
        for note in notes:
            report(f"{role}: {note}")
        lint.raise_on_error()
        plans[role] = profiles
        if model is not None:
            prepared[role] = model.SerializeToString()
    trt = import_tensorrt()  # after the lint: a graph TensorRT would refuse is reported even without it
    gpu = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_file = bundle.path / ENGINE_DIR / TIMING_CACHE
    cache_blob = cache_file.read_bytes() if cache_file.is_file() else None
    engines, records, extra = {}, {}, {}
    work = tempfile.TemporaryDirectory(prefix="edge-vla-trt-")
    for role in ROLES:
        g = bundle.graphs[role]
        precision = BUILDER_PRECISION.get(g.get("precision") or bundle.manifest.get("precision") or "fp16", "fp16")
        report(f"building {role} engine ({precision}) with TensorRT {trt.__version__} on {gpu['name']} ...")
        t0 = time.perf_counter()
        graph_rel, onnx_path = g["file"], bundle.graph_path(role)
        if role in prepared:  # the rewritten graph is parsed, shipped in engines/ and used for refits
            graph_rel = f"{ENGINE_DIR}/{role}.trt.onnx"
            onnx_path = Path(work.name) / f"{role}.trt.onnx"
            onnx_path.write_bytes(prepared[role])
            extra[graph_rel] = prepared[role]
        plan, cache_blob = _build_one(trt, logger, onnx_path, precision, plans[role], t, cache_blob)
        engines[role] = plan
        records[role] = {"file": f"{ENGINE_DIR}/{role}.plan", "graph": graph_rel, "precision": precision,
                         "tensorrt_version": trt.__version__, "gpu": gpu, "target": t.name,
                         "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in plans[role]],
                         "weights_stripped": bool(t.tensorrt.external_weights and hasattr(trt.BuilderFlag, "STRIP_PLAN")),
                         "sha256": hashlib.sha256(plan).hexdigest(), "build_seconds": round(time.perf_counter() - t0, 1)}
        report(f"  {len(plan) / 1e6:.1f} MB in {records[role]['build_seconds']} s")
    record_engines(bundle.path, engines, records, cache_blob, extra)
    work.cleanup()
    return records
