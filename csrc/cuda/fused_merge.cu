// Fused CUDA merge kernels (see fused_merge.h for the contract).
//
// Per tensor, with δ_k = x_k − base recomputed from the inputs at every pass:
//   selection (rank interval, SCE top-k): radix select on the composite (key << 32 | index) of the
//     keys' fp32 bits (|δ_k|, or the across-model variance), whose order is the tie rule's. The
//     key's top 11 bits come from a full-data histogram (shared-memory bins, flushed with global
//     atomics: integer sums, order-free), the cut's bin is collected into a buffer at offsets
//     fixed by the per-block counts of that histogram, and the remaining digits are read off the
//     buffer. One pick kernel per level and cut narrows the prefix and the rank left to place; the
//     decisions stay on the device. A bin too large for its buffer is finished on the full data;
//   sums (L1 rescale, SCE energies): per-tile fp32 partials, reduced in double in tile order;
//   ONE element pass: masks, rescale, weights, sign election, (weighted) mean, λ, output cast.
// Tiles are kThreads x kItems consecutive elements, each thread kItems of them; the order of
// floating operations per element is the reference's (compiled with --fmad=false).
#include "cuda/fused_merge.h"

#include "cuda/common.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>

namespace seme {
namespace cuda {
namespace {

constexpr int kThreads = 256, kItems = 4, kTile = kThreads * kItems;
// Resident blocks asked of the compiler for the streaming passes over M models' tiles (48 registers
// at 5, 64 at 4): the passes are latency-bound (bench.cuda_profile, ncu: stalls on the tile's loads
// and on dependent integer work). With bf16 / fp16 inputs of up to 4 models every load of a tile is
// issued before any use; at 5 blocks that made whole merges 2-23% faster on an H100 (bench/RESULTS.md).
// fp32's loads-first tile spilled at 5 blocks (1.3-1.8x slower), and registers left unbounded at one
// block (79) were slower too, so fp32 and 8 models keep one load in flight at a time.
template <int M>
constexpr int kMinBlocks = M <= 4 ? 5 : 4;
constexpr int kMaxRows = 2 * kMaxModels;  // cuts: at most two per model
constexpr int kMaxBins = 2048;
constexpr int kPickThreads = 1024;
constexpr uint32_t kAll = 0x80000000u;  // keys are < 2^31: a cut here has every element below it
enum { kNone = 0, kRank = 1, kRandom = 2, kDella = 3, kSce = 4 };
enum { kKeep = 0, kDrop = 1, kActive = 2 };

struct Cut {
  uint64_t c;      // the digits chosen so far of the composite (key << 32 | index); once decided,
                   // an element lies below the cut iff its composite is less than c
  int64_t room;    // the rank left to place inside the digits chosen so far
  uint32_t count;  // entries collected into the row's buffer
  int32_t done;    // decided
  int32_t slow;    // its level-0 bin outgrew the buffer: finished on the full data
  int32_t pad;
};

struct Args {
  const void* base;
  const void* x[kMaxModels];
  void* out;
  const float* prob[kMaxModels];
  int64_t n;
  int K, nblocks;
  int sparsify, nb;  // nb: cuts per selection key (rank: 1 TIES, 2 breadcrumbs; SCE: 1 when selecting)
  int consensus, normalize, rescale, vec;
  float lambda, divisor;
  double tau, inv_k;  // inv_k: RN(1 / K), SCE's variance
  int mode[kMaxModels];
  float weight[kMaxModels], p0[kMaxModels];
  uint32_t key_lo[kMaxModels], key_hi[kMaxModels];
  // workspace
  Cut* cut;
  uint32_t* hist;
  unsigned long long* zeros;
  uint32_t* eq;      // [row][tile]: elements equal to the cut, then their exclusive prefix (slow rows);
                     // [row][level-0 block]: the block's first slot in the row's buffer (fast rows)
  uint32_t* blockhist;  // [level-0 block][key][kMaxBins]: each block's level-0 histogram
  uint64_t* buffer;  // [row][cap]: the level-0 bin's entries (fast rows)
  int64_t cap;
  float* partial;    // [model][2][tile]
  float* coef;       // [model]: rescale factor, or SCE η
};

// ------------------------------------------------------------ element access

// kItems consecutive elements in one aligned access (16 bytes of fp32, 8 of bf16 / fp16): raw() loads
// the words, unpack() converts them, so that a tile's loads can all be issued before any conversion.
template <class T>
struct Packed;
template <>
struct Packed<float> {
  using Raw = float4;
  static __device__ __forceinline__ Raw raw(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
  static __device__ __forceinline__ void unpack(Raw w, float v[kItems]) { v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w; }
  static __device__ __forceinline__ void store(float* p, const float v[kItems]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <class T>
struct Packed16 {  // bf16 / fp16: element 2q is the low half of word q (little endian)
  using Raw = uint2;
  static __device__ __forceinline__ float half(uint32_t w) { return to_f32(from_bits(uint16_t(w))); }
  static __device__ __forceinline__ T from_bits(uint16_t b);
  static __device__ __forceinline__ Raw raw(const T* p) { return __ldg(reinterpret_cast<const uint2*>(p)); }
  static __device__ __forceinline__ void unpack(Raw w, float v[kItems]) {
    v[0] = half(w.x), v[1] = half(w.x >> 16), v[2] = half(w.y), v[3] = half(w.y >> 16);
  }
  static __device__ __forceinline__ void store(T* p, const float v[kItems]) {
    uint16_t b[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      T y;
      from_f32(v[j], y);
      b[j] = bits(y);
    }
    *reinterpret_cast<uint2*>(p) = make_uint2(b[0] | uint32_t(b[1]) << 16, b[2] | uint32_t(b[3]) << 16);
  }
  static __device__ __forceinline__ uint16_t bits(T y);
};
template <>
__device__ __forceinline__ __nv_bfloat16 Packed16<__nv_bfloat16>::from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }
template <>
__device__ __forceinline__ uint16_t Packed16<__nv_bfloat16>::bits(__nv_bfloat16 y) { return __bfloat16_as_ushort(y); }
template <>
__device__ __forceinline__ __half Packed16<__half>::from_bits(uint16_t b) { return __ushort_as_half(b); }
template <>
__device__ __forceinline__ uint16_t Packed16<__half>::bits(__half y) { return __half_as_ushort(y); }
template <>
struct Packed<__nv_bfloat16> : Packed16<__nv_bfloat16> {};
template <>
struct Packed<__half> : Packed16<__half> {};

// v[j] = p[i + j] (0 past n), i a multiple of kItems.
template <class T>
__device__ __forceinline__ void load(const void* ptr, int64_t i, const Args& a, float v[kItems]) {
  const T* p = static_cast<const T*>(ptr);
  if (a.vec && i + kItems <= a.n) {
    Packed<T>::unpack(Packed<T>::raw(p + i), v);
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) v[j] = i + j < a.n ? to_f32(p[i + j]) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store(void* ptr, int64_t i, const Args& a, const float v[kItems]) {
  T* p = static_cast<T*>(ptr);
  if (a.vec && i + kItems <= a.n) {
    Packed<T>::store(p + i, v);
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j)
      if (i + j < a.n) from_f32(v[j], p[i + j]);
  }
}

__device__ __forceinline__ uint32_t key_of(float x) { return __float_as_uint(x) & 0x7fffffffu; }

// x / d correctly rounded, given inv = RN(1 / d), without a division (a double division is a
// dozen dependent instructions, which left SCE's passes compute-bound): Markstein's correction of
// x·inv by its exact remainder. It is the correctly rounded quotient for finite nonzero x away from
// underflow (here: squares of float deltas); zeros and infinities may differ in sign or turn NaN,
// which variance() never tells apart (keys drop the sign; an infinite δ makes m2 NaN either way).
__device__ __forceinline__ double divide(double x, double d, double inv) {
  const double q = x * inv;
  return fma(fma(-q, d, x), inv, q);
}

// The across-model variance as torch computes it on CPU: Welford in double, rounded to float.
template <int M>
__device__ __forceinline__ float variance(const float d[M][kItems], int K, double inv_k, int j) {
  double mean = 0.0, m2 = 0.0;
#pragma unroll
  for (int k = 0; k < M; ++k) {
    if (k < K) {
      const double x = d[k][j], dev = x - mean;
      mean = mean + ((k + 1) & k ? divide(dev, k + 1, 1.0 / (k + 1)) : dev * (1.0 / (k + 1)));  // 2^m: exact
      m2 = m2 + dev * (x - mean);
    }
  }
  return float(divide(m2, K, inv_k));
}

// Philox4x32-10 of counter (c, 0, 0) under (k0, k1): words of elements 4c .. 4c + 3 (seme.methods.rng).
__device__ __forceinline__ void uniforms(uint64_t c, uint32_t k0, uint32_t k1, float u[kItems]) {
  uint32_t c0 = uint32_t(c), c1 = uint32_t(c >> 32), c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hb = __umulhi(0xCD9E8D57u, c2), lb = 0xCD9E8D57u * c2;
    const uint32_t ha = __umulhi(0xD2511F53u, c0), la = 0xD2511F53u * c0;
    c0 = hb ^ c1 ^ k0;
    c1 = lb;
    c2 = ha ^ c3 ^ k1;
    c3 = la;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  u[0] = float(c0 >> 8) * 0x1p-24f;
  u[1] = float(c1 >> 8) * 0x1p-24f;
  u[2] = float(c2 >> 8) * 0x1p-24f;
  u[3] = float(c3 >> 8) * 0x1p-24f;
}

// A tile: base and every δ_k of the thread's kItems elements.
template <class T, int M>
__device__ __forceinline__ void load_tile(const Args& a, int64_t i, float b[kItems], float d[M][kItems]) {
  if (sizeof(T) == 2 && M <= 4 && a.vec && i + kItems <= a.n) {
    // Every input's words are loaded before any is converted (see kMinBlocks).
    using P = Packed<T>;
    typename P::Raw w[M + 1];
    w[0] = P::raw(static_cast<const T*>(a.base) + i);
#pragma unroll
    for (int k = 0; k < M; ++k)
      if (k < a.K) w[k + 1] = P::raw(static_cast<const T*>(a.x[k]) + i);
    P::unpack(w[0], b);
#pragma unroll
    for (int k = 0; k < M; ++k) {
      if (k < a.K) {
        P::unpack(w[k + 1], d[k]);
#pragma unroll
        for (int j = 0; j < kItems; ++j) d[k][j] = d[k][j] - b[j];
      }
    }
    return;
  }
  load<T>(a.base, i, a, b);
#pragma unroll
  for (int k = 0; k < M; ++k) {
    if (k < a.K) {
      load<T>(a.x[k], i, a, d[k]);
#pragma unroll
      for (int j = 0; j < kItems; ++j) d[k][j] = d[k][j] - b[j];
    }
  }
}

using BlockScan = cub::BlockScan<int, kThreads>;
using BlockSum = cub::BlockReduce<float, kThreads>;

// Whether the element (key, index) lies below a decided cut: the cut is the (key, index) pair of the
// first element kept, so equal keys split by index, lowest first (the reference's tie rule).
__device__ __forceinline__ bool below(uint64_t cut, uint32_t key, int64_t i) {
  return ((uint64_t(key) << 32) | uint64_t(i)) < cut;
}

// keep[j] of model k's δ under its sparsification (rank cuts, DARE or DELLA draws).
__device__ __forceinline__ void keep_mask(const Args& a, int k, int64_t i, const float d[kItems], bool keep[kItems]) {
  if (a.sparsify == kRank) {
    const uint64_t lo = a.cut[k * a.nb].c, hi = a.nb == 2 ? a.cut[k * 2 + 1].c : ~uint64_t(0);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const uint32_t key = key_of(d[j]);
      keep[j] = !below(lo, key, i + j) && below(hi, key, i + j);
    }
    return;
  }
  float u[kItems];
  uniforms(uint64_t(i) >> 2, a.key_lo[k], a.key_hi[k], u);
  if (a.sparsify == kRandom) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) keep[j] = u[j] < a.p0[k];
  } else {
    float p[kItems];
    load<float>(a.prob[k], i, a, p);
#pragma unroll
    for (int j = 0; j < kItems; ++j) keep[j] = u[j] < p[j];
  }
}

// SCE: selected[j], the elements whose variance is not below the cut.
template <int M>
__device__ __forceinline__ void sce_selected(const Args& a, int64_t i, const float d[M][kItems], bool selected[kItems]) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) selected[j] = !a.nb || !below(a.cut[0].c, key_of(variance<M>(d, a.K, a.inv_k, j)), i + j);
}

