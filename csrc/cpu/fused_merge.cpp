// Fused task-vector-family and SCE merges (see fused_merge.h for the contract).
//
// A merge reads the inputs a few times and never materialises a [K, n] tensor:
//   selection passes  (magnitude / outlier band / SCE top-k only): level-1 histograms of the top
//                     16 bits of the fp32 keys (|δ| or the variance), then level-2 histograms of
//                     the low 16 bits inside the bin holding each cut: the exact k-th value. If a
//                     cut splits a run of equal values, the fused pass must know each equal
//                     element's position among them: one more pass counts them per chunk (SCE
//                     gets the counts from the cut's bin, collected during level 2 when small).
//   sum passes        L1 rescale: per-chunk double sums. SCE energies: summed during level 2 above
//                     the cut's bin, plus the bin's kept elements (or a pass of their own).
//   fused pass        recomputes δ_k from the inputs, block by block in fp32 scratch, applies the
//                     masks (rank cuts, Philox draws), rescale, weights, sign election and the
//                     (weighted) mean, and writes the output dtype.
// Work is split into fixed chunks; integer histograms are merged across threads, floating sums
// are kept per chunk and added in chunk order, so results do not depend on the thread count.
// Floating-point order per element mirrors the torch reference (fp32, models summed in order).
#include "fused_merge.h"
#include "openmp.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

// This file is compiled three times: as is, for the baseline ISA, and (GCC on x86) from
// fused_merge_avx2.cpp (SEME_AVX2) and fused_merge_avx512.cpp (SEME_AVX512, which also has
// SEME_AVX2: its 8-lane paths stay valid) into namespaces seme::avx2 and seme::avx512; the entry
// points at the end pick one at run time. All give the same bits: no FMA contraction, no
// reassociation.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define SEME_AVX2_BUILD 1
#endif
#ifdef SEME_AVX512
#include <immintrin.h>
// 512-bit vectors where the compiler vectorizes too (its generic tuning prefers 256).
#pragma GCC target("avx2,bmi2,avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")
// GCC 12 warns on its own intrinsics' `__m512 __Y = __Y;` (_mm512_undefined_ps) when inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SEME_ISA avx512
#elif defined(SEME_AVX2)
#include <immintrin.h>
#pragma GCC target("avx2,f16c")
#define SEME_ISA avx2
#else
#define SEME_ISA baseline
#endif

namespace seme {
namespace SEME_ISA {
namespace {

constexpr int64_t kChunk = 1 << 16;     // unit of parallel work and of the fixed reduction order
constexpr int64_t kBlock = 2048;        // elements per model staged in fp32 scratch
constexpr uint32_t kAll = 0x80000000u;  // keys are < 2^31: a cut here has every element below it
constexpr uint32_t kLargestKey = 0x7fffffffu;  // |NaN| with every payload bit
constexpr int kBins1 = 1 << 15;         // selection level 1: key >> 16
constexpr int kBins2 = 1 << 16;         // level 2: key & 0xffff, inside one level-1 bin

// ------------------------------------------------------------ dtypes (bit-exact with torch)

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Non-negative floats order like their bit patterns: |x| (and a variance) is ranked by this key.
inline uint32_t key_of(float x) { return f2u(x) & 0x7fffffffu; }

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return u2f(uint32_t(x.bits) << 16); }
inline float to_f32(f16 x) {  // exact, subnormals included (the FP16 library's bit trick)
  const uint32_t w = uint32_t(x.bits) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1p-112f;
  const float subnormal = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  return u2f(sign | (two_w < (1u << 27) ? f2u(subnormal) : f2u(normal)));
}

inline void from_f32(float x, float& y) { y = x; }
inline void from_f32(float x, bf16& y) {  // round to nearest even, NaN -> 0x7fc0, as c10::BFloat16
  const uint32_t u = f2u(x);
  y.bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0)
                                           : uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
inline void from_f32(float x, f16& y) {  // round to nearest even; the float adds do the rounding
  const uint32_t w = f2u(x), shl1 = w + w, sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1 & 0xff000000u, 0x71000000u);
  const float v = u2f((bias >> 1) + 0x07800000u) + (std::fabs(x) * 0x1p112f) * 0x1p-110f;
  const uint32_t bits = f2u(v), nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  y.bits = uint16_t((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : nonsign));
}

#ifdef SEME_AVX512
// 16 elements in fp32, as to_f32 converts them.
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const bf16* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}
inline __m512 load16(const f16* x) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }
#elif defined(SEME_AVX2)
// 8 elements in fp32, as to_f32 converts them (F16C's conversion is exact, subnormals included).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const bf16* x) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16));
}
inline __m256 load8(const f16* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }
#endif

// x[0, len) in fp32. fp16 takes the vector conversion where the build has one: the compiler
// vectorizes the bf16 and fp32 loops itself, but not the fp16 one.
template <class T>
inline void widen(const T* __restrict x, float* __restrict y, int64_t len) {
  for (int64_t j = 0; j < len; ++j) y[j] = to_f32(x[j]);
}
#ifdef SEME_AVX512
inline void widen(const f16* __restrict x, float* __restrict y, int64_t len) {
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) _mm512_storeu_ps(y + j, load16(x + j));
  for (; j < len; ++j) y[j] = to_f32(x[j]);
}
#elif defined(SEME_AVX2)
inline void widen(const f16* __restrict x, float* __restrict y, int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) _mm256_storeu_ps(y + j, load8(x + j));
  for (; j < len; ++j) y[j] = to_f32(x[j]);
}
#endif

template <class F>
void dispatch(Dtype t, F&& f) {
  switch (t) {
    case kF32: return f(float{});
    case kBF16: return f(bf16{});
    case kF16: return f(f16{});
  }
  throw std::invalid_argument("unsupported dtype code");
}

// ------------------------------------------------------------ random draws

