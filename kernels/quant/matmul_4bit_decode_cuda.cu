// matmul_4bit_decode: out[M, N] = x[M, K] · dequant(W)ᵀ for M <= 16 from the decode layout (quant.h), on
// the tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// The repack put each lane's fragments of one weight row for 8 k16 steps into one 16-byte word group, so the
// loop has no index arithmetic. Work is the list of (tile pair, 128-wide K chunk) items, pair-major. The grid
// is persistent (the resident blocks) and each block takes an equal contiguous run of the list (stream-K), so
// every SM streams the same bytes whatever the shape and the memory pipeline fills once. A block splits each
// pair of its run over its 8 warps (chunk c to warp c % 8) and sums the warps' fp32 partials through shared
// memory in warp order. A run's first and last pairs are usually shared with the neighbouring blocks: the
// block does those two first and writes its partials to the workspace; after its last chunk it counts
// itself in with a release atomic, and the block that arrives last sums the partials in block order
// (deterministic). The two tiles of a pair are the mma's A operand (16 weight rows) and x its B
// operand (8 rows of x), so one mma per k16 step serves both tiles and M <= 8 (a second one with the same A
// serves rows 8..15). Per chunk a warp copies the pair's two units (2 x 512 code bytes plus their scale
// records) into a 3-slot shared-memory ring with cp.async (sizes are compile-time: two copies per lane and
// tile, no loop), so two chunks are in flight while one is computed. x is read from L1/L2 with 16-byte loads
// (the layout's k order makes a lane's B fragments of two k16 steps contiguous). Dequantization stays in
// registers: NF4 looks up whole code bytes (two codes) in a lane-replicated shared-memory table of T pairs
// (byte extract + address + load); INT4g ORs the nibbles into the mantissa of a magic number (bf16 128 + q,
// f16 1024 + q) and subtracts the magic number plus the zero point, exactly. The scale of each block /
// group is applied to the fp32 partial sums of its period (32..128 k), not to the weights.
// Test: pytest -m gpu tests/test_matmul_4bit.py
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <atomic>
#include <type_traits>

#include "../common.cuh"
#include "kindred/formats.h"
#include "kindred/quant.h"