// ------------------------------------------------------------ selection kernels
//
// A cut is found digit by digit on the composite (key << 32 | index), whose order is the tie rule's.
// Level 0 (the key's top 11 bits) histograms the full data. Its bin is then collected into the row's
// buffer (one more full pass, which also histograms level 1) and the remaining digits (key: 10 + 10
// bits, index: 11 + 11 + 10) are read off the buffer alone. A bin that outgrows the buffer (keys
// piled on a few values) takes the slow path instead: the key's digits from full passes, then the
// rank among equal keys from per-tile counts of the equal elements.

struct Ranks {
  int64_t r[kMaxRows];
};

__global__ void init_cuts(Cut* cut, int rows, Ranks rank) {
  const int t = threadIdx.x;
  if (t < rows) cut[t] = Cut{0, rank.r[t], 0u, 0, 0, 0};
}

struct Level {
  int shift, bits;  // of the composite (key << 32 | index)
};
__host__ __device__ constexpr Level level_of(int level) {
  return level == 0 ? Level{52, 11} : level == 1 ? Level{42, 10} : level == 2 ? Level{32, 10}
       : level == 3 ? Level{21, 11} : level == 4 ? Level{10, 11} : Level{0, 10};
}
constexpr int kKeyLevels = 3, kLevels = 6;
enum Path { kFirst = 0, kSlow = 1, kBuffer = 2 };  // which rows a level serves

