// The fused kernels compiled for AVX-512 (seme::avx512); fused_merge.cpp calls them where the CPU
// has AVX-512 F, BW, DQ and VL. Only GCC on x86 builds this copy (SEME_AVX2_BUILD); elsewhere this
// file compiles to nothing.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define SEME_AVX512
#define SEME_AVX2
#include "fused_merge.cpp"
#endif
