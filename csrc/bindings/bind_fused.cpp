// Bindings of the fused family (kindred/fused.h): add_rms_norm, silu_mul, rope_qk_cache, rope_rotate and
// silu_mul_backward, CPU and CUDA.
#include <pybind11/stl.h>

#include "bind.h"
#include "kindred/fused.h"

namespace py = pybind11;

namespace kindred {

void bind_fused(py::module_& m) {
  using OptView = std::optional<TensorView>;
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("add_rms_norm", &add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("w"), py::arg("eps"), py::arg("out"),
        py::arg("residual_out"), py::arg("stream"), release);
  m.def("silu_mul", &silu_mul, py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("stream"), release);
  m.def(
      "rope_qk_cache",
      [](const TensorView& q, const TensorView& k, const TensorView& v, const OptView& q_norm, const OptView& k_norm,
         double eps, const TensorView& cos, const TensorView& sin, const TensorView& cache_k, const TensorView& cache_v,
         const TensorView& slots, const TensorView& q_out, int64_t stream) {
        rope_qk_cache(RopeQkCache{q, k, v, q_norm, k_norm, eps, cos, sin, cache_k, cache_v, slots, q_out}, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_norm"), py::arg("k_norm"), py::arg("eps"), py::arg("cos"),
      py::arg("sin"), py::arg("cache_k"), py::arg("cache_v"), py::arg("slots"), py::arg("q_out"), py::arg("stream"),
      release);
  m.def("rope_rotate", &rope_rotate, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("inverse"), py::arg("out"),
        py::arg("stream"), release);
  m.def("silu_mul_backward", &silu_mul_backward, py::arg("dout"), py::arg("gate"), py::arg("up"), py::arg("dgate"),
        py::arg("dup"), py::arg("stream"), release);
}

}  // namespace kindred
