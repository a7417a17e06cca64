// Fused CPU (OpenMP) merge kernels for the task-vector family, SCE, linear, SLERP, Model Stock and RAM.
//
// Bit-compatible with the plain-torch references in seme/methods/task_vector.py: masks are
// identical (exact rank selection with the (value, index) tie rule, the same Philox draws), and
// fp32 outputs agree up to the rounding of the few global sums (L1 norms, SCE energies), which
// are accumulated here in double, per fixed chunk, in chunk order: results do not depend on the
// number of threads.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace seme {

enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// All inputs share one shape (n elements, contiguous) and one dtype.
struct Tensors {
  const void* base = nullptr;
  std::vector<const void*> others;  // the K non-base models
  void* out = nullptr;
  int64_t n = 0;
  Dtype in_dtype = kF32, out_dtype = kF32;
  int num_threads = 0;  // 0: OpenMP's default
};

enum Sparsify : int {
  kNone = 0,    // task arithmetic
  kRank = 1,    // keep the ranks [rank_lo, rank_hi) of |δ| ascending (TIES magnitude, breadcrumbs)
  kRandom = 2,  // DARE: keep where uniform < p0
  kDella = 3,   // keep where uniform < p0 + (row rank / (cols-1)) * 2 * epsilon
};

// Per model: density >= 1 keeps δ as is, density <= 0 drops it, otherwise δ is sparsified.
enum Mode : int { kKeep = 0, kDrop = 1, kActive = 2 };

struct FamilyParams {
  Sparsify sparsify = kNone;
  bool consensus = false, normalize = false, rescale = false;
  float lambda = 1.0f;
  int64_t cols = 1;  // kDella: ranks are taken along rows of this length (the last dimension)
  std::vector<int> mode;
  std::vector<float> weight;
  std::vector<int64_t> rank_lo, rank_hi;
  std::vector<float> p0, epsilon;
  std::vector<uint64_t> key;  // Philox stream key of each model (rng.stream_key)
};

// What the element pass saw, so that the caller needs no pass of its own: whether every δ_k was
// finite (an Inf or NaN in any input makes some δ_k non-finite; the converse fails only when a
// difference of finite inputs overflows) and whether every output element is finite as written in
// the output dtype (a finite fp32 result beyond the dtype's range counts as an overflow).
struct Finite {
  bool inputs = true, output = true;
};

Finite family_merge(const Tensors& t, const FamilyParams& p);

// What SeMe reports of its Select / Compute / Erase merge (METHOD §7): the coefficients η_k, how
// many elements were selected and, of those, how many hold a non-zero selected δ_k whose sign lost
// the election (erased).
struct SceStats {
  std::vector<float> eta;
  int64_t selected = 0, conflicts = 0;
};

// SCE with select_topk = tau; fills `stats` unless it is null.
Finite sce_merge(const Tensors& t, double tau, SceStats* stats);

// Linear: Σ_k w_k x_k over base (the first model) and others, divided by Σ w_k when normalize.
// Finite.inputs is exact here: the inputs themselves are checked.
Finite linear_merge(const Tensors& t, const std::vector<float>& weight, bool normalize);

// The Gram matrix (row-major) of the inputs as fp32 values, [base, others...], or with `deltas` of
// δ_k = x_k - base: every Σ u·v summed in double in a fixed order (independent of the thread
// count); all NaN where an input is not finite. SLERP's norms and cosine, Model Stock's cosines
// between task vectors; their merges are then linear_merge with the coefficients they give.
std::vector<double> gram(const Tensors& t, bool deltas);

// RAM and tensor-local RAM+ (seme/methods/ram.py). δ_k counts where |δ_k| > epsilon; an element
// changed by one model takes that change times scale_k (1 for RAM), one changed by c > 1 models
// Σ_k δ_k / c. An uncounted δ_k is multiplied by 0, as in the reference, so NaN stays NaN.
Finite ram_merge(const Tensors& t, float epsilon, const std::vector<float>& scale);

// RAM+'s tensor-wide counts, per model, of its counted δ_k that no other model changes (unique)
// and that another model changes too (shared).
void ram_counts(const Tensors& t, float epsilon, std::vector<int64_t>& unique, std::vector<int64_t>& shared);

// Which build of the kernels runs: "avx512", "avx2" or "baseline".
const char* active_isa();

// Philox4x32-10 of counter (lo, hi, 0, 0) under key (lo, hi): the generator of seme.methods.rng.
inline std::array<uint32_t, 4> philox4x32(uint64_t key, uint64_t counter) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t(0xCD9E8D57u) * c2, pa = uint64_t(0xD2511F53u) * c0;
    const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0, n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

}  // namespace seme