namespace kindred {
namespace {

constexpr int kWarps = 8;
constexpr int kTiles = 2;                                 // 8-row tiles per warp: the 16 rows of the mma A operand
constexpr int kStages = 3;                                // chunk slots per warp
constexpr int kMinRun = 3;                                // chunks per warp at least (fewer warps for small weights)
constexpr int kPartial = kDecodeRowPad * kDecodeMaxRows;  // floats of one warp's partial: [8 C registers][32]
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
  float* partials;  // [blocks][2][kPartial]: a block's partial of its first pair, then of its last
  int* counters;    // [pairs], zero between calls
  int m, n, k, chunks, unit, pairs;
  int blocks;     // the grid: one run each
  int64_t items;  // pairs * chunks
};

// Asynchronous 16-byte global -> shared copy, cached in L2 only (the weights are read once).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

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

// Bytes of one unit (8 rows x 128 k): 512 code bytes and the scale record (quant.h), per format and period.
template <DecodeFormat F, int P>
constexpr int kUnit = static_cast<int>(kDecodeCodeBytes) +
                      (F == DecodeFormat::nf4 ? P * 8 * 4 : (P * 8 * 3 + 15) / 16 * 16);

// Copies one chunk of the warp's two tiles (their units at src0 and src1) into its shared-memory slot
// (one commit group): 32 lanes x 16 bytes, then the rest of the unit on the first lanes.
template <int kBytes>
__device__ __forceinline__ void issue_chunk(uint8_t* slot, const uint8_t* src0, const uint8_t* src1, int lane) {
  constexpr int kRest = kBytes / 16 - 32;
  static_assert(kBytes % 16 == 0 && kRest > 0 && kRest <= 32, "a unit is 32 to 64 pieces of 16 bytes");
  cp_async16(slot + 16 * lane, src0 + 16 * lane);
  cp_async16(slot + kBytes + 16 * lane, src1 + 16 * lane);
  if (lane < kRest) {
    cp_async16(slot + 512 + 16 * lane, src0 + 512 + 16 * lane);
    cp_async16(slot + kBytes + 512 + 16 * lane, src1 + 512 + 16 * lane);
  }
  cp_async_commit();
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
    lo = lds32(lut_lane + (__byte_perm(w, 0, 0x4440 + 2 * h) << 7));
    hi = lds32(lut_lane + (__byte_perm(w, 0, 0x4441 + 2 * h) << 7));
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

// First item of block b's run, and the block whose run holds item f (the largest b with run_start(b) <= f).
__device__ __forceinline__ int64_t run_start(const Params& p, int64_t b) {
  return b * p.items / p.blocks;
}
__device__ __forceinline__ int run_owner(const Params& p, int64_t f) {
  return static_cast<int>(((f + 1) * p.blocks - 1) / p.items);
}

// The pairs of a block's run [lo, hi) in the order it does them: the first pair p0, then the last p1 (both
// usually shared with a neighbour), then the ones between; chunk range [c0, c1) of each.
struct Run {
  int lo, hi, chunks, p0, p1;
  __device__ __forceinline__ int segments() const { return p1 - p0 + 1; }
  __device__ __forceinline__ int pair(int s) const { return s == 0 ? p0 : s == 1 ? p1 : p0 + s - 1; }
  __device__ __forceinline__ int c0(int pair) const { return pair == p0 ? lo - p0 * chunks : 0; }
  __device__ __forceinline__ int c1(int pair) const { return pair == p1 ? hi - p1 * chunks : chunks; }
};

// A warp's position in its block's run: segment s, chunk ch (chunks ch = warp, warp + 8, ... of each pair).
struct Cursor {
  int s, ch;
  __device__ __forceinline__ void first(const Run& run, int warp) {
    s = 0;
    ch = run.c0(run.pair(0)) + warp;
    settle(run, warp);
  }
  __device__ __forceinline__ void next(const Run& run, int warp) {
    ch += kWarps;
    settle(run, warp);
  }
  __device__ __forceinline__ bool done(const Run& run) const { return s >= run.segments(); }
  // Skips segments where this warp has no chunk left.
  __device__ __forceinline__ void settle(const Run& run, int warp) {
    while (s < run.segments() && ch >= run.c1(run.pair(s))) {
      ++s;
      if (s < run.segments()) ch = run.c0(run.pair(s)) + warp;
    }
  }
};

// Output position of C register r of mma j of a lane: x row m, weight row (column of out) col.
__device__ __forceinline__ void c_position(int pair, int lane, int j, int r, int& m, int& col) {
  m = 2 * (lane % 4) + (r & 1) + 8 * j;
  col = pair * static_cast<int>(kDecodeRowPad) + 8 * (r >> 1) + lane / 4;
}

template <typename T, bool kRows16>
__device__ __forceinline__ void store_pair(const Params& p, int pair, int lane, const float (&v)[8]) {
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < (kRows16 ? 8 : 4); ++i) {
    int m = 0, col = 0;
    c_position(pair, lane, i / 4, i % 4, m, col);
    if (m < p.m && col < p.n) out[static_cast<int64_t>(m) * p.n + col] = cuda::from_f32<T>(v[i]);
  }
}

// A pair shared with other blocks: this block's partial is in the workspace and `arrived` is what the
// counter held before this block's increment. The last block to arrive sums every block's partial in block
// order and writes the pair (one warp).
struct Shared {
  int pair = -1, arrived = 0;
};

template <typename T, bool kRows16>
__device__ __noinline__ void finish_shared(const Params& p, const Shared& sh, int lane) {
  const int b0 = run_owner(p, static_cast<int64_t>(sh.pair) * p.chunks);
  const int b1 = run_owner(p, static_cast<int64_t>(sh.pair + 1) * p.chunks - 1);
  if (sh.arrived != b1 - b0) return;  // a block still to arrive sums
  __threadfence();                    // acquire: the other blocks' partials are visible
  // Block b0's run started before the pair (the pair is its last: slot 1) or at its first item (slot 0); the
  // runs of the later blocks start inside the pair (slot 0).
  const bool b0_last = run_start(p, b0) < static_cast<int64_t>(sh.pair) * p.chunks;
  float v[8] = {};
  for (int b = b0; b <= b1; ++b) {
    const float* part = p.partials + (2 * static_cast<int64_t>(b) + (b == b0 && b0_last ? 1 : 0)) * kPartial;
#pragma unroll
    for (int i = 0; i < (kRows16 ? 8 : 4); ++i) v[i] += __ldcg(part + i * 32 + lane);
  }
  store_pair<T, kRows16>(p, sh.pair, lane, v);
  if (lane == 0) p.counters[sh.pair] = 0;  // every block has arrived: zero for the next call
}

__device__ __forceinline__ int atomic_add_release(int* addr, int v) {
  int old;
  asm volatile("atom.release.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(addr), "r"(v) : "memory");
  return old;
}

template <typename T, DecodeFormat F, int P, bool kRows16>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks<kRows16>) matmul_4bit_decode_kernel(const Params p) {
  constexpr int kBytes = kUnit<F, P>, kSlot = kTiles * kBytes, kRegs = kRows16 ? 8 : 4;
  __shared__ float partial[kWarps][kRegs][32];  // [warp][4 * mma + C register][lane]
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
  Run run;
  run.lo = static_cast<int>(run_start(p, blockIdx.x));
  run.hi = static_cast<int>(run_start(p, blockIdx.x + 1));
  run.chunks = p.chunks;
  run.p0 = run.lo / p.chunks;
  run.p1 = (run.hi - 1) / p.chunks;
  // A ring of kStages chunk slots per warp: kStages - 1 chunks are in flight while one is computed.
  uint8_t* ring = ring_base + warp * kStages * kSlot;
  const int64_t tile_bytes = static_cast<int64_t>(p.chunks) * kBytes;  // one tile's units
  Cursor load;
  load.first(run, warp);
  const auto issue = [&](int slot) {               // tiles 2 pair and 2 pair + 1 of the cursor's pair, its chunk
    if (load.done(run)) return cp_async_commit();  // empty group: the waits count groups
    const uint8_t* src0 = p.data + 2 * run.pair(load.s) * tile_bytes + static_cast<int64_t>(load.ch) * kBytes;
    issue_chunk<kBytes>(ring + slot * kSlot, src0, src0 + tile_bytes, lane);
    load.next(run, warp);
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  Shared shared[2];  // warp 0: the run's first and last pairs when other blocks share them
  int i = 0;         // chunks computed by this warp
  for (int s = 0; s < run.segments(); ++s) {
    const int pair = run.pair(s);
    float acc[2][4] = {};
    for (int ch = run.c0(pair) + warp; ch < run.c1(pair); ch += kWarps, ++i) {
      issue((i + kStages - 1) % kStages);
      cp_async_wait<kStages - 1>();  // chunk i has landed (this lane's copies)...
      __syncwarp();                  // ...and every lane's
      Chunk<F, P> chunk;
      read_chunk<T, F, P, kRows16>(p, ring + i % kStages * kSlot, ch, g, c, chunk);
      compute_chunk<T, F, P, kRows16>(chunk, lut_lane, acc);
      __syncwarp();  // the slot is refilled next iteration
    }
    // The block's sum of the pair: warps' partials through shared memory, summed by warp 0 in warp order.
#pragma unroll
    for (int r = 0; r < kRegs; ++r) partial[warp][r][lane] = acc[r / 4][r % 4];
    __syncthreads();
    float v[8] = {};
    if (warp == 0) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w)
#pragma unroll
        for (int r = 0; r < kRegs; ++r) v[r] += partial[w][r][lane];
    }
    __syncthreads();  // the partials are read: the next segment may overwrite them
    if (warp != 0) continue;
    const bool whole = run_owner(p, static_cast<int64_t>(pair) * p.chunks) ==
                       run_owner(p, static_cast<int64_t>(pair + 1) * p.chunks - 1);
    if (whole) {
      store_pair<T, kRows16>(p, pair, lane, v);
      continue;
    }
    // Shared with other blocks (only the first two segments can be): the partial goes to the workspace now;
    // the block counts itself in after its last chunk, when no copy is in flight for the release to wait on.
    float* mine = p.partials + (2 * static_cast<int64_t>(blockIdx.x) + (s == 0 ? 0 : 1)) * kPartial;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) mine[r * 32 + lane] = v[r];
    shared[s].pair = pair;
  }
  if (warp != 0) return;
  __syncwarp();  // every lane's partials are written before lane 0's release
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    int arrived = 0;
    if (lane == 0 && shared[s].pair >= 0) arrived = atomic_add_release(p.counters + shared[s].pair, 1);
    shared[s].arrived = __shfl_sync(0xffffffffu, arrived, 0);
  }
