// projected_edit on the CPU (two batched GEMMs through ATen's BLAS, one intermediate).
#include <torch/library.h>

#include "../ops.h"

namespace deepunlearn {

static at::Tensor projected_edit_cpu(const at::Tensor& w, const at::Tensor& m_r, const at::Tensor& m_f) {
  TORCH_CHECK(w.device().is_cpu(), "projected_edit: CPU kernel called with ", w.device());
  return projected_edit_impl(w, m_r, m_f);
}

TORCH_LIBRARY_IMPL(deepunlearn, CPU, m) { m.impl("projected_edit", &projected_edit_cpu); }

}  // namespace deepunlearn
