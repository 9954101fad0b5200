// conv_cov_accumulate_ on the CPU: the form chosen by choose_conv_form (conv/forms.h), the direct
// one here: a chunk of at most chunk_elements patch entries is gathered straight from the
// (any-layout) input, fed to the symmetric rank-k update per group, and reused for the next chunk;
// the unfolded (n·positions, C·k²) matrix is never built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv/forms.h"
#include "../ops.h"

namespace deepunlearn {

namespace {

// Entries of a gathered chunk, or of a chunk's copies of the input in the shifted family: bounds
// the extra memory (16 MiB in float32) whatever the batch size (the op's chunk_elements overrides it).
constexpr int64_t kChunkElements = int64_t(1) << 22;

// buf rows (one per output position row0.., in unfold's (c, ky, kx) order) written in order: per
// channel the kh × kw window, read from the same few cache lines as the neighbouring positions'.
template <typename in_t, typename acc_t>
void gather_patches(const in_t* x, std::array<int64_t, 4> st, int64_t C, int64_t H, int64_t W, const ConvGeom& g,
                    int64_t ho, int64_t wo, int64_t row0, int64_t rows, acc_t* buf) {
  const int64_t d = C * g.kh * g.kw;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = row0 + r;
      const int64_t n = p / (ho * wo), oy = (p / wo) % ho, ox = p % wo;
      const int64_t iy0 = oy * g.sh - g.ph_lo, ix0 = ox * g.sw - g.pw_lo;
      const bool inside = iy0 >= 0 && iy0 + (g.kh - 1) * g.dh < H && ix0 >= 0 && ix0 + (g.kw - 1) * g.dw < W;
      const in_t* xn = x + n * st[0];
      acc_t* out = buf + r * d;
      for (int64_t c = 0; c < C; ++c) {
        const in_t* xc = xn + c * st[1];
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const int64_t iy = iy0 + ky * g.dh;
          const in_t* src = xc + iy * st[2];
          if (inside) {
            for (int64_t kx = 0; kx < g.kw; ++kx) *out++ = static_cast<acc_t>(src[(ix0 + kx * g.dw) * st[3]]);
            continue;
          }
          for (int64_t kx = 0; kx < g.kw; ++kx) {  // zero padding, as the conv sees it
            const int64_t ix = ix0 + kx * g.dw;
            *out++ = iy >= 0 && iy < H && ix >= 0 && ix < W ? static_cast<acc_t>(src[ix * st[3]]) : acc_t(0);
          }
        }
      }
    }
  });
}

}  // namespace

static void conv_cov_accumulate_cpu(at::Tensor cov, const at::Tensor& x_in, at::IntArrayRef kernel,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    c10::string_view form, int64_t chunk_elements) {
  const auto [g, x] = checked_conv_call(cov, x_in, kernel, stride, padding, dilation);
  TORCH_CHECK(cov.device().is_cpu(), "conv_cov_accumulate_: CPU kernel called with ", cov.device());
  TORCH_CHECK(chunk_elements >= 0, "conv_cov_accumulate_: chunk_elements must be >= 0 (0: the default), got ",
              chunk_elements);
  const ConvChoice choice = choose_conv_form(cov, x, g, parse_conv_form(form));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t ho = g.out_h(H), wo = g.out_w(W), total = N * ho * wo;
  if (total == 0) return;
  const int64_t groups = cov.size(0), dg = cov.size(1), d = C * g.kh * g.kw;
  const int64_t entries = chunk_elements > 0 ? chunk_elements : kChunkElements;
  if (choice.form != ConvForm::kDirect) {
    accumulate_by_form(cov, x, g, choice, entries);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, std::min(total, entries / d));
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
      syrk_lower_cpu(cg, part.narrow(1, gi * dg, dg));
    }
  }
  for (int64_t gi = 0; gi < groups; ++gi) {  // once per call, not per chunk
    at::Tensor cg = cov.select(0, gi);
    mirror_lower_to_upper_cpu(cg);
  }
}

TORCH_LIBRARY_IMPL(deepunlearn, CPU, m) { m.impl("conv_cov_accumulate_", &conv_cov_accumulate_cpu); }

}  // namespace deepunlearn
