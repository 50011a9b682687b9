// matmul_4bit_decode: out[M, N] = x[M, K] · dequant(W)ᵀ for M <= 16 from the decode layout (kindred/matmul_4bit.h), on
// the tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// The repack put each lane's fragments of one weight row for 8 k16 steps into one 16-byte word group, so the
// loop has no index arithmetic. A warp owns two 8-row tiles and a contiguous range of 128-wide K chunks. The
// two tiles are the mma's A operand (16 weight rows) and x its B operand (8 rows of x), so one mma per k16
// step serves both tiles and M <= 8 (a second one with the same A serves rows 8..15). Per chunk the warp
// copies the two tiles' units (2 x 512 code bytes plus their scale records) into a 3-slot shared-memory
// ring with cp.async (sizes are compile-time: two copies per lane and tile, no loop), so two chunks are in
// flight while one is computed. x is read from L1/L2 with 16-byte loads (the layout's k order makes a
// lane's B fragments of two k16 steps contiguous). Dequantization stays in registers: NF4 looks up whole
// code bytes (two codes) in a lane-replicated shared-memory table of T pairs (byte extract + address +
// load); INT4g ORs the nibbles into the mantissa of a magic number (bf16 128 + q, f16 1024 + q) and
// subtracts the magic number plus the zero point, exactly. The scale of each block / group is applied to
// the fp32 partial sums of its period (32..128 k), not to the weights. Registers are bounded for 3 blocks
// (24 warps) per SM when M <= 8. Split-K, when N is too small to fill the GPU, is between the warps of one
// block, summed through shared memory in a fixed order (deterministic).
// Test: pytest -m gpu tests/test_matmul_4bit.py
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <atomic>
#include <type_traits>

#include "../common.cuh"
#include "kindred/formats.h"
#include "kindred/matmul_4bit.h"

namespace kindred {
namespace {

constexpr int kWarps = 8;
constexpr int kTiles = 2;   // 8-row tiles per warp: the 16 rows of the mma A operand
constexpr int kStages = 3;  // chunk slots per warp
// Resident blocks per SM the registers are bounded for: 3 (24 warps, <= 80 registers) for <= 8 rows of x;
// 2 for 16 rows (the second B operand needs 16 more registers; 80 would spill).
template <bool kRows16>
constexpr int kMinBlocks = kRows16 ? 2 : 3;
constexpr int kLutBytes = 256 * 32 * 4;
__constant__ float kCodebook[16] = {KINDRED_NF4_CODEBOOK};

struct Params {
  const void* x;
  void* out;
  const uint8_t* data;
  int m, n, k, chunks, unit, tiles, splits;  // tiles: padded N / 8; splits: warps sharing one tile pair
};

// T pair with the integer value 128 + q (bf16) or 1024 + q (f16) in each half when q < 16 is OR'ed in.
template <typename T>
constexpr uint32_t kMagic = std::is_same_v<T, __nv_bfloat16> ? 0x43004300u : 0x64006400u;

// (a & b) | c in one LOP3 (the compiler splits it into two when b and c are both immediates).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T>
__device__ __forceinline__ uint32_t sub_pair(uint32_t a, uint32_t b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 r =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
}

// Bytes of one unit (8 rows x 128 k): 512 code bytes and the scale record (kindred/matmul_4bit.h), per format and
// period.
template <DecodeFormat F, int P>
constexpr int kUnit = static_cast<int>(kDecodeCodeBytes) +
                      (F == DecodeFormat::nf4 ? P * 8 * 4 : (P * 8 * 3 + 15) / 16 * 16);

// Copies one chunk of the warp's two tiles (their units at src0 and src1) into its shared-memory slot
// (one commit group): 32 lanes x 16 bytes, then the rest of the unit on the first lanes.
template <int kBytes>
__device__ __forceinline__ void issue_chunk(uint8_t* slot, const uint8_t* src0, const uint8_t* src1, int lane) {
  constexpr int kRest = kBytes / 16 - 32;
  static_assert(kBytes % 16 == 0 && kRest > 0 && kRest <= 32, "a unit is 32 to 64 pieces of 16 bytes");
  cuda::cp_async16(slot + 16 * lane, src0 + 16 * lane);
  cuda::cp_async16(slot + kBytes + 16 * lane, src1 + 16 * lane);
  if (lane < kRest) {
    cuda::cp_async16(slot + 512 + 16 * lane, src0 + 512 + 16 * lane);
    cuda::cp_async16(slot + kBytes + 512 + 16 * lane, src1 + 512 + 16 * lane);
  }
  cuda::cp_async_commit();
}

// What a lane reads for one chunk: its code words of both tiles and the scales (periods P) of its weight
// row g in each tile from the slot, and its B fragments (x rows g and g + 8) from global memory (L1/L2:
// x is small and hot).
template <DecodeFormat F, int P>
struct Chunk {
  uint4 codes[kTiles];
  float scale[P][kTiles];
  uint32_t zero[P][kTiles];  // INT4g
  uint4 xa[4], xb[4];
};

template <typename T, DecodeFormat F, int P, bool kRows16>
__device__ __forceinline__ void read_chunk(const Params& p, const uint8_t* slot, int ch, int g, int c, Chunk<F, P>& s) {
  const T* x = static_cast<const T*>(p.x) + ch * kDecodeChunk + 8 * c;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    s.xa[q] = g < p.m ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(g) * p.k + 32 * q))
                      : make_uint4(0, 0, 0, 0);
    s.xb[q] = kRows16 && g + 8 < p.m
                  ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(g + 8) * p.k + 32 * q))
                  : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const uint8_t* unit = slot + t * kUnit<F, P>;
    s.codes[t] = *reinterpret_cast<const uint4*>(unit + 16 * (4 * g + c));
    const uint8_t* rec = unit + kDecodeCodeBytes;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if constexpr (F == DecodeFormat::nf4) {
        s.scale[i][t] = reinterpret_cast<const float*>(rec)[i * 8 + g];
      } else {
        s.scale[i][t] = __half2float(reinterpret_cast<const __half*>(rec)[i * 8 + g]);
        s.zero[i][t] = rec[P * 16 + i * 8 + g];
      }
    }
  }
}

