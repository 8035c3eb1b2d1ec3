"""One weight at a time into ONNX Runtime's block-quantized formats (MatMulNBits, GatherBlockQuantized).

The whole-graph quantizer (edge_vla.export.quantize: MatMulNBitsQuantizer over a loaded ONNX
model) needs the float32 graph in memory; a 7B decoder is 28 GB of it. Here each weight is packed
as the graph is built, with the same packers and conventions, so the two paths give the same
bytes: symmetric blocks along K, INT4 block 64 and INT8 block 256 (smaller where K is smaller:
the largest power of two <= K, at least 16), accuracy_level 4 (int8 activations and dot
products), packed by ONNX Runtime's own C++ kernels (`quantize_matmul_4bits` / `_8bits`, what
MatMulNBitsQuantizer calls) and, for the INT4 embedding, its numpy block quantizer along the
hidden axis (GatherBlockQuantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_vla.export.quantize import INT4_BLOCK, INT8_BLOCK, INT_COMPUTE, block_for

MS = "com.microsoft"
BLOCKS = {4: INT4_BLOCK, 8: INT8_BLOCK}


@dataclass(frozen=True)
class Packed:
    """A (K, N) float weight as MatMulNBits takes it: `data` uint8 (N, K/block, block*bits/8), `scales` (N, K/block)."""

    data: np.ndarray
    scales: np.ndarray
    k: int
    n: int
    bits: int
    block: int


def weight_kn(*parts: np.ndarray) -> np.ndarray:
    """The MatMul weight (K, N), contiguous, of Linear weights (N_i, K) stacked along N (fused QKV,
    gate|up): one strided copy through torch, ~3x faster than numpy's transpose on this CPU (1.0 vs
    3.4 s for 11008 x 4096 x 2)."""
    import torch

    k = parts[0].shape[1]
    out = np.empty((k, sum(p.shape[0] for p in parts)), np.float32)
    o, off = torch.from_numpy(out), 0
    for p in parts:
        o[:, off:off + p.shape[0]].copy_(torch.from_numpy(np.ascontiguousarray(p, np.float32)).t())
        off += p.shape[0]
    return out


def pack_matmul(weight_kn: np.ndarray, bits: int) -> Packed:
    """Symmetric block quantization of the MatMul weight `weight_kn` (K, N) float32, as
    MatMulNBitsQuantizer(bits, block, is_symmetric=True) writes it."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    w = np.ascontiguousarray(weight_kn, dtype=np.float32)
    k, n = w.shape
    block = block_for(k, BLOCKS[bits], bits)
    k_blocks = (k + block - 1) // block
    if k_blocks * block != k:
        w = np.pad(w, ((0, k_blocks * block - k), (0, 0)))
    kpack = 8 // bits
    data = np.zeros((n, k_blocks, (block + kpack - 1) // kpack), dtype=np.uint8)
    zero_point = np.zeros((n, (k_blocks + kpack - 1) // kpack), dtype=np.uint8)  # unused: symmetric
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    # All-zero columns (a released vocabulary padded past its tokenizer) give 0/0 scales, as in quantize.py.
    with np.errstate(divide="ignore", invalid="ignore"):
        (quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits)(data, w, scales, zero_point, block, n, k, True)
    return Packed(data, scales, k, n, bits, block)


def matmul_nbits_node(helper, x: str, packed_names: tuple[str, str], out: str, p: Packed):
    """The MatMulNBits node of `p` (inputs: activation, packed weight, scales)."""
    return helper.make_node("MatMulNBits", [x, *packed_names], [out], name=out + "/MatMulNBits", domain=MS,
                            K=p.k, N=p.n, bits=p.bits, block_size=p.block, accuracy_level=INT_COMPUTE)


def pack_gather_int4(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """An embedding table (V, H) as GatherBlockQuantized takes it (quantize_axis 1, symmetric INT4, block INT4_BLOCK):
    (packed uint8 of V*H/2 bytes, scales (V, H/block), block)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    block = INT4_BLOCK
    with np.errstate(divide="ignore", invalid="ignore"):
        data, scales, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(np.asarray(table, np.float32), 1, block, True)
    return data, scales, block


__all__ = ["Packed", "pack_matmul", "weight_kn", "pack_gather_int4", "matmul_nbits_node", "BLOCKS"]


def pack_gather_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An embedding table as the whole-graph INT8 path leaves it (ORT's dynamic quantization of a
    Gather: one asymmetric uint8 scale and zero point for the table, then DequantizeLinear):
    (uint8 table, scale (), zero point ())."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    t = np.asarray(table, np.float32)
    zero_point, scale, q = quantize_data(t.reshape(-1), TensorProto.UINT8, False)
    return np.asarray(q, np.uint8).reshape(t.shape), np.asarray(scale, np.float32).reshape(()), \
        np.asarray(zero_point, np.uint8).reshape(())
