// Bindings of the matmul_4bit family and its decode-layout constants (kindred/matmul_4bit.h).
#include <pybind11/stl.h>

#include "bind.h"
#include "kindred/matmul_4bit.h"

namespace py = pybind11;

namespace kindred {

void bind_matmul_4bit(py::module_& m) {
  m.attr("DECODE_MAX_ROWS") = kDecodeMaxRows;
  m.attr("DECODE_CHUNK") = kDecodeChunk;
  m.attr("DECODE_ROW_PAD") = kDecodeRowPad;
  m.attr("DECODE_NF4") = static_cast<int>(DecodeFormat::nf4);
  m.attr("DECODE_INT4G") = static_cast<int>(DecodeFormat::int4g);
  py::class_<DecodeWeight>(m, "DecodeWeight")
      .def(py::init([](const TensorView& data, int format, int64_t n, int64_t k, int64_t period) {
             return DecodeWeight{data, static_cast<DecodeFormat>(format), n, k, period};
           }),
           py::arg("data"), py::arg("format"), py::arg("n"), py::arg("k"), py::arg("period"));
  m.def(
      "decode_bytes",
      [](int format, int64_t n, int64_t k, int64_t period) {
        return decode_bytes(static_cast<DecodeFormat>(format), n, k, period);
      },
      py::arg("format"), py::arg("n"), py::arg("k"), py::arg("period"));

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("matmul_4bit",
        py::overload_cast<const TensorView&, const Nf4Tensors&, int64_t, const TensorView&, int64_t>(&matmul_4bit),
        py::arg("x"), py::arg("w"), py::arg("n"), py::arg("out"), py::arg("stream"), release);
  m.def("matmul_4bit",
        py::overload_cast<const TensorView&, const Int4gTensors&, const TensorView&, int64_t>(&matmul_4bit),
        py::arg("x"), py::arg("w"), py::arg("out"), py::arg("stream"), release);
  m.def("repack_decode", py::overload_cast<const Nf4Tensors&, int64_t, const DecodeWeight&>(&repack_decode),
        py::arg("w"), py::arg("n"), py::arg("out"), release);
  m.def("repack_decode", py::overload_cast<const Int4gTensors&, const DecodeWeight&>(&repack_decode), py::arg("w"),
        py::arg("out"), release);
  m.def("unpack_decode", py::overload_cast<const DecodeWeight&, const Nf4Tensors&>(&unpack_decode), py::arg("d"),
        py::arg("out"), release);
  m.def("unpack_decode", py::overload_cast<const DecodeWeight&, const Int4gTensors&>(&unpack_decode), py::arg("d"),
        py::arg("out"), release);
  m.def("matmul_4bit_decode", &matmul_4bit_decode, py::arg("x"), py::arg("d"), py::arg("out"), py::arg("stream"),
        release);
}

}  // namespace kindred