// Fragment registers (lo, hi) of k16 step 2q + h of one weight row from code word `w`: pairs 2h and 2h + 1
// of the word. NF4: byte b of the word -> its code pair at lut_lane + 128 b (shared-memory byte address).
template <typename T, DecodeFormat F>
__device__ __forceinline__ void dequant(uint32_t w, int h, uint32_t mz, uint32_t lut_lane, uint32_t& lo, uint32_t& hi) {
  if constexpr (F == DecodeFormat::nf4) {
    lo = cuda::lds32(lut_lane + (__byte_perm(w, 0, 0x4440 + 2 * h) << 7));
    hi = cuda::lds32(lut_lane + (__byte_perm(w, 0, 0x4441 + 2 * h) << 7));
  } else {
    lo = sub_pair<T>(and_or(w >> (8 * h), 0x000F000Fu, kMagic<T>), mz);
    hi = sub_pair<T>(and_or(w >> (8 * h + 4), 0x000F000Fu, kMagic<T>), mz);
  }
}

// The two 8-row tiles are the A operand (16 weight rows x k16: row g of tile t is A row g + 8t) and x is
// the B operand (k16 x 8 rows of x), so one mma covers both tiles and up to 8 rows of x; rows 8..15 of x
// take a second mma with the same A. C register r of mma j: weight row g of tile r / 2, x row 2c + r % 2
// + 8j.
template <typename T, DecodeFormat F, int P, bool kRows16>
__device__ __forceinline__ void compute_chunk(const Chunk<F, P>& s, uint32_t lut_lane, float (&acc)[2][4]) {
  constexpr int kWords = 4 / P;  // code words (32 k each) per scale period
  const uint32_t* xa = reinterpret_cast<const uint32_t*>(s.xa);
  const uint32_t* xb = reinterpret_cast<const uint32_t*>(s.xb);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    float part[2][4] = {};
    uint32_t mz[kTiles] = {};  // INT4g: magic number + zero point of this lane's row, in both halves
    if constexpr (F == DecodeFormat::int4g) {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) mz[t] = kMagic<T> | (s.zero[i][t] * 0x00010001u);
    }
#pragma unroll
    for (int q = i * kWords; q < (i + 1) * kWords; ++q) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t a[4];
        dequant<T, F>(reinterpret_cast<const uint32_t*>(&s.codes[0])[q], h, mz[0], lut_lane, a[0], a[2]);
        dequant<T, F>(reinterpret_cast<const uint32_t*>(&s.codes[1])[q], h, mz[1], lut_lane, a[1], a[3]);
        cuda::mma_m16n8k16<T>(part[0], a, xa[4 * q + 2 * h], xa[4 * q + 2 * h + 1]);
        if constexpr (kRows16) cuda::mma_m16n8k16<T>(part[1], a, xb[4 * q + 2 * h], xb[4 * q + 2 * h + 1]);
      }
    }
#pragma unroll
    for (int j = 0; j < (kRows16 ? 2 : 1); ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][r] = fmaf(s.scale[i][r / 2], part[j][r], acc[j][r]);
  }
}

