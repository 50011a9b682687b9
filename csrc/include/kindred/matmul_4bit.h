// The matmul_4bit op family: out = x · dequant(W)ᵀ for a frozen 4-bit (NF4 / INT4g) weight W, and its decode
// layout. Each op is declared once; `<op>` (csrc/matmul_4bit.cpp) validates and dispatches to `<op>_cpu`
// (csrc/cpu/matmul_4bit_cpu.cpp) or `<op>_cuda` (kernels/matmul_4bit/matmul_4bit_cuda.cu).
// The weights' tensors: kindred/quant.h. All buffers are allocated by the caller.
#pragma once

#include "kindred/quant.h"

namespace kindred {

// out[M, N] = x[M, K] · dequant(W)ᵀ with W a 4-bit [N, K] weight in its canonical layout (`n` = N), fp32
// accumulation. x: f32/f16/bf16, contiguous 2-D; out: x's dtype, contiguous [M, N]. CPU only (the
// reference and the no-GPU path); on CUDA, kindred composes dequantize + one cuBLAS GEMM
// (python/kindred/_ops/matmul_4bit.py), and decoding reads the decode layout below.
void matmul_4bit(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out, int64_t stream);
void matmul_4bit(const TensorView& x, const Int4gTensors& w, const TensorView& out, int64_t stream);

void matmul_4bit_cpu(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out);
void matmul_4bit_cpu(const TensorView& x, const Int4gTensors& w, const TensorView& out);

inline constexpr int64_t kDecodeMaxRows = 16;  // rows of x the decode kernel takes

// ---------------------------------------------------------------------------------------------------
// Decode layout: a load-time, lossless repack of an NF4 or INT4g [N, K] weight for the decode kernel
// (kernels/matmul_4bit/matmul_4bit_cuda.cu). K % 128 == 0; N is padded to a multiple of 16 rows.
// - Unit (t, ch): weight rows [8t, 8t + 8) x K columns [128 ch, 128 ch + 128), at byte (t * K/128 + ch) * U.
//   U = 512 + record bytes. Units of one tile are consecutive, so a warp streams a tile's K contiguously.
// - Codes, bytes [0, 512): lane L = 4 g + c owns bytes [16 L, 16 L + 16) = 4 words; word p holds the 8 codes
//   of row 8t + g, columns 128 ch + 32 p + 8 c + j (j = 0..7), which are exactly the lane's mma.m16n8k16
//   B fragments of k16 steps 2p (j = 0..3) and 2p + 1 (j = 4..7). NF4: byte i = code j=2i (high nibble) |
//   code j=2i+1 (low), as bitsandbytes. INT4g: nibble i of the word holds code kDecodeInt4Order[i], so
//   (word >> 4i) & 0x000f000f is the pair (j = 2i, 2i + 1).
// - Record, bytes [512, U): the scales of the unit's 8 rows for each of its P = 128 / period periods
//   (period = min(blocksize, 128) for NF4, the group size for INT4g). NF4: f32 absmax[P][8] (double
//   quantization expanded to f32 exactly as dequantize_nf4 does). INT4g: f16 scale[P][8], u8 zero[P][8],
//   zero-padded to a multiple of 16 bytes. Padding rows have zero codes and zero scales.
enum class DecodeFormat : int { nf4 = 0, int4g = 1 };
inline constexpr int64_t kDecodeChunk = 128;      // K per unit
inline constexpr int64_t kDecodeTileRows = 8;     // N rows per unit
inline constexpr int64_t kDecodeRowPad = 16;      // N is padded to a multiple of this (two tiles per warp)
inline constexpr int64_t kDecodeCodeBytes = 512;  // code bytes per unit
inline constexpr int kDecodeInt4Order[8] = {0, 2, 4, 6, 1, 3, 5, 7};

struct DecodeWeight {
  TensorView data;  // u8 [decode_bytes(...)]
  DecodeFormat format = DecodeFormat::nf4;
  int64_t n = 0, k = 0, period = 64;
};

inline int64_t decode_padded_rows(int64_t n) {
  return (n + kDecodeRowPad - 1) / kDecodeRowPad * kDecodeRowPad;
}
int64_t decode_record_bytes(DecodeFormat format, int64_t period);
int64_t decode_bytes(DecodeFormat format, int64_t n, int64_t k, int64_t period);

// Canonical -> decode layout (CPU; `n` = N for NF4) and back. NF4 unpacks to f32 absmax [N*K/blocksize]
// (the expanded values when the source was double-quantized).
void repack_decode(const Nf4Tensors& in, int64_t n, const DecodeWeight& out);
void repack_decode(const Int4gTensors& in, const DecodeWeight& out);
void unpack_decode(const DecodeWeight& in, const Nf4Tensors& out);
void unpack_decode(const DecodeWeight& in, const Int4gTensors& out);

void repack_decode_cpu(const Nf4Tensors& in, int64_t n, const DecodeWeight& out);
void repack_decode_cpu(const Int4gTensors& in, const DecodeWeight& out);
void unpack_decode_cpu(const DecodeWeight& in, const Nf4Tensors& out);
void unpack_decode_cpu(const DecodeWeight& in, const Int4gTensors& out);

// The one statement of which calls the CUDA decode kernel serves (x [M, K]): M <= kDecodeMaxRows, bf16 or
// f16, K a multiple of kDecodeChunk. Throws a named error otherwise. (Python: kindred._ops.matmul_4bit.)
void check_decode_eligible(const TensorView& x);

// out[M, N] = x[M, K] · dequant(W)ᵀ from the decode layout. CPU: any M (reference of the layout). CUDA:
// the decode kernel, for calls that check_decode_eligible accepts.
void matmul_4bit_decode(const TensorView& x, const DecodeWeight& w, const TensorView& out, int64_t stream);
void matmul_4bit_decode_cpu(const TensorView& x, const DecodeWeight& w, const TensorView& out);
void matmul_4bit_decode_cuda(const TensorView& x, const DecodeWeight& w, const TensorView& out, int64_t stream);

}  // namespace kindred