#ifdef SEME_AVX2
// Philox by hand (the compiler's version spends most of its time shuffling), on the lanes of one
// ISA: L holds V (a vector of kWide 32-bit lanes, one Philox block each) and its operations.
#ifdef SEME_AVX512
// 16 lanes. A 32x32->64 multiply of the even and of the odd lanes; one masked shuffle each picks
// the high and the low words back into lane order, and one ternary-logic op does a round's
// three-way xor. The 4 x 16 words leave transposed by 128-bit quarters.
struct Avx512Lanes {
  using V = __m512i;
  static constexpr int kWide = 16;
  static V load(const uint32_t* w) { return _mm512_load_si512(w); }
  static V zero() { return _mm512_setzero_si512(); }
  static V set1(uint32_t x) { return _mm512_set1_epi32(int(x)); }
  static void mulhilo(V m, V x, V& hi, V& lo) {
    const V even = _mm512_mul_epu32(x, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
  }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static __m512 uniform(V w) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(0x1p-24f));
  }
  // Lane l's 4 words to v[4l .. 4l + 3].
  static void store(float* v, V c0, V c1, V c2, V c3) {
    const __m512 f0 = uniform(c0), f1 = uniform(c1), f2 = uniform(c2), f3 = uniform(c3);
    const __m512 a_lo = _mm512_unpacklo_ps(f0, f1), a_hi = _mm512_unpackhi_ps(f0, f1);
    const __m512 b_lo = _mm512_unpacklo_ps(f2, f3), b_hi = _mm512_unpackhi_ps(f2, f3);
    // q_r holds, in each quarter Q, the 4 words of lane 4Q + r.
    const __m512 q0 = _mm512_shuffle_ps(a_lo, b_lo, 0x44), q1 = _mm512_shuffle_ps(a_lo, b_lo, 0xEE);
    const __m512 q2 = _mm512_shuffle_ps(a_hi, b_hi, 0x44), q3 = _mm512_shuffle_ps(a_hi, b_hi, 0xEE);
    const __m512 t0 = _mm512_shuffle_f32x4(q0, q1, 0x44), t1 = _mm512_shuffle_f32x4(q2, q3, 0x44);
    const __m512 t2 = _mm512_shuffle_f32x4(q0, q1, 0xEE), t3 = _mm512_shuffle_f32x4(q2, q3, 0xEE);
    _mm512_storeu_ps(v, _mm512_shuffle_f32x4(t0, t1, 0x88));
    _mm512_storeu_ps(v + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
    _mm512_storeu_ps(v + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
    _mm512_storeu_ps(v + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
  }
};
#endif

// 8 lanes: two 4-lane 32x32->64 multiplies (even and odd lanes) blended back into high and low
// words; the 4 x 8 words are transposed into element order on the way out.
struct Avx2Lanes {
  using V = __m256i;
  static constexpr int kWide = 8;
  static V load(const uint32_t* w) { return _mm256_load_si256(reinterpret_cast<const V*>(w)); }
  static V zero() { return _mm256_setzero_si256(); }
  static V set1(uint32_t x) { return _mm256_set1_epi32(int(x)); }
  static void mulhilo(V m, V x, V& hi, V& lo) {
    const V even = _mm256_mul_epu32(x, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static __m256 uniform(V w) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(0x1p-24f));
  }
  static void store(float* v, V c0, V c1, V c2, V c3) {
    const __m256 f0 = uniform(c0), f1 = uniform(c1), f2 = uniform(c2), f3 = uniform(c3);
    const __m256 a_lo = _mm256_unpacklo_ps(f0, f1), a_hi = _mm256_unpackhi_ps(f0, f1);
    const __m256 b_lo = _mm256_unpacklo_ps(f2, f3), b_hi = _mm256_unpackhi_ps(f2, f3);
    const __m256 q0 = _mm256_shuffle_ps(a_lo, b_lo, 0x44), q1 = _mm256_shuffle_ps(a_lo, b_lo, 0xEE);  // lanes 0|4, 1|5
    const __m256 q2 = _mm256_shuffle_ps(a_hi, b_hi, 0x44), q3 = _mm256_shuffle_ps(a_hi, b_hi, 0xEE);  // lanes 2|6, 3|7
    _mm256_storeu_ps(v, _mm256_permute2f128_ps(q0, q1, 0x20));
    _mm256_storeu_ps(v + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
    _mm256_storeu_ps(v + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
    _mm256_storeu_ps(v + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
  }
};

// The Philox words of elements [i, end) in whole steps of kGroups vectors of blocks (i a multiple
// of 4), handed to out(first element of the group, c0, c1, c2, c3); returns where it stopped.
template <class L, class Out>
int64_t philox_vectors(uint64_t key, int64_t i, int64_t end, Out&& out) {
  using V = typename L::V;
  constexpr int kGroups = 4;  // independent multiply chains in flight: the multiplies' latency is hidden
  constexpr int64_t kStep = 4 * L::kWide * kGroups;
  const V round_a = L::set1(0xD2511F53u), round_b = L::set1(0xCD9E8D57u);
  for (; i + kStep <= end; i += kStep) {
    V c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      alignas(64) uint32_t lo_words[L::kWide], hi_words[L::kWide];
      for (int l = 0; l < L::kWide; ++l) {
        const uint64_t counter = (uint64_t(i) >> 2) + g * L::kWide + l;
        lo_words[l] = uint32_t(counter), hi_words[l] = uint32_t(counter >> 32);
      }
      c0[g] = L::load(lo_words);
      c1[g] = L::load(hi_words);
      c2[g] = c3[g] = L::zero();
    }
    uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
    for (int round = 0; round < 10; ++round) {
      const V key0 = L::set1(k0), key1 = L::set1(k1);
      for (int g = 0; g < kGroups; ++g) {
        V hi_b, lo_b, hi_a, lo_a;
        L::mulhilo(round_b, c2[g], hi_b, lo_b);
        L::mulhilo(round_a, c0[g], hi_a, lo_a);
        c0[g] = L::xor3(hi_b, c1[g], key0);
        c2[g] = L::xor3(hi_a, c3[g], key1);
        c1[g] = lo_b, c3[g] = lo_a;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int g = 0; g < kGroups; ++g) out(i + 4 * L::kWide * g, c0[g], c1[g], c2[g], c3[g]);
  }
  return i;
}
#endif

// u[j] = the uniform draw of element off + j: element i takes word i & 3 of Philox block i >> 2.
// The aligned middle runs 8 Philox blocks side by side (structure of arrays): independent multiply
// chains, ~1.7x faster than one block at a time; the AVX2 and AVX-512 builds run wider steps first.
void uniforms(uint64_t key, int64_t off, int64_t len, float* __restrict u) {
  constexpr int kLanes = 8;
  const int64_t end = off + len;
  auto one_by_one = [&](int64_t i, int64_t stop) {
    while (i < stop) {
      const auto w = philox4x32(key, uint64_t(i) >> 2);
      for (int t = int(i & 3); t < 4 && i < stop; ++t, ++i) u[i - off] = float(w[t] >> 8) * 0x1p-24f;
    }
  };
  int64_t i = std::min(end, (off + 3) & ~int64_t(3));
  one_by_one(off, i);
#ifdef SEME_AVX512
  i = philox_vectors<Avx512Lanes>(key, i, end, [&](int64_t at, auto... c) { Avx512Lanes::store(u + (at - off), c...); });
#endif
#ifdef SEME_AVX2
  i = philox_vectors<Avx2Lanes>(key, i, end, [&](int64_t at, auto... c) { Avx2Lanes::store(u + (at - off), c...); });
#endif
  for (; i + 4 * kLanes <= end; i += 4 * kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes] = {}, c3[kLanes] = {};
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t counter = (uint64_t(i) >> 2) + l;
      c0[l] = uint32_t(counter), c1[l] = uint32_t(counter >> 32);
    }
    uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t pb = uint64_t(0xCD9E8D57u) * c2[l], pa = uint64_t(0xD2511F53u) * c0[l];
        const uint32_t n0 = uint32_t(pb >> 32) ^ c1[l] ^ k0, n2 = uint32_t(pa >> 32) ^ c3[l] ^ k1;
        c1[l] = uint32_t(pb), c3[l] = uint32_t(pa), c0[l] = n0, c2[l] = n2;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    float* v = u + (i - off);
    for (int l = 0; l < kLanes; ++l) {
      v[4 * l] = float(c0[l] >> 8) * 0x1p-24f;
      v[4 * l + 1] = float(c1[l] >> 8) * 0x1p-24f;
      v[4 * l + 2] = float(c2[l] >> 8) * 0x1p-24f;
      v[4 * l + 3] = float(c3[l] >> 8) * 0x1p-24f;
    }
  }
  one_by_one(i, end);
}

// ------------------------------------------------------------ scratch and the parallel driver

struct Scratch {
  std::vector<float> base, delta, acc, div, u;
  std::vector<uint32_t> ties;            // positions of elements equal to a split cut
  std::vector<float> var;                // SCE: variances over models
  std::vector<double> mean, m2;          // SCE: Welford accumulators
  std::vector<uint32_t> rank;            // DELLA: ranks within the row, or positions within buckets
  std::vector<uint64_t> sort_a, sort_b;  // DELLA: row sort
  std::vector<uint16_t> bucket;          // DELLA: each element's key bucket
  std::vector<uint32_t> bucket_start;    // DELLA: first rank of each key bucket of the row
  std::vector<uint32_t> bucket_key;      // DELLA: a key of some buckets
  std::vector<uint8_t> bucket_mixed;     // DELLA: whether such a bucket holds other keys too
  std::vector<float> bucket_min, bucket_max;  // DELLA: the keep bound over a bucket's ranks
  std::vector<uint32_t> undecided;       // DELLA: elements their bucket does not decide
  std::vector<uint32_t> gathered_at, gathered_keys;  // DELLA: the elements of the mixed buckets
  uint32_t input_exponents = 0;          // max of the exponent bits of the staged δ (or inputs)
  uint32_t output_magnitude = 0;         // max of |output| as fp32 bits
};

// Max of the exponent field over x: 0x7f800000 when some element is Inf or NaN (vectorizes).
inline uint32_t max_exponent(const float* __restrict x, int64_t len, uint32_t m) {
  for (int64_t j = 0; j < len; ++j) m = std::max(m, f2u(x[j]) & 0x7f800000u);
  return m;
}

// Asks for the cache lines of the next block of a stream, [x + len, x + 2 len), while this one is
// converted: the hardware prefetcher alone left the loads waiting (16M-element merges on a 2-core
// EPYC: linear, task arithmetic, TIES, DARE and SCE 2-11% faster). Prefetches never fault.
template <class T>
inline void prefetch_next(const T* x, int64_t len) {
  for (int64_t j = 0; j < len; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(x + len + j);
}

struct Ctx {
  const Tensors& t;
  const int K, nt;
  const int64_t chunk, block, nchunks;
  std::vector<Scratch> scratch;  // one per thread

  Ctx(const Tensors& t, int64_t chunk, int64_t block)
      : t(t), K(int(t.others.size())),
        nt(int(std::min<int64_t>(t.num_threads > 0 ? t.num_threads : omp_get_max_threads(),
                                 std::max<int64_t>(1, (t.n + chunk - 1) / chunk)))),  // no idle threads
        chunk(chunk), block(block), nchunks((t.n + chunk - 1) / chunk), scratch(nt) {
    for (Scratch& s : scratch) {
      s.base.resize(block);
      s.delta.resize(size_t(K) * block);
      s.acc.resize(block);
      s.div.resize(block);
      s.u.resize(block);
      s.ties.resize(block);
    }
  }

  // f(thread, chunk index, first element, end) for every chunk.
  template <class F>
  void chunks(F&& f) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t c = 0; c < nchunks; ++c) f(omp_get_thread_num(), c, c * chunk, std::min(t.n, (c + 1) * chunk));
  }

  template <class F>
  void blocks(int64_t start, int64_t end, F&& f) const {
    for (int64_t off = start; off < end; off += block) f(off, std::min(block, end - off));
  }

  float* delta(Scratch& s, int k) const { return s.delta.data() + size_t(k) * block; }

  // Stage base and δ_k = x_k - base of elements [off, off + len) in fp32. With `note`, the element
  // pass's: the largest exponent of the δ is noted for finite() on the way.
  void load(Scratch& s, int64_t off, int64_t len, bool note = false) const {
    dispatch(t.in_dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* __restrict b = static_cast<const T*>(t.base) + off;
      float* __restrict bf = s.base.data();
      prefetch_next(b, len);
      widen(b, bf, len);
      for (int k = 0; k < K; ++k) {
        const T* __restrict x = static_cast<const T*>(t.others[k]) + off;
        prefetch_next(x, len);
        float* __restrict d = delta(s, k);
        if (!note) {
          for (int64_t j = 0; j < len; ++j) d[j] = to_f32(x[j]) - bf[j];
          continue;
        }
        uint32_t m = s.input_exponents;
        for (int64_t j = 0; j < len; ++j) d[j] = to_f32(x[j]) - bf[j], m = std::max(m, f2u(d[j]) & 0x7f800000u);
        s.input_exponents = m;
      }
    });
  }

  float delta_at(int k, int64_t i) const {
    float d = 0;
    dispatch(t.in_dtype, [&](auto tag) {
      using T = decltype(tag);
      d = to_f32(static_cast<const T*>(t.others[k])[i]) - to_f32(static_cast<const T*>(t.base)[i]);
    });
    return d;
  }

  // What the threads noted: the smallest |x| bits that overflow the output dtype, with round to
  // nearest even: fp32 Inf, bf16 0x7f7f8000 (its max plus half an ulp), fp16 65520.
  Finite finite() const {
    const uint32_t overflow = t.out_dtype == kF32 ? 0x7f800000u : t.out_dtype == kBF16 ? 0x7f7f8000u : 0x477ff000u;
    Finite f;
    for (const Scratch& s : scratch) {
      f.inputs = f.inputs && s.input_exponents != 0x7f800000u;
      f.output = f.output && s.output_magnitude < overflow;
    }
    return f;
  }

  // Writes v to the output in its dtype, noting max |v|.
  void store(Scratch& s, const float* v, int64_t off, int64_t len) const {
    dispatch(t.out_dtype, [&](auto tag) {
      using T = decltype(tag);
      T* __restrict o = static_cast<T*>(t.out) + off;
      uint32_t m = s.output_magnitude;
      for (int64_t j = 0; j < len; ++j) m = std::max(m, f2u(v[j]) & 0x7fffffffu), from_f32(v[j], o[j]);
      s.output_magnitude = m;
    });
  }
};

// Σ_j f(j) in double, in a fixed order: kLanes interleaved partial sums, so that it vectorizes into
// several independent add chains (one chain waits on the add's latency), then a pairwise tree. f
// should capture by value, or the pointers it reads are reloaded at every element.
template <class F>
double lane_sum(int64_t len, F&& f) {
  constexpr int kLanes = 32;
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(j + l);
  for (int l = 0; j < len; ++j, ++l) acc[l] += f(j);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

double sum_abs(const float* d, int64_t len) {
  return lane_sum(len, [=](int64_t j) { return std::fabs(double(d[j])); });
}

// Σ|δ| and Σ|δ| over the elements flagged in words (bit j & 63 of words[j >> 6]), δ = x - base
// computed from the inputs as load() stages it: sum_abs's sums of the staged δ and of the
// sparsified δ, without staging.
template <class T>
std::pair<double, double> abs_sums(const T* __restrict base, const T* __restrict x, const uint64_t* __restrict words,
                                   int64_t len) {
  auto magnitude = [=](int64_t j) { return std::fabs(double(to_f32(x[j]) - to_f32(base[j]))); };
#if defined(SEME_AVX512) || defined(SEME_AVX2)
  // lane_sum's 32 lanes in vectors, in one pass for both sums; the flags mask the adds.
  alignas(64) double a[32], b[32];
  int64_t j = 0;
#ifdef SEME_AVX512
  __m512d all[4], kept[4];  // lanes 8v .. 8v + 7
  for (int v = 0; v < 4; ++v) all[v] = kept[v] = _mm512_setzero_pd();
  for (; j + 32 <= len; j += 32) {
    const uint32_t flags = uint32_t(words[j >> 6] >> (j & 63));
    for (int h = 0; h < 2; ++h) {
      const __m512 d = _mm512_abs_ps(_mm512_sub_ps(load16(x + j + 16 * h), load16(base + j + 16 * h)));
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
      all[2 * h] = _mm512_add_pd(all[2 * h], lo), all[2 * h + 1] = _mm512_add_pd(all[2 * h + 1], hi);
      const __mmask8 k_lo = __mmask8(flags >> (16 * h)), k_hi = __mmask8(flags >> (16 * h + 8));
      kept[2 * h] = _mm512_mask_add_pd(kept[2 * h], k_lo, kept[2 * h], lo);
      kept[2 * h + 1] = _mm512_mask_add_pd(kept[2 * h + 1], k_hi, kept[2 * h + 1], hi);
    }
  }
  for (int v = 0; v < 4; ++v) _mm512_store_pd(a + 8 * v, all[v]), _mm512_store_pd(b + 8 * v, kept[v]);
#else
  __m256d all[8], kept[8];  // lanes 4v .. 4v + 3
  for (int v = 0; v < 8; ++v) all[v] = kept[v] = _mm256_setzero_pd();
  const __m256i lane_bit = _mm256_setr_epi64x(1, 2, 4, 8);
  auto flagged = [&](uint32_t four) {  // 4 flags as all-ones or zero lanes
    const __m256i f = _mm256_and_si256(_mm256_set1_epi64x(four), lane_bit);
    return _mm256_castsi256_pd(_mm256_cmpeq_epi64(f, lane_bit));
  };
  for (; j + 32 <= len; j += 32) {
    const uint32_t flags = uint32_t(words[j >> 6] >> (j & 63));
    for (int h = 0; h < 4; ++h) {
      const __m256 d = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(load8(x + j + 8 * h), load8(base + j + 8 * h)));
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
      all[2 * h] = _mm256_add_pd(all[2 * h], lo), all[2 * h + 1] = _mm256_add_pd(all[2 * h + 1], hi);
      kept[2 * h] = _mm256_add_pd(kept[2 * h], _mm256_and_pd(flagged((flags >> (8 * h)) & 15), lo));
      kept[2 * h + 1] = _mm256_add_pd(kept[2 * h + 1], _mm256_and_pd(flagged((flags >> (8 * h + 4)) & 15), hi));
    }
  }
  for (int v = 0; v < 8; ++v) _mm256_store_pd(a + 4 * v, all[v]), _mm256_store_pd(b + 4 * v, kept[v]);
#endif
  for (int l = 0; j < len; ++j, ++l) {
    a[l] += magnitude(j);
    if ((words[j >> 6] >> (j & 63)) & 1) b[l] += magnitude(j);
  }
  for (int width = 16; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) a[l] += a[l + width], b[l] += b[l + width];
  return {a[0], b[0]};
#else
  return {lane_sum(len, magnitude),
          lane_sum(len, [=](int64_t j) { return (words[j >> 6] >> (j & 63)) & 1 ? magnitude(j) : 0.0; })};
#endif
}

// Sign election: the elected sign is + where sum = Σ_k (weighted) δ_k >= 0, and an entry counts if
// its sign is the elected one (zeros never count). For the entries of d that count:
// acc += d (or d · w when kTimesW), wsum += w.
template <bool kTimesW, bool kFirst = false>
void add_agreeing(const float* __restrict sum, const float* __restrict d, float w, int64_t len,
                  float* __restrict acc, float* __restrict wsum) {
  for (int64_t j = 0; j < len; ++j) {
    const bool pos = sum[j] >= 0.0f;
    const bool counts = (pos & (d[j] > 0.0f)) | (!pos & (d[j] < 0.0f));
    acc[j] = (kFirst ? 0.0f : acc[j]) + (counts ? (kTimesW ? d[j] * w : d[j]) : 0.0f);
    wsum[j] = (kFirst ? 0.0f : wsum[j]) + (counts ? w : 0.0f);
  }
}

// Σ (d · mask)² in double, mask 0 or 1 (all ones when null); a product, not a select, vectorizes.
double sum_squares(const float* __restrict d, const float* __restrict mask, int64_t len) {
  if (!mask) return lane_sum(len, [=](int64_t j) { return double(d[j]) * d[j]; });
  return lane_sum(len, [=](int64_t j) {
    const double x = d[j] * mask[j];
    return x * x;
  });
}

void zero_unless(float* d, const float* keep, int64_t len) {
  for (int64_t j = 0; j < len; ++j) d[j] = keep[j] != 0.0f ? d[j] : 0.0f;
}

// A block's 0/1 flags as bits: flag j in bit j & 63 of words[j >> 6] (passes that replay a decision
// keep it this way, 1/32 of the flags' size).
void pack_bits(const float* __restrict flags, int64_t len, uint64_t* __restrict words) {
  for (int64_t j = 0; j < len; j += 64) {
    uint64_t word = 0;
    const int64_t n = std::min<int64_t>(64, len - j);
    for (int64_t b = 0; b < n; ++b) word |= uint64_t(flags[j + b] != 0.0f) << b;
    words[j >> 6] = word;
  }
}

void unpack_bits(const uint64_t* __restrict words, int64_t len, float* __restrict flags) {
  for (int64_t j = 0; j < len; j += 64) {
    const uint64_t word = words[j >> 6];
    const int64_t n = std::min<int64_t>(64, len - j);
    for (int64_t b = 0; b < n; ++b) flags[j + b] = (word >> b) & 1 ? 1.0f : 0.0f;
  }
}

#if defined(SEME_AVX2) && !defined(SEME_AVX512)
// Bit b of an 8-bit mask to bit 4b.
inline uint32_t spread4(uint32_t m) {
  m = (m | (m << 12)) & 0x000F000Fu;
  m = (m | (m << 6)) & 0x03030303u;
  return (m | (m << 3)) & 0x11111111u;
}
#endif

// DARE's keep flags of elements [off, off + len) as bits (off a multiple of 64, u scratch for len
// floats): element i is kept where its draw u_i < p. As u_i = (w >> 8) · 2^-24 exactly for its
// Philox word w, that is (w >> 8) < ceil(p · 2^24): the AVX2 and AVX-512 builds compare the words
// as they come and interleave the four words' masks into element order, with no floats in between.
void keep_bits(uint64_t key, int64_t off, int64_t len, float p, float* __restrict u, uint64_t* __restrict words) {
  int64_t done = off;
  [[maybe_unused]] const uint32_t below = !(p > 0.0f) ? 0u : uint32_t(std::min(std::ceil(double(p) * 0x1p24), 0x1p24));
#ifdef SEME_AVX512
  const __m512i limit = _mm512_set1_epi32(int(below));
  auto mask = [&](__m512i w) { return uint64_t(_mm512_cmplt_epu32_mask(_mm512_srli_epi32(w, 8), limit)); };
  done = philox_vectors<Avx512Lanes>(key, off, off + len, [&](int64_t at, __m512i c0, __m512i c1, __m512i c2, __m512i c3) {
    // Lane l holds word t of elements 4l + t: bit l of mask t goes to bit 4l + t.
    words[(at - off) >> 6] = _pdep_u64(mask(c0), 0x1111111111111111ull) | _pdep_u64(mask(c1), 0x2222222222222222ull) |
                             _pdep_u64(mask(c2), 0x4444444444444444ull) | _pdep_u64(mask(c3), 0x8888888888888888ull);
  });
#elif defined(SEME_AVX2)
  const __m256i limit = _mm256_set1_epi32(int(below));  // signed compares: both sides are < 2^25
  auto mask = [&](__m256i w) {
    return spread4(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, _mm256_srli_epi32(w, 8))))));
  };
  done = philox_vectors<Avx2Lanes>(key, off, off + len, [&](int64_t at, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
    // Lane l holds word t of elements 4l + t: bit l of mask t goes to bit 4l + t of these 32 flags,
    // the low or high half of their word.
    const uint64_t half = mask(c0) | mask(c1) << 1 | mask(c2) << 2 | mask(c3) << 3;
    uint64_t& word = words[(at - off) >> 6];
    word = (at - off) & 32 ? (word & 0xffffffffull) | half << 32 : half;
  });