// NF4 code byte -> its two codebook values as a T pair (element 2i, in the high nibble, in the low half).
template <typename T>
__device__ __forceinline__ uint32_t nf4_byte_pair(int byte) {
  const T lo = cuda::from_f32<T>(kCodebook[byte >> 4]), hi = cuda::from_f32<T>(kCodebook[byte & 0xF]);
  const uint32_t l = *reinterpret_cast<const uint16_t*>(&lo), u = *reinterpret_cast<const uint16_t*>(&hi);
  return l | u << 16;
}

template <typename T, DecodeFormat F, int P, bool kRows16>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks<kRows16>) matmul_4bit_decode_kernel(const Params p) {
  constexpr int kBytes = kUnit<F, P>, kSlot = kTiles * kBytes;
  __shared__ float partial[kWarps][8][32];  // [warp][4 * mma + C register][lane]
  // Dynamic shared memory: the NF4 table lut[byte * 32 + lane] (one copy per lane: no bank conflicts), then
  // the warps' chunk rings.
  extern __shared__ __align__(16) uint32_t lut[];
  uint8_t* ring_base = reinterpret_cast<uint8_t*>(lut) + (F == DecodeFormat::nf4 ? kLutBytes : 0);
  if constexpr (F == DecodeFormat::nf4) {
    static_assert(kWarps * 32 == 256, "one thread per byte value builds the table");
    const uint32_t v = nf4_byte_pair<T>(threadIdx.x);
    const uint4 v4 = make_uint4(v, v, v, v);
    uint4* entry = reinterpret_cast<uint4*>(lut + threadIdx.x * 32);  // rotated: 4 wavefronts per store
#pragma unroll
    for (int r = 0; r < 8; ++r) entry[(r + threadIdx.x) % 8] = v4;
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const uint32_t lut_lane = static_cast<uint32_t>(__cvta_generic_to_shared(lut)) + 4 * lane;
  const int groups = kWarps / p.splits, group = warp / p.splits, split = warp % p.splits;
  const int tile = (blockIdx.x * groups + group) * kTiles;
  float acc[2][4] = {};
  if (tile < p.tiles) {
    const int c0 = split * p.chunks / p.splits, c1 = (split + 1) * p.chunks / p.splits;
    // A ring of kStages chunk slots per warp: kStages - 1 chunks are in flight while one is computed.
    uint8_t* ring = ring_base + warp * kStages * kSlot;
    const uint8_t* src0 = p.data + (static_cast<int64_t>(tile) * p.chunks + c0) * kBytes;
    const uint8_t* src1 = src0 + static_cast<int64_t>(p.chunks) * kBytes;  // the same chunk of tile + 1
    const int count = c1 - c0;
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
      if (i < count)
        issue_chunk<kBytes>(ring + i * kSlot, src0 + i * kBytes, src1 + i * kBytes, lane);
      else
        cuda::cp_async_commit();  // empty group: the wait below counts groups
    }
    for (int i = 0; i < count; ++i) {
      const int ahead = i + kStages - 1;
      if (ahead < count)
        issue_chunk<kBytes>(ring + ahead % kStages * kSlot, src0 + ahead * kBytes, src1 + ahead * kBytes, lane);
      else
        cuda::cp_async_commit();
      cuda::cp_async_wait<kStages - 1>();  // chunk i has landed (this lane's copies)...
      __syncwarp();                        // ...and every lane's
      Chunk<F, P> chunk;
      read_chunk<T, F, P, kRows16>(p, ring + i % kStages * kSlot, c0 + i, g, c, chunk);
      compute_chunk<T, F, P, kRows16>(chunk, lut_lane, acc);
      __syncwarp();  // the slot is refilled next iteration
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) partial[warp][4 * j + r][lane] = acc[j][r];
  __syncthreads();
  // The splits of each tile pair are summed in split order; thread i handles one (group, register, lane).
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < groups * 8 * 32; i += kWarps * 32) {
    const int grp = i / 256, r = i / 32 % 8, l = i % 32;
    const int m = 2 * (l % 4) + (r & 1) + (r >= 4 ? 8 : 0);
    const int col = ((blockIdx.x * groups + grp) * kTiles + (r >> 1 & 1)) * 8 + l / 4;
    if (m >= p.m || col >= p.n) continue;
    float sum = 0.0f;
    for (int s = 0; s < p.splits; ++s) sum += partial[grp * p.splits + s][r][l];
    out[static_cast<int64_t>(m) * p.n + col] = cuda::from_f32<T>(sum);
  }
}

