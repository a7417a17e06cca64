// DELLA's keep probability on the device: per row (the last dimension), the ascending rank of
// |δ| = |x − base| (ties by position), mapped linearly onto [density − ε, density + ε]. The float
// operations are the CPU kernel's (csrc/cpu/fused_merge.cpp), so both give the same probabilities.
#pragma once

#include <cstdint>

namespace seme {
namespace cuda {

constexpr int64_t kDellaMaxCols = 16384;  // the longest row one thread block sorts

// prob[r * cols + j] = p0 + ((rank / span) * 2) * eps, rank the position of |δ| at (r, j) among its
// row's, span = max(cols − 1, 1). base, x: rows * cols contiguous elements of dtype in_dtype (0 fp32,
// 1 bf16, 2 fp16); prob: as many floats. Enqueued on `stream` (a cudaStream_t). Throws
// std::invalid_argument for cols outside [1, kDellaMaxCols].
void della_probability(const void* base, const void* x, float* prob, int64_t rows, int64_t cols, int in_dtype,
                       float p0, float eps, uintptr_t stream);

}  // namespace cuda
}  // namespace seme
