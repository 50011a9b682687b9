// The gguf op family: dequantization of GGUF tensor blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
// for the GGUF importer. Load-time work, so CPU only. Block layouts: kindred/formats.h (GGUF section).
#pragma once

#include "kindred/common.h"

namespace kindred {

// blocks: u8, contiguous, (numel / block_elems) * block_bytes bytes of ggml_type `ggml_type`;
// out: f32/f16/bf16, contiguous, on the CPU, numel a positive multiple of the type's block size.
void dequantize_gguf(int ggml_type, const TensorView& blocks, const TensorView& out);

void dequantize_gguf_cpu(int ggml_type, const TensorView& blocks, const TensorView& out);

}  // namespace kindred