template <typename T, DecodeFormat F, int P, bool kRows16>
void launch_kernel(Params p, cudaStream_t stream) {
  const auto kernel = matmul_4bit_decode_kernel<T, F, P, kRows16>;
  constexpr int kBytes = kUnit<F, P>;
  KINDRED_CHECK(p.unit == kBytes, "matmul_4bit_decode: units of ", p.unit, " bytes, the kernel expects ", kBytes);
  const size_t smem =
      (F == DecodeFormat::nf4 ? kLutBytes : 0) + static_cast<size_t>(kWarps) * kStages * kTiles * kBytes;
  // Resident blocks on the device (SMs x blocks per SM), looked up once per kernel and device: the shared
  // memory size is fixed per instantiation (the period fixes the unit size).
  static std::array<std::atomic<int>, 64> resident{};
  int device = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  KINDRED_CHECK(device < static_cast<int>(resident.size()), "matmul_4bit_decode: device index ", device,
                " is out of range");
  int slots = resident[device].load(std::memory_order_relaxed);
  if (slots == 0) {
    int sms = 0, per_sm = 0;
    cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                "cudaFuncSetAttribute");
    cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem),
                "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    KINDRED_CHECK(per_sm > 0, "matmul_4bit_decode: the kernel does not fit on an SM (", smem,
                  " bytes of shared memory)");
    slots = sms * per_sm;
    resident[device].store(slots, std::memory_order_relaxed);
  }
  // Splits of K per tile pair: the one whose grid fills the resident block slots most evenly (the last
  // wave least empty); ties go to fewer splits (longer K runs per warp, less reduction).
  double best = -1.0;
  for (int s = 1; s <= kWarps && s <= p.chunks; s *= 2) {
    const int blocks = (p.tiles + kTiles * (kWarps / s) - 1) / (kTiles * (kWarps / s));
    const int waves = (blocks + slots - 1) / slots;
    const double fill = static_cast<double>(blocks) / (static_cast<double>(waves) * slots);
    if (fill > best + 1e-3) {
      best = fill;
      p.splits = s;
    }
  }
  const int blocks = (p.tiles + kTiles * (kWarps / p.splits) - 1) / (kTiles * (kWarps / p.splits));
  kernel<<<blocks, kWarps * 32, smem, stream>>>(p);
  cuda::check_launch("matmul_4bit_decode_kernel");
}

// The kernels this file instantiates, the only ones the dispatch can pick: activation dtype x format x period
// (the K span of one scale; P = 128 / period per chunk), each for <= 8 and for <= 16 rows of x.
struct Instance {
  DType dtype;
  DecodeFormat format;
  int64_t period;
  void (*rows8)(Params, cudaStream_t);
  void (*rows16)(Params, cudaStream_t);
};

#define KINDRED_DECODE_INSTANCE(T, DT, F, PERIOD)                                                        \
  Instance {                                                                                             \
    DType::DT, DecodeFormat::F, PERIOD, launch_kernel<T, DecodeFormat::F, kDecodeChunk / PERIOD, false>, \
        launch_kernel<T, DecodeFormat::F, kDecodeChunk / PERIOD, true>                                   \
  }
#define KINDRED_DECODE_PERIODS(T, DT, F) \
  KINDRED_DECODE_INSTANCE(T, DT, F, 128), KINDRED_DECODE_INSTANCE(T, DT, F, 64), KINDRED_DECODE_INSTANCE(T, DT, F, 32)

const Instance kInstances[] = {KINDRED_DECODE_PERIODS(__nv_bfloat16, bf16, nf4),
                               KINDRED_DECODE_PERIODS(__nv_bfloat16, bf16, int4g),
                               KINDRED_DECODE_PERIODS(__half, f16, nf4), KINDRED_DECODE_PERIODS(__half, f16, int4g)};

#undef KINDRED_DECODE_PERIODS
#undef KINDRED_DECODE_INSTANCE

}  // namespace

void matmul_4bit_decode_cuda(const TensorView& x, const DecodeWeight& w, const TensorView& out, int64_t stream) {
  cuda::DeviceGuard guard(x);
  cuda::check_aligned(w.data, "data", 16);
  cuda::check_aligned(x, "x", 16);
  Params p{};
  p.x = x.data;
  p.out = out.data;
  p.data = w.data.ptr<uint8_t>();
  p.m = static_cast<int>(x.shape[0]);
  p.n = static_cast<int>(w.n);
  p.k = static_cast<int>(w.k);
  p.chunks = static_cast<int>(w.k / kDecodeChunk);
  p.unit = static_cast<int>(kDecodeCodeBytes + decode_record_bytes(w.format, w.period));
  p.tiles = static_cast<int>(decode_padded_rows(w.n) / kDecodeTileRows);
  p.splits = 1;
  for (const Instance& in : kInstances) {
    if (in.dtype != x.dtype || in.format != w.format || in.period != w.period) continue;
    return (p.m > 8 ? in.rows16 : in.rows8)(p, cuda::as_stream(stream));
  }
  KINDRED_CHECK(false, "matmul_4bit_decode: no kernel for x ", x.describe(), " and period ", w.period);
}

}  // namespace kindred