__device__ __forceinline__ bool serves(const Cut& c, int path) {
  return !c.done && (path == kFirst || (path == kSlow) == bool(c.slow));
}

__device__ __forceinline__ bool any_row(const Args& a, int rows, int path) {
  bool any = false;
  for (int r = 0; r < rows; ++r) any |= serves(a.cut[r], path);
  return any;
}

// The selection key of row `row` (the model's |δ|, or SCE's variance) for a tile of elements.
template <int M>
__device__ __forceinline__ void row_keys(const Args& a, int row, const float d[M][kItems], uint32_t key[kItems]) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (a.sparsify == kSce) {
      key[j] = key_of(variance<M>(d, a.K, a.inv_k, j));
    } else {
      float x = 0.0f;
#pragma unroll
      for (int k = 0; k < M; ++k)
        if (k == row / a.nb) x = d[k][j];
      key[j] = key_of(x);
    }
  }
}

// Full-data levels (0: every key; 1, 2: the slow rows): hist[h][digit] += elements whose key matches
// cut h's prefix above the level's digit. Level 0 has no prefix: one histogram per key (model)
// serves its cuts. Grid-stride, shared-memory bins.
template <class T, int M>
__global__ void __launch_bounds__(kThreads, kMinBlocks<M>) hist_kernel(Args a, int level, int rows) {
  extern __shared__ uint32_t bins[];
  if (level > 0 && !any_row(a, rows, kSlow)) return;
  const Level lv = level_of(level);
  const int nbins = 1 << lv.bits, shift = lv.shift - 32, top = shift + lv.bits;
  const bool sce = a.sparsify == kSce;
  const int nkeys = sce ? 1 : a.K;
  const int nh = level == 0 ? nkeys : rows;
  for (int e = threadIdx.x; e < nh * nbins; e += kThreads) bins[e] = 0;
  __syncthreads();
  unsigned long long zeros = 0;
  const int64_t groups = (a.n + kItems - 1) / kItems;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const int64_t i = g * kItems;
    float b[kItems], d[M][kItems];
    uint32_t key[kItems];
    bool valid[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) valid[j] = i + j < a.n;
    load_tile<T, M>(a, i, b, d);  // every input's loads in flight at once
    if (sce) {
#pragma unroll
      for (int j = 0; j < kItems; ++j) key[j] = key_of(variance<M>(d, a.K, a.inv_k, j));
    }
#pragma unroll
    for (int s = 0; s < M; ++s) {
      if (s >= nkeys) break;
      if (!sce) {
        if (a.mode[s] != kActive) continue;
#pragma unroll
        for (int j = 0; j < kItems; ++j) key[j] = key_of(d[s][j]);
      }
      if (level == 0) {
        // Plain shared atomics: lanes that share a bin replay, which costs far less than grouping
        // them first with __match_any_sync (H100, 3 x 64M fp32 keys: 0.13 against 0.40 ms). A whole
        // group (all but the tail) skips the per-element bound tests.
        if (valid[kItems - 1]) {
#pragma unroll
          for (int j = 0; j < kItems; ++j) atomicAdd(&bins[s * nbins + (key[j] >> shift)], 1u);
        } else {
#pragma unroll
          for (int j = 0; j < kItems; ++j)
            if (valid[j]) atomicAdd(&bins[s * nbins + (key[j] >> shift)], 1u);
        }
        if (sce) {
#pragma unroll
          for (int j = 0; j < kItems; ++j) zeros += valid[j] && key[j] == 0;
        }
        continue;
      }
      for (int c = 0; c < a.nb; ++c) {
        const int row = s * a.nb + c;
        const Cut cut = a.cut[row];
        if (!serves(cut, kSlow)) continue;
        const uint32_t prefix = uint32_t(cut.c >> 32) >> top;
#pragma unroll
        for (int j = 0; j < kItems; ++j)
          if (valid[j] && (key[j] >> top) == prefix)
            atomicAdd(&bins[row * nbins + ((key[j] >> shift) & (nbins - 1))], 1u);
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nh * nbins; e += kThreads) {
    if (bins[e]) atomicAdd(&a.hist[size_t(e / nbins) * kMaxBins + e % nbins], bins[e]);
    if (level == 0) a.blockhist[size_t(blockIdx.x) * nh * kMaxBins + e] = bins[e];  // nbins == kMaxBins
  }
  if (sce && level == 0) {
    using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    const unsigned long long total = Reduce(tmp).Sum(zeros);
    if (threadIdx.x == 0 && total) atomicAdd(a.zeros, total);
  }
}

// The buffer's levels: hist[row][digit] += the row's collected entries that match its prefix.
// Grid: (blocks over the entries, rows).
__global__ void __launch_bounds__(kThreads) buffer_hist_kernel(Args a, int level) {
  __shared__ uint32_t bins[kMaxBins];
  const int row = blockIdx.y;
  const Cut cut = a.cut[row];
  if (!serves(cut, kBuffer)) return;
  const Level lv = level_of(level);
  const int nbins = 1 << lv.bits, top = lv.shift + lv.bits;
  for (int e = threadIdx.x; e < nbins; e += kThreads) bins[e] = 0;
  __syncthreads();
  const uint64_t* entry = a.buffer + size_t(row) * a.cap;
  const uint64_t prefix = cut.c >> top;
  for (int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x; q < cut.count; q += int64_t(gridDim.x) * kThreads) {
    const uint64_t e = entry[q];
    if ((e >> top) == prefix) atomicAdd(&bins[(e >> lv.shift) & (nbins - 1)], 1u);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nbins; e += kThreads)
    if (bins[e]) atomicAdd(&a.hist[size_t(row) * kMaxBins + e], bins[e]);
}

// One block per cut: the digit holding the rank left to place, and the rank left within it. A cut
// whose remaining rank takes its whole digit is decided there: it starts at the next digit.
__global__ void __launch_bounds__(kPickThreads) pick_kernel(Args a, int level, int path) {
  const int row = blockIdx.x;
  Cut* cut = a.cut + row;
  if (!serves(*cut, path)) return;
  const Level lv = level_of(level);
  const int nbins = 1 << lv.bits;
  int64_t rank = cut->room;
  if (level == 0) {
    if (a.sparsify == kSce)  // keep the int(#nonzero · topk) largest variances
      rank = a.n - int64_t(double(a.n - int64_t(*a.zeros)) * a.tau);
    if (rank <= 0 || rank >= a.n) {  // nothing, or everything, below
      if (threadIdx.x == 0) *cut = Cut{rank <= 0 ? 0 : uint64_t(kAll) << 32, 0, 0u, 1, 0, 0};
      return;
    }
  }
  const uint32_t* h = a.hist + size_t(level == 0 ? row / a.nb : row) * kMaxBins;
  constexpr int per = kMaxBins / kPickThreads;
  unsigned long long count[per], incl[per];
#pragma unroll
  for (int q = 0; q < per; ++q) {
    const int bin = threadIdx.x * per + q;
    count[q] = bin < nbins ? h[bin] : 0;
  }
  using Scan = cub::BlockScan<unsigned long long, kPickThreads>;
  __shared__ typename Scan::TempStorage tmp;
  Scan(tmp).InclusiveSum(count, incl);
#pragma unroll
  for (int q = 0; q < per; ++q) {
    const unsigned long long r = (unsigned long long)rank;
    if (incl[q] >= r && incl[q] - count[q] < r) {  // exactly one bin holds the rank
      const uint64_t digit = threadIdx.x * per + q;
      Cut c = *cut;
      c.c |= digit << lv.shift;
      c.room = rank - int64_t(incl[q] - count[q]);
      if (c.room == int64_t(count[q])) {  // the whole digit lies below
        c.c += uint64_t(1) << lv.shift;
        c.done = 1;
      } else if (level == 0) {
        c.slow = count[q] > uint64_t(a.cap);
      }
      *cut = c;
    }
  }
}

// Fast rows: each level-0 block's first slot in the row's buffer, the exclusive prefix over blocks of
// their counts in the row's bin (one block per row). The row's count is the bin's.
__global__ void __launch_bounds__(kPickThreads) offsets_kernel(Args a, int blocks) {
  const int row = blockIdx.x;
  if (!serves(a.cut[row], kBuffer)) return;
  const bool sce = a.sparsify == kSce;
  const int nkeys = sce ? 1 : a.K, key = sce ? 0 : row / a.nb;
  const uint32_t bin = uint32_t(a.cut[row].c >> 52);
  uint32_t* start = a.eq + size_t(row) * a.nblocks;
  using Scan = cub::BlockScan<uint32_t, kPickThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ uint32_t carry;
  if (threadIdx.x == 0) carry = 0;
  for (int first = 0; first < blocks; first += kPickThreads) {
    const int b = first + threadIdx.x;
    const uint32_t v = b < blocks ? a.blockhist[(size_t(b) * nkeys + key) * kMaxBins + bin] : 0;
    uint32_t before, total;
    __syncthreads();
    Scan(tmp).ExclusiveSum(v, before, total);
    const uint32_t base = carry;
    if (b < blocks) start[b] = base + before;
    __syncthreads();
    if (threadIdx.x == 0) carry = base + total;
  }
  __syncthreads();
  if (threadIdx.x == 0) a.cut[row].count = carry;
}

// The fast rows' level-0 bins: each element of the bin goes to its row's buffer as (key << 32 |
// index), at its block's offset (offsets_kernel) plus a slot reserved by one shared atomic per warp.
// Same grid and element order as level 0's histogram, so the block's count is the one offsets_kernel
// summed. No global atomics, no block barriers in the loop: a shared-memory stage flushed by the
// block, or a global counter per row, left the pass at 3x a plain read (H100). The order of entries
// is free: they only feed histograms. Level 1's histogram (key bits 19..10) is taken on the way.
template <class T, int M>
__global__ void __launch_bounds__(kThreads, kMinBlocks<M>) collect_kernel(Args a, int rows) {
  constexpr int kNext = 1 << level_of(1).bits;
  extern __shared__ uint32_t next_bins[];  // [rows][kNext]
  __shared__ uint32_t slot_of[kMaxRows];   // the block's next free slot in each row's buffer
  if (!any_row(a, rows, kBuffer)) return;
  for (int e = threadIdx.x; e < rows * kNext; e += kThreads) next_bins[e] = 0;
  for (int r = threadIdx.x; r < rows; r += kThreads) slot_of[r] = a.eq[size_t(r) * a.nblocks + blockIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const bool sce = a.sparsify == kSce;
  const int nkeys = sce ? 1 : a.K;
  const int64_t groups = (a.n + kItems - 1) / kItems;
  // Block-uniform trip count: every lane of a warp reaches the shuffles.
  for (int64_t g0 = int64_t(blockIdx.x) * kThreads; g0 < groups; g0 += int64_t(gridDim.x) * kThreads) {
    const int64_t i = (g0 + threadIdx.x) * kItems;
    float b[kItems], d[M][kItems];
    load_tile<T, M>(a, i, b, d);
    uint32_t key[kItems];
    if (sce) {
#pragma unroll
      for (int j = 0; j < kItems; ++j) key[j] = key_of(variance<M>(d, a.K, a.inv_k, j));
    }
    // Models unrolled (their δ stay in registers), cuts of each model's key within.
#pragma unroll
    for (int s = 0; s < M; ++s) {
      if (s >= nkeys) break;
      if (!sce) {
#pragma unroll
        for (int j = 0; j < kItems; ++j) key[j] = key_of(d[s][j]);
      }
      for (int c = 0; c < a.nb; ++c) {
        const int row = s * a.nb + c;
        const Cut cut = a.cut[row];
        if (!serves(cut, kBuffer)) continue;
        const uint32_t prefix = uint32_t(cut.c >> 52);
        bool in[kItems];
        int mine = 0;
#pragma unroll
        for (int j = 0; j < kItems; ++j) mine += in[j] = i + j < a.n && (key[j] >> 20) == prefix;
        int upto = mine;  // inclusive prefix over the warp's lanes
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xffffffffu, upto, o);
          if (lane >= o) upto += y;
        }
        const int total = __shfl_sync(0xffffffffu, upto, 31);
        if (!total) continue;
        uint32_t first = 0;
        if (lane == 31) first = atomicAdd(&slot_of[row], uint32_t(total));
        first = __shfl_sync(0xffffffffu, first, 31) + uint32_t(upto - mine);
        uint64_t* slot = a.buffer + size_t(row) * a.cap + first;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          if (!in[j]) continue;
          *slot++ = (uint64_t(key[j]) << 32) | uint64_t(i + j);
          atomicAdd(&next_bins[row * kNext + ((key[j] >> 10) & (kNext - 1))], 1u);
        }
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < rows * kNext; e += kThreads)
    if (next_bins[e]) atomicAdd(&a.hist[size_t(e / kNext) * kMaxBins + e % kNext], next_bins[e]);
}

// Slow rows: which of a tile's elements have the key of row r's cut, and how many.
template <int M>
__device__ __forceinline__ int equal_to_cut(const Args& a, int r, int64_t i, const float d[M][kItems],
                                            bool equal[kItems]) {
  uint32_t key[kItems];
  row_keys<M>(a, r, d, key);
  const uint32_t v = uint32_t(a.cut[r].c >> 32);
  int count = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) count += equal[j] = i + j < a.n && key[j] == v;
  return count;
}

