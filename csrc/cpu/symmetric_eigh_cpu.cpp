// symmetric_eigh on the CPU: LAPACK's divide and conquer (syevd) through ATen, matrix by matrix.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../ops.h"

namespace deepunlearn {

static std::tuple<at::Tensor, at::Tensor> symmetric_eigh_cpu(const at::Tensor& a) {
  TORCH_CHECK(a.device().is_cpu(), "symmetric_eigh: CPU kernel called with ", a.device());
  check_eigh_args(a);
  auto result = at::linalg_eigh(a, "L");  // LAPACK's own failures raise; NaN in, NaN out
  check_eigh_results(std::get<0>(result), at::Tensor());
  return result;
}

TORCH_LIBRARY_IMPL(deepunlearn, CPU, m) { m.impl("symmetric_eigh", &symmetric_eigh_cpu); }

}  // namespace deepunlearn
