// Bindings of the gguf family and the GGUF block-format table (kindred/formats.h, read by Python from here).
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <tuple>

#include "bind.h"
#include "kindred/formats.h"
#include "kindred/gguf.h"

namespace py = pybind11;

namespace kindred {

void bind_gguf(py::module_& m) {
  std::map<std::string, std::tuple<int, int, int>> types;  // name -> (ggml_type id, block elems, block bytes)
  for (const auto& t : formats::gguf::kGgmlTypes) types[t.name] = {t.id, t.block_elems, t.block_bytes};
  m.attr("GGUF_BLOCK_TYPES") = types;
  m.def("dequantize_gguf", &dequantize_gguf, py::arg("ggml_type"), py::arg("blocks"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize_gguf", &quantize_gguf, py::arg("ggml_type"), py::arg("x"), py::arg("blocks"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace kindred