// Slow rows: eq[row][tile] = elements of the tile whose key equals the cut's key.
template <class T, int M>
__global__ void __launch_bounds__(kThreads) count_kernel(Args a, int rows) {
  if (!any_row(a, rows, kSlow)) return;
  using Count = cub::BlockReduce<int, kThreads>;
  __shared__ typename Count::TempStorage tmp;
  for (int tile = blockIdx.x; tile < a.nblocks; tile += gridDim.x) {
    const int64_t i = (int64_t(tile) * kThreads + threadIdx.x) * kItems;
    float b[kItems], d[M][kItems];
    load_tile<T, M>(a, i, b, d);
    for (int r = 0; r < rows; ++r) {
      if (!serves(a.cut[r], kSlow)) continue;
      bool equal[kItems];
      const int mine = equal_to_cut<M>(a, r, i, d, equal);
      __syncthreads();
      const int total = Count(tmp).Sum(mine);
      if (threadIdx.x == 0) a.eq[size_t(r) * a.nblocks + tile] = uint32_t(total);
    }
  }
}

// In place: eq[row][*] -> its exclusive prefix over tiles (one block per slow row).
__global__ void __launch_bounds__(kPickThreads) scan_kernel(Args a) {
  if (!serves(a.cut[blockIdx.x], kSlow)) return;
  uint32_t* e = a.eq + size_t(blockIdx.x) * a.nblocks;
  using Scan = cub::BlockScan<uint32_t, kPickThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ uint32_t carry;
  if (threadIdx.x == 0) carry = 0;
  for (int start = 0; start < a.nblocks; start += kPickThreads) {
    const int t = start + threadIdx.x;
    const uint32_t v = t < a.nblocks ? e[t] : 0;
    uint32_t before, total;
    __syncthreads();
    Scan(tmp).ExclusiveSum(v, before, total);
    const uint32_t base = carry;
    if (t < a.nblocks) e[t] = base + before;
    __syncthreads();
    if (threadIdx.x == 0) carry = base + total;
  }
}

