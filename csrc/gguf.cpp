// Validation and dispatch of the gguf family (CPU only: GGUF tensors are dequantized once, at load time, and
// quantized once, at export time).
#include "kindred/gguf.h"

#include <string>

#include "kindred/dispatch.h"
#include "kindred/formats.h"

namespace kindred {

namespace {

const formats::gguf::GgmlTypeInfo& type_info(int ggml_type, const char* verb) {
  const formats::gguf::GgmlTypeInfo* info = formats::gguf::ggml_type_info(ggml_type);
  if (info == nullptr) {
    std::string known;
    for (const auto& t : formats::gguf::kGgmlTypes) known += cat(known.empty() ? "" : ", ", t.name, " (", t.id, ")");
    KINDRED_CHECK(false, "ggml_type ", ggml_type, " is not a block format kindred ", verb, "; supported: ", known);
  }
  return *info;
}

}  // namespace

void dequantize_gguf(int ggml_type, const TensorView& blocks, const TensorView& out) {
  const formats::gguf::GgmlTypeInfo* info = &type_info(ggml_type, "dequantizes");
  check_dtype(blocks, "blocks", {DType::u8});
  check_contiguous(blocks, "blocks");
  check_dtype(out, "out", {DType::f32, DType::f16, DType::bf16});
  check_contiguous(out, "out");
  check_cpu(blocks, "blocks", "GGUF dequantization runs at load time");
  check_cpu(out, "out", "GGUF dequantization runs at load time");
  const int64_t n = out.numel();
  KINDRED_CHECK(n > 0 && n % info->block_elems == 0, "out must have a positive multiple of ", info->block_elems,
                " elements (one ", info->name, " block), got ", out.describe());
  const int64_t expected = n / info->block_elems * info->block_bytes;
  KINDRED_CHECK(blocks.numel() == expected, "blocks must hold ", expected, " bytes for ", n, " ", info->name,
                " elements (", info->block_bytes, " bytes per ", info->block_elems, "), got ", blocks.describe(),
                " — truncated tensor data or a wrong shape?");
  dequantize_gguf_cpu(ggml_type, blocks, out);
}

void quantize_gguf(int ggml_type, const TensorView& x, const TensorView& blocks) {
  const formats::gguf::GgmlTypeInfo& info = type_info(ggml_type, "quantizes");
  check_dtype(x, "x", {DType::f32, DType::f16, DType::bf16});
  check_contiguous(x, "x");
  check_dtype(blocks, "blocks", {DType::u8});
  check_contiguous(blocks, "blocks");
  check_cpu(x, "x", "GGUF quantization runs at export time");
  check_cpu(blocks, "blocks", "GGUF quantization runs at export time");
  const int64_t n = x.numel();
  KINDRED_CHECK(n > 0 && n % info.block_elems == 0, "x must have a positive multiple of ", info.block_elems,
                " elements (one ", info.name, " block), got ", x.describe());
  const int64_t expected = n / info.block_elems * info.block_bytes;
  KINDRED_CHECK(blocks.numel() == expected, "blocks must hold ", expected, " bytes for ", n, " ", info.name,
                " elements (", info.block_bytes, " bytes per ", info.block_elems, "), got ", blocks.describe());
  quantize_gguf_cpu(ggml_type, x, blocks);
}

}  // namespace kindred
