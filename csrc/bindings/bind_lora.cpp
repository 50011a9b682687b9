// Bindings of the lora family: the dropout kernel (CPU and CUDA) and the CPU reference forward / backward.
#include <pybind11/stl.h>

#include "bind.h"
#include "kindred/lora.h"

namespace py = pybind11;

namespace kindred {

void bind_lora(py::module_& m) {
  using OptView = std::optional<TensorView>;
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "lora_dropout",
      [](const TensorView& x, double p, const OptView& seed, const TensorView& out, bool accumulate, int64_t stream) {
        lora_dropout(x, LoraDropout{p, seed}, out, accumulate, stream);
      },
      py::arg("x"), py::arg("p"), py::arg("seed"), py::arg("out"), py::arg("accumulate"), py::arg("stream"), release);
  m.def(
      "lora_linear",
      [](const TensorView& x, const TensorView& w, const TensorView& a, const TensorView& b, const OptView& bias,
         double scaling, double p, const OptView& seed, const TensorView& y, const TensorView& xs) {
        lora_linear(x, w, a, b, bias, scaling, LoraDropout{p, seed}, y, xs);
      },
      py::arg("x"), py::arg("w"), py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("scaling"), py::arg("p"),
      py::arg("seed"), py::arg("y"), py::arg("xs"), release);
  m.def(
      "lora_linear_backward",
      [](const TensorView& dy, const TensorView& x, const TensorView& w, const TensorView& a, const TensorView& b,
         double scaling, double p, const OptView& seed, const TensorView& dx, const TensorView& da,
         const TensorView& db) {
        lora_linear_backward(dy, x, w, a, b, scaling, LoraDropout{p, seed}, dx, da, db);
      },
      py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("a"), py::arg("b"), py::arg("scaling"), py::arg("p"),
      py::arg("seed"), py::arg("dx"), py::arg("da"), py::arg("db"), release);
}

}  // namespace kindred
