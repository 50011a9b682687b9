// matmul_4bit decode kernel: out[M, N] = x[M, K] · dequant(W)ᵀ for M <= 16 on the tensor cores
// (mma.sync m16n8k16, fp32 accumulation), streaming the canonical 4-bit layouts once (no repack).
//
// Tiling: a block of 8 warps owns kTiles x 8 weight rows. It first stages that whole slab of packed weights
// in shared memory with cp.async (every load of the block in flight at once: a GEMV must keep a large share
// of the matrix in flight to reach HBM bandwidth), then its warps split K in chunks of 128 and their partial
// 16x8 tiles are summed through shared memory. Within a chunk, lane (g = lane/4, c = lane%4)
// loads 16 bytes = codes [32c, 32c+32) of weight row g and dequantizes them in registers. The mma's k
// index is permuted consistently for x and W so those 32 codes are exactly what the lane's B fragments
// need over the chunk's 8 k16 steps: step s, fragment k {2c, 2c+1, 2c+8, 2c+9} <- codes 32c+4s+{0,1,2,3}.
// Rows of x at or beyond M are zeros in the A fragment. Test: pytest -m gpu tests/test_matmul_4bit.py
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common.cuh"
#include "kindred/formats.h"
#include "kindred/quant.h"

namespace kindred {
namespace {

using namespace formats;

constexpr int kWarps = 8;
constexpr int kChunk = 128;  // K per warp step; lane segment = 32 codes = 16 bytes
__constant__ float kNf4Values[16] = {KINDRED_NF4_CODEBOOK};

enum class Fmt { nf4, nf4_nested, int4g };

struct Params {
  const void* x;
  void* out;
  const uint8_t* packed;
  // NF4
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  // INT4g
  const __half* scales;
  const uint8_t* zeros;
  int m, n, k, log2_block;
};

template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};
template <>
struct Pair<__half> {
  using type = __half2;
};

template <typename T>
__device__ __forceinline__ typename Pair<T>::type splat(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat162_rn(v);
  } else {
    return __float2half2_rn(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_bits(uint16_t b) {
  return *reinterpret_cast<const T*>(&b);
}

// Scale (and zero point) of the 32 codes a lane holds, as T pairs; `e` is the flat index of the first code.
template <typename T, Fmt F>
__device__ __forceinline__ void load_scale(const Params& p, int64_t e, int row, int col, typename Pair<T>::type& s,
                                           typename Pair<T>::type& z) {
  if constexpr (F == Fmt::int4g) {
    const int64_t gi = static_cast<int64_t>(row) * (p.k >> p.log2_block) + (col >> p.log2_block);
    s = splat<T>(__half2float(p.scales[gi]));
    z = splat<T>(static_cast<float>(p.zeros[gi]));
  } else if constexpr (F == Fmt::nf4_nested) {
    const int64_t b = e >> p.log2_block;
    s = splat<T>(__fadd_rn(__fmul_rn(__ldg(p.nested_code + p.absmax_q[b]), p.nested_absmax[b / kNestedBlocksize]),
                           __ldg(p.offset)));
  } else {
    s = splat<T>(__ldg(p.absmax + (e >> p.log2_block)));
  }
}

// What a lane loads for one chunk: its 32 codes of each tile's row, their scales, and x rows g, g + 8.
template <typename T, int kTiles>
struct Chunk {
  uint4 w[kTiles];
  typename Pair<T>::type s[kTiles], z[kTiles];
  uint32_t xa[16], xb[16];
};

// Bytes between two weight rows of the staged slab: padded by 16 so the 8 rows a warp reads at once fall
// in different banks.
__host__ __device__ __forceinline__ int slab_stride(int k) {
  return k / 2 + 16;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

template <typename T, Fmt F, int kTiles, bool kRows16>
__device__ __forceinline__ void load_chunk(const Params& p, const uint8_t* slab, int ch, int row0, int g, int c,
                                           Chunk<T, kTiles>& d) {
  const int col = ch * kChunk + 32 * c;  // first k of this lane's segment
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int row = row0 + t * 8 + g;
    if (row < p.n) {
      const int64_t e = static_cast<int64_t>(row) * p.k + col;
      d.w[t] = *reinterpret_cast<const uint4*>(slab + (t * 8 + g) * slab_stride(p.k) + col / 2);
      load_scale<T, F>(p, e, row, col, d.s[t], d.z[t]);
    } else {
      d.w[t] = make_uint4(0, 0, 0, 0);
      d.s[t] = splat<T>(0.0f);
      d.z[t] = splat<T>(0.0f);
    }
  }
  const T* x = static_cast<const T*>(p.x);
#pragma unroll
  for (int i = 0; i < 16; ++i) d.xa[i] = d.xb[i] = 0;
  if (g < p.m) {
    const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(g) * p.k + col);
#pragma unroll
    for (int i = 0; i < 4; ++i) reinterpret_cast<uint4*>(d.xa)[i] = __ldg(src + i);
  }
  if (kRows16 && g + 8 < p.m) {
    const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(g + 8) * p.k + col);
#pragma unroll
    for (int i = 0; i < 4; ++i) reinterpret_cast<uint4*>(d.xb)[i] = __ldg(src + i);
  }
}

// Dequantizes the chunk in registers and runs its 8 k16 steps on the tensor cores. A byte of two codes
// is looked up whole in `lut` (both code values as a T pair; one copy per lane, so a warp's 32 lookups hit
// 32 different banks), then shifted by the zero point (INT4g) and multiplied by the scale in T pairs.
template <typename T, Fmt F, int kTiles>
__device__ __forceinline__ void compute_chunk(const uint32_t* lut_lane, const Chunk<T, kTiles>& d,
                                              float (&acc)[kTiles][4]) {
  using T2 = typename Pair<T>::type;
#pragma unroll
  for (int step = 0; step < 8; ++step) {
    const uint32_t a[4] = {d.xa[2 * step], d.xb[2 * step], d.xa[2 * step + 1], d.xb[2 * step + 1]};
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const uint32_t bits = reinterpret_cast<const uint32_t*>(&d.w[t])[step / 2] >> (16 * (step % 2));
      const uint32_t u0 = lut_lane[(bits & 0xFF) * 32], u1 = lut_lane[((bits >> 8) & 0xFF) * 32];
      T2 b0 = *reinterpret_cast<const T2*>(&u0), b1 = *reinterpret_cast<const T2*>(&u1);
      if constexpr (F == Fmt::int4g) {
        b0 = __hsub2(b0, d.z[t]);
        b1 = __hsub2(b1, d.z[t]);
      }
      b0 = __hmul2(b0, d.s[t]);
      b1 = __hmul2(b1, d.s[t]);
      cuda::mma_m16n8k16<T>(acc[t], a, *reinterpret_cast<const uint32_t*>(&b0),
                            *reinterpret_cast<const uint32_t*>(&b1));
    }
  }
}

