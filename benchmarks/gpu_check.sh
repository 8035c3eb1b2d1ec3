#!/usr/bin/env bash
# The one-call GPU check of issue #20, for the first CUDA machine (it has not run yet: no GPU was lent).
#
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.txt (OUT defaults to results/)
#
# Within 8 minutes, each step under its own timeout, every step's output appended to one file:
#   1. the machine: nvidia-smi, torch/CUDA/Triton/onnxruntime versions
#   2. make test-gpu (pytest -m gpu): compiled Triton and CUDA action-decode kernels against the
#      reference, TensorRT tests (they skip with one line where TensorRT is absent)
#   3. benchmarks/bench_action_head.py --skip-cpu: the compiled Triton and CUDA kernels timed
#      against the unfused PyTorch path (full head + argmax + gather + clip); the bar is 5x
#   4. bitsandbytes INT8 / NF4 vs fp32 on the GPU, on the MiniVLA-shaped policy (Qwen2.5-0.5B
#      decoder layers, random weights, built offline), direct and full mode: the MiniVLA-shaped bench
#   5. onnxruntime-gpu, if it installs (pip, or a wheel in $ORT_GPU_WHEEL): the same policy's fp32
#      and INT8 bundles on its CUDA provider
# A step that fails or times out is recorded as such; the others still run. Nothing is asserted
# about speed: the file is what the README's GPU lines are written from.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-results}
mkdir -p "$OUT_DIR"
RES="$OUT_DIR/gpu_check.txt"
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/edge_vla_gpu_check}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
START=$SECONDS
BUDGET=${BUDGET:-470}  # seconds: 8 minutes less a margin for writing the file

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout (never past the budget), append the output
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -le 10 ]; then
        echo "== $name: NOT RUN (budget of ${BUDGET}s spent)" >>"$RES"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s) $(date -u +%H:%M:%S)" >>"$RES"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=5 "$limit" "$@" >>"$RES" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "-- $name: TIMED OUT after ${limit}s" >>"$RES"
    echo "-- $name: rc=$rc in $((SECONDS - t0))s" >>"$RES"
}

{
    echo "# edge-vla GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null)"
    echo "# budget ${BUDGET}s; OMP_NUM_THREADS=$OMP_NUM_THREADS"
} >"$RES"

step machine 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
    $PY -c 'import torch, sys; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")'; \
    $PY -c 'import triton; print(\"triton\", triton.__version__)'; \
    $PY -c 'import onnxruntime as o; print(\"onnxruntime\", o.__version__, o.get_available_providers())'; \
    $PY -c 'import bitsandbytes as b; print(\"bitsandbytes\", b.__version__)'"

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "== no CUDA device visible to torch: the GPU steps below would only skip; stopping" >>"$RES"
    echo "wrote $RES"
    exit 0
fi

step make-test-gpu 150 $PY -m pytest -q -m gpu -p no:cacheprovider
step action-decode-kernels 90 $PY benchmarks/bench_action_head.py --skip-cpu --reps 50 --out "$OUT_DIR/gpu_action_head.json"
step torch-bnb-minivla-shape 150 $PY benchmarks/gpu_check.py torch-quant --device cuda --work "$WORK" --calls 10

# onnxruntime-gpu lives in its own venv (it replaces the CPU onnxruntime package of the project venv).
ORTV="$WORK/ort-gpu-venv"
step install-onnxruntime-gpu 60 bash -c "$PY -m venv --system-site-packages '$ORTV' && \
    '$ORTV/bin/pip' install -q ${ORT_GPU_WHEEL:-onnxruntime-gpu==1.32.0} && \
    '$ORTV/bin/python' -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'"
if [ -x "$ORTV/bin/python" ] && "$ORTV/bin/python" -c 'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' 2>/dev/null; then
    step ort-gpu-bundles 120 "$ORTV/bin/python" benchmarks/gpu_check.py ort-gpu --device cuda --work "$WORK" --calls 10
else
    echo "== ort-gpu-bundles: NOT RUN (onnxruntime-gpu with a CUDA provider did not install)" >>"$RES"
fi

echo "# done in $((SECONDS - START))s" >>"$RES"
echo "wrote $RES"
