// The decode layout of a 4-bit weight (quant.h): sizes, the lossless repack from the canonical NF4 / INT4g
// tensors and back (CPU, done once at load), and the validation and dispatch of matmul_4bit_decode.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "kindred/formats.h"
#include "kindred/quant.h"

namespace kindred {
namespace {

// Weight position of code j of word p of `lane` in unit (t, ch).
struct UnitPos {
  int64_t row, col;  // weight row and column of code j
};

UnitPos unit_pos(int64_t t, int64_t ch, int lane, int p, int j) {
  return {kDecodeTileRows * t + lane / 4, kDecodeChunk * ch + 32 * p + 8 * (lane % 4) + j};
}

// Nibble position of code j within its INT4g word (the inverse of kDecodeInt4Order).
int int4_nibble(int j) {
  for (int i = 0; i < 8; ++i)
    if (kDecodeInt4Order[i] == j) return i;
  return 0;
}

int64_t padded_rows(int64_t n) {
  return (n + kDecodeRowPad - 1) / kDecodeRowPad * kDecodeRowPad;
}

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

void check_cpu(const TensorView& t, const char* name) {
  KINDRED_CHECK(t.device == Device::cpu, name, " must be on the CPU for the decode repack, got ", t.describe());
}

// Packed code of weight element (row, col) in the canonical layouts.
uint8_t nf4_code(const uint8_t* packed, int64_t k, int64_t row, int64_t col) {
  const int64_t e = row * k + col;
  return e % 2 ? packed[e / 2] & 0xF : packed[e / 2] >> 4;
}

uint8_t int4g_code(const uint8_t* packed, int64_t k, int64_t row, int64_t col) {
  const uint8_t byte = packed[row * (k / 2) + col / 2];
  return col % 2 ? byte >> 4 : byte & 0xF;
}

// Calls fn(unit pointer, t, ch) for every unit, in parallel.
template <typename Fn>
void for_units(const DecodeWeight& w, Fn&& fn) {
  const int64_t tiles = padded_rows(w.n) / kDecodeTileRows, chunks = w.k / kDecodeChunk;
  const int64_t unit = kDecodeCodeBytes + decode_record_bytes(w.format, w.period);
  uint8_t* base = w.data.ptr<uint8_t>();
#pragma omp parallel for
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t ch = 0; ch < chunks; ++ch) fn(base + (t * chunks + ch) * unit, t, ch);
}

}  // namespace

int64_t decode_record_bytes(DecodeFormat format, int64_t period) {
  const int64_t periods = kDecodeChunk / period;
  if (format == DecodeFormat::nf4) return periods * kDecodeTileRows * 4;
  return (periods * kDecodeTileRows * 3 + 15) / 16 * 16;
}

int64_t decode_bytes(DecodeFormat format, int64_t n, int64_t k, int64_t period) {
  return padded_rows(n) / kDecodeTileRows * (k / kDecodeChunk) *
         (kDecodeCodeBytes + decode_record_bytes(format, period));
}