#pragma unroll
  for (int s = 0; s < 2; ++s)
    if (shared[s].pair >= 0) finish_shared<T, kRows16>(p, shared[s], lane);
}

template <typename T, DecodeFormat F, int P, bool kRows16>
void launch_kernel(Params p, int sms, cudaStream_t stream) {
  const auto kernel = matmul_4bit_decode_kernel<T, F, P, kRows16>;
  constexpr int kBytes = kUnit<F, P>;
  KINDRED_CHECK(p.unit == kBytes, "matmul_4bit_decode: units of ", p.unit, " bytes, the kernel expects ", kBytes);
  const size_t smem =
      (F == DecodeFormat::nf4 ? kLutBytes : 0) + static_cast<size_t>(kWarps) * kStages * kTiles * kBytes;
  // Resident blocks per SM (at most the workspace's kDecodeMaxBlocksPerSm), looked up once per kernel and
  // device: the shared memory size is fixed per instantiation.
  static std::array<std::atomic<int>, 64> resident{};
  int device = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  KINDRED_CHECK(device < static_cast<int>(resident.size()), "matmul_4bit_decode: device index ", device,
                " is out of range");
  int per_sm = resident[device].load(std::memory_order_relaxed);
  if (per_sm == 0) {
    cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                "cudaFuncSetAttribute");
    cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem),
                "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    KINDRED_CHECK(per_sm > 0, "matmul_4bit_decode: the kernel does not fit on an SM (", smem,
                  " bytes of shared memory)");
    per_sm = std::min<int>(per_sm, kDecodeMaxBlocksPerSm);
    resident[device].store(per_sm, std::memory_order_relaxed);
  }
  // One run per resident block, each of at least kMinRun chunks (and at least one).
  p.items = static_cast<int64_t>(p.pairs) * p.chunks;
  p.blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(int64_t{sms} * per_sm, p.items / kMinRun)));
  kernel<<<p.blocks, kWarps * 32, smem, stream>>>(p);
  cuda::check_launch("matmul_4bit_decode_kernel");
}

