// Bindings of the loss family (kindred/loss.h): the CPU reference and the chunk steps of the CUDA path.
#include <pybind11/stl.h>

#include "bind.h"
#include "kindred/loss.h"

namespace py = pybind11;

namespace kindred {

void bind_loss(py::module_& m) {
  py::class_<LceOptions>(m, "LceOptions")
      .def(py::init([](int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
             return LceOptions{ignore_index, label_smoothing, z_loss, softcap};
           }),
           py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"));
  m.attr("LCE_STATE_COLS") = static_cast<int>(kLceStateCols);
  m.attr("LCE_STATE") =
      py::dict(py::arg("max") = static_cast<int>(kLceMax), py::arg("sum") = static_cast<int>(kLceSum),
               py::arg("ref") = static_cast<int>(kLceRef), py::arg("sum_z") = static_cast<int>(kLceSumZ),
               py::arg("z_target") = static_cast<int>(kLceZy), py::arg("raw_max") = static_cast<int>(kLceRMax));

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("linear_cross_entropy", &linear_cross_entropy, py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("targets"), py::arg("options"), py::arg("loss"), py::arg("lse"), py::arg("hit"), release);
  m.def("linear_cross_entropy_backward", &linear_cross_entropy_backward, py::arg("hidden"), py::arg("weight"),
        py::arg("bias"), py::arg("targets"), py::arg("lse"), py::arg("coef"), py::arg("options"), py::arg("d_hidden"),
        py::arg("d_weight"), py::arg("d_bias"), release);
  m.def("lce_chunk_update", &lce_chunk_update, py::arg("logits"), py::arg("bias"), py::arg("targets"), py::arg("col0"),
        py::arg("vocab"), py::arg("options"), py::arg("state"), py::arg("argmax"), py::arg("exp_out"), py::arg("acc"),
        py::arg("stream"), release);
  m.def("lce_chunk_grad", &lce_chunk_grad, py::arg("logits"), py::arg("bias"), py::arg("targets"), py::arg("col0"),
        py::arg("vocab"), py::arg("options"), py::arg("lse"), py::arg("coef"), py::arg("grad_out"), py::arg("stream"),
        release);
  m.def("lce_finalize", &lce_finalize, py::arg("state"), py::arg("argmax"), py::arg("targets"), py::arg("vocab"),
        py::arg("options"), py::arg("loss"), py::arg("lse"), py::arg("hit"), py::arg("acc"), py::arg("weight"),
        py::arg("wsum"), py::arg("scale"), py::arg("d_hidden"), py::arg("stream"), release);
}

}  // namespace kindred
