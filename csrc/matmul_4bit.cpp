// Validation and device dispatch of the matmul_4bit family (declarations, semantics and the decode layout:
// kindred/matmul_4bit.h), and the decode layout's sizes.
#include "kindred/matmul_4bit.h"

#include <algorithm>
#include <utility>

#include "kindred/dispatch.h"
#include "kindred/formats.h"

namespace kindred {
namespace {

constexpr const char* kRepack = "the decode repack runs on the CPU, once at load";

void check_decode_weight(const DecodeWeight& w) {
  KINDRED_CHECK(w.format == DecodeFormat::nf4 || w.format == DecodeFormat::int4g,
                "format must be 0 (NF4) or 1 (INT4g), got ", static_cast<int>(w.format));
  KINDRED_CHECK(w.k > 0 && w.k % kDecodeChunk == 0, "the decode layout needs in_features % 128 == 0, got ", w.k);
  KINDRED_CHECK(w.n > 0, "the decode layout needs out_features > 0, got ", w.n);
  const bool ok =
      w.format == DecodeFormat::nf4 ? w.period >= 32 && w.period <= kDecodeChunk : formats::int4g_group_ok(w.period);
  KINDRED_CHECK(ok && (w.period & (w.period - 1)) == 0, "period must be a power of two in [32, 128], got ", w.period);
  check_dtype(w.data, "data", {DType::u8});
  check_contiguous(w.data, "data");
  KINDRED_CHECK(w.data.numel() == decode_bytes(w.format, w.n, w.k, w.period), "data must have ",
                decode_bytes(w.format, w.n, w.k, w.period), " bytes for the decode layout of [", w.n, ", ", w.k,
                "], got ", w.data.describe());
}

}  // namespace

int64_t decode_record_bytes(DecodeFormat format, int64_t period) {
  const int64_t periods = kDecodeChunk / period;
  if (format == DecodeFormat::nf4) return periods * kDecodeTileRows * 4;
  return (periods * kDecodeTileRows * 3 + 15) / 16 * 16;
}

int64_t decode_bytes(DecodeFormat format, int64_t n, int64_t k, int64_t period) {
  return decode_padded_rows(n) / kDecodeTileRows * (k / kDecodeChunk) *
         (kDecodeCodeBytes + decode_record_bytes(format, period));
}

namespace {

// Checks x [M, K] and out [M, N] of matmul_4bit; returns a view standing for the [N, K] weight on x's device.
TensorView check_matmul_io(const TensorView& x, int64_t n, const TensorView& out) {
  check_dtype(x, "x", {DType::f32, DType::f16, DType::bf16});
  check_contiguous(x, "x");
  KINDRED_CHECK(x.dim() == 2, "x must be 2-D [M, K], got ", x.describe());
  check_dtype(out, "out", {x.dtype});
  check_contiguous(out, "out");
  check_shape(out, "out", {x.shape[0], n});
  check_same_device(x, "x", out, "out");
  TensorView dense = x;
  dense.shape = {n, x.shape[1]};
  dense.strides = {x.shape[1], 1};
  return dense;
}

constexpr const char* kCanonicalOnCpu =
    "matmul_4bit of the canonical layout is the CPU path; on CUDA kindred composes dequantize + one cuBLAS GEMM "
    "(python/kindred/_ops/matmul_4bit.py) and decodes from the decode layout (matmul_4bit_decode)";

}  // namespace

void matmul_4bit(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out,
                 [[maybe_unused]] int64_t stream) {
  KINDRED_CHECK(n > 0, "the weight's out_features must be positive, got ", n);
  const TensorView dense = check_matmul_io(x, n, out);
  check_nf4(w, dense.numel(), dense, "x");
  check_cpu(x, "x", kCanonicalOnCpu);
  matmul_4bit_cpu(x, w, n, out);
}

void matmul_4bit(const TensorView& x, const Int4gTensors& w, const TensorView& out, [[maybe_unused]] int64_t stream) {
  KINDRED_CHECK(w.packed.dim() == 2, "packed must be 2-D [N, K/2], got ", w.packed.describe());
  const TensorView dense = check_matmul_io(x, w.packed.shape[0], out);
  check_int4g(w, dense, "x");
  check_cpu(x, "x", kCanonicalOnCpu);
  matmul_4bit_cpu(x, w, out);
}

void check_decode_eligible(const TensorView& x) {
  KINDRED_CHECK(x.dim() == 2 && x.shape[0] <= kDecodeMaxRows, "the CUDA decode kernel takes at most ", kDecodeMaxRows,
                " rows of x, got x ", x.describe());
  KINDRED_CHECK(x.dtype == DType::bf16 || x.dtype == DType::f16,
                "the CUDA decode kernel takes bf16 or f16 activations, got x ", x.describe());
  KINDRED_CHECK(x.shape[1] % kDecodeChunk == 0, "the CUDA decode kernel needs in_features % 128 == 0, got x ",
                x.describe());
}

void repack_decode(const Nf4Tensors& in, int64_t n, const DecodeWeight& out) {
  KINDRED_CHECK(out.format == DecodeFormat::nf4 && out.n == n && out.period == std::min(in.blocksize, kDecodeChunk),
                "the decode layout must be NF4 with n = ", n, " and period = min(blocksize, 128)");
  check_decode_weight(out);
  KINDRED_CHECK(formats::nf4_blocksize_ok(in.blocksize), "blocksize must be a power of two in [32, 4096], got ",
                in.blocksize);
  KINDRED_CHECK(!in.nested() || (in.nested_code && in.offset), "double quantization needs nested_absmax, ",
                "nested_code and offset together");
  for (const TensorView* t : {&in.packed, &in.absmax, &out.data}) check_cpu(*t, "the weight's tensors", kRepack);
  check_dtype(in.packed, "packed", {DType::u8});
  const int64_t blocks = n * out.k / in.blocksize;
  KINDRED_CHECK(in.packed.numel() == n * out.k / 2 && in.absmax.numel() == blocks, "packed / absmax do not match a [",
                n, ", ", out.k, "] weight with blocksize ", in.blocksize);
  if (in.nested()) {
    check_dtype(in.absmax, "absmax", {DType::u8});
    const std::pair<const TensorView*, int64_t> parts[] = {
        {&*in.nested_absmax, (blocks + formats::kNestedBlocksize - 1) / formats::kNestedBlocksize},
        {&*in.nested_code, 256},
        {&*in.offset, 1}};
    for (auto [t, numel] : parts) {
      check_dtype(*t, "nested_absmax / nested_code / offset", {DType::f32});
      check_cpu(*t, "nested_absmax / nested_code / offset", kRepack);
      KINDRED_CHECK(t->numel() == numel, "a double-quantization tensor has ", t->numel(), " elements, expected ",
                    numel);
    }
  } else {
    check_dtype(in.absmax, "absmax", {DType::f32});
  }
  repack_decode_cpu(in, n, out);
}

void repack_decode(const Int4gTensors& in, const DecodeWeight& out) {
  KINDRED_CHECK(out.format == DecodeFormat::int4g && out.period == in.group_size,
                "the decode layout must be INT4g with period = group_size");
  check_decode_weight(out);
  for (const TensorView* t : {&in.packed, &in.scales, &in.zeros, &out.data})
    check_cpu(*t, "the weight's tensors", kRepack);
  check_shape(in.packed, "packed", {out.n, out.k / 2});
  check_shape(in.scales, "scales", {out.n, out.k / in.group_size});
  check_shape(in.zeros, "zeros", {out.n, out.k / in.group_size});
  check_dtype(in.packed, "packed", {DType::u8});
  check_dtype(in.scales, "scales", {DType::f16});
  check_dtype(in.zeros, "zeros", {DType::u8});
  repack_decode_cpu(in, out);
}

void unpack_decode(const DecodeWeight& in, const Nf4Tensors& out) {
  KINDRED_CHECK(in.format == DecodeFormat::nf4 && !out.nested(), "unpack_decode: an NF4 layout unpacks to ",
                "packed codes and an f32 absmax");
  check_decode_weight(in);
  for (const TensorView* t : {&in.data, &out.packed, &out.absmax}) check_cpu(*t, "the weight's tensors", kRepack);
  const int64_t n = in.n, k = in.k, bs = out.blocksize;
  KINDRED_CHECK(std::min<int64_t>(bs, kDecodeChunk) == in.period && formats::nf4_blocksize_ok(bs), "blocksize ", bs,
                " does not match the layout's period ", in.period);
  check_dtype(out.packed, "packed", {DType::u8});
  check_dtype(out.absmax, "absmax", {DType::f32});
  KINDRED_CHECK(out.packed.numel() == n * k / 2 && out.absmax.numel() == n * k / bs, "packed / absmax do not match a [",
                n, ", ", k, "] weight with blocksize ", bs);
  unpack_decode_cpu(in, out);
}

void unpack_decode(const DecodeWeight& in, const Int4gTensors& out) {
  KINDRED_CHECK(in.format == DecodeFormat::int4g && out.group_size == in.period,
                "unpack_decode: an INT4g layout unpacks with group_size = its period");
  check_decode_weight(in);
  for (const TensorView* t : {&in.data, &out.packed, &out.scales, &out.zeros})
    check_cpu(*t, "the weight's tensors", kRepack);
  const int64_t n = in.n, k = in.k, groups = k / in.period;
  check_shape(out.packed, "packed", {n, k / 2});
  check_shape(out.scales, "scales", {n, groups});
  check_shape(out.zeros, "zeros", {n, groups});
  check_dtype(out.packed, "packed", {DType::u8});
  check_dtype(out.scales, "scales", {DType::f16});
  check_dtype(out.zeros, "zeros", {DType::u8});
  unpack_decode_cpu(in, out);
}

void matmul_4bit_decode(const TensorView& x, const DecodeWeight& w, const TensorView& out,
                        [[maybe_unused]] int64_t stream) {
  check_decode_weight(w);
  check_dtype(x, "x", {DType::f32, DType::f16, DType::bf16});
  check_contiguous(x, "x");
  KINDRED_CHECK(x.dim() == 2 && x.shape[1] == w.k, "x must be 2-D [M, ", w.k, "], got ", x.describe());
  check_dtype(out, "out", {x.dtype});
  check_contiguous(out, "out");
  check_shape(out, "out", {x.shape[0], w.n});
  check_same_device(x, "x", out, "out");
  check_same_device(x, "x", w.data, "data");
  if (x.device == Device::cpu) return matmul_4bit_decode_cpu(x, w, out);
  check_decode_eligible(x);
  KINDRED_CALL_CUDA(matmul_4bit_decode, x, w, out, stream);
}

}  // namespace kindred
