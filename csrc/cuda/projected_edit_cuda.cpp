// projected_edit on CUDA: two batched cuBLAS GEMMs (beta = 1, alpha = −1), one intermediate.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"

namespace deepunlearn {

static at::Tensor projected_edit_cuda(const at::Tensor& w, const at::Tensor& m_r, const at::Tensor& m_f) {
  TORCH_CHECK(w.is_cuda(), "projected_edit: CUDA kernel called with ", w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  return projected_edit_impl(w, m_r, m_f);
}

TORCH_LIBRARY_IMPL(deepunlearn, CUDA, m) { m.impl("projected_edit", &projected_edit_cuda); }

}  // namespace deepunlearn
