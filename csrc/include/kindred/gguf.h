// The gguf op family: GGUF tensor blocks (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
// dequantized for the GGUF importer and quantized for the GGUF exporter. Load and export-time work, CPU
// only. Block layouts: kindred/formats.h (GGUF section).
#pragma once

#include "kindred/common.h"

namespace kindred {

// blocks: u8, contiguous, (numel / block_elems) * block_bytes bytes of ggml_type `ggml_type`;
// out: f32/f16/bf16, contiguous, on the CPU, numel a positive multiple of the type's block size.
void dequantize_gguf(int ggml_type, const TensorView& blocks, const TensorView& out);

void dequantize_gguf_cpu(int ggml_type, const TensorView& blocks, const TensorView& out);

// x: f32/f16/bf16, contiguous, on the CPU, numel a positive multiple of the type's block size, finite
// (a NaN or infinity raises, naming its index); blocks: u8, contiguous, (numel / block_elems) * block_bytes bytes.
// Byte-identical to llama.cpp's reference quantizers (quantize_row_*_ref, no importance matrix); blocks are
// independent, so rows need no special care.
void quantize_gguf(int ggml_type, const TensorView& x, const TensorView& blocks);

void quantize_gguf_cpu(int ggml_type, const TensorView& x, const TensorView& blocks);

}  // namespace kindred
