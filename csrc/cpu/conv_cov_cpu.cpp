// conv_cov_accumulate_ on the CPU. Two exact algorithms, chosen per call by their GEMM work:
//
// * implicit im2col (any stride, dilation): a chunk of at most kChunkElements patch entries is
//   gathered straight from the (any-layout) input, fed to the symmetric rank-k update per group,
//   and reused for the next chunk; the unfolded (n·positions, C·k²) matrix is never built.
// * shifted cross-correlations (stride 1, dilation 1): block (a, b) of the patch covariance, for
//   kernel offsets a and b, is Σ_{u ∈ window(a)} x_u x_{u+s}ᵀ with s = b − a. All blocks with the
//   same shift share the sum over the intersection of their windows (the "core"), so one GEMM per
//   shift ((2k−1)² shifts, half of them by symmetry) plus thin corrections (the rows and columns
//   of each window outside the core) replace the k⁴ blocks. The input is padded and processed in
//   chunks of images, so the extra memory is O(d²) + O(chunk) here too.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ops.h"

#include <vector>

namespace deepunlearn {

namespace {

// The shifted algorithm is used when its GEMM work is below this share of the direct one: it
// runs more, smaller GEMMs and copies each shifted slice once.
constexpr double kShiftAdvantage = 0.6;
constexpr int64_t kShiftMinChannels = 16, kShiftMinPositions = 256;

template <typename in_t, typename acc_t>
void gather_patches(const in_t* x, std::array<int64_t, 4> st, int64_t C, int64_t H, int64_t W, const ConvGeom& g,
                    int64_t ho, int64_t wo, int64_t row0, int64_t rows, acc_t* buf) {
  const int64_t kk = g.kh * g.kw, d = C * kk;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = row0 + r;
      const int64_t n = p / (ho * wo), oy = (p / wo) % ho, ox = p % wo;
      acc_t* out = buf + r * d;
      const in_t* xn = x + n * st[0];
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.ph_lo + ky * g.dh;
        const bool row_in = iy >= 0 && iy < H;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pw_lo + kx * g.dw;
          const int64_t k = ky * g.kw + kx;
          if (row_in && ix >= 0 && ix < W) {
            const in_t* src = xn + iy * st[2] + ix * st[3];
            for (int64_t c = 0; c < C; ++c) out[c * kk + k] = static_cast<acc_t>(src[c * st[1]]);
          } else {
            for (int64_t c = 0; c < C; ++c) out[c * kk + k] = acc_t(0);  // zero padding, as the conv sees it
          }
        }
      }
    }
  });
}

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

static void conv_cov_accumulate_cpu(at::Tensor cov, const at::Tensor& x_in, at::IntArrayRef kernel,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const ConvGeom g = parse_conv_geometry(x_in, kernel, stride, padding, dilation);
  check_conv_cov_args(cov, x_in, g);
  TORCH_CHECK(cov.device().is_cpu(), "conv_cov_accumulate_: CPU kernel called with ", cov.device());
  const at::Tensor x = x_in.dim() == 3 ? x_in.unsqueeze(2) : x_in;  // conv1d as conv2d with H = 1
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t ho = g.out_h(H), wo = g.out_w(W), total = N * ho * wo;
  if (total == 0) return;
  const int64_t groups = cov.size(0), dg = cov.size(1), d = C * g.kh * g.kw;
  // Measured on the CPU (benchmarks/results/kernels_cpu.md): with few channels per group or tiny
  // feature maps the shifted GEMMs are too small and the block assembly dominates; gather there.
  const bool shiftable = g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.kh * g.kw > 1 &&
                         ho >= g.kh - 1 && wo >= g.kw - 1 && C / groups >= kShiftMinChannels &&
                         ho * wo >= kShiftMinPositions;
  if (shiftable && shift_work(g, ho, wo) < kShiftAdvantage * direct_work(g.kh * g.kw, ho, wo)) {
    const int64_t cg = C / groups, hp = H + g.ph_lo + g.ph_hi, wp = W + g.pw_lo + g.pw_hi;
    const int64_t images = std::max<int64_t>(1, kChunkElements / (C * hp * wp));
    for (int64_t n0 = 0; n0 < N; n0 += images) {
      const at::Tensor xp = at::constant_pad_nd(x.narrow(0, n0, std::min(images, N - n0)).to(cov.scalar_type()),
                                                {g.pw_lo, g.pw_hi, g.ph_lo, g.ph_hi}, 0);
      for (int64_t gi = 0; gi < groups; ++gi) shift_accumulate(cov.select(0, gi), xp.narrow(1, gi * cg, cg), g.kh, g.kw);
    }
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, std::min(total, kChunkElements / d));
  at::Tensor buf = at::empty({chunk, d}, cov.options());
  const std::array<int64_t, 4> st{x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  for (int64_t row0 = 0; row0 < total; row0 += chunk) {
    const int64_t rows = std::min(chunk, total - row0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_cov_gather", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "conv_cov_acc", [&] {
        gather_patches<in_t, scalar_t>(x.const_data_ptr<in_t>(), st, C, H, W, g, ho, wo, row0, rows,
                                       buf.mutable_data_ptr<scalar_t>());
      });
    });
    const at::Tensor part = buf.narrow(0, 0, rows);
    for (int64_t gi = 0; gi < groups; ++gi) {
      at::Tensor cg = cov.select(0, gi);
      syrk_accumulate_cpu(cg, part.narrow(1, gi * dg, dg));
    }
  }
}

TORCH_LIBRARY_IMPL(deepunlearn, CPU, m) { m.impl("conv_cov_accumulate_", &conv_cov_accumulate_cpu); }

}  // namespace deepunlearn
