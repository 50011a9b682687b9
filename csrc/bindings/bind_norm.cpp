// Bindings of the norm family (kindred/norm.h): rms_norm and rms_norm_backward, CPU and CUDA.
#include "bind.h"
#include "kindred/norm.h"

namespace py = pybind11;

namespace kindred {

void bind_norm(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("offset"), py::arg("out"),
        py::arg("rstd"), py::arg("stream"), release);
  m.def("rms_norm_backward", &rms_norm_backward, py::arg("dout"), py::arg("x"), py::arg("w"), py::arg("rstd"),
        py::arg("offset"), py::arg("dx"), py::arg("stream"), release);
}

}  // namespace kindred
