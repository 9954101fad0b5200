// linear_cov_accumulate_ on the CPU: symmetric rank-n update through ATen's BLAS.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../ops.h"

namespace deepunlearn {

namespace {

// Rows per GEMM of the lower staircase: narrower blocks skip more of the upper triangle, wider
// ones keep the GEMMs at the BLAS's full speed (measured on 2 threads: d = 576-1152 best at 192,
// 3072-4608 at 384; 1.3x at d = 576 to 1.7x at d = 3072 faster than one full product).
int64_t staircase_rows(int64_t d) { return d <= 2048 ? 192 : 384; }

// c[i · ld + j] = c[j · ld + i] for i < j < d. Pairs of kTile × kTile tiles, listed so that every
// thread gets the same number; each lower tile is read by rows, transposed in L1 and written by
// rows (copying element by element across the diagonal would touch a new cache line, and page,
// per element).
template <typename T>
void mirror(T* c, int64_t d, int64_t ld) {
  constexpr int64_t kTile = 32;
  const int64_t nt = (d + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (row tile, column tile) of the upper triangle
  for (int64_t bi = 0; bi < nt; ++bi)
    for (int64_t bj = bi; bj < nt; ++bj) tiles.emplace_back(bi, bj);
  at::parallel_for(0, int64_t(tiles.size()), 16, [&](int64_t begin, int64_t end) {
    T t[kTile * kTile];
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i0 = tiles[k].first * kTile, j0 = tiles[k].second * kTile;
      const int64_t ni = std::min(kTile, d - i0), nj = std::min(kTile, d - j0);
      for (int64_t j = 0; j < nj; ++j)  // lower tile rows j0 + j, columns i0..: t[i][j]
        for (int64_t i = 0; i < ni; ++i) t[i * kTile + j] = c[(j0 + j) * ld + i0 + i];
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t from = i0 == j0 ? i + 1 : 0;  // the diagonal tile: strictly above only
        std::copy(t + i * kTile + from, t + i * kTile + nj, c + (i0 + i) * ld + j0 + from);
      }
    }
  });
}

}  // namespace

void syrk_lower_cpu(at::Tensor& cov, const at::Tensor& a, double beta) {
  const int64_t d = cov.size(0), rows = staircase_rows(d);
  if (a.size(0) == 0) {
    if (beta == 0) cov.zero_();
    return;
  }
  for (int64_t i0 = 0; i0 < d; i0 += rows) {  // rows i0.. against the columns up to their block's end
    const int64_t e = std::min(d, i0 + rows);
    cov.narrow(0, i0, e - i0).narrow(1, 0, e).addmm_(a.narrow(1, i0, e - i0).t(), a.narrow(1, 0, e), beta);
  }
}

void mirror_lower_to_upper_cpu(at::Tensor& cov) {
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "mirror_lower_to_upper",
                             [&] { mirror<scalar_t>(cov.mutable_data_ptr<scalar_t>(), cov.size(0), cov.stride(0)); });
}

static void linear_cov_accumulate_cpu(at::Tensor cov, const at::Tensor& x, int64_t tile, int64_t split_k) {
  check_linear_cov_args(cov, x, tile, split_k);
  TORCH_CHECK(cov.device().is_cpu(), "linear_cov_accumulate_: CPU kernel called with ", cov.device());
  if (x.size(0) == 0) return;
  at::Tensor a = x.to(cov.scalar_type());  // bf16/fp16 → accumulation dtype (no copy when it already is)
  if (a.stride(1) != 1) a = a.contiguous();
  syrk_lower_cpu(cov, a);
  mirror_lower_to_upper_cpu(cov);
}

TORCH_LIBRARY_IMPL(deepunlearn, CPU, m) { m.impl("linear_cov_accumulate_", &linear_cov_accumulate_cpu); }

}  // namespace deepunlearn
