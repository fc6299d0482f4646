// Row kernels compiled for AVX2 + FMA; soft_threshold_cpu.cpp calls them only on CPUs that have
// both. This file includes no ATen header, so no shared inline function gets AVX2 code.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "soft_threshold_bag_rows.h"
#include "soft_threshold_rows.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
namespace pep_kernels::rows_avx2 {
#include "optim_rows.inc"
#include "soft_threshold_rows.inc"
#include "soft_threshold_bag_rows.inc"
}  // namespace pep_kernels::rows_avx2
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
// No AVX2 build on this platform: the base kernels serve (soft_threshold_cpu.cpp never picks these).
namespace pep_kernels::rows_avx2 {
#include "optim_rows.inc"
#include "soft_threshold_rows.inc"
#include "soft_threshold_bag_rows.inc"
}  // namespace pep_kernels::rows_avx2
#endif
