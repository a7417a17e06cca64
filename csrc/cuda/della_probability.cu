// DELLA's keep probability (see della_probability.h): one thread block per row sorts the row's
// |δ| bits in shared memory with cub's block radix ranking, blocked arrangement in column order,
// so the stable ranking keeps equal magnitudes in column order (the reference's tie rule). Only
// the final position of each element is needed: the last pass ranks without exchanging, and the
// probabilities are staged in shared memory by column to leave in coalesced stores.
#include "cuda/della_probability.h"

#include "cuda/common.cuh"

#include <cub/block/block_exchange.cuh>
#include <cub/block/block_radix_rank.cuh>

#include <algorithm>
#include <climits>
#include <stdexcept>

namespace seme {
namespace cuda {
namespace {

constexpr uint32_t kPad = 0xFFFFFFFFu;  // past the row's end: every bit set, so after every key in
                                        // any bit range (ties fall to position: the padding is last)
// Digits of 6 bits: 5 passes over the 30 bits that small |δ| use. Without memoizing the counter
// scan in registers (33 of them), which measured faster on an H100 than cub's default 4 bits
// memoized, or than 5 or 7 bits.
constexpr int kRadixBits = 6;

template <int kThreads, int kItems>
struct RowSort {
  using Exchange = cub::BlockExchange<uint32_t, kThreads, kItems>;
  using Rank = cub::BlockRadixRank<kThreads, kRadixBits, false, false>;
  struct Storage {
    union {
      typename Exchange::TempStorage exchange;
      typename Rank::TempStorage rank;
      float prob[kThreads * kItems];  // by column
    };
    uint32_t varying;  // the key bits that differ within the row
  };
};

// Rows of at most kThreads * kItems columns, one per block at a time. Only the bits that vary
// within a row are sorted (none in a row of equal magnitudes); the others cannot change its order.
template <class T, int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads)
    della_kernel(const T* __restrict__ base, const T* __restrict__ x, float* __restrict__ prob, int64_t rows,
                 int cols, float p0, float eps, float span) {
  using Sort = RowSort<kThreads, kItems>;
  extern __shared__ __align__(16) unsigned char shared[];
  auto& s = *reinterpret_cast<typename Sort::Storage*>(shared);
  const int tid = threadIdx.x;
  if (tid == 0) s.varying = 0;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t start = row * cols;
    const uint32_t first = __float_as_uint(to_f32(x[start]) - to_f32(base[start])) & 0x7fffffffu;
    uint32_t key[kItems], column[kItems], varying = 0;
    int rank[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {  // striped: coalesced loads
      const int j = i * kThreads + tid;
      key[i] = j < cols ? __float_as_uint(to_f32(x[start + j]) - to_f32(base[start + j])) & 0x7fffffffu : kPad;
      if (j < cols) varying |= key[i] ^ first;
    }
    varying = __reduce_or_sync(0xffffffffu, varying);
    __syncthreads();  // the previous row's probabilities are read out, and s.varying reset
    if ((tid & 31) == 0) atomicOr(&s.varying, varying);
    __syncthreads();
    varying = s.varying;
    typename Sort::Exchange(s.exchange).StripedToBlocked(key, key);
#pragma unroll
    for (int i = 0; i < kItems; ++i) column[i] = rank[i] = tid * kItems + i;
    const int end = 32 - __clz(varying), begin = varying ? __ffs(varying) - 1 : end;
    for (int bit = begin; bit < end; bit += kRadixBits) {
      __syncthreads();
      typename Sort::Rank(s.rank).RankKeys(key, rank, cub::BFEDigitExtractor<uint32_t>(bit, min(kRadixBits, end - bit)));
      if (bit + kRadixBits >= end) break;  // rank: the final positions
      __syncthreads();
      typename Sort::Exchange(s.exchange).ScatterToBlocked(key, rank);
      __syncthreads();
      typename Sort::Exchange(s.exchange).ScatterToBlocked(column, rank);
    }
    __syncthreads();
    if (tid == 0) s.varying = 0;  // read by every thread before the barrier above
#pragma unroll
    for (int i = 0; i < kItems; ++i)  // float ops in the CPU kernel's order (built with --fmad=false)
      if (column[i] < uint32_t(cols)) s.prob[column[i]] = p0 + ((float(rank[i]) / span) * 2.0f) * eps;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = i * kThreads + tid;
      if (j < cols) prob[start + j] = s.prob[j];
    }
  }
}

template <class T, int kThreads, int kItems>
void launch(const void* base, const void* x, float* prob, int64_t rows, int cols, float p0, float eps,
            cudaStream_t stream) {
  const auto kernel = della_kernel<T, kThreads, kItems>;
  const int smem = int(sizeof(typename RowSort<kThreads, kItems>::Storage));
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "smem");
  const float span = float(std::max(cols - 1, 1));
  // A block per row: the hardware overlaps one block's loads with another's sort (measured faster on
  // an H100 than resident blocks that loop over rows and prefetch their next). Past 2^31 − 1 rows
  // the grid-stride loop takes the rest.
  const unsigned grid = unsigned(std::min<int64_t>(rows, INT_MAX));
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(base), static_cast<const T*>(x), prob, rows, cols,
                                           p0, eps, span);
  check(cudaGetLastError(), "della probability");
}

// The smallest block that holds the row.
template <class T>
void launch_for(const void* base, const void* x, float* prob, int64_t rows, int cols, float p0, float eps,
                cudaStream_t stream) {
  if (cols <= 1024) return launch<T, 256, 4>(base, x, prob, rows, cols, p0, eps, stream);
  if (cols <= 2048) return launch<T, 256, 8>(base, x, prob, rows, cols, p0, eps, stream);
  if (cols <= 4096) return launch<T, 256, 16>(base, x, prob, rows, cols, p0, eps, stream);
  if (cols <= 8192) return launch<T, 512, 16>(base, x, prob, rows, cols, p0, eps, stream);
  if (cols <= 11264) return launch<T, 512, 22>(base, x, prob, rows, cols, p0, eps, stream);  // 11008 columns
  if (cols <= 14336) return launch<T, 512, 28>(base, x, prob, rows, cols, p0, eps, stream);
  launch<T, 512, 32>(base, x, prob, rows, cols, p0, eps, stream);
}

}  // namespace

void della_probability(const void* base, const void* x, float* prob, int64_t rows, int64_t cols, int in_dtype,
                       float p0, float eps, uintptr_t stream) {
  if (cols < 1 || cols > kDellaMaxCols) throw std::invalid_argument("della_probability: cols must be in [1, 16384]");
  if (rows < 1) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (in_dtype) {
    case 0: return launch_for<float>(base, x, prob, rows, int(cols), p0, eps, s);
    case 1: return launch_for<__nv_bfloat16>(base, x, prob, rows, int(cols), p0, eps, s);
    case 2: return launch_for<__half>(base, x, prob, rows, int(cols), p0, eps, s);
  }
  throw std::invalid_argument("unsupported dtype code");
}

}  // namespace cuda
}  // namespace seme
