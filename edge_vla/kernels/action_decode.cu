// Fused action decode (contract: edge_vla/kernels/reference.py).
//
// One thread block per row (one action token). The block copies the row's hidden state into
// shared memory, each warp computes the logits of bins w, w + n_warps, ... with lanes striding
// over H (coalesced reads of the weight rows), the block takes the argmax with ties resolved to
// the LOWEST bin index, and thread 0 writes the bin and its clipped env-unit value.
// Logits live only in shared memory; the whole decode is one launch.
//
// Loaded at run time by edge_vla/kernels/cuda_loader.py (pycuda SourceModule, or CuPy RawModule):
// plain C, no headers, so NVRTC and nvcc both compile it.
//
// Launch: grid (n_rows), block (ACTION_DECODE_THREADS), dynamic shared memory
//         (hidden_size + n_bins) * sizeof(float).

#define ACTION_DECODE_THREADS 256
#define ACTION_DECODE_WARPS (ACTION_DECODE_THREADS / 32)

__device__ __forceinline__ void better_pair(float v, int i, float *best, int *best_i) {
    // (v, i) beats (best, best_i) when larger, or equal with a lower index. NaN never wins.
    if (v > *best || (v == *best && i < *best_i)) {
        *best = v;
        *best_i = i;
    }
}

extern "C" __global__ void action_decode_f32(
    const float *__restrict__ hidden,     // (n_rows, hidden_size), row stride hidden_stride
    const float *__restrict__ weight,     // (n_bins, hidden_size), contiguous
    const float *__restrict__ bias,       // (n_bins,) or NULL
    const long long *__restrict__ dim,    // (n_rows,)
    const float *__restrict__ values,     // (n_bins, action_dim), contiguous
    const float *__restrict__ low,        // (action_dim,)
    const float *__restrict__ high,       // (action_dim,)
    long long *__restrict__ bins_out,     // (n_rows,)
    float *__restrict__ actions_out,      // (n_rows,)
    int n_rows, int hidden_size, int hidden_stride, int n_bins, int action_dim)
{
    extern __shared__ float shared[];
    float *h = shared;                    // hidden_size floats
    float *logits = shared + hidden_size; // n_bins floats
    __shared__ float warp_best[ACTION_DECODE_WARPS];
    __shared__ int warp_best_i[ACTION_DECODE_WARPS];

    const int row = blockIdx.x;
    if (row >= n_rows) return;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    const float *h_row = hidden + (long long)row * hidden_stride;
    for (int k = tid; k < hidden_size; k += blockDim.x) h[k] = h_row[k];
    __syncthreads();

    // Logits: one warp per bin at a time.
    for (int b = warp; b < n_bins; b += ACTION_DECODE_WARPS) {
        const float *w_row = weight + (long long)b * hidden_size;
        float acc = 0.0f;
        for (int k = lane; k < hidden_size; k += 32) acc = fmaf(w_row[k], h[k], acc);
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) logits[b] = bias ? acc + bias[b] : acc;
    }
    __syncthreads();

    // Argmax: per-thread scan in increasing bin order, then warp and block reductions of pairs.
    float best = __int_as_float(0xff800000);  // -inf without math.h (NVRTC has no headers)
    int best_i = 0x7fffffff;
    for (int b = tid; b < n_bins; b += blockDim.x) better_pair(logits[b], b, &best, &best_i);
    for (int off = 16; off > 0; off >>= 1) {
        float v = __shfl_down_sync(0xffffffffu, best, off);
        int i = __shfl_down_sync(0xffffffffu, best_i, off);
        better_pair(v, i, &best, &best_i);
    }
    if (lane == 0) {
        warp_best[warp] = best;
        warp_best_i[warp] = best_i;
    }
    __syncthreads();

    if (tid == 0) {
        best = warp_best[0];
        best_i = warp_best_i[0];
        for (int w = 1; w < ACTION_DECODE_WARPS; ++w) better_pair(warp_best[w], warp_best_i[w], &best, &best_i);
        if (best_i >= n_bins) best_i = 0;  // all-NaN row: stay in range
        const long long d = dim[row];
        float v;
        if (d < 0 || d >= action_dim) {
            v = __int_as_float(0x7fc00000);  // NaN marks an out-of-range dim instead of reading out of bounds
        } else {
            v = values[(long long)best_i * action_dim + d];
            v = fminf(fmaxf(v, low[d]), high[d]);
        }
        bins_out[row] = best_i;
        actions_out[row] = v;
    }
}
