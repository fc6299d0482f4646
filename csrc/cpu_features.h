#pragma once

#include <cstdlib>

namespace pep_kernels {

// Whether the AVX2 row kernels may run. PEP_KERNELS_DISABLE_AVX2=1 forces the base kernels (how
// the tests reach them on AVX2 machines).
inline bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("PEP_KERNELS_DISABLE_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

}  // namespace pep_kernels