// Slow rows: the tile holding equal element number `room` (index order) writes its index into the cut.
template <class T, int M>
__global__ void __launch_bounds__(kThreads) locate_kernel(Args a, int rows) {
  if (!any_row(a, rows, kSlow)) return;
  __shared__ BlockScan::TempStorage scan;
  for (int tile = blockIdx.x; tile < a.nblocks; tile += gridDim.x) {
    const int64_t i = (int64_t(tile) * kThreads + threadIdx.x) * kItems;
    for (int r = 0; r < rows; ++r) {
      const Cut c = a.cut[r];  // the block that decides this row is the only one past the test below
      if (!serves(c, kSlow)) continue;
      const uint32_t* e = a.eq + size_t(r) * a.nblocks;
      const int64_t first = e[tile], end = tile + 1 < a.nblocks ? e[tile + 1] : int64_t(1) << 40;
      if (c.room < first || c.room >= end) continue;
      float b[kItems], d[M][kItems];
      load_tile<T, M>(a, i, b, d);
      bool equal[kItems];
      int before;
      BlockScan(scan).ExclusiveSum(equal_to_cut<M>(a, r, i, d, equal), before);
      __syncthreads();
      int64_t pos = first + before;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        if (equal[j] && pos++ == c.room) {
          a.cut[r].c = (c.c & ~uint64_t(0xffffffffu)) | uint64_t(i + j);
          a.cut[r].done = 1;
        }
      }
    }
  }
}

// ------------------------------------------------------------ sums and the element pass

