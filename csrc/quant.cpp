// Validation and device dispatch of the quant family (declarations and semantics: kindred/quant.h).
#include "kindred/quant.h"

#include "kindred/dispatch.h"
#include "kindred/formats.h"

namespace kindred {
namespace {

using formats::kNestedBlocksize;

void check_numel(const TensorView& t, const char* name, int64_t expected, const char* why) {
  KINDRED_CHECK(t.numel() == expected, name, " must have ", expected, " elements (", why, "), got ", t.describe(),
                " — truncated or mismatched quantization state?");
}

void check_float_io(const TensorView& t, const char* name) {
  check_dtype(t, name, {DType::f32, DType::f16, DType::bf16});
  check_contiguous(t, name);
}

// A dequantize output: contiguous, or 2-D with strided rows (see quant.h).
void check_float_out(const TensorView& t, int64_t blocksize) {
  check_dtype(t, "out", {DType::f32, DType::f16, DType::bf16});
  if (t.contiguous()) return;
  KINDRED_CHECK(t.dim() == 2 && t.strides[1] == 1 && t.strides[0] >= t.shape[1] && t.strides[0] % 8 == 0,
                "out must be contiguous or 2-D with unit column stride and a row stride >= its width and a ",
                "multiple of 8, got ", t.describe(), " with strides [", t.strides[0], ", ", t.strides[1], "]");
  KINDRED_CHECK(t.shape[1] % blocksize == 0, "a row-strided out needs rows that are whole blocks of ", blocksize,
                ", got ", t.describe());
}

}  // namespace

// Checks `q` against a tensor of n elements and returns the number of blocks.
int64_t check_nf4(const Nf4Tensors& q, int64_t n, const TensorView& dense, const char* dense_name) {
  KINDRED_CHECK(formats::nf4_blocksize_ok(q.blocksize), "blocksize must be a power of two in [32, 4096], got ",
                q.blocksize);
  KINDRED_CHECK(n > 0 && n % q.blocksize == 0, dense_name, " must have a number of elements that is a positive ",
                "multiple of blocksize ", q.blocksize, ", got ", dense.describe());
  const int64_t blocks = n / q.blocksize;
  check_dtype(q.packed, "packed", {DType::u8});
  check_contiguous(q.packed, "packed");
  check_numel(q.packed, "packed", n / 2, "two 4-bit codes per byte");
  check_same_device(q.packed, "packed", dense, dense_name);
  check_contiguous(q.absmax, "absmax");
  check_numel(q.absmax, "absmax", blocks, "one per block");
  check_same_device(q.absmax, "absmax", dense, dense_name);
  const bool any_nested = q.nested_absmax || q.nested_code || q.offset;
  KINDRED_CHECK(!any_nested || (q.nested_absmax && q.nested_code && q.offset),
                "double quantization needs nested_absmax, nested_code and offset together");
  if (!q.nested()) {
    check_dtype(q.absmax, "absmax", {DType::f32});
    return blocks;
  }
  check_dtype(q.absmax, "absmax", {DType::u8});
  const std::pair<const TensorView*, const char*> nested[] = {
      {&*q.nested_absmax, "nested_absmax"}, {&*q.nested_code, "nested_code"}, {&*q.offset, "offset"}};
  for (auto [t, name] : nested) {
    check_dtype(*t, name, {DType::f32});
    check_contiguous(*t, name);
    check_same_device(*t, name, dense, dense_name);
  }
  check_numel(*q.nested_absmax, "nested_absmax", (blocks + kNestedBlocksize - 1) / kNestedBlocksize,
              "one per 256 blocks");
  check_numel(*q.nested_code, "nested_code", 256, "the 8-bit dynamic map");
  check_numel(*q.offset, "offset", 1, "the absmax mean");
  return blocks;
}

// Checks `q` against an [N, K] weight and returns {N, K}.
std::pair<int64_t, int64_t> check_int4g(const Int4gTensors& q, const TensorView& dense, const char* dense_name) {
  KINDRED_CHECK(formats::int4g_group_ok(q.group_size), "group_size must be 32, 64 or 128, got ", q.group_size);
  KINDRED_CHECK(dense.dim() == 2, dense_name, " must be 2-D [out_features, in_features], got ", dense.describe());
  const int64_t n = dense.shape[0], k = dense.shape[1];
  KINDRED_CHECK(n > 0 && k > 0 && k % q.group_size == 0, dense_name, " in_features must be a positive multiple of ",
                "group_size ", q.group_size, ", got ", dense.describe());
  const std::pair<const TensorView*, const char*> parts[] = {
      {&q.packed, "packed"}, {&q.scales, "scales"}, {&q.zeros, "zeros"}};
  for (auto [t, name] : parts) {
    check_contiguous(*t, name);
    check_same_device(*t, name, dense, dense_name);
  }
  check_dtype(q.packed, "packed", {DType::u8});
  check_shape(q.packed, "packed", {n, k / 2});
  check_dtype(q.scales, "scales", {DType::f16});
  check_shape(q.scales, "scales", {n, k / q.group_size});
  check_dtype(q.zeros, "zeros", {DType::u8});
  check_shape(q.zeros, "zeros", {n, k / q.group_size});
  return {n, k};
}

void quantize_nf4(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace,
                  [[maybe_unused]] int64_t stream) {
  check_float_io(weight, "weight");
  const int64_t blocks = check_nf4(out, weight.numel(), weight, "weight");
  if (out.nested()) {
    KINDRED_CHECK(workspace.has_value(), "double quantization needs an f32 workspace of ", blocks, " elements");
    check_dtype(*workspace, "workspace", {DType::f32});
    check_contiguous(*workspace, "workspace");
    check_numel(*workspace, "workspace", blocks, "one f32 absmax per block");
    check_same_device(*workspace, "workspace", weight, "weight");
  }
  if (weight.device == Device::cpu) return quantize_nf4_cpu(weight, out, workspace);
  KINDRED_CALL_CUDA(quantize_nf4, weight, out, workspace, stream);
}

void dequantize_nf4(const Nf4Tensors& in, const TensorView& out, [[maybe_unused]] int64_t stream) {
  check_float_out(out, in.blocksize);
  check_nf4(in, out.numel(), out, "out");
  if (out.device == Device::cpu) return dequantize_nf4_cpu(in, out);
  KINDRED_CALL_CUDA(dequantize_nf4, in, out, stream);
}

void quantize_int4g(const TensorView& weight, const Int4gTensors& out, [[maybe_unused]] int64_t stream) {
  check_float_io(weight, "weight");
  check_int4g(out, weight, "weight");
  if (weight.device == Device::cpu) return quantize_int4g_cpu(weight, out);
  KINDRED_CALL_CUDA(quantize_int4g, weight, out, stream);
}

void dequantize_int4g(const Int4gTensors& in, const TensorView& out, [[maybe_unused]] int64_t stream) {
  check_float_out(out, in.group_size);
  check_int4g(in, out, "out");
  if (out.device == Device::cpu) return dequantize_int4g_cpu(in, out);
  KINDRED_CALL_CUDA(dequantize_int4g, in, out, stream);
}

namespace {

// Checks the AWQ tensors against an [N, K] INT4g weight.
void check_awq(const Int4gTensors& q, const TensorView& qweight, const TensorView& qzeros, const TensorView& scales) {
  const int64_t n = q.packed.shape.at(0), k = q.packed.shape.at(1) * 2, g = q.group_size;
  KINDRED_CHECK(n % 8 == 0, "AWQ packs 8 output columns per int32: out_features must be a multiple of 8, got ", n);
  const std::pair<const TensorView*, const char*> parts[] = {
      {&qweight, "qweight"}, {&qzeros, "qzeros"}, {&scales, "scales"}};
  for (auto [t, name] : parts) {
    check_cpu(*t, name, "the AWQ repack runs on the CPU");
    check_contiguous(*t, name);
  }
  check_dtype(qweight, "qweight", {DType::i32});
  check_shape(qweight, "qweight", {k, n / 8});
  check_dtype(qzeros, "qzeros", {DType::i32});
  check_shape(qzeros, "qzeros", {k / g, n / 8});
  check_dtype(scales, "scales", {DType::f16});
  check_shape(scales, "scales", {k / g, n});
}

// A view of the INT4g tensors' [N, K] shape for check_int4g.
TensorView dense_like(const Int4gTensors& q) {
  TensorView d = q.packed;
  d.dtype = DType::f32;
  d.shape = {q.packed.shape.at(0), q.packed.shape.at(1) * 2};
  d.strides = {d.shape[1], 1};
  return d;
}

}  // namespace

void awq_pack(const Int4gTensors& in, const TensorView& qweight, const TensorView& qzeros, const TensorView& scales) {
  KINDRED_CHECK(in.packed.dim() == 2, "packed must be 2-D [N, K/2], got ", in.packed.describe());
  const TensorView dense = dense_like(in);
  check_cpu(dense, "packed", "the AWQ repack runs on the CPU");
  check_int4g(in, dense, "weight");
  check_awq(in, qweight, qzeros, scales);
  awq_pack_cpu(in, qweight, qzeros, scales);
}

void awq_unpack(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                const Int4gTensors& out) {
  KINDRED_CHECK(out.packed.dim() == 2, "packed must be 2-D [N, K/2], got ", out.packed.describe());
  const TensorView dense = dense_like(out);
  check_cpu(dense, "packed", "the AWQ repack runs on the CPU");
  check_int4g(out, dense, "weight");
  check_awq(out, qweight, qzeros, scales);
  awq_unpack_cpu(qweight, qzeros, scales, out);
}

}  // namespace kindred
