// The quant op family: quantize / dequantize for NF4 and INT4g, and the AWQ repack. Each op is declared
// once; `<op>` validates its arguments and dispatches to `<op>_cpu` (csrc/cpu) or `<op>_cuda` (kernels/).
// Formats: kindred/formats.h. All buffers are allocated by the caller.
#pragma once

#include <optional>
#include <utility>

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

// The checks of the tensors of a quantized weight against the dense tensor they stand for (named errors),
// shared with the matmul_4bit family. check_nf4: `numel` elements, returns the number of blocks.
// check_int4g: an [N, K] `dense`, returns {N, K}.
int64_t check_nf4(const Nf4Tensors& q, int64_t numel, const TensorView& dense, const char* dense_name);
std::pair<int64_t, int64_t> check_int4g(const Int4gTensors& q, const TensorView& dense, const char* dense_name);

void quantize_nf4_cpu(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace);
void dequantize_nf4_cpu(const Nf4Tensors& in, const TensorView& out);
void quantize_int4g_cpu(const TensorView& weight, const Int4gTensors& out);
void dequantize_int4g_cpu(const Int4gTensors& in, const TensorView& out);
void awq_pack_cpu(const Int4gTensors& in, const TensorView& qweight, const TensorView& qzeros,
                  const TensorView& scales);
void awq_unpack_cpu(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                    const Int4gTensors& out);

void quantize_nf4_cuda(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace,
                       int64_t stream);
void dequantize_nf4_cuda(const Nf4Tensors& in, const TensorView& out, int64_t stream);
void quantize_int4g_cuda(const TensorView& weight, const Int4gTensors& out, int64_t stream);
void dequantize_int4g_cuda(const Int4gTensors& in, const TensorView& out, int64_t stream);

}  // namespace kindred
