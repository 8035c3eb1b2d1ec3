"""Run the shipped CUDA C kernel's code on the CPU, under an emulation of the CUDA thread model.

No GPU here, so this is the closest CPU check of action_decode.cu's logic (indexing, warp and
block reductions, the lowest-index tie rule, clipping): the source is compiled by g++ as C++
with a small harness where each block is 256 std::threads, `__syncthreads()` is a block-wide
barrier, and `__shfl_down_sync` exchanges values through a per-warp buffer between two warp
barriers (lanes of a warp run in lockstep at every shuffle, as on the GPU). Blocks run one
after another, so `__shared__` arrays become statics. What it does NOT prove: that the real
compiled kernel runs on a GPU (see the gpu-marked tests in test_kernels.py).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from test_kernels import CASES, _assert_match, _expected

HARNESS_PRE = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;
static std::barrier<> *g_block_barrier;
static std::vector<std::barrier<> *> g_warp_barriers;
static long long g_warp_buf[2][1024];
static thread_local int t_shfl_parity;
static float g_dyn_shared[1 << 16];
#define __syncthreads() g_block_barrier->arrive_and_wait()
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
template <class T> static T __shfl_down_sync(unsigned, T v, int off) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    long long slot = 0;
    std::memcpy(&slot, &v, sizeof(T));
    // Double-buffered: a lane writes buffer p again only two shuffles later, after every lane
    // of its warp has passed the barrier of the shuffle in between (so has read buffer p).
    long long *buf = g_warp_buf[t_shfl_parity];
    t_shfl_parity ^= 1;
    buf[tid] = slot;
    g_warp_barriers[warp]->arrive_and_wait();
    T out = v;
    if (lane + off < 32) std::memcpy(&out, &buf[tid + off], sizeof(T));
    return out;
}
"""

HARNESS_POST = r"""
extern "C" void launch(const float *h, const float *w, const float *b, const long long *dim, const float *values,
                       const float *low, const float *high, long long *bins, float *actions,
                       int n_rows, int H, int stride, int n_bins, int D) {
    const int threads = ACTION_DECODE_THREADS;
    blockDim.x = threads;
    gridDim.x = n_rows;
    for (int row = 0; row < n_rows; ++row) {
        std::barrier<> block(threads);
        g_block_barrier = &block;
        std::vector<std::barrier<> *> warps;
        for (int i = 0; i < threads / 32; ++i) warps.push_back(new std::barrier<>(32));
        g_warp_barriers = warps;
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([=] {
                threadIdx.x = t;
                t_shfl_parity = 0;
                blockIdx.x = row;
                action_decode_f32(h, w, b, dim, values, low, high, bins, actions, n_rows, H, stride, n_bins, D);
            });
        for (auto &th : pool) th.join();
        for (auto *p : warps) delete p;
    }
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    from edge_vla.kernels.cuda_loader import kernel_source

    src = kernel_source()
    assert "extern __shared__ float shared[];" in src
    # Dynamic shared memory becomes a static buffer of the harness (blocks run one at a time).
    body = src.replace("extern __shared__ float shared[];", "float *shared = g_dyn_shared;")
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "emu.cpp").write_text(HARNESS_PRE + body + HARNESS_POST)
    proc = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(d / "emu.cpp"),
                           "-o", str(d / "emu.so")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = ctypes.CDLL(str(d / "emu.so"))
    lib.launch.restype = None
    return lib


def _run(lib, hidden, weight, dim, values, low, high, bias=None):
    h = np.ascontiguousarray(hidden, np.float32)
    lead = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    w = np.ascontiguousarray(weight, np.float32)
    d = np.ascontiguousarray(np.broadcast_to(np.asarray(dim, np.int64), lead).reshape(-1))
    vals = np.ascontiguousarray(values, np.float32)
    lo, hi = np.ascontiguousarray(low, np.float32), np.ascontiguousarray(high, np.float32)
    b = None if bias is None else np.ascontiguousarray(bias, np.float32)
    bins = np.zeros(h.shape[0], np.int64)
    actions = np.zeros(h.shape[0], np.float32)
    p = lambda a: None if a is None else a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    lib.launch(p(h), p(w), p(b), p(d), p(vals), p(lo), p(hi), p(bins), p(actions), ctypes.c_int(h.shape[0]),
               ctypes.c_int(h.shape[1]), ctypes.c_int(h.shape[1]), ctypes.c_int(w.shape[0]), ctypes.c_int(vals.shape[1]))
    return bins.reshape(lead), actions.reshape(lead)


def _first_rows(case: dict, n: int) -> dict:
    """The case flattened to rows (the kernel sees rows; layouts are the wrapper's job), first n."""
    h = case["hidden"]
    lead = h.shape[:-1]
    out = dict(case, hidden=h.reshape(-1, h.shape[-1])[:n],
               dim=np.broadcast_to(case["dim"], lead).reshape(-1)[:n].copy())
    return out


# Each emulated block is 256 OS threads meeting at ~200 barriers: ~0.5 s a row on 2 shared
# cores. The default suite runs every case on its first rows (ties included); `slow` runs all.
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_cuda_kernel_matches_the_reference(emulated, case):
    c = _first_rows(CASES[case], 12 if case == "exact_ties" else 3)
    _assert_match(f"cuda-emulated/{case}", _run(emulated, **c), _expected(c))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_cuda_kernel_matches_the_reference_all_rows(emulated, case):
    _assert_match(f"cuda-emulated/{case}", _run(emulated, **CASES[case]), _expected(CASES[case]))


def test_emulated_cuda_kernel_marks_out_of_range_dims_with_nan(emulated):
    c = _first_rows(CASES["random_n7_h96"], 3)
    c["dim"] = np.array([0, 99, -1], np.int64)
    bins, actions = _run(emulated, **c)
    assert np.isfinite(actions[0]) and np.isnan(actions[1:]).all()
    np.testing.assert_array_equal(bins, _expected(_first_rows(CASES["random_n7_h96"], 3))[0])
