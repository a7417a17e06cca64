// What the CUDA sources share: the error check of runtime calls and launches, and the conversions
// of input and output elements to and from the fp32 the kernels compute in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace seme {
namespace cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("seme CUDA kernel (") + what + "): " + cudaGetErrorString(e));
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ void from_f32(float v, float& y) { y = v; }
__device__ __forceinline__ void from_f32(float v, __nv_bfloat16& y) { y = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_f32(float v, __half& y) { y = __float2half_rn(v); }

}  // namespace cuda
}  // namespace seme