void repack_decode(const Nf4Tensors& in, int64_t n, const DecodeWeight& out) {
  KINDRED_CHECK(out.format == DecodeFormat::nf4 && out.n == n && out.period == std::min<int64_t>(in.blocksize, 128),
                "the decode layout must be NF4 with n = ", n, " and period = min(blocksize, 128)");
  check_decode_weight(out);
  KINDRED_CHECK(formats::nf4_blocksize_ok(in.blocksize), "blocksize must be a power of two in [32, 4096], got ",
                in.blocksize);
  KINDRED_CHECK(!in.nested() || (in.nested_code && in.offset), "double quantization needs nested_absmax, ",
                "nested_code and offset together");
  for (const TensorView* t : {&in.packed, &in.absmax, &out.data}) check_cpu(*t, "the weight's tensors");
  check_dtype(in.packed, "packed", {DType::u8});
  std::vector<float> expanded;
  {
    // The f32 absmax of every block: the stored one, or double quantization expanded as dequantize_nf4 does.
    const int64_t blocks = n * out.k / in.blocksize;
    KINDRED_CHECK(in.packed.numel() == n * out.k / 2 && in.absmax.numel() == blocks, "packed / absmax do not match a [",
                  n, ", ", out.k, "] weight with blocksize ", in.blocksize);
    expanded.resize(blocks);
    if (in.nested()) {
      check_dtype(in.absmax, "absmax", {DType::u8});
      const std::pair<const TensorView*, int64_t> parts[] = {
          {&*in.nested_absmax, (blocks + formats::kNestedBlocksize - 1) / formats::kNestedBlocksize},
          {&*in.nested_code, 256},
          {&*in.offset, 1}};
      for (auto [t, numel] : parts) {
        check_dtype(*t, "nested_absmax / nested_code / offset", {DType::f32});
        check_cpu(*t, "nested_absmax / nested_code / offset");
        KINDRED_CHECK(t->numel() == numel, "a double-quantization tensor has ", t->numel(), " elements, expected ",
                      numel);
      }
      const uint8_t* q = in.absmax.ptr<uint8_t>();
      const float* code = in.nested_code->ptr<float>();
      const float* nested = in.nested_absmax->ptr<float>();
      const float offset = in.offset->ptr<float>()[0];
      for (int64_t b = 0; b < blocks; ++b) {
        const float scaled = code[q[b]] * nested[b / formats::kNestedBlocksize];
        expanded[b] = scaled + offset;
      }
    } else {
      check_dtype(in.absmax, "absmax", {DType::f32});
      std::copy_n(in.absmax.ptr<float>(), blocks, expanded.begin());
    }
  }
  const uint8_t* packed = in.packed.ptr<uint8_t>();
  const int64_t k = out.k, bs = in.blocksize, periods = kDecodeChunk / out.period;
  for_units(out, [&](uint8_t* u, int64_t t, int64_t ch) {
    std::memset(u, 0, kDecodeCodeBytes + decode_record_bytes(out.format, out.period));
    for (int lane = 0; lane < 32; ++lane)
      for (int p = 0; p < 4; ++p)
        for (int j = 0; j < 8; ++j) {
          const UnitPos pos = unit_pos(t, ch, lane, p, j);
          if (pos.row >= n) continue;
          const uint8_t code = nf4_code(packed, k, pos.row, pos.col);
          u[16 * lane + 4 * p + j / 2] |= static_cast<uint8_t>(j % 2 ? code : code << 4);
        }
    float* record = reinterpret_cast<float*>(u + kDecodeCodeBytes);
    for (int64_t i = 0; i < periods; ++i)
      for (int64_t r = 0; r < kDecodeTileRows; ++r) {
        const int64_t row = kDecodeTileRows * t + r;
        if (row < n) record[i * kDecodeTileRows + r] = expanded[(row * k + kDecodeChunk * ch + i * out.period) / bs];
      }
  });
}

void repack_decode(const Int4gTensors& in, const DecodeWeight& out) {
  KINDRED_CHECK(out.format == DecodeFormat::int4g && out.period == in.group_size,
                "the decode layout must be INT4g with period = group_size");
  check_decode_weight(out);
  for (const TensorView* t : {&in.packed, &in.scales, &in.zeros, &out.data}) check_cpu(*t, "the weight's tensors");
  check_shape(in.packed, "packed", {out.n, out.k / 2});
  check_shape(in.scales, "scales", {out.n, out.k / in.group_size});
  check_shape(in.zeros, "zeros", {out.n, out.k / in.group_size});
  check_dtype(in.packed, "packed", {DType::u8});
  check_dtype(in.scales, "scales", {DType::f16});
  check_dtype(in.zeros, "zeros", {DType::u8});
  const uint8_t* packed = in.packed.ptr<uint8_t>();
  const uint16_t* scales = in.scales.ptr<uint16_t>();
  const uint8_t* zeros = in.zeros.ptr<uint8_t>();
  const int64_t n = out.n, k = out.k, groups = k / in.group_size, periods = kDecodeChunk / out.period;
  for_units(out, [&](uint8_t* u, int64_t t, int64_t ch) {
    std::memset(u, 0, kDecodeCodeBytes + decode_record_bytes(out.format, out.period));
    for (int lane = 0; lane < 32; ++lane)
      for (int p = 0; p < 4; ++p) {
        uint32_t word = 0;
        for (int j = 0; j < 8; ++j) {
          const UnitPos pos = unit_pos(t, ch, lane, p, j);
          if (pos.row < n)
            word |= static_cast<uint32_t>(int4g_code(packed, k, pos.row, pos.col)) << (4 * int4_nibble(j));
        }
        std::memcpy(u + 16 * lane + 4 * p, &word, 4);
      }
    uint16_t* s = reinterpret_cast<uint16_t*>(u + kDecodeCodeBytes);
    uint8_t* z = u + kDecodeCodeBytes + periods * kDecodeTileRows * 2;
    for (int64_t i = 0; i < periods; ++i)
      for (int64_t r = 0; r < kDecodeTileRows; ++r) {
        const int64_t row = kDecodeTileRows * t + r;
        if (row >= n) continue;
        const int64_t gi = row * groups + ch * periods + i;
        s[i * kDecodeTileRows + r] = scales[gi];
        z[i * kDecodeTileRows + r] = zeros[gi];
      }
  });
}