#endif
  const int64_t rest = off + len - done;
  if (rest == 0) return;
  uniforms(key, done, rest, u);
  for (int64_t j = 0; j < rest; ++j) u[j] = u[j] < p ? 1.0f : 0.0f;
  pack_bits(u, rest, words + ((done - off) >> 6));
}

// Bit arrays of one pass's decisions, n/64 words, not cleared: every word is packed before it is
// read. Clearing them was a memset on one thread ahead of the parallel passes, which took all their
// page faults there too (a DARE-TIES merge of bench.e2e's models: 84 MB, 20K of its 70K faults).
std::unique_ptr<uint64_t[]> uncleared_words(size_t words) { return std::unique_ptr<uint64_t[]>(new uint64_t[words]); }

// Exclusive scan over chunks of per-chunk counts laid out [chunk][cols].
std::vector<int64_t> chunk_prefix(const std::vector<int64_t>& counts, int64_t nchunks, size_t cols) {
  std::vector<int64_t> start(counts.size(), 0);
  for (int64_t c = 1; c < nchunks; ++c)
    for (size_t q = 0; q < cols; ++q) start[c * cols + q] = start[(c - 1) * cols + q] + counts[(c - 1) * cols + q];
  return start;
}

// ------------------------------------------------------------ exact rank selection

// The elements of ascending rank < r, ranked by (value, index): key < v, and, when `split`, the
// first `room` elements with key == v in index order (`eqpos` counts those seen so far).
struct Cut {
  uint32_t v = 0;
  bool split = false, pending = false;
  int64_t room = 0;  // while pending: the rank's position (1-based) inside level-1 bin v >> 16

  bool below(uint32_t key, int64_t& eqpos) const {
    if (key < v) return true;
    return split && key == v && eqpos++ < room;
  }
};

int64_t count_key(const float* __restrict x, int64_t len, uint32_t v) {
  int64_t count = 0;
  for (int64_t j = 0; j < len; ++j) count += key_of(x[j]) == v;
  return count;
}

constexpr uint32_t kNoKey = 0xffffffffu;  // keys are < 2^31: matches none

#ifdef SEME_AVX2
// Appending the selected lanes of 8 (in order) is a permutation that packs them to the front: one
// per 8-bit mask. The appends below are then 8 elements at a time instead of one.
struct PackTable {
  alignas(32) uint32_t lanes[256][8];
  PackTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int b = 0; b < 8; ++b)
        if (mask >> b & 1) lanes[mask][n++] = uint32_t(b);
      while (n < 8) lanes[mask][n++] = 0;
    }
  }
};
const PackTable kPack;

inline __m256i keys8(const float* x) {
  return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), _mm256_set1_epi32(0x7fffffff));
}

// Stores the lanes of v selected by mask at out (8 lanes written: out needs the room) and returns
// how many were selected.
inline int pack(__m256i v, int mask, uint32_t* out) {
  const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.lanes[mask]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(v, order));
  return __builtin_popcount(unsigned(mask));
}

#ifdef SEME_AVX512
inline __m512i keys16(const float* x) { return _mm512_and_si512(_mm512_loadu_si512(x), _mm512_set1_epi32(0x7fffffff)); }

// pack() on 16 lanes, by a compress: 16 lanes written, so out needs the room.
inline int pack16(__m512i v, __mmask16 mask, uint32_t* out) {
  _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(mask, v));
  return __builtin_popcount(unsigned(mask));
}

inline __m512i positions16(int64_t j) { return _mm512_add_epi32(_mm512_set1_epi32(int(j)), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)); }
#endif

inline __m256i positions8(int64_t j) { return _mm256_add_epi32(_mm256_set1_epi32(int(j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

inline int64_t lane_total(__m256i v) {
  alignas(32) int32_t a[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), v);
  int64_t total = 0;
  for (int32_t x : a) total += x;
  return total;
}
#endif

// Positions (ascending) of the elements equal to a split cut among a and b: only those need the
// sequential tie rule, the rest of a block is decided by plain comparisons. `out` holds len.
int64_t find_ties(const float* __restrict x, int64_t len, const Cut& a, const Cut& b, uint32_t* __restrict out) {
  if (!a.split && !b.split) return 0;
  const uint32_t ta = a.split ? a.v : kNoKey, tb = b.split ? b.v : kNoKey;
  int64_t n = 0, j = 0;
#ifdef SEME_AVX512
  {
    const __m512i va = _mm512_set1_epi32(int(ta)), vb = _mm512_set1_epi32(int(tb)), step = _mm512_set1_epi32(16);
    __m512i at = positions16(0);
    for (; j + 16 <= len; j += 16, at = _mm512_add_epi32(at, step)) {
      const __m512i key = keys16(x + j);
      n += pack16(at, _mm512_cmpeq_epi32_mask(key, va) | _mm512_cmpeq_epi32_mask(key, vb), out + n);
    }
  }
#endif
#ifdef SEME_AVX2
  const __m256i va = _mm256_set1_epi32(int(ta)), vb = _mm256_set1_epi32(int(tb));
  const __m256i step = _mm256_set1_epi32(8);
  __m256i at = positions8(j);
  for (; j + 8 <= len; j += 8, at = _mm256_add_epi32(at, step)) {
    const __m256i key = keys8(x + j);
    const __m256i hit = _mm256_or_si256(_mm256_cmpeq_epi32(key, va), _mm256_cmpeq_epi32(key, vb));
    n += pack(at, _mm256_movemask_ps(_mm256_castsi256_ps(hit)), out + n);
  }
#endif
  for (; j < len; ++j) {  // branch-free append
    const uint32_t key = key_of(x[j]);
    out[n] = uint32_t(j);
    n += (key == ta) | (key == tb);
  }
  return n;
}

// Positions (ascending) of the keys in [lo, hi], appended to `out` (which holds len); the keys
// below lo are counted into `below`.
int64_t positions_between(const float* __restrict x, int64_t len, uint32_t lo, uint32_t hi, uint32_t* __restrict out,
                          int64_t& below) {
  int64_t n = 0, j = 0;
#ifdef SEME_AVX512
  {
    const __m512i vl = _mm512_set1_epi32(int(lo)), vh = _mm512_set1_epi32(int(hi)), step = _mm512_set1_epi32(16);
    __m512i at = positions16(0);
    for (; j + 16 <= len; j += 16, at = _mm512_add_epi32(at, step)) {
      const __m512i key = keys16(x + j);
      const __mmask16 lt = _mm512_cmplt_epi32_mask(key, vl), gt = _mm512_cmpgt_epi32_mask(key, vh);
      below += __builtin_popcount(unsigned(lt));
      n += pack16(at, __mmask16(~(lt | gt)), out + n);
    }
  }
#endif
#ifdef SEME_AVX2
  const __m256i vl = _mm256_set1_epi32(int(lo)), vh = _mm256_set1_epi32(int(hi)), step = _mm256_set1_epi32(8);
  __m256i at = positions8(j), under = _mm256_setzero_si256();
  for (; j + 8 <= len; j += 8, at = _mm256_add_epi32(at, step)) {
    const __m256i key = keys8(x + j);
    const __m256i lt = _mm256_cmpgt_epi32(vl, key), outside = _mm256_or_si256(lt, _mm256_cmpgt_epi32(key, vh));
    under = _mm256_add_epi32(under, lt);
    n += pack(at, ~_mm256_movemask_ps(_mm256_castsi256_ps(outside)) & 0xff, out + n);
  }
  below -= lane_total(under);
#endif
  for (; j < len; ++j) {
    const uint32_t key = key_of(x[j]);
    below += key < lo;
    out[n] = uint32_t(j);
    n += (key >= lo) & (key <= hi);
  }
  return n;
}

// For the bracket [lo, hi] of a cut (hi_eq: hi, or kNoKey when hi == lo): the counts of the keys
// below lo, equal to lo and equal to hi_eq, and the keys strictly between lo and hi appended to
// `out` (which holds len).
struct BracketCounts {
  int64_t below = 0, at_lo = 0, at_hi = 0, inside = 0;
};

BracketCounts scan_bracket(const float* __restrict x, int64_t len, uint32_t lo, uint32_t hi, uint32_t hi_eq,
                           uint32_t* __restrict out) {
  BracketCounts c;
  int64_t j = 0;
#ifdef SEME_AVX2
  const __m256i vl = _mm256_set1_epi32(int(lo)), vh = _mm256_set1_epi32(int(hi)), ve = _mm256_set1_epi32(int(hi_eq));
  __m256i below = _mm256_setzero_si256(), at_lo = below, at_hi = below;  // lanes count down (masks are -1)
  for (; j + 8 <= len; j += 8) {  // len <= kBlock: the lane counts cannot overflow
    const __m256i key = keys8(x + j);
    below = _mm256_add_epi32(below, _mm256_cmpgt_epi32(vl, key));
    at_lo = _mm256_add_epi32(at_lo, _mm256_cmpeq_epi32(key, vl));
    at_hi = _mm256_add_epi32(at_hi, _mm256_cmpeq_epi32(key, ve));
    const __m256i inside = _mm256_and_si256(_mm256_cmpgt_epi32(key, vl), _mm256_cmpgt_epi32(vh, key));
    c.inside += pack(key, _mm256_movemask_ps(_mm256_castsi256_ps(inside)), out + c.inside);
  }
  c.below = -lane_total(below), c.at_lo = -lane_total(at_lo), c.at_hi = -lane_total(at_hi);
#endif
  for (; j < len; ++j) {
    const uint32_t key = key_of(x[j]);
    c.below += key < lo;
    c.at_lo += key == lo;
    c.at_hi += key == hi_eq;
    out[c.inside] = key;
    c.inside += (key > lo) & (key < hi);
  }
  return c;
}

struct Hist {  // per-thread integer histograms [thread][stream][bin]: merging them is order-free
  int streams, bins;
  std::vector<uint32_t> data;
  Hist(int nt, int streams, int bins) : streams(streams), bins(bins), data(size_t(nt) * streams * bins) {}
  uint32_t* at(int th, int m) { return data.data() + (size_t(th) * streams + m) * bins; }
  std::vector<uint64_t> total(int m) const {
    std::vector<uint64_t> h(bins, 0);
    for (size_t th = 0; th < data.size() / (size_t(streams) * bins); ++th) {
      const uint32_t* src = data.data() + (th * streams + m) * bins;
      for (int b = 0; b < bins; ++b) h[b] += src[b];
    }
    return h;
  }
};

// The bin holding the r-th smallest element (1-based) and the number of elements before that bin.
std::pair<uint32_t, int64_t> locate(const std::vector<uint64_t>& h, int64_t r) {
  int64_t before = 0;
  uint32_t b = 0;
  while (before + int64_t(h[b]) < r) before += int64_t(h[b++]);
  return {b, before};
}

Cut cut_level1(const std::vector<uint64_t>& h, int64_t r, int64_t n) {
  Cut c;
  if (r >= n) {
    c.v = kAll;
  } else if (r > 0) {
    const auto [bin, before] = locate(h, r);
    c.v = bin << 16;
    c.room = r - before;
    c.pending = true;
  }
  return c;
}

void refine(Cut& c, const std::vector<uint64_t>& h) {
  const auto [low, before] = locate(h, c.room);
  c.v |= low;
  c.room -= before;
  c.pending = false;
  if (c.room == int64_t(h[low])) ++c.v;  // every element equal to v is below: a plain cut
  else c.split = true;
}

// Level 1 over `streams` value streams: prep(s, thread, off, len) stages a block, vals(s, m) is
// stream m of it.
template <class Prep, class Vals>
Hist level1(Ctx& ctx, int streams, Prep& prep, Vals& vals) {
  Hist h(ctx.nt, streams, kBins1);
  ctx.chunks([&](int th, int64_t, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      prep(s, th, off, len);
      for (int m = 0; m < streams; ++m) {
        uint32_t* __restrict hm = h.at(th, m);
        const float* x = vals(s, m);
        for (int64_t j = 0; j < len; ++j) ++hm[key_of(x[j]) >> 16];
      }
    });
  });
  return h;
}

// Level 2: resolves the pending ones of `cuts` ({stream, cut}) to exact values. extra(s, chunk,
// off, len) sees every staged block.
template <class Prep, class Vals, class Extra>
void level2(Ctx& ctx, const std::vector<std::pair<int, Cut*>>& cuts, Prep& prep, Vals& vals, Extra&& extra) {
  std::vector<std::pair<int, Cut*>> todo;
  for (const auto& c : cuts)
    if (c.second->pending) todo.push_back(c);
  if (todo.empty()) return;
  Hist h(ctx.nt, int(todo.size()), kBins2);
  ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      prep(s, th, off, len);
      extra(s, c, off, len);
      for (size_t q = 0; q < todo.size(); ++q) {
        uint32_t* __restrict hq = h.at(th, int(q));
        const float* x = vals(s, todo[q].first);
        const uint32_t bin = todo[q].second->v >> 16;
        for (int64_t j = 0; j < len; ++j) {
          const uint32_t key = key_of(x[j]);
          if ((key >> 16) == bin) ++hq[key & 0xffffu];
        }
      }
    });
  });
  for (size_t q = 0; q < todo.size(); ++q) refine(*todo[q].second, h.total(int(q)));
}

