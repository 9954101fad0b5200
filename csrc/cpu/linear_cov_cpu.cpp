// linear_cov_accumulate_ on the CPU: symmetric rank-n update through ATen's BLAS.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ops.h"

namespace deepunlearn {

namespace {
// Tiles this wide keep each GEMM large enough for the BLAS to run at full speed.
constexpr int64_t kTile = 384;
}  // namespace

// c[i][j] = c[j][i] for i < j, in cache-sized blocks (exact symmetry whatever the GEMMs rounded).
template <typename T>
void mirror_lower_to_upper(T* c, int64_t d) {
  constexpr int64_t B = 64;
  at::parallel_for(0, (d + B - 1) / B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      for (int64_t bj = bi; bj < (d + B - 1) / B; ++bj) {
        for (int64_t i = bi * B; i < std::min(d, (bi + 1) * B); ++i) {
          for (int64_t j = std::max(i + 1, bj * B); j < std::min(d, (bj + 1) * B); ++j) c[i * d + j] = c[j * d + i];
        }
      }
    }
  });
}

void syrk_accumulate_cpu(at::Tensor& cov, const at::Tensor& a) {
  const int64_t d = cov.size(0);
  if (a.size(0) == 0) return;
  if (d <= 2 * kTile) {  // one or two tiles: symmetry saves too little to pay for the extra calls
    cov.addmm_(a.t(), a);
  } else {
    for (int64_t i0 = 0; i0 < d; i0 += kTile) {  // tiles on and below the diagonal only
      const int64_t ti = std::min(kTile, d - i0);
      const at::Tensor ai = a.narrow(1, i0, ti);
      for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
        const int64_t tj = std::min(kTile, d - j0);
        cov.narrow(0, i0, ti).narrow(1, j0, tj).addmm_(ai.t(), a.narrow(1, j0, tj));
      }
    }
  }
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "mirror_lower_to_upper", [&] {
    mirror_lower_to_upper<scalar_t>(cov.mutable_data_ptr<scalar_t>(), d);
  });
}

static void linear_cov_accumulate_cpu(at::Tensor cov, const at::Tensor& x) {
  check_linear_cov_args(cov, x);
  TORCH_CHECK(cov.device().is_cpu(), "linear_cov_accumulate_: CPU kernel called with ", cov.device());
  if (x.size(0) == 0) return;
  at::Tensor a = x.to(cov.scalar_type());  // bf16/fp16 → accumulation dtype (no copy when it already is)
  if (a.stride(1) != 1) a = a.contiguous();
  syrk_accumulate_cpu(cov, a);
}

TORCH_LIBRARY_IMPL(deepunlearn, CPU, m) { m.impl("linear_cov_accumulate_", &linear_cov_accumulate_cpu); }

}  // namespace deepunlearn
