// Shared vocabulary of the kindred core: the one exception type, dtypes, devices and the tensor view
// that crosses the Python boundary. Torch-free: the core builds and runs without PyTorch.
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#define KINDRED_HD __host__ __device__ __forceinline__
#else
#define KINDRED_HD inline
#endif

namespace kindred {

// The only exception the core throws. `input` errors (bad shapes, dtypes, values, files) become
// kindred.KindredValueError in Python; the others (CUDA failures) kindred.KindredError.
class Error : public std::runtime_error {
 public:
  Error(const std::string& msg, bool input) : std::runtime_error(msg), input_(input) {}
  bool input() const { return input_; }

 private:
  bool input_;
};

// Message building without iostreams: the core must not depend on the process's locale/iostream state
// (a Python process may have loaded another libstdc++ first).
inline void append(std::string& s, const std::string& v) {
  s += v;
}
inline void append(std::string& s, const char* v) {
  s += v;
}
inline void append(std::string& s, char v) {
  s += v;
}
template <typename T>
void append(std::string& s, T v) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
    s += buf;
  } else {
    s += std::to_string(v);
  }
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

#define KINDRED_CHECK(cond, ...)                                            \
  do {                                                                      \
    if (!(cond)) throw ::kindred::Error(::kindred::cat(__VA_ARGS__), true); \
  } while (0)

// The label of a token that is not trained (Hugging Face's convention).
inline constexpr int32_t kIgnoreIndex = -100;

enum class DType : int { u8, i32, f16, bf16, f32, f64, i64 };
enum class Device : int { cpu, cuda };

const char* dtype_name(DType t);
int dtype_size(DType t);

// A strided view of memory owned by the caller (strides in elements).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  Device device = Device::cpu;
  int device_index = 0;

  int64_t numel() const;
  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  bool contiguous() const;
  std::string describe() const;  // e.g. "bf16[4096, 14336] on cuda:0"
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// Named checks: each throws an input Error that names the argument and what was expected.
void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
void check_contiguous(const TensorView& t, const char* name);
void check_shape(const TensorView& t, const char* name, const std::vector<int64_t>& expected);
void check_same_device(const TensorView& a, const char* name_a, const TensorView& b, const char* name_b);

// Set by the build: whether the CUDA implementations were compiled in.
bool cuda_compiled();

// CUDA builds only (kernels/device_info_cuda.cu): the CUDA runtime and driver versions (1000 * major + 10 *
// minor; driver 0 when none is installed) and, for one device, the machine code the driver loaded for kindred's
// kernels: binary sm_XY → XY and the PTX version it was compiled from (binary = 0 and `error` set when none
// loads, e.g. no kernel image for that GPU).
struct CudaLoadInfo {
  int runtime = 0, driver = 0, binary = 0, ptx = 0;
  std::string error;
};
CudaLoadInfo cuda_load_info(int device);

}  // namespace kindred