// Per-chunk counts of the elements equal to each split cut: [chunk][cut], then prefixed.
template <class Prep, class Vals>
std::vector<int64_t> equal_starts(Ctx& ctx, const std::vector<std::pair<int, Cut*>>& cuts, Prep& prep, Vals& vals) {
  std::vector<int64_t> counts(ctx.nchunks * cuts.size(), 0);
  ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      prep(s, th, off, len);
      for (size_t q = 0; q < cuts.size(); ++q) {
        if (!cuts[q].second->split) continue;
        counts[c * cuts.size() + q] += count_key(vals(s, cuts[q].first), len, cuts[q].second->v);
      }
    });
  });
  return chunk_prefix(counts, ctx.nchunks, cuts.size());
}

// One-pass exact selection for large inputs. A strided sample of each stream's keys brackets the
// wanted rank between two sample keys lo <= hi; one pass counts, per chunk, the keys below lo and
// equal to lo and to hi, and collects the keys strictly between them (about 3% of the elements).
// The cut is then exact: found among the collected keys (or at a bracket end), with its per-chunk
// tie counts, so neither a level-2 pass nor a count pass is needed. Returns false, leaving the cuts
// pending, where a bracket misses its rank (a sample unlike the data) or collects too many keys:
// the histogram passes then decide, with the same result.
constexpr int64_t kSample = 1 << 14;
constexpr int64_t kMinBracketed = 1 << 18;  // below this, the histogram passes cost as little
// Up to this many keys over all cuts, the bracket is every key (none sampled) and each cut a selection
// among them: the histograms' clearing and summing (about 1.5 MB per stream) would cost far more than
// the elements (norms, biases, small experts: their merge took ~1 ms whatever their size).
constexpr int64_t kMaxWhole = 1 << 15;

// The keys of the sorted sample around the fraction p of it, `spread` sample positions either side:
// two selections (linear time; sorting the sample was a tenth of a bf16 TIES merge's CPU time).
std::pair<uint32_t, uint32_t> sample_bracket(std::vector<uint32_t>& sample, double p, double spread) {
  const double at = p * double(sample.size());
  const int64_t n = int64_t(sample.size()), a = int64_t(std::floor(at - spread)), b = int64_t(std::ceil(at + spread));
  uint32_t lo = 0u, hi = kLargestKey;
  if (a >= 0) {
    std::nth_element(sample.begin(), sample.begin() + a, sample.end());
    lo = sample[a];
  }
  if (b < n) {
    std::nth_element(sample.begin() + std::max<int64_t>(a + 1, 0), sample.begin() + b, sample.end());
    hi = sample[b];
  }
  return {lo, hi};
}

// The elements a bracketed pass may collect before it gives up; shared by the threads.
struct Collection {
  const int64_t cap;
  int64_t used = 0;
  bool full = false;

  bool stopped() {
    bool f;
#pragma omp atomic read
    f = full;
    return f;
  }
  void add(int64_t m) {
    int64_t total;
#pragma omp atomic capture
    total = used += m;
    if (total > cap) {
#pragma omp atomic write
      full = true;
    }
  }
};

template <class Key, class Prep, class Vals>
bool bracketed(Ctx& ctx, const std::vector<std::pair<int, Cut*>>& cuts, const std::vector<int64_t>& ranks,
               Key& sample_key, Prep& prep, Vals& vals, std::vector<int64_t>& eq_counts) {
  const int64_t n = ctx.t.n;
  const size_t Q = cuts.size();
  const bool whole = n * int64_t(Q) <= kMaxWhole;
  if ((n < kMinBracketed && !whole) || Q == 0) return false;
  std::vector<uint32_t> lo(Q, 0u), hi(Q, kLargestKey);  // whole: every key
  std::vector<uint32_t> sample(whole ? 0 : kSample);
  for (size_t q = 0; q < Q && !whole; ++q) {
    for (int64_t j = 0; j < kSample; ++j) sample[j] = sample_key(cuts[q].first, j * n / kSample);
    const double p = double(ranks[q]) / double(n);
    std::tie(lo[q], hi[q]) = sample_bracket(sample, p, 4.0 * std::sqrt(kSample * p * (1 - p)) + 8.0);
  }
  Collection collection{std::max<int64_t>(kChunk, n / 8) * int64_t(Q)};  // ~0.03 n per cut expected
  std::vector<int64_t> below(ctx.nchunks * Q, 0), at_lo(ctx.nchunks * Q, 0), at_hi(ctx.nchunks * Q, 0);
  std::vector<std::vector<uint32_t>> inside(ctx.nchunks * Q);
  ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      if (collection.stopped()) return;
      prep(s, th, off, len);
      for (size_t q = 0; q < Q; ++q) {
        const uint32_t* out = s.ties.data();
        const BracketCounts n = scan_bracket(vals(s, cuts[q].first), len, lo[q], hi[q],
                                             hi[q] == lo[q] ? kNoKey : hi[q], s.ties.data());
        below[c * Q + q] += n.below, at_lo[c * Q + q] += n.at_lo, at_hi[c * Q + q] += n.at_hi;
        inside[c * Q + q].insert(inside[c * Q + q].end(), out, out + n.inside);
        collection.add(n.inside);
      }
    });
  });
  if (collection.full) return false;
  std::vector<Cut> found(Q);
  for (size_t q = 0; q < Q; ++q) {
    int64_t b = 0, el = 0, eh = 0, m = 0;
    for (int64_t c = 0; c < ctx.nchunks; ++c)
      b += below[c * Q + q], el += at_lo[c * Q + q], eh += at_hi[c * Q + q], m += int64_t(inside[c * Q + q].size());
    int64_t r = ranks[q] - b;  // the cut's rank among the keys >= lo
    if (r < 0 || r > el + m + eh) return false;
    Cut& cut = found[q];
    if (r <= el) {
      cut.v = lo[q], cut.room = r;
    } else if (r > el + m) {
      cut.v = hi[q], cut.room = r - el - m;
    } else {  // the (r - el)-th smallest collected key
      std::vector<uint32_t> keys;
      keys.reserve(size_t(m));
      for (int64_t c = 0; c < ctx.nchunks; ++c) keys.insert(keys.end(), inside[c * Q + q].begin(), inside[c * Q + q].end());
      r -= el;
      std::nth_element(keys.begin(), keys.begin() + (r - 1), keys.end());
      cut.v = keys[size_t(r - 1)];
      int64_t less = 0;
      for (uint32_t key : keys) less += key < cut.v;
      cut.room = r - less;
    }
    int64_t equal = 0;
    for (int64_t c = 0; c < ctx.nchunks; ++c) {
      int64_t count;
      if (cut.v == lo[q]) count = at_lo[c * Q + q];
      else if (cut.v == hi[q]) count = at_hi[c * Q + q];
      else count = std::count(inside[c * Q + q].begin(), inside[c * Q + q].end(), cut.v);
      eq_counts[c * Q + q] = count;
      equal += count;
    }
    if (cut.room == equal || cut.room == 0) {  // every element equal to v is below, or none: a plain cut
      if (cut.room == equal) ++cut.v;
      cut.room = 0;
    } else {
      cut.split = true;
    }
  }
  for (size_t q = 0; q < Q; ++q) *cuts[q].second = found[q];
  return true;
}

// Zeroes the elements of d outside the ranks [lo, hi): those below hi and not below lo stay.
void keep_ranks(float* __restrict d, int64_t len, const Cut& lo, const Cut& hi, int64_t& eq_lo, int64_t& eq_hi,
                uint32_t* __restrict ties) {
  const int64_t n_ties = find_ties(d, len, lo, hi, ties);
  const uint32_t vlo = lo.v, vhi = hi.split ? hi.v + 1 : hi.v;  // keeps the ties, decided below
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t key = key_of(d[j]);
    d[j] = (key >= vlo) & (key < vhi) ? d[j] : 0.0f;
  }
  for (int64_t t = 0; t < n_ties; ++t) {
    const uint32_t j = ties[t], key = key_of(d[j]);
    const bool below_hi = hi.below(key, eq_hi), below_lo = lo.below(key, eq_lo);
    if (!below_hi || below_lo) d[j] = 0.0f;
  }
}

// ------------------------------------------------------------ DELLA row ranks

// s.rank[j] = ascending rank of |d[j]| within the row, whose keys lie in [lo, hi] (lo < hi), ties
// by index: a stable LSD radix sort of (key << 32 | index), whose initial order is by index. Keys
// are taken relative to the row's smallest, and the digits cover only the bits that vary, in as
// few passes of at most 11 bits as they need: a row's |δ| spans a few exponents, so the digits are
// narrower than the key's (smaller counts to clear and sum) and a row of few values takes fewer
// passes. The last pass writes the ranks instead of the sorted pairs.
void row_ranks(const float* d, int64_t len, uint32_t lo, uint32_t hi, Scratch& s) {
  uint64_t* a = s.sort_a.data();
  uint64_t* b = s.sort_b.data();
  uint32_t* rank = s.rank.data();
  for (int64_t j = 0; j < len; ++j) a[j] = uint64_t(key_of(d[j]) - lo) << 32 | uint64_t(j);
  if (len <= 64) {
    std::sort(a, a + len);  // the pairs are distinct, so this is the same order
    for (int64_t pos = 0; pos < len; ++pos) rank[uint32_t(a[pos])] = uint32_t(pos);
    return;
  }
  const int bits = 32 - __builtin_clz(hi - lo), passes = (bits + 10) / 11, width = (bits + passes - 1) / passes;
  const uint32_t mask = (1u << width) - 1;
  uint32_t count[3][2048];
  for (int p = 0; p < passes; ++p) std::memset(count[p], 0, sizeof(uint32_t) << width);
  for (int64_t j = 0; j < len; ++j)
    for (int p = 0; p < passes; ++p) ++count[p][(a[j] >> (32 + p * width)) & mask];
  for (int p = 0; p < passes; ++p) {
    uint32_t* c = count[p];
    const int shift = 32 + p * width;
    for (uint32_t i = 0, sum = 0; i <= mask; ++i) std::swap(c[i], sum), sum += c[i];
    if (p + 1 == passes) {
      for (int64_t j = 0; j < len; ++j) rank[uint32_t(a[j])] = c[(a[j] >> shift) & mask]++;
      return;
    }
    for (int64_t j = 0; j < len; ++j) b[c[(a[j] >> shift) & mask]++] = a[j];
    std::swap(a, b);
  }
}

