// CPU matmul_4bit: the reference and the no-GPU path. Row panels of the weight are dequantized to fp32 and
// multiplied with Eigen (fp32 accumulation), one panel per OpenMP thread at a time.
#include <Eigen/Core>
#include <algorithm>
#include <cstring>
#include <vector>

#include "kindred/formats.h"
#include "kindred/quant.h"

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
  switch (x.dtype) {
    case DType::f16:
      return load_x<Eigen::half>(x);
    case DType::bf16:
      return load_x<Eigen::bfloat16>(x);
    default:
      return load_x<float>(x);
  }
}

template <typename T>
void store_cols(const RowMajor& y, int64_t col0, const TensorView& out) {
  const int64_t m = out.shape[0], n = out.shape[1];
  T* o = out.ptr<T>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < y.cols(); ++j) o[i * n + col0 + j] = static_cast<T>(y(i, j));
}

void store_cols(const RowMajor& y, int64_t col0, const TensorView& out) {
  switch (out.dtype) {
    case DType::f16:
      return store_cols<Eigen::half>(y, col0, out);
    case DType::bf16:
      return store_cols<Eigen::bfloat16>(y, col0, out);
    default:
      return store_cols<float>(y, col0, out);
  }
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

}  // namespace kindred
