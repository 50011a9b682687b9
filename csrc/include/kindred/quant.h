// The quant op family: quantize / dequantize for NF4 and INT4g, and the AWQ repack. Each op is declared
// once; `<op>` validates its arguments and dispatches to `<op>_cpu` (csrc/cpu) or `<op>_cuda` (kernels/).
// Formats: kindred/formats.h. All buffers are allocated by the caller.
#pragma once

#include <optional>

#include "kindred/common.h"

namespace kindred {

// One NF4-quantized tensor of `numel` elements, in bitsandbytes' layout.
struct Nf4Tensors {
  TensorView packed;                        // u8, numel / 2 elements (any shape, contiguous)
  TensorView absmax;                        // f32 [blocks]; u8 [blocks] when nested
  std::optional<TensorView> nested_absmax;  // f32 [ceil(blocks / 256)]
  std::optional<TensorView> nested_code;    // f32 [256], the dynamic map
  std::optional<TensorView> offset;         // f32 [1]
  int64_t blocksize = 64;
  bool nested() const { return nested_absmax.has_value(); }
};

// One INT4g-quantized [N, K] weight in kindred's layout.
struct Int4gTensors {
  TensorView packed;  // u8 [N, K/2]
  TensorView scales;  // f16 [N, K/g]
  TensorView zeros;   // u8 [N, K/g]
  int64_t group_size = 128;
};

// weight: f32/f16/bf16, contiguous, numel a multiple of blocksize, finite. `workspace`: f32 [blocks],
// required when `out` is nested (holds the unquantized absmax).
void quantize_nf4(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace,
                  int64_t stream);
// `out` of a dequantize: contiguous (any shape), or a 2-D [rows, K] view whose rows are strided
// (row stride >= K, a multiple of 8, unit column stride), e.g. the first K columns of a wider workspace.
void dequantize_nf4(const Nf4Tensors& in, const TensorView& out, int64_t stream);

// weight: f32/f16/bf16 [N, K], contiguous, K a multiple of group_size, finite.
void quantize_int4g(const TensorView& weight, const Int4gTensors& out, int64_t stream);
void dequantize_int4g(const Int4gTensors& in, const TensorView& out, int64_t stream);

// Lossless conversion between kindred's INT4g layout and AutoAWQ's GEMM tensors (CPU only).
void awq_pack(const Int4gTensors& in, const TensorView& qweight, const TensorView& qzeros, const TensorView& scales);
void awq_unpack(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales, const Int4gTensors& out);

void quantize_nf4_cpu(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace);
void dequantize_nf4_cpu(const Nf4Tensors& in, const TensorView& out);
void quantize_int4g_cpu(const TensorView& weight, const Int4gTensors& out);
void dequantize_int4g_cpu(const Int4gTensors& in, const TensorView& out);

void quantize_nf4_cuda(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace,
                       int64_t stream);
void dequantize_nf4_cuda(const Nf4Tensors& in, const TensorView& out, int64_t stream);
void quantize_int4g_cuda(const TensorView& weight, const Int4gTensors& out, int64_t stream);
void dequantize_int4g_cuda(const Int4gTensors& in, const TensorView& out, int64_t stream);

// out[M, N] = x[M, K] · dequant(W)ᵀ with W a 4-bit [N, K] weight (`n` = N), fp32 accumulation.
// x: f32/f16/bf16, contiguous 2-D; out: x's dtype, contiguous [M, N].
// CPU: any M (the reference). CUDA: the decode path, M <= kDecodeMaxRows, bf16/f16, K a multiple of 128;
// larger M on CUDA is dequantize + cuBLAS, composed in Python (kindred/_ops.py).
inline constexpr int64_t kDecodeMaxRows = 16;
void matmul_4bit(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out, int64_t stream);
void matmul_4bit(const TensorView& x, const Int4gTensors& w, const TensorView& out, int64_t stream);

void matmul_4bit_cpu(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out);
void matmul_4bit_cpu(const TensorView& x, const Int4gTensors& w, const TensorView& out);
void matmul_4bit_cuda(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out, int64_t stream);
void matmul_4bit_cuda(const TensorView& x, const Int4gTensors& w, const TensorView& out, int64_t stream);

// ---------------------------------------------------------------------------------------------------
// Decode layout: a load-time, lossless repack of an NF4 or INT4g [N, K] weight for the decode kernel
// (kernels/quant/matmul_4bit_decode_cuda.cu). K % 128 == 0; N is padded to a multiple of 16 rows.
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

int64_t decode_record_bytes(DecodeFormat format, int64_t period);
int64_t decode_bytes(DecodeFormat format, int64_t n, int64_t k, int64_t period);

// Canonical -> decode layout (CPU; `n` = N for NF4) and back. NF4 unpacks to f32 absmax [N*K/blocksize]
// (the expanded values when the source was double-quantized).
void repack_decode(const Nf4Tensors& in, int64_t n, const DecodeWeight& out);
void repack_decode(const Int4gTensors& in, const DecodeWeight& out);
void unpack_decode(const DecodeWeight& in, const Nf4Tensors& out);
void unpack_decode(const DecodeWeight& in, const Int4gTensors& out);

// out[M, N] = x[M, K] · dequant(W)ᵀ from the decode layout. CPU: any M (reference of the layout). CUDA:
// M <= kDecodeMaxRows, bf16/f16 x.
void matmul_4bit_decode(const TensorView& x, const DecodeWeight& w, const TensorView& out, int64_t stream);
void matmul_4bit_decode_cpu(const TensorView& x, const DecodeWeight& w, const TensorView& out);
void matmul_4bit_decode_cuda(const TensorView& x, const DecodeWeight& w, const TensorView& out, int64_t stream);

}  // namespace kindred
