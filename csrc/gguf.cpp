// Validation and dispatch of the gguf family (CPU only: GGUF tensors are dequantized once, at load time).
#include "kindred/gguf.h"

#include <string>

#include "kindred/dispatch.h"
#include "kindred/formats.h"

namespace kindred {

void dequantize_gguf(int ggml_type, const TensorView& blocks, const TensorView& out) {
  const formats::gguf::GgmlTypeInfo* info = formats::gguf::ggml_type_info(ggml_type);
  if (info == nullptr) {
    std::string known;
    for (const auto& t : formats::gguf::kGgmlTypes) known += cat(known.empty() ? "" : ", ", t.name, " (", t.id, ")");
    KINDRED_CHECK(false, "ggml_type ", ggml_type, " is not a block format kindred dequantizes; supported: ", known);
  }
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

}  // namespace kindred
