// What the CUDA driver makes of kindred's fat binary on one device (for `kindred doctor`): a no-op kernel,
// compiled with the same architectures as every other kernel, is loaded and its attributes read. Its binary
// version is the machine code that ran (sm_90 on an H200); a PTX version below the binary one means the driver
// compiled the embedded PTX at load time (a GPU newer than the machine code in the build).
#include <cuda_runtime.h>

#include "kindred/common.h"

namespace kindred {
namespace {

__global__ void probe_kernel() {}

}  // namespace

CudaLoadInfo cuda_load_info(int device) {
  CudaLoadInfo info;
  cudaRuntimeGetVersion(&info.runtime);
  if (cudaDriverGetVersion(&info.driver) != cudaSuccess) info.driver = 0;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && (device < 0 || device >= count)) {
    info.error = cat("no CUDA device ", device, " (", count, " found)");
    return info;
  }
  int previous = 0;
  if (err == cudaSuccess) err = cudaGetDevice(&previous);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  cudaFuncAttributes attr{};
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, probe_kernel);
  if (err == cudaSuccess) {
    info.binary = attr.binaryVersion;
    info.ptx = attr.ptxVersion;
    cudaSetDevice(previous);
  } else {
    info.error = cudaGetErrorString(err);
    cudaGetLastError();  // clear it: the caller may go on with the CPU paths
  }
  return info;
}

}  // namespace kindred
