"""Third-party notices that do not reach the user's terminal, each silenced where it arises.

Every entry is a notice about the library's own set-up that a user cannot act on (and that repeats
per worker, per graph or per save); anything else a library says still gets through. A filter is
installed on the exact logger that emits the notice, before the code that emits it runs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# logger name -> message prefixes dropped there. "" is the root logger (ONNX Runtime's quantizer
# logs through it).
NOTICES: dict[str, tuple[str, ...]] = {
    # robosuite without a private macro file (we run on its defaults on purpose): 3 lines per process.
    "robosuite_logs": ("No private macro file found", "It is recommended to use a private macro file",
                       "To setup, run:"),
    # torch.onnx probes torchvision ops that a VLA export never uses.
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
    # ONNX Runtime's quantizer: advice per graph, and an INFO line per unquantized tensor.
    "": ("Please consider to run pre-processing before quantization", "Quantization parameters for tensor"),
    # ...and its INT4 pass raises the graph's opset to 21 with a warning per graph (the graph is then
    # loaded and checked against fp32 by the export's accuracy step).
    "onnxruntime.quantization.matmul_nbits_quantizer": ("The opset of the input model is under 21",),
    # bitsandbytes on CPU: an optional kernels-community package for 4-bit GEMM.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}
WARNINGS = (r"`torch\.jit\.script_method` is deprecated",)


class _DropNotices(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and str(record.msg).startswith(self.prefixes))


def silence(*loggers: str) -> None:
    """Drop the known notices of `loggers` (names in NOTICES) from now on; idempotent."""
    for name in loggers:
        logger = logging.getLogger(name or None)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(NOTICES[name]))
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)


@contextlib.contextmanager
def root_logger_kept():
    """Undo what a library does to the root logger while inside: importing ONNX Runtime's quantizer
    calls `logging.basicConfig(level=INFO)`, after which every library's INFO lines (onnxscript's
    optimizer passes, hundreds per export) reached the terminal."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


__all__ = ["NOTICES", "root_logger_kept", "silence"]
