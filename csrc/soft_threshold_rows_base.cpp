// Row kernels for any x86-64 (or other) CPU.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "soft_threshold_bag_rows.h"
#include "soft_threshold_rows.h"

namespace pep_kernels::rows_base {
#include "optim_rows.inc"
#include "soft_threshold_rows.inc"
#include "soft_threshold_bag_rows.inc"
}  // namespace pep_kernels::rows_base