void unpack_decode(const DecodeWeight& in, const Nf4Tensors& out) {
  KINDRED_CHECK(in.format == DecodeFormat::nf4 && !out.nested(), "unpack_decode: an NF4 layout unpacks to ",
                "packed codes and an f32 absmax");
  check_decode_weight(in);
  for (const TensorView* t : {&in.data, &out.packed, &out.absmax}) check_cpu(*t, "the weight's tensors");
  const int64_t n = in.n, k = in.k, bs = out.blocksize;
  KINDRED_CHECK(std::min<int64_t>(bs, kDecodeChunk) == in.period && formats::nf4_blocksize_ok(bs), "blocksize ", bs,
                " does not match the layout's period ", in.period);
  check_dtype(out.packed, "packed", {DType::u8});
  check_dtype(out.absmax, "absmax", {DType::f32});
  KINDRED_CHECK(out.packed.numel() == n * k / 2 && out.absmax.numel() == n * k / bs, "packed / absmax do not match a [",
                n, ", ", k, "] weight with blocksize ", bs);
  uint8_t* packed = out.packed.ptr<uint8_t>();
  float* absmax = out.absmax.ptr<float>();
  const int64_t periods = kDecodeChunk / in.period;
  // Every unit writes whole bytes of its own rows and the absmax of its blocks (a block over several units
  // gets the same value from each), so units can run in parallel.
  for_units(in, [&](uint8_t* u, int64_t t, int64_t ch) {
    for (int lane = 0; lane < 32; ++lane)
      for (int p = 0; p < 4; ++p)
        for (int j = 0; j < 8; j += 2) {
          const UnitPos pos = unit_pos(t, ch, lane, p, j);
          if (pos.row < n) packed[(pos.row * k + pos.col) / 2] = u[16 * lane + 4 * p + j / 2];
        }
    const float* record = reinterpret_cast<const float*>(u + kDecodeCodeBytes);
    for (int64_t i = 0; i < periods; ++i)
      for (int64_t r = 0; r < kDecodeTileRows; ++r) {
        const int64_t row = kDecodeTileRows * t + r;
        if (row < n) absmax[(row * k + kDecodeChunk * ch + i * in.period) / bs] = record[i * kDecodeTileRows + r];
      }
  });
}

void unpack_decode(const DecodeWeight& in, const Int4gTensors& out) {
  KINDRED_CHECK(in.format == DecodeFormat::int4g && out.group_size == in.period,
                "unpack_decode: an INT4g layout unpacks with group_size = its period");
  check_decode_weight(in);
  for (const TensorView* t : {&in.data, &out.packed, &out.scales, &out.zeros}) check_cpu(*t, "the weight's tensors");
  const int64_t n = in.n, k = in.k, groups = k / in.period, periods = kDecodeChunk / in.period;
  check_shape(out.packed, "packed", {n, k / 2});
  check_shape(out.scales, "scales", {n, groups});
  check_shape(out.zeros, "zeros", {n, groups});
  check_dtype(out.packed, "packed", {DType::u8});
  check_dtype(out.scales, "scales", {DType::f16});
  check_dtype(out.zeros, "zeros", {DType::u8});
  uint8_t* packed = out.packed.ptr<uint8_t>();
  uint16_t* scales = out.scales.ptr<uint16_t>();
  uint8_t* zeros = out.zeros.ptr<uint8_t>();
  for_units(in, [&](uint8_t* u, int64_t t, int64_t ch) {
    for (int lane = 0; lane < 32; ++lane)
      for (int p = 0; p < 4; ++p) {
        uint32_t word;
        std::memcpy(&word, u + 16 * lane + 4 * p, 4);
        for (int j = 0; j < 8; j += 2) {
          const UnitPos pos = unit_pos(t, ch, lane, p, j);
          if (pos.row >= n) continue;
          const uint32_t lo = (word >> (4 * int4_nibble(j))) & 0xF, hi = (word >> (4 * int4_nibble(j + 1))) & 0xF;
          packed[pos.row * (k / 2) + pos.col / 2] = static_cast<uint8_t>(lo | hi << 4);
        }
      }
    const uint16_t* s = reinterpret_cast<const uint16_t*>(u + kDecodeCodeBytes);
    const uint8_t* z = u + kDecodeCodeBytes + periods * kDecodeTileRows * 2;
    for (int64_t i = 0; i < periods; ++i)
      for (int64_t r = 0; r < kDecodeTileRows; ++r) {
        const int64_t row = kDecodeTileRows * t + r;
        if (row >= n) continue;
        scales[row * groups + ch * periods + i] = s[i * kDecodeTileRows + r];
        zeros[row * groups + ch * periods + i] = z[i * kDecodeTileRows + r];
      }
  });
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
  KINDRED_CHECK(x.shape[0] <= kDecodeMaxRows && x.dtype != DType::f32, "the CUDA decode kernel takes at most ",
                kDecodeMaxRows, " rows of bf16 or f16, got x ", x.describe());
#ifdef KINDRED_WITH_CUDA
  matmul_4bit_decode_cuda(x, w, out, stream);
#else
  throw Error("matmul_4bit_decode: kindred was built without CUDA; rebuild with nvcc on the PATH", true);
#endif
}

}  // namespace kindred