constexpr int kBucketBits = 11;
static_assert(kBucketBits < 16, "bucket numbers are stored as uint16_t");
constexpr int64_t kCounted = 8;   // undecided elements each ranked by a count over the row; more take a pass first
constexpr int64_t kSortRow = 32;  // counts reading more keys than this many rows hold: the row is sorted instead

// DELLA's draw for one row: keep[j] = 1 where u[j] < p0 + ((rank[j] / span) * 2) * eps (the
// reference's float ops), rank[j] being the ascending rank of |d[j]| within the row, ties by index.
// The bound is monotone in the rank, so an element's bucket (its key's top bits above the row's
// smallest nonzero key; the zeros have a bucket of their own, so that they do not widen the others)
// decides it wherever the bounds at the bucket's first and last rank lie on one side of u[j]: nearly
// every element, since the buckets are narrow. The few undecided ones are ranked by a count over the
// row. Crowded buckets (many equal |δ|, as quantized bf16 / fp16 deltas have) leave more undecided:
// where such a bucket holds one key, index order is rank order, and the element's position among
// its bucket's, taken while counting them, ranks it; the undecided elements of buckets holding
// several keys are counted among those buckets' elements, or the row is sorted where that reads
// less. (3 x 16M as [4096, 4096], 2 threads on a noisy 2-core EPYC (Zen 3), AVX2, best of 7 in
// five alternations, fp32 / bf16 / fp16: 265-331 / 273-343 / 290-353 ms -> 183-233 / 190-229 /
// 184-204 ms, against crowded rows, picked by a sample, sorted whole and the others' undecided
// elements' buckets sorted.)
void della_keep(const float* d, int64_t len, const float* u, float p0, float eps, float* keep, Scratch& s) {
  const float span = float(std::max<int64_t>(len - 1, 1));
  auto bound = [&](uint32_t rank) { return p0 + ((float(rank) / span) * 2.0f) * eps; };
#ifdef SEME_AVX2
  const int64_t len8 = len & ~int64_t(7);  // the part of the row the 8-lane loops take
#else
  const int64_t len8 = 0;
#endif
  uint32_t lo = 0xffffffffu, hi = 0;  // the smallest nonzero key (key - 1 wraps for 0), the largest
  for (int64_t j = 0; j < len; ++j) lo = std::min(lo, key_of(d[j]) - 1), hi = std::max(hi, key_of(d[j]));
  ++lo;
  const int bits = hi > lo ? 32 - __builtin_clz(hi - lo) : 0;
  const int width = std::min({bits, kBucketBits, 32 - __builtin_clz(uint32_t(len))});
  const int shift = bits - width;
  const uint32_t buckets = ((hi - lo) >> shift) + 2;
  // Bucket 1 starts at lo; bucket 0 holds the keys below: the zeros (and, where lo is below one
  // bucket's width, the keys below that width).
  const uint32_t floor = lo >= (1u << shift) ? lo - (1u << shift) : 0;
  uint16_t* bucket = s.bucket.data();
  for (int64_t j = 0; j < len; ++j) bucket[j] = uint16_t((std::max(key_of(d[j]), floor) - floor) >> shift);
  uint32_t* start = s.bucket_start.data();
  uint32_t* pos = s.rank.data();  // an element's position among its bucket's, in index order
  std::memset(start, 0, sizeof(uint32_t) * (buckets + 1));
  for (int64_t j = 0; j < len; ++j) pos[j] = start[bucket[j] + 1]++;
  for (uint32_t b = 0; b < buckets; ++b) start[b + 1] += start[b];
  float* below = s.bucket_min.data();
  float* above = s.bucket_max.data();
  for (uint32_t b = 0; b < buckets; ++b) {  // (vectorized: an empty bucket's bounds are never read)
    const float first = bound(start[b]), last = bound(start[b + 1] - 1);
    below[b] = std::min(first, last), above[b] = std::max(first, last);
  }
  uint32_t* undecided = s.undecided.data();  // ascending
  int64_t n = 0;
#ifdef SEME_AVX2
  for (int64_t j = 0; j < len8; j += 8) {
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket + j)));
    const __m256 uj = _mm256_loadu_ps(u + j);
    const __m256 yes = _mm256_cmp_ps(uj, _mm256_i32gather_ps(below, b, 4), _CMP_LT_OQ);
    const __m256 open = _mm256_andnot_ps(yes, _mm256_cmp_ps(uj, _mm256_i32gather_ps(above, b, 4), _CMP_LT_OQ));
    _mm256_storeu_ps(keep + j, _mm256_and_ps(yes, _mm256_set1_ps(1.0f)));
    n += pack(positions8(j), _mm256_movemask_ps(open), undecided + n);
  }
#endif
  for (int64_t j = len8; j < len; ++j) {
    const uint32_t b = bucket[j];
    const bool yes = u[j] < below[b];
    keep[j] = yes ? 1.0f : 0.0f;
    undecided[n] = uint32_t(j);
    n += !yes & (u[j] < above[b]);
  }
  if (n > kCounted) {
    // mixed[b]: bucket b holds a key unlike the one an undecided element of it left in some_key[b]
    // (kNoKey: none did, nothing to mark). The other buckets' undecided elements are ranked.
    uint32_t* some_key = s.bucket_key.data();
    uint8_t* mixed = s.bucket_mixed.data();
    std::fill(some_key, some_key + buckets, kNoKey);
    for (int64_t i = 0; i < n; ++i) some_key[bucket[undecided[i]]] = key_of(d[undecided[i]]);
    std::memset(mixed, 0, buckets);
#ifdef SEME_AVX2
    for (int64_t j = 0; j < len8; j += 8) {
      const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket + j)));
      const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(some_key), b, 4);
      const __m256i none = _mm256_cmpeq_epi32(v, _mm256_set1_epi32(int(kNoKey)));
      const __m256i same = _mm256_or_si256(_mm256_cmpeq_epi32(keys8(d + j), v), none);
      for (unsigned other = ~unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(same))) & 0xff; other; other &= other - 1)
        mixed[bucket[j + __builtin_ctz(other)]] = 1;
    }
#endif
    for (int64_t j = len8; j < len; ++j)
      if (some_key[bucket[j]] != kNoKey && key_of(d[j]) != some_key[bucket[j]]) mixed[bucket[j]] = 1;
    int64_t m = 0;  // the undecided elements of mixed buckets, kept in front
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t j = undecided[i], b = bucket[j];
      if (mixed[b]) undecided[m++] = j;
      else keep[j] = u[j] < bound(start[b] + pos[j]) ? 1.0f : 0.0f;
    }
    n = m;
    if (n > kCounted) {
      // The mixed buckets' elements, gathered in index order (keys, positions): each undecided one is
      // counted among them, from its bucket's first key.
      uint32_t* keys = s.gathered_keys.data();
      uint32_t* at = s.gathered_at.data();
      int64_t g = 0;
#ifdef SEME_AVX2
      for (int64_t j = 0; j < len8; j += 8) {  // mixed[b] as the low byte of 4 read at b (it has the room)
        const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket + j)));
        const __m256i flag = _mm256_slli_epi32(_mm256_i32gather_epi32(reinterpret_cast<const int*>(mixed), b, 1), 24);
        const int take = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(flag, _mm256_setzero_si256())));
        pack(keys8(d + j), take, keys + g);
        g += pack(positions8(j), take, at + g);
      }
#endif
      for (int64_t j = len8; j < len; ++j) keys[g] = key_of(d[j]), at[g] = uint32_t(j), g += mixed[bucket[j]];
      if (n * g > kSortRow * len) {
        row_ranks(d, len, start[1] > 0 ? 0 : lo, hi, s);
        for (int64_t i = 0; i < n; ++i) {
          const uint32_t j = undecided[i];
          keep[j] = u[j] < bound(s.rank[j]) ? 1.0f : 0.0f;
        }
        return;
      }
      for (int64_t i = 0, p = 0; i < n; ++i) {
        const uint32_t j = undecided[i], b = bucket[j];
        while (at[p] != j) ++p;
        const int32_t key = int32_t(key_of(d[j])), first = b > 0 ? int32_t(floor + (b << shift)) : 0;
        uint32_t rank = start[b];
        for (int64_t q = 0; q < p; ++q) rank += (int32_t(keys[q]) >= first) & (int32_t(keys[q]) <= key);
        for (int64_t q = p; q < g; ++q) rank += (int32_t(keys[q]) >= first) & (int32_t(keys[q]) < key);
        keep[j] = u[j] < bound(rank) ? 1.0f : 0.0f;
      }
      return;
    }
  }
  // The keys below key_j, and the equal ones before j (keys are below 2^31: signed compares vectorize).
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t j = undecided[i];
    const int32_t key = int32_t(key_of(d[j]));
    uint32_t rank = 0;
    for (uint32_t k = 0; k < j; ++k) rank += int32_t(key_of(d[k])) <= key;
    for (int64_t k = j; k < len; ++k) rank += int32_t(key_of(d[k])) < key;
    keep[j] = u[j] < bound(rank) ? 1.0f : 0.0f;
  }
}

// Elements collected per chunk as key << 32 | index, each list in index order, with their K deltas.
struct Collected {
  std::vector<std::vector<uint64_t>> at;
  std::vector<std::vector<float>> deltas;  // K per element, in the order of `at`

  explicit Collected(int64_t nchunks = 0) : at(size_t(nchunks)), deltas(size_t(nchunks)) {}
  bool empty() const { return at.empty(); }
  int64_t size() const {
    int64_t m = 0;
    for (const auto& list : at) m += int64_t(list.size());
    return m;
  }
};

// The element of rank r (0-based) in (key, index) order among the collected ones, and how many elements
// with its key precede it: two parallel histogram passes over the keys (their high, then low 16 bits),
// then the equal keys counted per chunk; the lists' index order settles the rest without a sort.
std::pair<uint64_t, int64_t> select_rank(const Collected& in, int64_t r, int nt) {
  const int64_t nc = int64_t(in.at.size());
  if (in.size() <= kMaxWhole) {  // few: one selection among them (the indices make every element distinct)
    std::vector<uint64_t> all;
    for (const auto& list : in.at) all.insert(all.end(), list.begin(), list.end());
    std::nth_element(all.begin(), all.begin() + r, all.end());
    const uint64_t e = all[size_t(r)];
    int64_t room = 0;
    for (uint64_t x : all) room += (x >> 32) == (e >> 32) && x < e;
    return {e, room};
  }
  auto histogram = [&](int shift, uint32_t prefix_mask, uint32_t prefix) {
    std::vector<int64_t> h(1 << 16, 0);
#pragma omp parallel num_threads(nt)
    {
      std::vector<int64_t> local(1 << 16, 0);
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t c = 0; c < nc; ++c)
        for (uint64_t e : in.at[c]) {
          const uint32_t key = uint32_t(e >> 32);
          if ((key & prefix_mask) == prefix) ++local[(key >> shift) & 0xffff];
        }
#pragma omp critical
      for (size_t i = 0; i < h.size(); ++i) h[i] += local[i];
    }
    return h;
  };
  int64_t before = 0;
  const auto h1 = histogram(16, 0, 0);
  uint32_t high = 0;
  while (before + h1[high] <= r) before += h1[high++];
  const auto h2 = histogram(0, 0xffff0000u, high << 16);
  uint32_t low = 0;
  while (before + h2[low] <= r) before += h2[low++];
  const uint32_t v = high << 16 | low;
  const int64_t room = r - before;  // elements equal to v before the one sought
  std::vector<int64_t> equal(size_t(nc), 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t c = 0; c < nc; ++c)
    for (uint64_t e : in.at[c]) equal[c] += uint32_t(e >> 32) == v;
  int64_t left = room;
  for (int64_t c = 0;; ++c) {
    if (left >= equal[c]) {
      left -= equal[c];
      continue;
    }
    for (uint64_t e : in.at[c])
      if (uint32_t(e >> 32) == v && left-- == 0) return {e, room};
  }
}

void check(const Tensors& t) {
  for (Dtype d : {t.in_dtype, t.out_dtype})
    if (d != kF32 && d != kBF16 && d != kF16) throw std::invalid_argument("unsupported dtype code");
  if (t.n < 0 || t.n >= (int64_t(1) << 32)) throw std::invalid_argument("tensor size must be below 2^32");
}

}  // namespace

// ------------------------------------------------------------ task-vector family

