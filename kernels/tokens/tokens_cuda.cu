// CUDA implementations of the device ops of the tokens family: trainable-token counts per sequence / row /
// batch from labels and cu_seqlens, and position ids from cu_seqlens. Exact integers, equal to the CPU
// reference in csrc/cpu/tokens_cpu.cpp. Nothing here synchronizes with the host: outputs are zeroed with
// cudaMemsetAsync and accumulated with atomics on the caller's stream.
//
// Both kernels give each thread kPerThread consecutive tokens (vector loads/stores when aligned) and each block
// a tile of kTile tokens. The block first copies the part of cu_seqlens that covers its tile into shared memory
// (one binary search per block in global memory), so each thread finds its first token's sequence with a
// short search in shared memory and then walks forward. Memory traffic: the labels once (count), the
// positions once (position ids), plus cu_seqlens.
// Test: pytest -m gpu tests/test_tokens.py
#include <algorithm>
#include <cstdint>
#include <limits>

#include "../common.cuh"
#include "kindred/tokens.h"

namespace kindred {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;
constexpr int kTile = kThreads * kPerThread;
constexpr int kSmemSeqs = 2048;  // sequences of one tile held in shared memory (else: global searches)

// The sequence of token t: the last q in [lo, hi] with cu[q] <= t (lo when none).
__device__ __forceinline__ int find_seq(const int32_t* cu, int lo, int hi, int64_t t) {
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The slice of cu_seqlens covering one tile, in shared memory when it fits.
struct TileSeqs {
  const int32_t* cu;  // smem copy (indexed by q − first) or the global array (indexed by q)
  int first;          // first sequence of the tile
  int last;           // last sequence of the tile
  bool shared;
  __device__ __forceinline__ int32_t start(int q) const { return shared ? cu[q - first] : cu[q]; }
  __device__ __forceinline__ int find(int64_t t) const {
    return shared ? first + find_seq(cu, 0, last - first, t) : find_seq(cu, first, last, t);
  }
};

__device__ TileSeqs load_tile_seqs(const int32_t* __restrict__ cu, int q, int64_t tile_begin, int64_t tile_end,
                                   int32_t* smem, int* smem_range) {
  if (threadIdx.x == 0) {
    smem_range[0] = find_seq(cu, 0, q - 1, tile_begin);
    smem_range[1] = find_seq(cu, 0, q - 1, tile_end - 1);
  }
  __syncthreads();
  const int first = smem_range[0], last = smem_range[1];
  const bool shared = last - first + 2 <= kSmemSeqs;
  if (shared)
    for (int i = threadIdx.x; i <= last - first + 1; i += blockDim.x) smem[i] = cu[first + i];
  __syncthreads();
  return TileSeqs{shared ? smem : cu, first, last, shared};
}

template <typename T, bool kVector>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int64_t t0, int64_t tokens, T (&v)[kPerThread]) {
  if (kVector && t0 + kPerThread <= tokens) {
    constexpr int kVecs = kPerThread * sizeof(T) / 16;
    const int4* src = reinterpret_cast<const int4*>(p + t0);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<int4*>(v)[i] = __ldg(src + i);
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) v[j] = t0 + j < tokens ? p[t0 + j] : T(kIgnoreIndex);
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    count_trainable_kernel(const T* __restrict__ labels, const int32_t* __restrict__ cu, int q, int64_t tokens,
                           int64_t row_length, int32_t* __restrict__ seq_count, int32_t* __restrict__ row_count,
                           int32_t* __restrict__ total) {
  __shared__ int32_t smem_cu[kSmemSeqs];
  __shared__ int smem_range[2];
  __shared__ int32_t smem_run[kThreads];
  __shared__ int32_t smem_warp_total[kThreads / 32];
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t tile_end = min(tile_begin + kTile, tokens);
  const TileSeqs seqs = load_tile_seqs(cu, q, tile_begin, tile_end, smem_cu, smem_range);

  const int64_t t0 = tile_begin + static_cast<int64_t>(threadIdx.x) * kPerThread;
  alignas(16) T v[kPerThread];
  load_chunk<T, kVector>(labels, t0, tokens, v);
  int32_t mine = 0;  // all trainable tokens of this thread
  int32_t run = 0;   // trainable tokens of the current (sequence, row) run
  unsigned long long key = ~0ull;
  if (t0 < tokens) {
    int s = seqs.find(t0);
    int64_t next = s + 1 <= seqs.last ? seqs.start(s + 1) : std::numeric_limits<int64_t>::max();
    int64_t row = t0 / row_length;
    int64_t row_end = (row + 1) * row_length;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t t = t0 + j;
      if (t >= tokens) break;
      if (t >= next || t >= row_end) {  // a run ends: flush it (rare: sequence or row boundary)
        if (run) {
          atomicAdd(seq_count + s, run);
          atomicAdd(row_count + row, run);
        }
        run = 0;
        while (t >= next) {
          ++s;
          next = s + 1 <= seqs.last ? seqs.start(s + 1) : std::numeric_limits<int64_t>::max();
        }
        while (t >= row_end) {
          ++row;
          row_end += row_length;
        }
      }
      const int32_t c = v[j] != T(kIgnoreIndex);
      run += c;
      mine += c;
    }
    key = static_cast<unsigned long long>(s) << 32 | static_cast<unsigned long long>(row);
  }
  // The last run of every thread: lanes of a warp on the same (sequence, row) add up before one atomic.
  const int lane = threadIdx.x % 32;
  smem_run[threadIdx.x] = run;
  __syncwarp();
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  if (key != ~0ull && lane == __ffs(peers) - 1) {
    int32_t sum = 0;
    for (unsigned m = peers; m; m &= m - 1) sum += smem_run[threadIdx.x - lane + __ffs(m) - 1];
    if (sum) {
      atomicAdd(seq_count + static_cast<int>(key >> 32), sum);
      atomicAdd(row_count + static_cast<int64_t>(key & 0xffffffffull), sum);
    }
  }
  // Block total, one atomic per block.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mine += __shfl_xor_sync(0xffffffffu, mine, o);
  if (lane == 0) smem_warp_total[threadIdx.x / 32] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t sum = 0;
    for (int w = 0; w < kThreads / 32; ++w) sum += smem_warp_total[w];
    if (sum) atomicAdd(total, sum);
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    position_ids_kernel(const int32_t* __restrict__ cu, int q, int64_t tokens, T* __restrict__ out) {
  __shared__ int32_t smem_cu[kSmemSeqs];
  __shared__ int smem_range[2];
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t tile_end = min(tile_begin + kTile, tokens);
  const TileSeqs seqs = load_tile_seqs(cu, q, tile_begin, tile_end, smem_cu, smem_range);
  const int64_t t0 = tile_begin + static_cast<int64_t>(threadIdx.x) * kPerThread;
  if (t0 >= tokens) return;
  int s = seqs.find(t0);
  int64_t begin = seqs.start(s);
  int64_t next = s + 1 <= seqs.last ? seqs.start(s + 1) : std::numeric_limits<int64_t>::max();
  alignas(16) T v[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t t = t0 + j;
    while (t >= next) {
      ++s;
      begin = next;
      next = s + 1 <= seqs.last ? seqs.start(s + 1) : std::numeric_limits<int64_t>::max();
    }
    v[j] = static_cast<T>(t - begin);
  }
  if (kVector && t0 + kPerThread <= tokens) {
    constexpr int kVecs = kPerThread * sizeof(T) / 16;
    int4* dst = reinterpret_cast<int4*>(out + t0);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) dst[i] = reinterpret_cast<const int4*>(v)[i];
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (t0 + j < tokens) out[t0 + j] = v[j];
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

unsigned tiles(int64_t tokens) {
  return static_cast<unsigned>((tokens + kTile - 1) / kTile);
}

}  // namespace

void count_trainable_cuda(const TensorView& labels, const TensorView& cu_seqlens, const TensorView& seq_trainable,
                          const TensorView& row_trainable, const TensorView& total, int64_t stream) {
  cuda::DeviceGuard guard(labels);
  const cudaStream_t s = cuda::as_stream(stream);
  const int64_t tokens = labels.numel();
  const int q = static_cast<int>(cu_seqlens.numel() - 1);
  const int64_t row_length = labels.dim() == 2 ? labels.shape[1] : std::max<int64_t>(tokens, 1);
  cuda::check(cudaMemsetAsync(seq_trainable.data, 0, sizeof(int32_t) * q, s), "cudaMemsetAsync");
  cuda::check(cudaMemsetAsync(row_trainable.data, 0, sizeof(int32_t) * row_trainable.numel(), s), "cudaMemsetAsync");
  cuda::check(cudaMemsetAsync(total.data, 0, sizeof(int32_t), s), "cudaMemsetAsync");
  if (tokens == 0 || q == 0) return;
  const bool vec = aligned16(labels.data);
  auto launch = [&](auto kernel, const auto* p) {
    kernel<<<tiles(tokens), kThreads, 0, s>>>(p, cu_seqlens.ptr<int32_t>(), q, tokens, row_length,
                                              seq_trainable.ptr<int32_t>(), row_trainable.ptr<int32_t>(),
                                              total.ptr<int32_t>());
  };
  if (labels.dtype == DType::i32) {
    vec ? launch(count_trainable_kernel<int32_t, true>, labels.ptr<int32_t>())
        : launch(count_trainable_kernel<int32_t, false>, labels.ptr<int32_t>());
  } else {
    vec ? launch(count_trainable_kernel<int64_t, true>, labels.ptr<int64_t>())
        : launch(count_trainable_kernel<int64_t, false>, labels.ptr<int64_t>());
  }
  cuda::check_launch("count_trainable_kernel");
}

void position_ids_cuda(const TensorView& cu_seqlens, const TensorView& out, int64_t stream) {
  cuda::DeviceGuard guard(out);
  const cudaStream_t s = cuda::as_stream(stream);
  const int64_t tokens = out.numel();
  const int q = static_cast<int>(cu_seqlens.numel() - 1);
  if (tokens == 0) return;
  if (q == 0) {  // no sequences: nothing defines positions; zeros, as the CPU path rejects this input
    cuda::check(cudaMemsetAsync(out.data, 0, static_cast<size_t>(tokens) * dtype_size(out.dtype), s),
                "cudaMemsetAsync");
    return;
  }
  const bool vec = aligned16(out.data);
  const int32_t* cu = cu_seqlens.ptr<int32_t>();
  if (out.dtype == DType::i32) {
    vec ? position_ids_kernel<int32_t, true><<<tiles(tokens), kThreads, 0, s>>>(cu, q, tokens, out.ptr<int32_t>())
        : position_ids_kernel<int32_t, false><<<tiles(tokens), kThreads, 0, s>>>(cu, q, tokens, out.ptr<int32_t>());
  } else {
    vec ? position_ids_kernel<int64_t, true><<<tiles(tokens), kThreads, 0, s>>>(cu, q, tokens, out.ptr<int64_t>())
        : position_ids_kernel<int64_t, false><<<tiles(tokens), kThreads, 0, s>>>(cu, q, tokens, out.ptr<int64_t>());
  }
  cuda::check_launch("position_ids_kernel");
}

}  // namespace kindred