// Family L1 rescale: partial[k][0][tile] = Σ|δ_k|, partial[k][1][tile] = Σ|kept δ_k| (active models).
// SCE: partial[k][1][tile] = Σ (selected δ_k)² (and 0 for [0]). A resident grid strides over the tiles.
template <class T, int M>
__global__ void __launch_bounds__(kThreads, kMinBlocks<M>) sums_kernel(Args a) {
  __shared__ BlockSum::TempStorage sum;
  const bool sce = a.sparsify == kSce;
  for (int64_t tile = blockIdx.x; tile < a.nblocks; tile += gridDim.x) {
    const int64_t i = (tile * kThreads + threadIdx.x) * kItems;
    float b[kItems], d[M][kItems];
    bool keep[kItems];
    load_tile<T, M>(a, i, b, d);  // zeros past n: they add nothing
    if (sce) sce_selected<M>(a, i, d, keep);
#pragma unroll
    for (int k = 0; k < M; ++k) {
      if (k >= a.K) continue;
      float before = 0.0f, after = 0.0f;
      if (sce) {
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const float x = keep[j] ? d[k][j] : 0.0f;
          after += x * x;
        }
      } else {
        if (a.mode[k] != kActive) continue;
        bool kept[kItems];
        keep_mask(a, k, i, d[k], kept);
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          before += fabsf(d[k][j]);
          after += kept[j] ? fabsf(d[k][j]) : 0.0f;
        }
      }
      float total_before = 0.0f;
      if (!sce) {
        __syncthreads();
        total_before = BlockSum(sum).Sum(before);
      }
      __syncthreads();
      const float total_after = BlockSum(sum).Sum(after);
      if (threadIdx.x == 0) {
        a.partial[(size_t(k) * 2) * a.nblocks + tile] = total_before;
        a.partial[(size_t(k) * 2 + 1) * a.nblocks + tile] = total_after;
      }
    }
  }
}

// One block: the per-model coefficients from the partial sums, reduced in double in tile order
// (fixed per-thread strides and a fixed tree: deterministic).
__global__ void __launch_bounds__(kPickThreads) coef_kernel(Args a) {
  using Reduce = cub::BlockReduce<double, kPickThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ double sums[kMaxModels][2];
  for (int k = 0; k < a.K; ++k)
    for (int s = 0; s < 2; ++s) {
      double acc = 0.0;
      for (int t = threadIdx.x; t < a.nblocks; t += kPickThreads) acc += a.partial[(size_t(k) * 2 + s) * a.nblocks + t];
      __syncthreads();
      const double total = Reduce(tmp).Sum(acc);
      if (threadIdx.x == 0) sums[k][s] = total;
    }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (a.sparsify == kSce) {  // η_k ∝ mean of the selected δ_k², uniform when all vanish
    double total = 0.0;
    for (int k = 0; k < a.K; ++k) total += (sums[k][1] /= double(a.n));
    for (int k = 0; k < a.K; ++k) a.coef[k] = fabs(total) >= 1e-6 ? float(sums[k][1] / total) : 1.0f / a.K;
    return;
  }
  for (int k = 0; k < a.K; ++k) {
    const bool apply = a.rescale && a.mode[k] == kActive && sums[k][0] >= 1e-7 && sums[k][1] >= 1e-7;
    a.coef[k] = apply ? float(sums[k][0] / sums[k][1]) : 1.0f;
  }
}

// The merged elements of one tile from its loaded inputs.
template <class O, int M>
__device__ __forceinline__ void merge_tile(const Args& a, int64_t i, const float b[kItems], float d[M][kItems]) {
  const bool sce = a.sparsify == kSce;
  if (sce) {
    bool selected[kItems];
    sce_selected<M>(a, i, d, selected);
#pragma unroll
    for (int k = 0; k < M; ++k)
#pragma unroll
      for (int j = 0; j < kItems; ++j) d[k][j] = selected[j] ? d[k][j] : 0.0f;
  } else {
#pragma unroll
    for (int k = 0; k < M; ++k) {
      if (k >= a.K) continue;
      if (a.mode[k] == kDrop) {
#pragma unroll
        for (int j = 0; j < kItems; ++j) d[k][j] = 0.0f;
      } else if (a.mode[k] == kActive && a.sparsify != kNone) {
        bool kept[kItems];
        keep_mask(a, k, i, d[k], kept);
#pragma unroll
        for (int j = 0; j < kItems; ++j) d[k][j] = kept[j] ? d[k][j] : 0.0f;
        if (a.rescale) {
          const float s = a.coef[k];
#pragma unroll
          for (int j = 0; j < kItems; ++j) d[k][j] = d[k][j] * s;
        }
      }
#pragma unroll
      for (int j = 0; j < kItems; ++j) d[k][j] = d[k][j] * a.weight[k];
    }
  }
  float out[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < M; ++k)
      if (k < a.K) total = total + d[k][j];
    float mixed = total;
    if (a.consensus) {
      const bool positive = total >= 0.0f;  // "sum" sign election, ties to +
      float acc = 0.0f, norm = 0.0f;
#pragma unroll
      for (int k = 0; k < M; ++k) {
        if (k >= a.K) continue;
        const bool agree = positive ? d[k][j] > 0.0f : d[k][j] < 0.0f;  // zeros never count
        const float w = sce ? a.coef[k] : a.weight[k];
        if (agree) {
          acc = acc + (sce ? d[k][j] * w : d[k][j]);
          norm = norm + w;
        }
      }
      if (sce) mixed = acc / fmaxf(norm, 1e-6f);
      else if (a.normalize) mixed = acc / (norm == 0.0f ? 1.0f : norm);
      else mixed = acc;
    } else if (a.normalize) {
      mixed = mixed / a.divisor;
    }
    if (a.lambda != 1.0f) mixed = mixed * a.lambda;
    out[j] = b[j] + mixed;
  }
  store<O>(a.out, i, a, out);
}

// A resident grid striding over the tiles: against a block per tile, whole merges took up to 19%
// less time on an H100 (bf16 task arithmetic; none slower beyond noise). Two tiles' loads in flight
// per thread measured slower (72 registers against 48).
template <class T, class O, int M>
__global__ void __launch_bounds__(kThreads, kMinBlocks<M>) merge_kernel(Args a) {
  for (int64_t tile = blockIdx.x; tile < a.nblocks; tile += gridDim.x) {
    const int64_t i = (tile * kThreads + threadIdx.x) * kItems;
    float b[kItems], d[M][kItems];
    load_tile<T, M>(a, i, b, d);
    merge_tile<O, M>(a, i, b, d);
  }
}

// ------------------------------------------------------------ host side

template <class F>
void with_dtype(int code, F&& f) {
  switch (code) {
    case 0: return f(float{});
    case 1: return f(__nv_bfloat16{});
    case 2: return f(__half{});
  }
  throw std::invalid_argument("unsupported dtype code");
}

// f(input dtype tag, models held in registers: 4 or 8). Four cover the usual merges with half the
// registers, which lets more blocks share a multiprocessor.
template <class F>
void with_inputs(int dtype, int K, F&& f) {
  with_dtype(dtype, [&](auto tag) {
    if (K <= 4) f(tag, std::integral_constant<int, 4>{});
    else f(tag, std::integral_constant<int, kMaxModels>{});
  });
}

