// CPU implementations of the matmul_4bit family: matmul_4bit (the reference and the no-GPU path), the decode
// layout's repack / unpack and its reference matmul. Arguments were validated by csrc/matmul_4bit.cpp.
// matmul_4bit: row panels of the weight are dequantized to fp32 and multiplied with Eigen (fp32
// accumulation), one panel per OpenMP thread at a time.
#include <Eigen/Core>
#include <algorithm>
#include <cstring>
#include <vector>

#include "kindred/dispatch.h"
#include "kindred/formats.h"
#include "kindred/matmul_4bit.h"

namespace kindred {
namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr int64_t kPanelRows = 64;

template <typename T>
RowMajor load_x(const TensorView& x) {
  const int64_t m = x.shape[0], k = x.shape[1];
  RowMajor out(m, k);
  const T* p = x.ptr<T>();
  for (int64_t i = 0; i < m * k; ++i) out.data()[i] = static_cast<float>(p[i]);
  return out;
}

RowMajor load_x(const TensorView& x) {
  return with_cpu_float(x.dtype, [&](auto tag) { return load_x<decltype(tag)>(x); });
}

template <typename T>
void store_cols(const RowMajor& y, int64_t col0, const TensorView& out) {
  const int64_t m = out.shape[0], n = out.shape[1];
  T* o = out.ptr<T>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < y.cols(); ++j) o[i * n + col0 + j] = static_cast<T>(y(i, j));
}

void store_cols(const RowMajor& y, int64_t col0, const TensorView& out) {
  with_cpu_float(out.dtype, [&](auto tag) { store_cols<decltype(tag)>(y, col0, out); });
}

// Calls dequant_panel(row0, rows, float* dst) for each panel of the [n, k] weight and multiplies.
template <typename Dequant>
void panels(const TensorView& x, int64_t n, const TensorView& out, Dequant&& dequant_panel) {
  const RowMajor xf = load_x(x);
  const int64_t k = x.shape[1], count = (n + kPanelRows - 1) / kPanelRows;
#pragma omp parallel for schedule(dynamic)
  for (int64_t p = 0; p < count; ++p) {
    const int64_t row0 = p * kPanelRows, rows = std::min(kPanelRows, n - row0);
    RowMajor w(rows, k);
    dequant_panel(row0, rows, w.data());
    const RowMajor y = xf * w.transpose();
    store_cols(y, row0, out);
  }
}

}  // namespace

void matmul_4bit_cpu(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out) {
  const int64_t k = x.shape[1], bs = w.blocksize, blocks = n * k / bs;
  std::vector<float> absmax(blocks);
  if (w.nested()) {
    const uint8_t* q = w.absmax.ptr<uint8_t>();
    const float* code = w.nested_code->ptr<float>();
    const float* nested = w.nested_absmax->ptr<float>();
    const float offset = w.offset->ptr<float>()[0];
    for (int64_t b = 0; b < blocks; ++b) {
      const float scaled = code[q[b]] * nested[b / formats::kNestedBlocksize];
      absmax[b] = scaled + offset;
    }
  } else {
    std::copy_n(w.absmax.ptr<float>(), blocks, absmax.begin());
  }
  const uint8_t* packed = w.packed.ptr<uint8_t>();
  panels(x, n, out, [&](int64_t row0, int64_t rows, float* dst) {
    for (int64_t e = row0 * k; e < (row0 + rows) * k; ++e) {
      const uint8_t byte = packed[e / 2];
      const uint8_t code = e % 2 ? byte & 0xF : byte >> 4;
      *dst++ = formats::kNf4Codebook[code] * absmax[e / bs];
    }
  });
}

void matmul_4bit_cpu(const TensorView& x, const Int4gTensors& w, const TensorView& out) {
  const int64_t n = w.packed.shape[0], k = x.shape[1], g = w.group_size;
  const uint8_t* packed = w.packed.ptr<uint8_t>();
  const Eigen::half* scales = w.scales.ptr<Eigen::half>();
  const uint8_t* zeros = w.zeros.ptr<uint8_t>();
  panels(x, n, out, [&](int64_t row0, int64_t rows, float* dst) {
    for (int64_t e = row0 * k; e < (row0 + rows) * k; ++e) {
      const uint8_t byte = packed[e / 2];
      const int64_t gi = e / g;  // rows are whole groups: the flat group index is row * (k/g) + col / g
      *dst++ = formats::int4g_decode(e % 2 ? byte >> 4 : byte & 0xF, zeros[gi], static_cast<float>(scales[gi]));
    }
  });
}

