// Fused CUDA merge kernels for the task-vector family and SCE: the contract of the CPU kernels
// (csrc/cpu/fused_merge.h) on device memory. Same masks as the plain-torch references (exact rank
// selection with the (value, index) tie rule, the same Philox draws), fp32 results equal up to the
// rounding of the few global sums (L1 norms, SCE energies), reduced in a fixed order in double.
//
// Everything is enqueued on the caller's stream and the host never waits: selection, rescale
// factors and SCE coefficients stay on the device, in a workspace the caller allocates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace seme {
namespace cuda {

constexpr int kMaxModels = 8;  // the non-base models a launch takes (register-resident deltas)

// All inputs share one shape (n elements, contiguous), one dtype and one device.
struct Launch {
  const void* base = nullptr;
  std::vector<const void*> others;  // the K non-base models
  void* out = nullptr;
  int64_t n = 0;
  int in_dtype = 0, out_dtype = 0;  // seme::Dtype codes: 0 fp32, 1 bf16, 2 fp16
  void* workspace = nullptr;        // workspace_bytes(n, rows) bytes of device memory
  int rows = 0;                     // the selection rows that workspace holds (see selection_rows)
  uintptr_t stream = 0;             // cudaStream_t
};

struct Family {
  int sparsify = 0;  // 0 none, 1 rank interval of |δ|, 2 random (DARE), 3 DELLA (keep probability given)
  bool consensus = false, normalize = false, rescale = false;
  float lambda = 1.0f;
  std::vector<int> mode;             // per model: 0 keep whole, 1 drop, 2 sparsify
  std::vector<float> weight, p0;     // p0: DARE keep probability
  std::vector<int64_t> rank_lo, rank_hi;  // kept ranks [lo, hi) of |δ| ascending (hi == n: no upper cut)
  std::vector<uint64_t> key;         // Philox stream keys
  std::vector<const float*> prob;    // DELLA: per-element keep probability of each model (device, n floats)
};

// Device workspace of a merge of n elements that selects `rows` cuts: one per model whose δ is
// sparsified by rank (two for a band with an upper cut, as breadcrumbs'), one for SCE, else none.
size_t workspace_bytes(int64_t n, int rows);
void family_merge(const Launch& t, const Family& p);
void sce_merge(const Launch& t, double select_topk);

}  // namespace cuda
}  // namespace seme