size_t align(size_t x) { return (x + 255) & ~size_t(255); }

// Selection buffers hold a level-0 bin: an eighth of the keys, the most a bin of smooth data holds
// (a bin spans an eighth of an octave); keys piled on fewer values take the slow path.
int64_t buffer_capacity(int64_t n) { return n / 8 + 1024; }

int multiprocessors() {
  int device = 0, count = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "device attribute");
  return count;
}

// The most blocks of kThreads a grid-stride pass over n elements runs: one wave of resident blocks.
int64_t resident_bound(int64_t n) {
  int device = 0, threads = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device), "device attribute");
  return std::min<int64_t>((n + kTile - 1) / kTile, int64_t(threads / kThreads) * multiprocessors());
}

struct Layout {
  size_t cut, hist, zeros, eq, partial, coef, blockhist, buffer, total;
  Layout(int64_t n, int rows) {
    const size_t tiles = size_t((n + kTile - 1) / kTile);
    cut = 0;
    hist = align(cut + sizeof(Cut) * kMaxRows);
    zeros = align(hist + sizeof(uint32_t) * kMaxRows * kMaxBins);
    eq = align(zeros + sizeof(unsigned long long));
    partial = align(eq + sizeof(uint32_t) * kMaxRows * tiles);
    coef = align(partial + sizeof(float) * 2 * kMaxModels * tiles);
    blockhist = align(coef + sizeof(float) * kMaxModels);  // level 0 histograms ≤ rows keys
    buffer = align(blockhist + (rows ? sizeof(uint32_t) * kMaxBins * size_t(rows) * size_t(resident_bound(n)) : 0));
    total = align(buffer + sizeof(uint64_t) * size_t(rows) * size_t(buffer_capacity(n)));
  }
};

Args prepare(const Launch& t, int rows) {
  const int K = int(t.others.size());
  if (rows > t.rows) throw std::invalid_argument("the workspace holds fewer selection rows than the merge needs");
  if (K < 1 || K > kMaxModels) throw std::invalid_argument("the CUDA kernels take 1 to 8 non-base models");
  if (t.n < 1 || t.n >= (int64_t(1) << 32)) throw std::invalid_argument("tensor size must be in [1, 2^32)");
  Args a{};
  a.base = t.base;
  a.out = t.out;
  a.n = t.n;
  a.K = K;
  a.inv_k = 1.0 / K;
  a.nblocks = int((t.n + kTile - 1) / kTile);
  a.lambda = 1.0f;
  a.divisor = 1.0f;
  const size_t in_size = t.in_dtype == 0 ? 4 : 2, out_size = t.out_dtype == 0 ? 4 : 2;
  bool aligned = reinterpret_cast<uintptr_t>(t.base) % (kItems * in_size) == 0 &&
                 reinterpret_cast<uintptr_t>(t.out) % (kItems * out_size) == 0;
  for (int k = 0; k < K; ++k) {
    a.x[k] = t.others[k];
    aligned = aligned && reinterpret_cast<uintptr_t>(t.others[k]) % (kItems * in_size) == 0;
  }
  a.vec = aligned;
  const Layout l(t.n, rows);
  char* ws = static_cast<char*>(t.workspace);
  a.cut = reinterpret_cast<Cut*>(ws + l.cut);
  a.hist = reinterpret_cast<uint32_t*>(ws + l.hist);
  a.zeros = reinterpret_cast<unsigned long long*>(ws + l.zeros);
  a.eq = reinterpret_cast<uint32_t*>(ws + l.eq);
  a.partial = reinterpret_cast<float*>(ws + l.partial);
  a.coef = reinterpret_cast<float*>(ws + l.coef);
  a.blockhist = reinterpret_cast<uint32_t*>(ws + l.blockhist);
  a.buffer = reinterpret_cast<uint64_t*>(ws + l.buffer);
  a.cap = buffer_capacity(t.n);
  return a;
}

// One wave of resident blocks for a grid-stride pass: a second, partial wave would double the pass
// for a few blocks.
template <class K>
int resident_grid(K kernel, size_t smem, int64_t work) {
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem), "occupancy");
  return int(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads,
                                                     std::max(per_sm, 1) * int64_t(multiprocessors()))));
}

// The selection of a.K * a.nb (rank) or 1 (SCE) cuts whose target ranks are `rank`. Every level is
// enqueued; those with no row to serve return at once (the decisions stay on the device).
template <class T, int M>
void select(Args& a, const std::vector<int64_t>& rank, cudaStream_t stream) {
  const int rows = int(rank.size());
  Ranks r{};
  for (int q = 0; q < rows; ++q) r.r[q] = rank[q];
  init_cuts<<<1, 32, 0, stream>>>(a.cut, rows, r);
  check(cudaGetLastError(), "init");
  if (a.sparsify == kSce) check(cudaMemsetAsync(a.zeros, 0, sizeof(unsigned long long), stream), "memset");
  const int64_t groups = (a.n + kItems - 1) / kItems;
  const int nkeys = a.sparsify == kSce ? 1 : a.K;
  const auto full_level = [&](int level, int path) {
    const Level lv = level_of(level);
    const int nh = level == 0 ? nkeys : rows;
    const size_t smem = sizeof(uint32_t) * nh * (size_t(1) << lv.bits);
    check(cudaFuncSetAttribute(hist_kernel<T, M>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "smem");
    check(cudaMemsetAsync(a.hist, 0, sizeof(uint32_t) * nh * kMaxBins, stream), "memset");
    const int grid = resident_grid(hist_kernel<T, M>, smem, groups);
    hist_kernel<T, M><<<grid, kThreads, smem, stream>>>(a, level, rows);
    check(cudaGetLastError(), "histogram");
    pick_kernel<<<rows, kPickThreads, 0, stream>>>(a, level, path);
    check(cudaGetLastError(), "pick");
    return grid;
  };
  const int level0_grid = full_level(0, kFirst);
  if (level0_grid > resident_bound(a.n)) throw std::logic_error("level-0 grid beyond its workspace");
  // Fast rows: the bin (and level 1's histogram) in one pass, then the remaining digits from the buffer.
  offsets_kernel<<<rows, kPickThreads, 0, stream>>>(a, level0_grid);
  check(cudaGetLastError(), "offsets");
  check(cudaMemsetAsync(a.hist, 0, sizeof(uint32_t) * rows * kMaxBins, stream), "memset");
  const size_t next_bytes = sizeof(uint32_t) * rows * (size_t(1) << level_of(1).bits);
  check(cudaFuncSetAttribute(collect_kernel<T, M>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(next_bytes)),
        "smem");
  collect_kernel<T, M><<<level0_grid, kThreads, next_bytes, stream>>>(a, rows);  // level 0's element order
  check(cudaGetLastError(), "collect");
  pick_kernel<<<rows, kPickThreads, 0, stream>>>(a, 1, kBuffer);
  check(cudaGetLastError(), "pick");
  const int entry_blocks = int(std::max<int64_t>(1, std::min<int64_t>(
      (a.cap + kThreads - 1) / kThreads, 4 * int64_t(multiprocessors()) / rows + 1)));
  for (int level = 2; level < kLevels; ++level) {
    check(cudaMemsetAsync(a.hist, 0, sizeof(uint32_t) * rows * kMaxBins, stream), "memset");
    buffer_hist_kernel<<<dim3(entry_blocks, rows), kThreads, 0, stream>>>(a, level);
    check(cudaGetLastError(), "buffer histogram");
    pick_kernel<<<rows, kPickThreads, 0, stream>>>(a, level, kBuffer);
    check(cudaGetLastError(), "pick");
  }
  // Slow rows: the key's digits from the full data, then the rank among equal keys.
  for (int level = 1; level < kKeyLevels; ++level) full_level(level, kSlow);
  // Resident grids: with no slow row (the usual case) these return at once.
  count_kernel<T, M><<<resident_grid(count_kernel<T, M>, 0, groups), kThreads, 0, stream>>>(a, rows);
  check(cudaGetLastError(), "count");
  scan_kernel<<<rows, kPickThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "scan");
  locate_kernel<T, M><<<resident_grid(locate_kernel<T, M>, 0, groups), kThreads, 0, stream>>>(a, rows);
  check(cudaGetLastError(), "locate");
}