// The decode layout read directly (quant.h), independently of unpack_decode: the reference of what the
// CUDA decode kernel computes from it.
void matmul_4bit_decode_cpu(const TensorView& x, const DecodeWeight& w, const TensorView& out) {
  const int64_t k = w.k, chunks = k / kDecodeChunk, periods = kDecodeChunk / w.period;
  const int64_t unit = kDecodeCodeBytes + decode_record_bytes(w.format, w.period);
  const uint8_t* data = w.data.ptr<uint8_t>();
  panels(x, w.n, out, [&](int64_t row0, int64_t rows, float* dst) {
    for (int64_t row = row0; row < row0 + rows; ++row) {
      const int64_t t = row / kDecodeTileRows, g = row % kDecodeTileRows;
      for (int64_t col = 0; col < k; ++col) {
        const uint8_t* u = data + (t * chunks + col / kDecodeChunk) * unit;
        const int64_t q = col % kDecodeChunk, p = q / 32, c = q % 32 / 8, j = q % 8, lane = 4 * g + c;
        const int64_t si = q / w.period * kDecodeTileRows + g;  // record slot of this row and period
        if (w.format == DecodeFormat::nf4) {
          const uint8_t byte = u[16 * lane + 4 * p + j / 2];
          float absmax;
          std::memcpy(&absmax, u + kDecodeCodeBytes + 4 * si, 4);
          *dst++ = formats::kNf4Codebook[j % 2 ? byte & 0xF : byte >> 4] * absmax;
        } else {
          uint32_t word;
          std::memcpy(&word, u + 16 * lane + 4 * p, 4);
          int nibble = 0;
          while (kDecodeInt4Order[nibble] != j) ++nibble;
          uint16_t s;
          std::memcpy(&s, u + kDecodeCodeBytes + 2 * si, 2);
          const uint8_t z = u[kDecodeCodeBytes + periods * kDecodeTileRows * 2 + si];
          *dst++ = formats::int4g_decode((word >> (4 * nibble)) & 0xF, z, formats::gguf::fp16_to_f32(s));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The decode layout: the lossless repack from the canonical NF4 / INT4g tensors and back (CPU, once at load).

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
  const int64_t tiles = decode_padded_rows(w.n) / kDecodeTileRows, chunks = w.k / kDecodeChunk;
  const int64_t unit = kDecodeCodeBytes + decode_record_bytes(w.format, w.period);
  uint8_t* base = w.data.ptr<uint8_t>();
#pragma omp parallel for
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t ch = 0; ch < chunks; ++ch) fn(base + (t * chunks + ch) * unit, t, ch);
}

}  // namespace

void repack_decode_cpu(const Nf4Tensors& in, int64_t n, const DecodeWeight& out) {
  // The f32 absmax of every block: the stored one, or double quantization expanded as dequantize_nf4 does.
  const int64_t blocks = n * out.k / in.blocksize;
  std::vector<float> expanded(blocks);
  if (in.nested()) {
    const uint8_t* q = in.absmax.ptr<uint8_t>();
    const float* code = in.nested_code->ptr<float>();
    const float* nested = in.nested_absmax->ptr<float>();
    const float offset = in.offset->ptr<float>()[0];
    for (int64_t b = 0; b < blocks; ++b) {
      const float scaled = code[q[b]] * nested[b / formats::kNestedBlocksize];
      expanded[b] = scaled + offset;
    }
  } else {
    std::copy_n(in.absmax.ptr<float>(), blocks, expanded.begin());
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

void repack_decode_cpu(const Int4gTensors& in, const DecodeWeight& out) {
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

void unpack_decode_cpu(const DecodeWeight& in, const Nf4Tensors& out) {
  const int64_t n = in.n, k = in.k, bs = out.blocksize;
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

void unpack_decode_cpu(const DecodeWeight& in, const Int4gTensors& out) {
  const int64_t n = in.n, k = in.k, groups = k / in.period, periods = kDecodeChunk / in.period;
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

}  // namespace kindred