Finite family_merge(const Tensors& t, const FamilyParams& p) {
  check(t);
  const int K = int(t.others.size());
  const size_t k_ = size_t(K);
  if (p.mode.size() != k_ || p.weight.size() != k_ || p.rank_lo.size() != k_ || p.rank_hi.size() != k_ ||
      p.p0.size() != k_ || p.epsilon.size() != k_ || p.key.size() != k_ || p.cols < 1 || t.n % p.cols != 0)
    throw std::invalid_argument("family_merge: per-model parameters must have one entry per model, cols divide n");
  const bool della = p.sparsify == kDella;
  // DELLA ranks along rows: a block is one row, a chunk a whole number of rows.
  const int64_t rows_per_chunk = della ? std::max<int64_t>(1, kChunk / p.cols) : 1;
  Ctx ctx(t, della ? rows_per_chunk * p.cols : kChunk, della ? p.cols : kBlock);
  if (della)
    for (Scratch& s : ctx.scratch) {
      const size_t buckets = (size_t(1) << kBucketBits) + 1;  // the zeros' and the key buckets
      s.sort_a.resize(p.cols), s.sort_b.resize(p.cols), s.rank.resize(p.cols), s.undecided.resize(p.cols + 8);
      s.bucket.resize(p.cols), s.gathered_at.resize(p.cols + 8), s.gathered_keys.resize(p.cols + 8);
      s.bucket_start.resize(buckets + 1), s.bucket_key.resize(buckets), s.bucket_mixed.resize(buckets + 3);
      s.bucket_min.resize(buckets), s.bucket_max.resize(buckets);
    }

  std::vector<int> active;
  for (int k = 0; k < K; ++k)
    if (p.mode[k] == kActive && p.sparsify != kNone) active.push_back(k);

  // kRank: cuts[2k] / cuts[2k + 1] = ranks below rank_lo / rank_hi of model k's |δ|.
  std::vector<Cut> cuts(2 * size_t(K));
  std::vector<std::pair<int, Cut*>> cut_list;  // {model, cut}
  std::vector<int64_t> eq_start(ctx.nchunks * 2 * size_t(K), 0);
  auto prep = [&](Scratch& s, int, int64_t off, int64_t len) { ctx.load(s, off, len); };
  auto model = [&](Scratch& s, int k) -> const float* { return ctx.delta(s, k); };
  if (p.sparsify == kRank && !active.empty()) {
    for (int k : active) cut_list.push_back({k, &cuts[2 * k]}), cut_list.push_back({k, &cuts[2 * k + 1]});
    // Cuts at rank 0 or n need no pass: nothing, or everything, is below them.
    std::vector<std::pair<int, Cut*>> open;
    std::vector<int64_t> ranks;
    for (const auto& [k, cut] : cut_list) {
      const int64_t r = cut == &cuts[2 * k] ? p.rank_lo[k] : p.rank_hi[k];
      if (r >= t.n) cut->v = kAll;
      else if (r > 0) open.push_back({k, cut}), ranks.push_back(r);
    }
    std::vector<int64_t> eq_counts(ctx.nchunks * open.size(), 0);
    auto sample_key = [&](int k, int64_t i) { return key_of(ctx.delta_at(k, i)); };
    if (bracketed(ctx, open, ranks, sample_key, prep, model, eq_counts)) {
      const auto starts = chunk_prefix(eq_counts, ctx.nchunks, open.size());
      for (int64_t c = 0; c < ctx.nchunks; ++c)
        for (size_t q = 0; q < open.size(); ++q)
          eq_start[c * 2 * K + (open[q].second - cuts.data())] = starts[c * open.size() + q];
    } else {
      auto stream = [&](Scratch& s, int m) -> const float* { return ctx.delta(s, active[m]); };
      const Hist h1 = level1(ctx, int(active.size()), prep, stream);
      for (size_t m = 0; m < active.size(); ++m) {
        const int k = active[m];
        const auto h = h1.total(int(m));
        cuts[2 * k] = cut_level1(h, p.rank_lo[k], t.n);
        cuts[2 * k + 1] = cut_level1(h, p.rank_hi[k], t.n);
      }
      level2(ctx, cut_list, prep, model, [](Scratch&, int64_t, int64_t, int64_t) {});
      if (std::any_of(cuts.begin(), cuts.end(), [](const Cut& c) { return c.split; })) {
        const auto starts = equal_starts(ctx, cut_list, prep, model);
        for (int64_t c = 0; c < ctx.nchunks; ++c)
          for (size_t q = 0; q < cut_list.size(); ++q)
            eq_start[c * 2 * K + (cut_list[q].second - cuts.data())] = starts[c * cut_list.size() + q];
      }
    }
  }

  // DARE and DELLA with rescale: the sums pass keeps its draws as one bit per element and the fused
  // pass replays them instead of drawing (and, for DELLA, ranking each row) again: that is most of
  // their arithmetic. DARE's blocks start at multiples of 64 elements and DELLA's rows get whole
  // words, so no two threads share a word.
  const int64_t row_words = della ? (p.cols + 63) / 64 : 0;
  auto first_word = [&](int64_t off) { return della ? off / p.cols * row_words : off >> 6; };  // of a block
  std::vector<std::unique_ptr<uint64_t[]>> kept_bits((p.sparsify == kRandom || della) && p.rescale ? K : 0);
  for (int k : active)
    if (!kept_bits.empty()) kept_bits[k] = uncleared_words(size_t(della ? t.n / p.cols * row_words : (t.n + 63) / 64));
  bool replay = false;

  // Drops elements of model k's δ in the staged block (a DELLA block is one row): zeroes them, or
  // returns the flags (1 kept, 0 dropped) for the caller to apply in a pass of its own.
  auto sparsify = [&](Scratch& s, int k, int64_t off, int64_t len, int64_t* eq) -> const float* {
    float* d = ctx.delta(s, k);
    if (p.sparsify == kRank) {
      keep_ranks(d, len, cuts[2 * k], cuts[2 * k + 1], eq[2 * k], eq[2 * k + 1], s.ties.data());
      return nullptr;
    }
    uint64_t* bits = kept_bits.empty() ? nullptr : kept_bits[k].get() + first_word(off);
    float* keep = s.div.data();
    if (bits && replay) {
      unpack_bits(bits, len, keep);
      return keep;
    }
    uniforms(p.key[k], off, len, s.u.data());
    const float* u = s.u.data();
    if (p.sparsify == kRandom) {
      const float p0 = p.p0[k];
      for (int64_t j = 0; j < len; ++j) keep[j] = u[j] < p0 ? 1.0f : 0.0f;
    } else {
      della_keep(d, len, u, p.p0[k], p.epsilon[k], keep, s);
    }
    if (bits) pack_bits(keep, len, bits);
    return keep;
  };

  // L1 rescale: kept δ · (Σ|δ| / Σ|kept|), from per-chunk sums added in chunk order.
  std::vector<float> scale(K, 1.0f);
  if (p.rescale && !active.empty()) {
    std::vector<double> sums(ctx.nchunks * 2 * size_t(K), 0.0);  // [chunk][model][before, after]
    ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
      Scratch& s = ctx.scratch[th];
      std::vector<int64_t> eq(eq_start.begin() + c * 2 * K, eq_start.begin() + (c + 1) * 2 * K);
      ctx.blocks(start, end, [&](int64_t off, int64_t len) {
        if (p.sparsify == kRandom) {  // the draws go straight to bits, and the sums read the inputs
          dispatch(t.in_dtype, [&](auto tag) {
            using T = decltype(tag);
            const T* base = static_cast<const T*>(t.base) + off;
            prefetch_next(base, len);
            for (int k : active) {
              prefetch_next(static_cast<const T*>(t.others[k]) + off, len);
              uint64_t* bits = kept_bits[k].get() + first_word(off);
              keep_bits(p.key[k], off, len, p.p0[k], s.u.data(), bits);
              const auto [before, after] = abs_sums(base, static_cast<const T*>(t.others[k]) + off, bits, len);
              sums[(c * K + k) * 2] += before;
              sums[(c * K + k) * 2 + 1] += after;
            }
          });
          return;
        }
        ctx.load(s, off, len);
        for (int k : active) {
          sums[(c * K + k) * 2] += sum_abs(ctx.delta(s, k), len);
          if (const float* keep = sparsify(s, k, off, len, eq.data())) zero_unless(ctx.delta(s, k), keep, len);
          sums[(c * K + k) * 2 + 1] += sum_abs(ctx.delta(s, k), len);
        }
      });
    });
    replay = true;
    for (int k : active) {
      double before = 0, after = 0;
      for (int64_t c = 0; c < ctx.nchunks; ++c) before += sums[(c * K + k) * 2], after += sums[(c * K + k) * 2 + 1];
      if (before >= 1e-7 && after >= 1e-7) scale[k] = float(before / after);
    }
  }

  std::vector<bool> rescaled(K, false);
  for (int k : active) rescaled[k] = p.rescale && scale[k] != 1.0f;
  float weight_sum = 0.0f;  // the divisor without consensus, summed in model order like torch
  for (int k = 0; k < K; ++k) weight_sum += p.weight[k];
  if (std::fabs(weight_sum) < 1e-8f) weight_sum = 1.0f;

  ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    std::vector<int64_t> eq(eq_start.begin() + c * 2 * K, eq_start.begin() + (c + 1) * 2 * K);
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      ctx.load(s, off, len, true);
      float* __restrict sum = s.acc.data();
      for (int k = 0; k < K; ++k) {
        float* __restrict d = ctx.delta(s, k);
        const float* keep = nullptr;
        if (p.mode[k] == kDrop) std::fill(d, d + len, 0.0f);
        else if (p.mode[k] == kActive && p.sparsify != kNone) keep = sparsify(s, k, off, len, eq.data());
        // Drop, rescale (x · 1 is x), weight and the running sum over models (from 0, in order, like torch).
        const float sc = rescaled[k] ? scale[k] : 1.0f, w = p.weight[k];
        if (keep && k == 0)
          for (int64_t j = 0; j < len; ++j) d[j] = ((keep[j] != 0.0f ? d[j] : 0.0f) * sc) * w, sum[j] = 0.0f + d[j];
        else if (keep)
          for (int64_t j = 0; j < len; ++j) d[j] = ((keep[j] != 0.0f ? d[j] : 0.0f) * sc) * w, sum[j] += d[j];
        else if (k == 0)
          for (int64_t j = 0; j < len; ++j) d[j] = (d[j] * sc) * w, sum[j] = 0.0f + d[j];
        else
          for (int64_t j = 0; j < len; ++j) d[j] = (d[j] * sc) * w, sum[j] += d[j];
      }
      const float* mixed = sum;  // may be sum itself: no __restrict
      const float* div = nullptr;
      if (p.consensus) {
        float* __restrict m = s.u.data();
        float* __restrict v = s.div.data();
        add_agreeing<false, true>(sum, ctx.delta(s, 0), p.weight[0], len, m, v);
        for (int k = 1; k < K; ++k) add_agreeing<false, false>(sum, ctx.delta(s, k), p.weight[k], len, m, v);
        mixed = m;
        if (p.normalize) div = v;
      }
      const float* __restrict base = s.base.data();
      const float lambda = p.lambda, by = weight_sum;
      // sum = base + lambda · the (normalized) mix, where x · 1 is x
      if (div)
        for (int64_t j = 0; j < len; ++j) sum[j] = base[j] + (mixed[j] / (div[j] == 0.0f ? 1.0f : div[j])) * lambda;
      else if (!p.consensus && p.normalize)
        for (int64_t j = 0; j < len; ++j) sum[j] = base[j] + (mixed[j] / by) * lambda;
      else
        for (int64_t j = 0; j < len; ++j) sum[j] = base[j] + mixed[j] * lambda;
      ctx.store(s, sum, off, len);
    });
  });
  return ctx.finite();
}

// ------------------------------------------------------------ SCE

