"""The terminal is ours: third-party set-up notices are dropped at their source, nothing else is."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

from edge_vla import notices

KNOWN = ("No private macro file", "torchvision is not installed", "consider to run pre-processing",
         "Quantization parameters for tensor", "kernels-community", "script_method", "opset of the input model")


def test_silence_drops_the_known_notices_and_keeps_the_rest(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notices.silence("bitsandbytes.backends.cpu.ops")
    notices.silence("bitsandbytes.backends.cpu.ops")  # idempotent: one filter
    assert sum(type(f).__name__ == "_DropNotices" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        logger.warning("something else went wrong")
        logger.error("Failed to load CPU gemm_4bit_forward from kernels-community: an error still shows")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else went wrong",
                        "Failed to load CPU gemm_4bit_forward from kernels-community: an error still shows"]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_export_prints_only_our_lines(tmp_path, tiny_vla):
    ckpt = tiny_vla.save_pretrained(tmp_path / "ckpt")
    # Two exports in one process, as the demo runs them: the first imports ONNX Runtime's
    # quantizer, which configures the root logger for INFO; the second must stay quiet anyway.
    r = _run("from edge_vla.export import export_bundle\n"
             "for p in ('int8', 'int4'): export_bundle('ckpt', p, precision=p)", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote int8" in r.stdout and "wrote int4" in r.stdout
    assert not [k for k in KNOWN if k in r.stderr + r.stdout], r.stderr[-2000:]
    assert "[INFO]" not in r.stderr, r.stderr[-2000:]
    assert ckpt.exists()


@pytest.mark.libero
@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO is not installed")
def test_the_simulator_starts_without_robosuites_notices(tmp_path):
    r = _run("from edge_vla.sim.env import _libero; _libero(); import robosuite.wrappers", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "robosuite WARNING" not in r.stderr and "GymWrapper" not in r.stdout + r.stderr, r.stderr