template <typename T, DecodeFormat F>
void launch_periods(const Params& p, int64_t period, int sms, cudaStream_t stream) {
  const bool rows16 = p.m > 8;
  const auto go = [&](auto periods) {
    constexpr int kP = decltype(periods)::value;
    if (rows16) return launch_kernel<T, F, kP, true>(p, sms, stream);
    launch_kernel<T, F, kP, false>(p, sms, stream);
  };
  if (period == 128) return go(std::integral_constant<int, 1>{});
  if (period == 64) return go(std::integral_constant<int, 2>{});
  go(std::integral_constant<int, 4>{});
}

}  // namespace

void matmul_4bit_decode_cuda(const TensorView& x, const DecodeWeight& w, const TensorView& out,
                             const TensorView& workspace, int64_t stream) {
  cuda::DeviceGuard guard(x);
  cuda::check_aligned(w.data, "data", 16);
  cuda::check_aligned(x, "x", 16);
  cuda::check_aligned(workspace, "workspace", 16);
  int device = 0, sms = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t need = decode_workspace_bytes(w.n, sms);
  KINDRED_CHECK(workspace.numel() >= need, "workspace must have at least decode_workspace_bytes(", w.n, ", ", sms,
                ") = ", need, " bytes, got ", workspace.describe());
  Params p{};
  p.x = x.data;
  p.out = out.data;
  p.data = w.data.ptr<uint8_t>();
  p.partials = reinterpret_cast<float*>(workspace.ptr<uint8_t>());
  p.counters = reinterpret_cast<int*>(workspace.ptr<uint8_t>() + sms * kDecodeMaxBlocksPerSm * kDecodePartialBytes);
  p.m = static_cast<int>(x.shape[0]);
  p.n = static_cast<int>(w.n);
  p.k = static_cast<int>(w.k);
  p.chunks = static_cast<int>(w.k / kDecodeChunk);
  p.unit = static_cast<int>(kDecodeCodeBytes + decode_record_bytes(w.format, w.period));
  p.pairs = static_cast<int>((w.n + kDecodeRowPad - 1) / kDecodeRowPad);
  const auto s = cuda::as_stream(stream);
  const auto by_format = [&](auto t) {
    using T = decltype(t);
    if (w.format == DecodeFormat::nf4) return launch_periods<T, DecodeFormat::nf4>(p, w.period, sms, s);
    launch_periods<T, DecodeFormat::int4g>(p, w.period, sms, s);
  };
  if (x.dtype == DType::bf16) return by_format(__nv_bfloat16{});
  by_format(__half{});
}

}  // namespace kindred