// The pair of code values a packed byte stands for, element order (even, odd) in (low, high) halves.
template <typename T, Fmt F>
__device__ __forceinline__ uint32_t byte_pair(int byte) {
  using T2 = typename Pair<T>::type;
  // NF4 stores the even element in the high nibble, INT4g in the low one.
  const int even = F == Fmt::int4g ? byte & 0xF : byte >> 4, odd = F == Fmt::int4g ? byte >> 4 : byte & 0xF;
  const T2 v(cuda::from_f32<T>(F == Fmt::int4g ? static_cast<float>(even) : kNf4Values[even]),
             cuda::from_f32<T>(F == Fmt::int4g ? static_cast<float>(odd) : kNf4Values[odd]));
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T, Fmt F, int kTiles, bool kRows16>
__global__ void __launch_bounds__(kWarps * 32) matmul_4bit_decode_kernel(const Params p) {
  static_assert(kWarps * 32 == 256, "one thread per byte value builds the lookup table");
  __shared__ uint32_t lut[256 * 32];  // lut[byte * 32 + lane]: byte_pair(byte), one copy per lane
  __shared__ float partial[kWarps][kTiles][32][4];
  extern __shared__ __align__(16) uint8_t slab[];  // kTiles * 8 rows of K / 2 bytes, rows slab_stride apart
  const int row0 = blockIdx.x * kTiles * 8;
  {
    const int pieces = p.k / 32;  // 16-byte pieces per row
    for (int i = threadIdx.x; i < kTiles * 8 * pieces; i += kWarps * 32) {
      const int r = i / pieces, piece = i % pieces;
      if (row0 + r < p.n)
        cp_async16(slab + r * slab_stride(p.k) + piece * 16,
                   p.packed + static_cast<int64_t>(row0 + r) * (p.k / 2) + piece * 16);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  {
    const uint32_t v = byte_pair<T, F>(threadIdx.x);
    for (int r = 0; r < 32; ++r) lut[threadIdx.x * 32 + (r + threadIdx.x) % 32] = v;  // rotated: no conflicts
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  float acc[kTiles][4] = {};
  const int chunks = p.k / kChunk;
  // Software pipeline: the next chunk's loads are in flight while this one is dequantized and multiplied.
  Chunk<T, kTiles> cur, next;
  if (warp < chunks) load_chunk<T, F, kTiles, kRows16>(p, slab, warp, row0, g, c, cur);
  for (int ch = warp; ch < chunks; ch += kWarps) {
    if (ch + kWarps < chunks) load_chunk<T, F, kTiles, kRows16>(p, slab, ch + kWarps, row0, g, c, next);
    compute_chunk<T, F, kTiles>(lut + lane, cur, acc);
    cur = next;
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][t][lane][i] = acc[t][i];
  __syncthreads();
  // Thread i of the block sums one (tile, lane, register) over the warps and stores it.
  for (int i = threadIdx.x; i < kTiles * 32 * 4; i += kWarps * 32) {
    const int t = i / 128, l = (i / 4) % 32, r = i % 4;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][t][l][r];
    const int m = l / 4 + (r >= 2 ? 8 : 0), col = row0 + t * 8 + 2 * (l % 4) + (r % 2);
    if (m < p.m && col < p.n) static_cast<T*>(p.out)[static_cast<int64_t>(m) * p.n + col] = cuda::from_f32<T>(sum);
  }
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

template <typename T, Fmt F, int kTiles>
void launch_tiles(const Params& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kTiles) * 8 * slab_stride(p.k);
  int device = 0, limit = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  cuda::check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
              "cudaDeviceGetAttribute");
  KINDRED_CHECK(
      smem + sizeof(float) * kWarps * kTiles * 128 + sizeof(uint32_t) * 256 * 32 <= static_cast<size_t>(limit),
      "matmul_4bit: in_features ", p.k, " is too large for the decode kernel's shared-memory slab");
  const dim3 grid((p.n + 8 * kTiles - 1) / (8 * kTiles)), threads(kWarps * 32);
  const auto run = [&](auto kernel) {
    cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                "cudaFuncSetAttribute");
    kernel<<<grid, threads, smem, stream>>>(p);
  };
  if (p.m > 8) {
    run(matmul_4bit_decode_kernel<T, F, kTiles, true>);
  } else {
    run(matmul_4bit_decode_kernel<T, F, kTiles, false>);
  }
  cuda::check_launch("matmul_4bit_decode_kernel");
}

// Two row tiles per block when that still gives every SM two blocks and the slab stays small; else one.
template <typename T, Fmt F>
void launch(const Params& p, cudaStream_t stream) {
  int device = 0, sms = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if ((p.n + 15) / 16 >= 2 * sms && 16 * slab_stride(p.k) <= 64 * 1024) return launch_tiles<T, F, 2>(p, stream);
  launch_tiles<T, F, 1>(p, stream);
}

template <Fmt F>
void dispatch(const TensorView& x, const Params& p, cudaStream_t stream) {
  if (x.dtype == DType::bf16) return launch<__nv_bfloat16, F>(p, stream);
  launch<__half, F>(p, stream);
}

Params common(const TensorView& x, int64_t n, const TensorView& out, const TensorView& packed) {
  Params p{};
  p.x = x.data;
  p.out = out.data;
  p.packed = packed.ptr<uint8_t>();
  p.m = static_cast<int>(x.shape[0]);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(x.shape[1]);
  return p;
}

}  // namespace

