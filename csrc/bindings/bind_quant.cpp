// Bindings of the quant family and its format constants (kindred/formats.h, read by Python from here).
#include <pybind11/stl.h>

#include <algorithm>
#include <vector>

#include "bind.h"
#include "kindred/formats.h"
#include "kindred/quant.h"

namespace py = pybind11;

namespace kindred {
namespace {

using OptView = std::optional<TensorView>;

Nf4Tensors nf4(const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax,
               const OptView& nested_code, const OptView& offset, int64_t blocksize) {
  return Nf4Tensors{packed, absmax, nested_absmax, nested_code, offset, blocksize};
}

}  // namespace

void bind_quant(py::module_& m) {
  namespace f = formats;
  m.attr("NF4_CODEBOOK") = std::vector<float>(std::begin(f::kNf4Codebook), std::end(f::kNf4Codebook));
  m.attr("DYNAMIC_MAP") = std::vector<float>(std::begin(f::kDynamicMap), std::end(f::kDynamicMap));
  m.attr("NF4_DEFAULT_BLOCKSIZE") = f::kNf4DefaultBlocksize;
  m.attr("NF4_MIN_BLOCKSIZE") = f::kNf4MinBlocksize;
  m.attr("NF4_MAX_BLOCKSIZE") = f::kNf4MaxBlocksize;
  m.attr("NESTED_BLOCKSIZE") = f::kNestedBlocksize;
  m.attr("INT4G_DEFAULT_GROUP") = f::kInt4gDefaultGroup;
  m.attr("INT4G_GROUPS") = std::vector<int64_t>{32, 64, 128};
  m.attr("AWQ_ORDER") = std::vector<int>(std::begin(f::kAwqOrder), std::end(f::kAwqOrder));

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "quantize_nf4",
      [](const TensorView& weight, const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax,
         const OptView& nested_code, const OptView& offset, const OptView& workspace, int64_t blocksize,
         int64_t stream) {
        quantize_nf4(weight, nf4(packed, absmax, nested_absmax, nested_code, offset, blocksize), workspace, stream);
      },
      py::arg("weight"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
      py::arg("offset"), py::arg("workspace"), py::arg("blocksize"), py::arg("stream"), release);
  m.def(
      "dequantize_nf4",
      [](const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax, const OptView& nested_code,
         const OptView& offset, int64_t blocksize, const TensorView& out, int64_t stream) {
        dequantize_nf4(nf4(packed, absmax, nested_absmax, nested_code, offset, blocksize), out, stream);
      },
      py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
      py::arg("blocksize"), py::arg("out"), py::arg("stream"), release);
  m.def(
      "quantize_int4g",
      [](const TensorView& weight, const TensorView& packed, const TensorView& scales, const TensorView& zeros,
         int64_t group_size, int64_t stream) {
        quantize_int4g(weight, Int4gTensors{packed, scales, zeros, group_size}, stream);
      },
      py::arg("weight"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
      py::arg("stream"), release);
  m.def(
      "dequantize_int4g",
      [](const TensorView& packed, const TensorView& scales, const TensorView& zeros, int64_t group_size,
         const TensorView& out, int64_t stream) {
        dequantize_int4g(Int4gTensors{packed, scales, zeros, group_size}, out, stream);
      },
      py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("out"), py::arg("stream"),
      release);
  m.def(
      "matmul_4bit_nf4",
      [](const TensorView& x, const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax,
         const OptView& nested_code, const OptView& offset, int64_t blocksize, int64_t n, const TensorView& out,
         int64_t stream) {
        matmul_4bit(x, nf4(packed, absmax, nested_absmax, nested_code, offset, blocksize), n, out, stream);
      },
      py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
      py::arg("offset"), py::arg("blocksize"), py::arg("n"), py::arg("out"), py::arg("stream"), release);
  m.def(
      "matmul_4bit_int4g",
      [](const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView& zeros,
         int64_t group_size, const TensorView& out, int64_t stream) {
        matmul_4bit(x, Int4gTensors{packed, scales, zeros, group_size}, out, stream);
      },
      py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("out"),
      py::arg("stream"), release);
  m.attr("DECODE_MAX_ROWS") = kDecodeMaxRows;
  m.def(
      "decode_bytes",
      [](int format, int64_t n, int64_t k, int64_t period) {
        return decode_bytes(static_cast<DecodeFormat>(format), n, k, period);
      },
      py::arg("format"), py::arg("n"), py::arg("k"), py::arg("period"));
  m.def(
      "repack_decode_nf4",
      [](const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax, const OptView& nested_code,
         const OptView& offset, int64_t blocksize, int64_t n, int64_t k, const TensorView& data) {
        repack_decode(nf4(packed, absmax, nested_absmax, nested_code, offset, blocksize), n,
                      DecodeWeight{data, DecodeFormat::nf4, n, k, std::min<int64_t>(blocksize, kDecodeChunk)});
      },
      py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
      py::arg("blocksize"), py::arg("n"), py::arg("k"), py::arg("data"), release);
  m.def(
      "repack_decode_int4g",
      [](const TensorView& packed, const TensorView& scales, const TensorView& zeros, int64_t group_size,
         const TensorView& data) {
        const int64_t n = packed.shape.at(0), k = 2 * packed.shape.at(1);
        repack_decode(Int4gTensors{packed, scales, zeros, group_size},
                      DecodeWeight{data, DecodeFormat::int4g, n, k, group_size});
      },
      py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("data"), release);
  m.def(
      "unpack_decode_nf4",
      [](const TensorView& data, int64_t n, int64_t k, int64_t blocksize, const TensorView& packed,
         const TensorView& absmax) {
        unpack_decode(DecodeWeight{data, DecodeFormat::nf4, n, k, std::min<int64_t>(blocksize, kDecodeChunk)},
                      nf4(packed, absmax, std::nullopt, std::nullopt, std::nullopt, blocksize));
      },
      py::arg("data"), py::arg("n"), py::arg("k"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"), release);
  m.def(
      "unpack_decode_int4g",
      [](const TensorView& data, int64_t n, int64_t k, int64_t group_size, const TensorView& packed,
         const TensorView& scales, const TensorView& zeros) {
        unpack_decode(DecodeWeight{data, DecodeFormat::int4g, n, k, group_size},
                      Int4gTensors{packed, scales, zeros, group_size});
      },
      py::arg("data"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("packed"), py::arg("scales"),
      py::arg("zeros"), release);
  m.def(
      "matmul_4bit_decode",
      [](const TensorView& x, const TensorView& data, int format, int64_t n, int64_t k, int64_t period,
         const TensorView& out, int64_t stream) {
        matmul_4bit_decode(x, DecodeWeight{data, static_cast<DecodeFormat>(format), n, k, period}, out, stream);
      },
      py::arg("x"), py::arg("data"), py::arg("format"), py::arg("n"), py::arg("k"), py::arg("period"), py::arg("out"),
      py::arg("stream"), release);
  m.def(
      "awq_pack",
      [](const TensorView& packed, const TensorView& scales, const TensorView& zeros, int64_t group_size,
         const TensorView& qweight, const TensorView& qzeros, const TensorView& awq_scales) {
        awq_pack(Int4gTensors{packed, scales, zeros, group_size}, qweight, qzeros, awq_scales);
      },
      py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("qweight"),
      py::arg("qzeros"), py::arg("awq_scales"), release);
  m.def(
      "awq_unpack",
      [](const TensorView& qweight, const TensorView& qzeros, const TensorView& awq_scales, int64_t group_size,
         const TensorView& packed, const TensorView& scales, const TensorView& zeros) {
        awq_unpack(qweight, qzeros, awq_scales, Int4gTensors{packed, scales, zeros, group_size});
      },
      py::arg("qweight"), py::arg("qzeros"), py::arg("awq_scales"), py::arg("group_size"), py::arg("packed"),
      py::arg("scales"), py::arg("zeros"), release);
}

}  // namespace kindred
