// Bindings of the quant family and its format constants (kindred/formats.h, read by Python from here).
// A quantized weight crosses as one object: Nf4Tensors / Int4gTensors, built from TensorViews.
#include <pybind11/stl.h>

#include <vector>

#include "bind.h"
#include "kindred/formats.h"
#include "kindred/quant.h"

namespace py = pybind11;

namespace kindred {

void bind_quant(py::module_& m) {
  namespace f = formats;
  using OptView = std::optional<TensorView>;
  m.attr("NF4_CODEBOOK") = std::vector<float>(std::begin(f::kNf4Codebook), std::end(f::kNf4Codebook));
  m.attr("DYNAMIC_MAP") = std::vector<float>(std::begin(f::kDynamicMap), std::end(f::kDynamicMap));
  m.attr("NF4_DEFAULT_BLOCKSIZE") = f::kNf4DefaultBlocksize;
  m.attr("NF4_MIN_BLOCKSIZE") = f::kNf4MinBlocksize;
  m.attr("NF4_MAX_BLOCKSIZE") = f::kNf4MaxBlocksize;
  m.attr("NESTED_BLOCKSIZE") = f::kNestedBlocksize;
  m.attr("INT4G_DEFAULT_GROUP") = f::kInt4gDefaultGroup;
  m.attr("INT4G_GROUPS") = std::vector<int64_t>(std::begin(f::kInt4gGroups), std::end(f::kInt4gGroups));
  m.attr("AWQ_ORDER") = std::vector<int>(std::begin(f::kAwqOrder), std::end(f::kAwqOrder));
  m.def("nf4_bits_per_weight", &f::nf4_bits_per_weight, py::arg("blocksize"), py::arg("double_quant"),
        "stored bits per weight of NF4 (formats.h)");
  m.def("int4g_bits_per_weight", &f::int4g_bits_per_weight, py::arg("group_size"),
        "stored bits per weight of INT4g (formats.h)");

  py::class_<Nf4Tensors>(m, "Nf4Tensors")
      .def(py::init([](const TensorView& packed, const TensorView& absmax, const OptView& nested_absmax,
                       const OptView& nested_code, const OptView& offset, int64_t blocksize) {
             return Nf4Tensors{packed, absmax, nested_absmax, nested_code, offset, blocksize};
           }),
           py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
           py::arg("blocksize"));
  py::class_<Int4gTensors>(m, "Int4gTensors")
      .def(
          py::init([](const TensorView& packed, const TensorView& scales, const TensorView& zeros, int64_t group_size) {
            return Int4gTensors{packed, scales, zeros, group_size};
          }),
          py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"));

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("quantize_nf4", &quantize_nf4, py::arg("weight"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
        release);
  m.def("dequantize_nf4", &dequantize_nf4, py::arg("q"), py::arg("out"), py::arg("stream"), release);
  m.def("quantize_int4g", &quantize_int4g, py::arg("weight"), py::arg("out"), py::arg("stream"), release);
  m.def("dequantize_int4g", &dequantize_int4g, py::arg("q"), py::arg("out"), py::arg("stream"), release);
  m.def("awq_pack", &awq_pack, py::arg("q"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), release);
  m.def("awq_unpack", &awq_unpack, py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("out"), release);
}

}  // namespace kindred