Finite sce_merge(const Tensors& t, double tau, SceStats* stats) {
  check(t);
  const int K = int(t.others.size());
  Ctx ctx(t, kChunk, kBlock);
  for (Scratch& s : ctx.scratch) s.mean.resize(kBlock), s.m2.resize(kBlock), s.var.resize(kBlock);
  const bool select = tau < 1;
  bool none = tau <= 0;  // nothing selected: the output is the base

  // var[j]: population variance over models of δ_k[j], as torch computes it (Welford in double).
  auto variance = [&](Scratch& s, int64_t len) {
    double* __restrict mean = s.mean.data();
    double* __restrict m2 = s.m2.data();
    std::fill(mean, mean + len, 0.0);
    std::fill(m2, m2 + len, 0.0);
    for (int k = 0; k < K; ++k) {
      const float* __restrict d = ctx.delta(s, k);
      const int count = k + 1;
      if ((count & (count - 1)) == 0) {  // x / 2^i == x * 2^-i exactly, and spares the division
        const double inv = 1.0 / count;
        for (int64_t j = 0; j < len; ++j) {
          const double x = d[j], dev = x - mean[j];
          mean[j] += dev * inv;
          m2[j] += dev * (x - mean[j]);
        }
      } else {
        for (int64_t j = 0; j < len; ++j) {
          const double x = d[j], dev = x - mean[j];
          mean[j] += dev / count;
          m2[j] += dev * (x - mean[j]);
        }
      }
    }
    float* __restrict var = s.var.data();
    for (int64_t j = 0; j < len; ++j) var[j] = float(m2[j] / K);
  };
  std::vector<int64_t> zeros(ctx.nt, 0);
  bool count_zeros = true;
  auto prep = [&](Scratch& s, int th, int64_t off, int64_t len) {
    ctx.load(s, off, len);
    variance(s, len);
    if (count_zeros) {
      int64_t z = 0;
      for (int64_t j = 0; j < len; ++j) z += s.var[j] == 0.0f;
      zeros[th] += z;
    }
  };
  auto var = [](Scratch& s, int) -> const float* { return s.var.data(); };

  // Kept: the k = int(nnz(var) · tau) largest variances, i.e. not below the cut at rank n - k.
  // While level 2 runs, the energies above the cut's level-1 bin are summed per chunk and, if that
  // bin is small, its elements collected: they settle the energies and the ties without another pass.
  Cut cut;
  int64_t rest = 0;                            // the cut's rank inside its level-1 bin (1-based)
  Collected in_bin;                            // per chunk: that bin's elements
  std::vector<double> above_bin(ctx.nchunks * size_t(K), 0.0);  // [chunk][model]: Σ δ² above the bin
  int64_t n_selected = none ? 0 : t.n;
  // Large tensors: the cut from one pass bracketed by a strided sample of the variances (as in
  // bracketed(), the estimated rank also allowing for the sampled share of zero variances). The
  // pass counts the zeros, which give the exact rank, and fills what level 2 fills below, the
  // bracket [lo, hi] playing the level-1 bin's part. It also keeps one bit per element, set above
  // the bracket and then for the kept elements inside it, so that the fused pass reads the
  // selection instead of computing every variance again (blocks start at multiples of 64). False
  // where the bracket misses or holds too many elements: nothing is kept of it, and the histogram
  // passes run.
  std::unique_ptr<uint64_t[]> selected_bits;
  uint64_t first_kept = 0;  // of the bin's elements in (key, index) order; found by the bracketed pass
  bool first_kept_known = false;
  // Appends the m staged elements at positions `at` (with their deltas) to chunk c's list.
  auto collect = [&](Scratch& s, int64_t c, int64_t off, const uint32_t* at, int64_t m, Collected& into) {
    const float* __restrict v = s.var.data();
    const size_t first = into.at[c].size();
    into.at[c].resize(first + size_t(m));
    into.deltas[c].resize((first + size_t(m)) * K);
    uint64_t* __restrict keys = into.at[c].data() + first;
    float* __restrict deltas = into.deltas[c].data() + first * K;
    for (int64_t e = 0; e < m; ++e) keys[e] = uint64_t(key_of(v[at[e]])) << 32 | uint64_t(off + at[e]);
    for (int k = 0; k < K; ++k) {
      const float* __restrict d = ctx.delta(s, k);
      for (int64_t e = 0; e < m; ++e) deltas[e * K + k] = d[at[e]];
    }
  };
  auto select_bracketed = [&]() -> bool {
    const bool whole = t.n <= kMaxWhole;  // the bracket [0, kLargestKey]: every element
    if (t.n < kMinBracketed && !whole) return false;
    std::vector<uint32_t> sample(whole ? 0 : kSample);
    int64_t zero_samples = 0;
    for (int64_t j = 0; j < int64_t(sample.size()); ++j) {
      const int64_t i = j * t.n / kSample;
      double mean = 0, m2 = 0;
      for (int k = 0; k < K; ++k) {
        const double x = ctx.delta_at(k, i), dev = x - mean;
        mean += dev / (k + 1);
        m2 += dev * (x - mean);
      }
      sample[j] = key_of(float(m2 / K));
      zero_samples += sample[j] == 0;
    }
    const double pz = double(zero_samples) / kSample, p = 1.0 - (1.0 - pz) * tau;
    const auto [lo, hi] = whole ? std::pair<uint32_t, uint32_t>{0u, kLargestKey} : sample_bracket(
        sample, p, 4.0 * (std::sqrt(kSample * p * (1 - p)) + tau * std::sqrt(kSample * pz * (1 - pz))) + 8.0);
    Collection collection{std::max<int64_t>(kChunk, t.n / 8)};
    std::vector<int64_t> below(ctx.nchunks, 0);
    Collected inside(ctx.nchunks);
    std::vector<double> above(ctx.nchunks * size_t(K), 0.0);
    std::unique_ptr<uint64_t[]> bits = uncleared_words(size_t((t.n + 63) / 64));
    ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
      Scratch& s = ctx.scratch[th];
      ctx.blocks(start, end, [&](int64_t off, int64_t len) {
        if (collection.stopped()) return;
        prep(s, th, off, len);
        const float* __restrict v = s.var.data();
        float* __restrict mask = s.acc.data();
        for (int64_t j = 0; j < len; ++j) mask[j] = key_of(v[j]) > hi ? 1.0f : 0.0f;
        for (int k = 0; k < K; ++k) above[c * K + k] += sum_squares(ctx.delta(s, k), mask, len);
        pack_bits(mask, len, bits.get() + (off >> 6));
        uint32_t* at = s.ties.data();
        const int64_t m = positions_between(v, len, lo, hi, at, below[c]);
        collect(s, c, off, at, m, inside);
        collection.add(m);
      });
    });
    int64_t nnz = t.n, under = 0;
    for (int64_t z : zeros) nnz -= z;
    std::fill(zeros.begin(), zeros.end(), 0);  // counted again by level 1 if it must run
    for (int64_t x : below) under += x;
    const int64_t n_keep = int64_t(double(nnz) * tau), r = t.n - n_keep;  // r: the dropped
    const int64_t collected = collection.used;
    if (collection.full || r < under || r > under + collected) return false;
    count_zeros = false;
    none = n_keep == 0;
    n_selected = n_keep;
    in_bin = std::move(inside);
    above_bin = std::move(above);
    selected_bits = std::move(bits);
    rest = r - under;
    if (rest == collected) {  // every bracketed element is dropped
      cut.v = hi + 1;
      return true;
    }
    const auto [first, room] = select_rank(in_bin, rest, ctx.nt);
    first_kept = first;
    first_kept_known = true;
    cut.v = uint32_t(first_kept >> 32);
    cut.room = room;
    cut.split = cut.room > 0;
    return true;
  };
  if (select && !none && !select_bracketed()) {
    const Hist h1 = level1(ctx, 1, prep, var);
    count_zeros = false;
    int64_t nnz = t.n;
    for (int64_t z : zeros) nnz -= z;
    const int64_t n_keep = int64_t(double(nnz) * tau);
    none = n_keep == 0;
    n_selected = n_keep;
    const auto h = h1.total(0);
    cut = cut_level1(h, t.n - n_keep, t.n);
    rest = cut.room;
    if (cut.pending && int64_t(h[cut.v >> 16]) <= std::max<int64_t>(kChunk, t.n / 32)) in_bin = Collected(ctx.nchunks);
    const uint32_t bin = cut.v >> 16;
    level2(ctx, {{0, &cut}}, prep, var, [&](Scratch& s, int64_t c, int64_t off, int64_t len) {
      if (in_bin.empty()) return;
      const float* __restrict v = s.var.data();
      float* __restrict mask = s.acc.data();
      uint32_t* __restrict at = s.ties.data();
      for (int64_t j = 0; j < len; ++j) mask[j] = (key_of(v[j]) >> 16) > bin ? 1.0f : 0.0f;
      for (int k = 0; k < K; ++k) above_bin[c * K + k] += sum_squares(ctx.delta(s, k), mask, len);
      int64_t n_at = 0;
      for (int64_t j = 0; j < len; ++j) {  // branch-free append of the bin's positions
        at[n_at] = uint32_t(j);
        n_at += (key_of(v[j]) >> 16) == bin;
      }
      collect(s, c, off, at, n_at, in_bin);
    });
  }
  // keep[j] of a staged block (variance computed); eq counts the elements equal to the cut so far.
  auto keep_mask = [&](Scratch& s, int64_t len, int64_t& eq, float* __restrict keep) {
    const float* __restrict v = s.var.data();
    uint32_t* ties = s.ties.data();
    const int64_t n_ties = find_ties(v, len, cut, cut, ties);
    const uint32_t cv = cut.v;
    for (int64_t j = 0; j < len; ++j) keep[j] = key_of(v[j]) >= cv ? 1.0f : 0.0f;
    for (int64_t e = 0; e < n_ties; ++e) keep[ties[e]] = eq++ < cut.room ? 0.0f : 1.0f;
  };

  // Energies Σ δ_k² of the selected deltas.
  std::vector<float> eta(K, 1.0f / K);
  std::vector<int64_t> eq_start(ctx.nchunks, 0);
  std::vector<double> energy(K, 0.0);
  if (!none && !in_bin.empty()) {
    // Kept in the bin: its elements from `first_kept` on in (key, index) order, their energies summed
    // per chunk in index order (from the deltas collected with them), then over chunks in order. The
    // same parallel walk sets their bits (the bracketed pass's selection) and counts per chunk the
    // elements equal to the cut.
    for (int64_t c = 0; c < ctx.nchunks; ++c)
      for (int k = 0; k < K; ++k) energy[k] += above_bin[c * K + k];
    if (rest >= in_bin.size()) first_kept = UINT64_MAX;  // nothing of the bin is kept
    else if (!first_kept_known) first_kept = select_rank(in_bin, rest, ctx.nt).first;
    std::vector<int64_t> eq_count(ctx.nchunks, 0);
    std::vector<double> part(ctx.nchunks * size_t(K), 0.0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx.nt)
    for (int64_t c = 0; c < ctx.nchunks; ++c) {
      // Locals: through the shared vectors every store would reload first_kept (int64 may alias it).
      const uint64_t* __restrict list = in_bin.at[c].data();
      const float* __restrict d = in_bin.deltas[c].data();
      const int64_t m = int64_t(in_bin.at[c].size());
      const uint64_t first = first_kept;
      const uint32_t cv = cut.v;
      uint64_t* __restrict bits = selected_bits.get();
      std::vector<double> sums(K, 0.0);
      double* __restrict acc = sums.data();
      int64_t eq = 0;
      for (int64_t i = 0; i < m; ++i) {
        const uint64_t e = list[i];
        eq += uint32_t(e >> 32) == cv;
        if (e < first) continue;
        for (int k = 0; k < K; ++k) acc[k] += double(d[i * K + k]) * double(d[i * K + k]);
        if (bits) bits[uint32_t(e) >> 6] |= uint64_t(1) << (uint32_t(e) & 63);
      }
      eq_count[c] = eq;
      for (int k = 0; k < K; ++k) part[c * K + k] = acc[k];
    }
    for (int64_t c = 0; c < ctx.nchunks; ++c)
      for (int k = 0; k < K; ++k) energy[k] += part[c * K + k];
    if (cut.split) eq_start = chunk_prefix(eq_count, ctx.nchunks, 1);
  } else if (!none) {
    // Per chunk; with a split cut the elements equal to it are summed apart and, once the chunk
    // prefixes are known, only the chunk where the kept run of equal elements starts is summed again.
    std::vector<double> sure(ctx.nchunks * size_t(K), 0.0), equal(ctx.nchunks * size_t(K), 0.0);
    std::vector<int64_t> eq_count(ctx.nchunks, 0);
    ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
      Scratch& s = ctx.scratch[th];
      ctx.blocks(start, end, [&](int64_t off, int64_t len) {
        if (!select) {
          ctx.load(s, off, len);
          for (int k = 0; k < K; ++k) sure[c * K + k] += sum_squares(ctx.delta(s, k), nullptr, len);
          return;
        }
        prep(s, th, off, len);
        // kept for sure: above the cut (at it too, unless it is split); the elements equal to a
        // split cut are summed apart
        float* __restrict sure_mask = s.acc.data();
        float* __restrict tie_mask = s.div.data();
        const float* __restrict v = s.var.data();
        const uint32_t cv = cut.v;
        const bool split = cut.split;
        for (int64_t j = 0; j < len; ++j) {
          const uint32_t key = key_of(v[j]);
          sure_mask[j] = (key > cv) | ((key == cv) & !split) ? 1.0f : 0.0f;
          tie_mask[j] = (key == cv) & split ? 1.0f : 0.0f;
        }
        for (int k = 0; k < K; ++k) sure[c * K + k] += sum_squares(ctx.delta(s, k), sure_mask, len);
        if (split) {
          for (int k = 0; k < K; ++k) equal[c * K + k] += sum_squares(ctx.delta(s, k), tie_mask, len);
          eq_count[c] += count_key(v, len, cv);
        }
      });
    });
    eq_start = chunk_prefix(eq_count, ctx.nchunks, 1);
    for (int64_t c = 0; c < ctx.nchunks; ++c) {
      const int64_t first = eq_start[c], last = first + eq_count[c];
      if (!cut.split || last <= cut.room) {  // no equal element of this chunk is kept
        for (int k = 0; k < K; ++k) energy[k] += sure[c * K + k];
      } else if (first >= cut.room) {  // all are
        for (int k = 0; k < K; ++k) energy[k] += sure[c * K + k] + equal[c * K + k];
      } else {  // the kept run starts inside this chunk
        Scratch& s = ctx.scratch[0];
        std::vector<double> part(K, 0.0);
        int64_t eq = first;
        ctx.blocks(c * ctx.chunk, std::min(t.n, (c + 1) * ctx.chunk), [&](int64_t off, int64_t len) {
          prep(s, 0, off, len);
          float* keep = s.u.data();
          keep_mask(s, len, eq, keep);
          for (int k = 0; k < K; ++k) part[k] += sum_squares(ctx.delta(s, k), keep, len);
        });
        for (int k = 0; k < K; ++k) energy[k] += part[k];
      }
    }
  }
  std::vector<int64_t> conflicts(ctx.nchunks, 0);  // per chunk, for `stats`
  if (!none) {
    double total = 0;
    for (double& e : energy) total += (e /= double(t.n));
    if (std::fabs(total) >= 1e-6)
      for (int k = 0; k < K; ++k) eta[k] = float(energy[k] / total);
  }

  ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    int64_t eq = eq_start[c];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      ctx.load(s, off, len, true);
      float* __restrict sum = s.acc.data();
      if (none || select) {
        float* keep = s.u.data();
        if (none) {
          std::fill(keep, keep + len, 0.0f);
        } else if (selected_bits) {
          unpack_bits(selected_bits.get() + (off >> 6), len, keep);
        } else {
          variance(s, len);
          keep_mask(s, len, eq, keep);
        }
        for (int k = 0; k < K; ++k) zero_unless(ctx.delta(s, k), keep, len);
      }
      std::fill(sum, sum + len, 0.0f);
      for (int k = 0; k < K; ++k) {
        const float* __restrict d = ctx.delta(s, k);
        for (int64_t j = 0; j < len; ++j) sum[j] += d[j];
      }
      if (stats && !none) {  // selected elements with a live δ_k of the losing sign (+ wins at sum 0)
        float* __restrict lost = s.div.data();
        std::fill(lost, lost + len, 0.0f);
        for (int k = 0; k < K; ++k) {
          const float* __restrict d = ctx.delta(s, k);
          for (int64_t j = 0; j < len; ++j) lost[j] = (sum[j] >= 0.0f ? d[j] < 0.0f : d[j] > 0.0f) ? 1.0f : lost[j];
        }
        const float* keep = s.u.data();
        int64_t n = 0;
        for (int64_t j = 0; j < len; ++j) n += lost[j] != 0.0f && (!select || keep[j] != 0.0f);
        conflicts[c] += n;
      }
      // Σ_k η_k δ_k / Σ_k η_k over the entries whose sign is the elected one.
      float* __restrict num = s.u.data();
      float* __restrict den = s.div.data();
      std::fill(num, num + len, 0.0f);
      std::fill(den, den + len, 0.0f);
      for (int k = 0; k < K; ++k) add_agreeing<true>(sum, ctx.delta(s, k), eta[k], len, num, den);
      const float* __restrict base = s.base.data();
      for (int64_t j = 0; j < len; ++j) sum[j] = base[j] + num[j] / std::max(den[j], 1e-6f);
      ctx.store(s, sum, off, len);
    });
  });
  if (stats) {
    stats->eta = eta;
    stats->selected = n_selected;
    stats->conflicts = 0;
    for (int64_t n : conflicts) stats->conflicts += n;
  }
  return ctx.finite();
}