void matmul_4bit_cuda(const TensorView& x, const Nf4Tensors& w, int64_t n, const TensorView& out, int64_t stream) {
  cuda::DeviceGuard guard(x);
  cuda::check_aligned(w.packed, "packed", 16);
  cuda::check_aligned(x, "x", 16);
  Params p = common(x, n, out, w.packed);
  p.log2_block = log2_exact(w.blocksize);
  if (w.nested()) {
    p.absmax_q = w.absmax.ptr<uint8_t>();
    p.nested_absmax = w.nested_absmax->ptr<float>();
    p.nested_code = w.nested_code->ptr<float>();
    p.offset = w.offset->ptr<float>();
    return dispatch<Fmt::nf4_nested>(x, p, cuda::as_stream(stream));
  }
  p.absmax = w.absmax.ptr<float>();
  dispatch<Fmt::nf4>(x, p, cuda::as_stream(stream));
}

void matmul_4bit_cuda(const TensorView& x, const Int4gTensors& w, const TensorView& out, int64_t stream) {
  cuda::DeviceGuard guard(x);
  cuda::check_aligned(w.packed, "packed", 16);
  cuda::check_aligned(x, "x", 16);
  Params p = common(x, w.packed.shape[0], out, w.packed);
  p.scales = w.scales.ptr<__half>();
  p.zeros = w.zeros.ptr<uint8_t>();
  p.log2_block = log2_exact(w.group_size);
  dispatch<Fmt::int4g>(x, p, cuda::as_stream(stream));
}

}  // namespace kindred