// The per-model coefficients (L1 rescale factors, SCE's η) into a.coef: partial sums, then their
// reduction.
template <class T, int M>
void launch_coefficients(const Args& a, cudaStream_t stream) {
  sums_kernel<T, M><<<resident_grid(sums_kernel<T, M>, 0, int64_t(a.nblocks) * kThreads), kThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "sums");
  coef_kernel<<<1, kPickThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "coefficients");
}

template <class T, int M>
void launch_merge(const Args& a, int out_dtype, cudaStream_t stream) {
  with_dtype(out_dtype, [&](auto out_tag) {
    using O = decltype(out_tag);
    merge_kernel<T, O, M><<<resident_grid(merge_kernel<T, O, M>, 0, int64_t(a.nblocks) * kThreads), kThreads, 0,
                            stream>>>(a);
    check(cudaGetLastError(), "merge");
  });
}

}  // namespace

size_t workspace_bytes(int64_t n, int rows) { return Layout(n, rows).total; }

// Cuts the merge selects: one per active model, two where a band has an upper cut too.
static int selection_rows(const Family& p, int64_t n) {
  const bool active = p.sparsify == kRank && std::find(p.mode.begin(), p.mode.end(), int(kActive)) != p.mode.end();
  if (!active) return 0;
  const bool band = std::any_of(p.rank_hi.begin(), p.rank_hi.end(), [&](int64_t h) { return h < n; });
  return int(p.mode.size()) * (band ? 2 : 1);
}

void family_merge(const Launch& t, const Family& p) {
  const int rows = selection_rows(p, t.n);
  Args a = prepare(t, rows);
  const int K = a.K;
  const size_t k_ = size_t(K);
  if (p.mode.size() != k_ || p.weight.size() != k_ || p.p0.size() != k_ || p.rank_lo.size() != k_ ||
      p.rank_hi.size() != k_ || p.key.size() != k_ || p.prob.size() != k_)
    throw std::invalid_argument("family_merge: per-model parameters must have one entry per model");
  a.sparsify = p.sparsify;
  a.consensus = p.consensus;
  a.normalize = p.normalize;
  a.lambda = p.lambda;
  float weight_sum = 0.0f;  // the divisor without consensus, summed in model order like torch
  bool active = false;
  for (int k = 0; k < K; ++k) {
    a.mode[k] = p.mode[k];
    a.weight[k] = p.weight[k];
    a.p0[k] = p.p0[k];
    a.key_lo[k] = uint32_t(p.key[k]);
    a.key_hi[k] = uint32_t(p.key[k] >> 32);
    a.prob[k] = p.prob[k];
    weight_sum += p.weight[k];
    active |= p.mode[k] == kActive && p.sparsify != kNone;
  }
  a.divisor = std::fabs(weight_sum) < 1e-8f ? 1.0f : weight_sum;
  a.rescale = p.rescale && active;
  a.nb = rows ? rows / K : p.sparsify == kRank ? 1 : 0;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(t.stream);
  with_inputs(t.in_dtype, K, [&](auto tag, auto width) {
    using T = decltype(tag);
    constexpr int M = decltype(width)::value;
    if (rows) {
      std::vector<int64_t> rank;
      for (int k = 0; k < K; ++k) {
        const bool live = p.mode[k] == kActive;  // others keep every rank: [0, n)
        rank.push_back(live ? p.rank_lo[k] : 0);
        if (a.nb == 2) rank.push_back(live ? p.rank_hi[k] : t.n);
      }
      select<T, M>(a, rank, stream);
    }
    if (a.rescale) {
      launch_coefficients<T, M>(a, stream);
    }
    launch_merge<T, M>(a, t.out_dtype, stream);
  });
}

void sce_merge(const Launch& t, double select_topk) {
  Args a = prepare(t, select_topk < 1 ? 1 : 0);
  a.sparsify = kSce;
  a.consensus = 1;
  a.tau = select_topk;
  a.nb = select_topk < 1 ? 1 : 0;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(t.stream);
  with_inputs(t.in_dtype, a.K, [&](auto tag, auto width) {
    using T = decltype(tag);
    constexpr int M = decltype(width)::value;
    if (a.nb) select<T, M>(a, {0}, stream);  // the rank comes from the zero count, on the device
    launch_coefficients<T, M>(a, stream);
    launch_merge<T, M>(a, t.out_dtype, stream);
  });
}

}  // namespace cuda
}  // namespace seme
