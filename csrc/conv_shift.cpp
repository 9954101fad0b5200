// The shifted cross-correlation form of the stride-1 patch covariance, in device-generic ATen
// (the CPU and CUDA kernels of conv_cov_accumulate_ both call it). For stride 1 and dilation 1,
// block (a, b) of the patch covariance, for kernel offsets a and b, is Σ_{u ∈ window(a)} x_u x_{u+s}ᵀ
// with s = b − a. All blocks with the same shift share the sum over the intersection of their
// windows (the "core"), so one GEMM per shift ((2k−1)² shifts, half of them by symmetry) plus thin
// corrections (the rows and columns of each window outside the core) replace the k⁴ blocks. The
// input is padded and processed in chunks of images, so the extra memory is O(d²) + O(chunk).
#include <ATen/ATen.h>

#include <vector>

#include "ops.h"

namespace deepunlearn {

namespace {

// The shifted algorithm is used when its GEMM work is below this share of the direct one: it
// runs more, smaller GEMMs and copies each shifted slice once.
constexpr double kShiftAdvantage = 0.6;
constexpr int64_t kShiftMinChannels = 16, kShiftMinPositions = 256;

// (N, C, h, w) -> (C, N·h·w): the channel vectors of every position as columns.
at::Tensor as_columns(const at::Tensor& x) { return x.permute({1, 0, 2, 3}).reshape({x.size(1), -1}); }

// Σ over u in rows [r0, r1) × cols [c0, c1) of x_u x_{u+s}ᵀ, (C, C).
at::Tensor shifted_gram(const at::Tensor& x, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t s1, int64_t s2) {
  const at::Tensor a = x.slice(2, r0, r1).slice(3, c0, c1);
  const at::Tensor b = x.slice(2, r0 + s1, r1 + s1).slice(3, c0 + s2, c1 + s2);
  return at::mm(as_columns(a), as_columns(b).t());
}

// The offsets a (along one axis) that pair with a + s inside a kernel of size k, the core rows
// they all cover, and the rows outside the core (each a window-row for some of those offsets).
struct ShiftAxis {
  int64_t lo, hi;              // offsets a in [lo, hi]
  int64_t core_begin, core_end;
  std::vector<int64_t> extra;  // rows in some window but not in the core
  ShiftAxis(int64_t k, int64_t s, int64_t out) {
    lo = std::max<int64_t>(0, -s);
    hi = k - 1 - std::max<int64_t>(0, s);
    core_begin = hi;
    core_end = lo + out;
    for (int64_t r = lo; r < hi; ++r) extra.push_back(r);
    for (int64_t r = lo + out; r < hi + out; ++r) extra.push_back(r);
  }
  int64_t core() const { return core_end - core_begin; }
};

// GEMM work of each algorithm for one group, in units of C_g² multiply-adds per image.
double direct_work(int64_t kk, int64_t ho, int64_t wo) { return 0.5 * kk * (kk + 1) * ho * wo; }
double shift_work(const ConvGeom& g, int64_t ho, int64_t wo) {
  double w = 0;
  for (int64_t s1 = 0; s1 < g.kh; ++s1)
    for (int64_t s2 = -(g.kw - 1); s2 < g.kw; ++s2) {
      if (s1 == 0 && s2 < 0) continue;  // the transpose of shift −s
      const ShiftAxis r(g.kh, s1, ho), c(g.kw, s2, wo);
      const double er = double(r.extra.size()), ec = double(c.extra.size());
      w += double(r.core()) * c.core() + er * c.core() + ec * r.core() + er * ec;
    }
  return w;
}

// cov (C·kh·kw)² += the stride-1 patch covariance of xp (N, C, Hp, Wp), already padded, in cov's dtype.
void shift_accumulate(at::Tensor cov, const at::Tensor& xp, int64_t kh, int64_t kw) {
  const int64_t C = xp.size(1), ho = xp.size(2) - kh + 1, wo = xp.size(3) - kw + 1, kk = kh * kw;
  at::Tensor blocks = cov.view({C, kk, C, kk});  // [c, a, c', b]
  for (int64_t s1 = 0; s1 < kh; ++s1)
    for (int64_t s2 = -(kw - 1); s2 < kw; ++s2) {
      if (s1 == 0 && s2 < 0) continue;
      const ShiftAxis r(kh, s1, ho), c(kw, s2, wo);
      const at::Tensor core = shifted_gram(xp, r.core_begin, r.core_end, c.core_begin, c.core_end, s1, s2);
      std::vector<at::Tensor> by_row, by_col, corner;  // corrections of one extra row / column / both
      for (int64_t y : r.extra) by_row.push_back(shifted_gram(xp, y, y + 1, c.core_begin, c.core_end, s1, s2));
      for (int64_t x : c.extra) by_col.push_back(shifted_gram(xp, r.core_begin, r.core_end, x, x + 1, s1, s2));
      for (int64_t y : r.extra)
        for (int64_t x : c.extra) corner.push_back(shifted_gram(xp, y, y + 1, x, x + 1, s1, s2));
      for (int64_t a1 = r.lo; a1 <= r.hi; ++a1)
        for (int64_t a2 = c.lo; a2 <= c.hi; ++a2) {
          at::Tensor blk = core.clone();
          std::vector<bool> row_in(r.extra.size()), col_in(c.extra.size());
          for (size_t i = 0; i < r.extra.size(); ++i) {
            row_in[i] = r.extra[i] >= a1 && r.extra[i] < a1 + ho;
            if (row_in[i]) blk.add_(by_row[i]);
          }
          for (size_t j = 0; j < c.extra.size(); ++j) {
            col_in[j] = c.extra[j] >= a2 && c.extra[j] < a2 + wo;
            if (col_in[j]) blk.add_(by_col[j]);
          }
          for (size_t i = 0; i < r.extra.size(); ++i)
            for (size_t j = 0; j < c.extra.size(); ++j)
              if (row_in[i] && col_in[j]) blk.add_(corner[i * c.extra.size() + j]);
          const int64_t ia = a1 * kw + a2, ib = (a1 + s1) * kw + (a2 + s2);
          if (ia == ib) {  // a diagonal block: add its symmetric part, so cov stays exactly symmetric
            blocks.select(3, ia).select(1, ia).add_(blk + blk.t(), 0.5);
          } else {
            blocks.select(3, ib).select(1, ia).add_(blk);
            blocks.select(3, ia).select(1, ib).add_(blk.t());
          }
        }
    }
}

}  // namespace

bool shift_pays(const ConvGeom& g, int64_t ho, int64_t wo, int64_t channels_per_group) {
  // Measured on the CPU (benchmarks/results/kernels_cpu.md): with few channels per group or tiny
  // feature maps the shifted GEMMs are too small and the block assembly dominates.
  const bool shiftable = g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.kh * g.kw > 1 && ho >= g.kh - 1 &&
                         wo >= g.kw - 1 && channels_per_group >= kShiftMinChannels && ho * wo >= kShiftMinPositions;
  return shiftable && shift_work(g, ho, wo) < kShiftAdvantage * direct_work(g.kh * g.kw, ho, wo);
}

void shift_accumulate_chunked(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements) {
  const int64_t N = x.size(0), C = x.size(1), groups = cov.size(0), cg = C / groups;
  const int64_t hp = x.size(2) + g.ph_lo + g.ph_hi, wp = x.size(3) + g.pw_lo + g.pw_hi;
  const int64_t images = std::max<int64_t>(1, chunk_elements / (C * hp * wp));
  for (int64_t n0 = 0; n0 < N; n0 += images) {
    const at::Tensor xp = at::constant_pad_nd(x.narrow(0, n0, std::min(images, N - n0)).to(cov.scalar_type()),
                                              {g.pw_lo, g.pw_hi, g.ph_lo, g.ph_hi}, 0);
    for (int64_t gi = 0; gi < groups; ++gi) shift_accumulate(cov.select(0, gi), xp.narrow(1, gi * cg, cg), g.kh, g.kw);
  }
}

}  // namespace deepunlearn