// ------------------------------------------------------------ linear

Finite linear_merge(const Tensors& t, const std::vector<float>& weight, bool normalize) {
  check(t);
  const int K = int(t.others.size());
  if (weight.size() != size_t(K) + 1) throw std::invalid_argument("linear_merge: one weight per model");
  Ctx ctx(t, kChunk, kBlock);
  double weight_sum = 0;  // Python's sum of the weights, then one fp32 division, like the reference
  for (float w : weight) weight_sum += w;
  const float divisor = float(weight_sum);
  ctx.chunks([&](int th, int64_t, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      float* __restrict x = s.base.data();
      float* __restrict out = s.acc.data();
      dispatch(t.in_dtype, [&](auto tag) {
        using T = decltype(tag);
        for (int k = 0; k <= K; ++k) {
          const T* __restrict in = static_cast<const T*>(k == 0 ? t.base : t.others[k - 1]) + off;
          prefetch_next(in, len);
          widen(in, x, len);
          s.input_exponents = max_exponent(x, len, s.input_exponents);
          const float w = weight[k];
          if (k == 0)
            for (int64_t j = 0; j < len; ++j) out[j] = x[j] * w;
          else
            for (int64_t j = 0; j < len; ++j) out[j] = out[j] + w * x[j];
        }
      });
      if (normalize)
        for (int64_t j = 0; j < len; ++j) out[j] = out[j] / divisor;
      ctx.store(s, out, off, len);
    });
  });
  return ctx.finite();
}

// ------------------------------------------------------------ Gram matrices (SLERP, Model Stock)

std::vector<double> gram(const Tensors& t, bool deltas) {
  check(t);
  Ctx ctx(t, kChunk, kBlock);
  const int M = deltas ? ctx.K : ctx.K + 1;
  std::vector<std::vector<double>> partial(ctx.nchunks, std::vector<double>(size_t(M) * M, 0.0));
  ctx.chunks([&](int th, int64_t c, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    std::vector<double>& sums = partial[c];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      if (deltas) {
        ctx.load(s, off, len, true);  // base and δ_k = x_k - base, noting non-finite ones
      } else {  // the inputs themselves, in fp32
        dispatch(t.in_dtype, [&](auto tag) {
          using T = decltype(tag);
          for (int i = 0; i <= ctx.K; ++i) {
            const T* __restrict x = static_cast<const T*>(i == 0 ? t.base : t.others[i - 1]) + off;
            float* __restrict v = i == 0 ? s.base.data() : ctx.delta(s, i - 1);
            prefetch_next(x, len);
            widen(x, v, len);
            s.input_exponents = max_exponent(v, len, s.input_exponents);
          }
        });
      }
      auto vec = [&](int i) -> const float* {
        return deltas ? ctx.delta(s, i) : i == 0 ? s.base.data() : ctx.delta(s, i - 1);
      };
      for (int i = 0; i < M; ++i)
        for (int j = i; j < M; ++j) {
          const float* __restrict a = vec(i);
          const float* __restrict b = vec(j);
          sums[size_t(i) * M + j] += lane_sum(len, [=](int64_t e) { return double(a[e]) * double(b[e]); });
        }
    });
  });
  std::vector<double> total(size_t(M) * M, 0.0);
  for (const auto& p : partial)  // chunk order: the same sums for any thread count
    for (size_t e = 0; e < total.size(); ++e) total[e] += p[e];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < i; ++j) total[size_t(i) * M + j] = total[size_t(j) * M + i];
  if (!ctx.finite().inputs) std::fill(total.begin(), total.end(), std::nan(""));
  return total;
}

// ------------------------------------------------------------ RAM

// How many models change each staged element (|δ_k| > epsilon), as floats in s.div.
static const float* changed_counts(const Ctx& ctx, Scratch& s, int64_t len, float epsilon) {
  float* __restrict c = s.div.data();
  for (int64_t j = 0; j < len; ++j) c[j] = 0.0f;
  for (int k = 0; k < ctx.K; ++k) {
    const float* __restrict d = ctx.delta(s, k);
    for (int64_t j = 0; j < len; ++j) c[j] += std::fabs(d[j]) > epsilon ? 1.0f : 0.0f;
  }
  return c;
}

void ram_counts(const Tensors& t, float epsilon, std::vector<int64_t>& unique, std::vector<int64_t>& shared) {
  check(t);
  Ctx ctx(t, kChunk, kBlock);
  const int K = ctx.K;
  std::vector<int64_t> counts(size_t(ctx.nt) * 2 * K, 0);  // [thread][unique, shared][model]: order-free sums
  ctx.chunks([&](int th, int64_t, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    int64_t* u = counts.data() + size_t(th) * 2 * K;
    int64_t* sh = u + K;
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      ctx.load(s, off, len);
      const float* __restrict c = changed_counts(ctx, s, len, epsilon);
      for (int k = 0; k < K; ++k) {
        const float* __restrict d = ctx.delta(s, k);
        int64_t nu = 0, ns = 0;
        for (int64_t j = 0; j < len; ++j) {
          const bool counted = std::fabs(d[j]) > epsilon;
          nu += counted & (c[j] == 1.0f);
          ns += counted & (c[j] > 1.0f);
        }
        u[k] += nu, sh[k] += ns;
      }
    });
  });
  unique.assign(K, 0), shared.assign(K, 0);
  for (int th = 0; th < ctx.nt; ++th)
    for (int k = 0; k < K; ++k) unique[k] += counts[size_t(th) * 2 * K + k], shared[k] += counts[size_t(th) * 2 * K + K + k];
}

Finite ram_merge(const Tensors& t, float epsilon, const std::vector<float>& scale) {
  check(t);
  Ctx ctx(t, kChunk, kBlock);
  const int K = ctx.K;
  if (scale.size() != size_t(K)) throw std::invalid_argument("ram_merge: one scale per non-base model");
  ctx.chunks([&](int th, int64_t, int64_t start, int64_t end) {
    Scratch& s = ctx.scratch[th];
    ctx.blocks(start, end, [&](int64_t off, int64_t len) {
      ctx.load(s, off, len, true);
      const float* __restrict c = changed_counts(ctx, s, len, epsilon);
      float* __restrict acc = s.acc.data();
      const float* __restrict b = s.base.data();
      for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
      // The reference's order: (δ_k · counted) then · scale_k where one model changes the element,
      // / max(c, 1) elsewhere, summed over k from 0, then added to the base.
      for (int k = 0; k < K; ++k) {
        const float* __restrict d = ctx.delta(s, k);
        const float sk = scale[k];
        for (int64_t j = 0; j < len; ++j) {
          const float kept = d[j] * (std::fabs(d[j]) > epsilon ? 1.0f : 0.0f);
          acc[j] += c[j] == 1.0f ? kept * sk : kept / std::max(c[j], 1.0f);
        }
      }
      for (int64_t j = 0; j < len; ++j) acc[j] = b[j] + acc[j];
      ctx.store(s, acc, off, len);
    });
  });
  return ctx.finite();
}

}  // namespace SEME_ISA

#ifndef SEME_AVX2
#ifdef SEME_AVX2_BUILD
#define SEME_DECLARE(isa)                                                                     \
  namespace isa {                                                                             \
  Finite family_merge(const Tensors& t, const FamilyParams& p);                               \
  Finite sce_merge(const Tensors& t, double tau, SceStats* stats);                            \
  Finite linear_merge(const Tensors& t, const std::vector<float>& weight, bool normalize);     \
  std::vector<double> gram(const Tensors& t, bool deltas);                                    \
  void ram_counts(const Tensors& t, float epsilon, std::vector<int64_t>& unique,              \
                  std::vector<int64_t>& shared);                                              \
  Finite ram_merge(const Tensors& t, float epsilon, const std::vector<float>& scale);         \
  }
SEME_DECLARE(avx2)
SEME_DECLARE(avx512)
#undef SEME_DECLARE

enum class Isa { baseline, avx2, avx512 };

// The widest build this CPU runs; SEME_CPU_ISA=baseline|avx2 caps it (the tests compare them all).
static Isa isa() {
  __builtin_cpu_init();
  const char* cap = std::getenv("SEME_CPU_ISA");
  const std::string limit = cap ? cap : "avx512";
  if (limit != "baseline" && limit != "avx2" && limit != "avx512")
    throw std::invalid_argument("SEME_CPU_ISA must be baseline, avx2 or avx512, not '" + limit + "'");
  if (limit == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
    return Isa::avx512;
  if (limit != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::avx2;
  return Isa::baseline;
}

struct Kernels {
  decltype(&baseline::family_merge) family;
  decltype(&baseline::sce_merge) sce;
  decltype(&baseline::linear_merge) linear;
  decltype(&baseline::gram) gram;
  decltype(&baseline::ram_counts) ram_counts;
  decltype(&baseline::ram_merge) ram;
};

static Kernels kernels(Isa i) {
  if (i == Isa::avx512) return {avx512::family_merge, avx512::sce_merge, avx512::linear_merge, avx512::gram, avx512::ram_counts,
          avx512::ram_merge};
  if (i == Isa::avx2) return {avx2::family_merge, avx2::sce_merge, avx2::linear_merge, avx2::gram, avx2::ram_counts,
          avx2::ram_merge};
  return {baseline::family_merge, baseline::sce_merge, baseline::linear_merge, baseline::gram, baseline::ram_counts,
          baseline::ram_merge};
}

Finite family_merge(const Tensors& t, const FamilyParams& p) { return kernels(isa()).family(t, p); }
Finite sce_merge(const Tensors& t, double tau, SceStats* stats) { return kernels(isa()).sce(t, tau, stats); }
Finite linear_merge(const Tensors& t, const std::vector<float>& weight, bool normalize) {
  return kernels(isa()).linear(t, weight, normalize);
}
std::vector<double> gram(const Tensors& t, bool deltas) { return kernels(isa()).gram(t, deltas); }
void ram_counts(const Tensors& t, float epsilon, std::vector<int64_t>& unique, std::vector<int64_t>& shared) {
  kernels(isa()).ram_counts(t, epsilon, unique, shared);
}
Finite ram_merge(const Tensors& t, float epsilon, const std::vector<float>& scale) {
  return kernels(isa()).ram(t, epsilon, scale);
}

const char* active_isa() {
  const Isa i = isa();
  return i == Isa::avx512 ? "avx512" : i == Isa::avx2 ? "avx2" : "baseline";
}
#else
Finite family_merge(const Tensors& t, const FamilyParams& p) { return baseline::family_merge(t, p); }
Finite sce_merge(const Tensors& t, double tau, SceStats* stats) { return baseline::sce_merge(t, tau, stats); }
Finite linear_merge(const Tensors& t, const std::vector<float>& weight, bool normalize) {
  return baseline::linear_merge(t, weight, normalize);
}
std::vector<double> gram(const Tensors& t, bool deltas) { return baseline::gram(t, deltas); }
void ram_counts(const Tensors& t, float epsilon, std::vector<int64_t>& unique, std::vector<int64_t>& shared) {
  baseline::ram_counts(t, epsilon, unique, shared);
}
Finite ram_merge(const Tensors& t, float epsilon, const std::vector<float>& scale) {
  return baseline::ram_merge(t, epsilon, scale);
}
const char* active_isa() { return "baseline"; }
#endif
#endif

}  // namespace seme
