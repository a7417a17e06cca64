// OpenMP where the compiler has it; one thread where it has not (Apple's clang without libomp), so
// that the extension builds everywhere. Results do not depend on the thread count.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

namespace seme {
#ifdef _OPENMP
constexpr bool kOpenMP = true;
#else
constexpr bool kOpenMP = false;
#endif
}  // namespace seme
