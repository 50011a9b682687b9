// kindred._core: the thin, torch-free binding layer. Python builds TensorViews from tensors (kindred/_ops/adapter.py);
// this module converts them, releases the GIL and calls the core. Errors become kindred.errors classes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind.h"
#include "kindred/common.h"

namespace py = pybind11;

namespace {

kindred::DType parse_dtype(const std::string& name) {
  static const std::pair<const char*, kindred::DType> names[] = {
      {"uint8", kindred::DType::u8},      {"int32", kindred::DType::i32},   {"float16", kindred::DType::f16},
      {"bfloat16", kindred::DType::bf16}, {"float32", kindred::DType::f32}, {"float64", kindred::DType::f64},
      {"int64", kindred::DType::i64}};
  for (auto [n, d] : names)
    if (name == n) return d;
  throw kindred::Error(kindred::cat("unsupported dtype '", name, "'"), true);
}

kindred::TensorView make_view(uintptr_t data, const std::string& dtype, std::vector<int64_t> shape,
                              std::vector<int64_t> strides, const std::string& device, int device_index) {
  KINDRED_CHECK(shape.size() == strides.size(), "shape and strides must have the same length");
  KINDRED_CHECK(device == "cpu" || device == "cuda", "device must be 'cpu' or 'cuda', got '", device, "'");
  kindred::TensorView v;
  v.data = reinterpret_cast<void*>(data);
  v.dtype = parse_dtype(dtype);
  v.shape = std::move(shape);
  v.strides = std::move(strides);
  v.device = device == "cpu" ? kindred::Device::cpu : kindred::Device::cuda;
  v.device_index = device_index;
  return v;
}

// What this build holds (compile definitions set by CMakeLists.txt): for kindred.doctor().
py::dict build_info() {
  py::dict d;
  d["cuda"] = kindred::cuda_compiled();
  d["cuda_architectures"] = std::string(KINDRED_BUILD_CUDA_ARCHS);  // CMake's list, comma-separated
  d["cuda_compiler"] = std::string(KINDRED_BUILD_CUDA_VERSION);
  d["eigen"] = std::string(KINDRED_BUILD_EIGEN);
  d["compiler"] = std::string(KINDRED_BUILD_COMPILER);
  d["native"] = bool(KINDRED_BUILD_NATIVE);
  d["openmp"] = bool(KINDRED_BUILD_OPENMP);
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "kindred's C++/CUDA core (torch-free); use kindred.ops, not this module";
  static py::object value_error = py::module_::import("kindred.errors").attr("KindredValueError");
  static py::object kindred_error = py::module_::import("kindred.errors").attr("KindredError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const kindred::Error& e) {
      PyErr_SetString((e.input() ? value_error : kindred_error).ptr(), e.what());
    }
  });

  py::class_<kindred::TensorView>(m, "TensorView")
      .def(py::init(&make_view), py::arg("data"), py::arg("dtype"), py::arg("shape"), py::arg("strides"),
           py::arg("device"), py::arg("device_index"))
      .def_property_readonly("shape", [](const kindred::TensorView& v) { return v.shape; })
      .def("__repr__", [](const kindred::TensorView& v) { return "TensorView(" + v.describe() + ")"; });
  m.def("cuda_compiled", &kindred::cuda_compiled, "whether the CUDA kernels were compiled in");
  m.def("build_info", &build_info, "what this build holds: CUDA architectures, compilers, Eigen, OpenMP");
#ifdef KINDRED_WITH_CUDA
  m.def(
      "cuda_load_info",
      [](int device) {
        kindred::CudaLoadInfo info;
        {
          py::gil_scoped_release release;
          info = kindred::cuda_load_info(device);
        }
        py::dict d;
        d["runtime"] = info.runtime;
        d["driver"] = info.driver;
        d["binary"] = info.binary;
        d["ptx"] = info.ptx;
        d["error"] = info.error;
        return d;
      },
      py::arg("device"), "CUDA runtime/driver versions and the kernel code the driver loads on `device`");
#endif

  kindred::bind_quant(m);
  kindred::bind_matmul_4bit(m);
  kindred::bind_lora(m);
  kindred::bind_gguf(m);
  kindred::bind_loss(m);
  kindred::bind_tokens(m);
  kindred::bind_fused(m);
  kindred::bind_norm(m);
}
