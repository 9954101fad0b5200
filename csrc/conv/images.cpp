// The images the shifted form reads for a strided or a dilated conv: a strided conv's statistics
// are those of a stride-1 conv over the input's phase images, a dilated one's those of undilated
// convs over its residue images (see forms.h).
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <vector>

#include "forms.h"

namespace deepunlearn {

namespace {

// The indices m < count with 0 <= offset + step·m < size (step > 0): a run, maybe empty.
Segment inside(int64_t offset, int64_t step, int64_t count, int64_t size) {
  const int64_t begin = std::min(count, offset >= 0 ? 0 : (step - 1 - offset) / step);
  const int64_t end = offset >= size ? 0 : (size - 1 - offset) / step + 1;
  return {begin, std::max(begin, std::min(end, count))};
}

}  // namespace

PhaseGeometry phase_geometry(const ConvGeom& g, int64_t channels_per_group, int64_t H, int64_t W) {
  const int64_t kh = (g.kh + g.sh - 1) / g.sh, kw = (g.kw + g.sw - 1) / g.sw;
  return {ConvGeom{kh, kw, 1, 1, 0, 0, 0, 0, 1, 1}, channels_per_group * g.sh * g.sw, g.out_h(H) + kh - 1,
          g.out_w(W) + kw - 1};
}

void accumulate_phases(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ShiftSums sums, int64_t chunk_elements) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), groups = cov.size(0), cg = C / groups;
  const PhaseGeometry phase = phase_geometry(g, cg, H, W);
  const ConvGeom& pg = phase.conv;
  const int64_t sh = g.sh, sw = g.sw, kh = pg.kh, kw = pg.kw, cp = phase.channels_per_group, hp = phase.hp,
                wp = phase.wp;
  // Phase images (hp, wp) with channels (c, φ1, φ2), each group's still together: entry (i, j) of
  // phase φ is the padded input's (s_h·i + φ1, s_w·j + φ2), zero past its end (ghost taps
  // s·α + φ >= k read those; their rows of big are dropped below).
  std::vector<std::array<Segment, 2>> parts;  // per phase: its rows and columns inside the input
  bool all_inside = true;                      // no phase image reads padding: nothing to zero
  for (int64_t f1 = 0; f1 < sh; ++f1)
    for (int64_t f2 = 0; f2 < sw; ++f2) {
      parts.push_back({inside(f1 - g.ph_lo, sh, hp, H), inside(f2 - g.pw_lo, sw, wp, W)});
      all_inside = all_inside && parts.back()[0].size() == hp && parts.back()[1].size() == wp;
    }
  ShiftImages phases{N, C * sh * sw, hp, wp, 1, [&](const at::Tensor& dst, int64_t i0, int64_t c0) {
    const int64_t c = dst.size(0) / (sh * sw), n = dst.size(2);
    if (!all_inside) dst.zero_();
    const at::Tensor src = x.narrow(0, i0, n).narrow(1, c0 / (sh * sw), c);
    const at::Tensor out = dst.view({c, sh, sw, hp, n, wp});
    for (int64_t f1 = 0; f1 < sh; ++f1)
      for (int64_t f2 = 0; f2 < sw; ++f2) {
        const Segment rows = parts[f1 * sw + f2][0], cols = parts[f1 * sw + f2][1];
        if (rows.size() == 0 || cols.size() == 0) continue;
        const int64_t y0 = sh * rows.begin + f1 - g.ph_lo, x0 = sw * cols.begin + f2 - g.pw_lo;
        out.select(1, f1).select(1, f2).narrow(1, rows.begin, rows.size()).narrow(3, cols.begin, cols.size())
            .copy_(src.slice(2, y0, y0 + sh * (rows.size() - 1) + 1, sh)
                       .slice(3, x0, x0 + sw * (cols.size() - 1) + 1, sw)
                       .permute({1, 2, 0, 3}));
      }
  }};
  const int64_t dp = cp * kh * kw;
  at::Tensor big = at::zeros({groups, dp, dp}, cov.options());  // the phase conv's statistics
  accumulate_images(big, phases, pg, sums, chunk_elements);
  // cov's entry (c, a1, a2) is big's (c, a1 mod sh, a2 mod sw, a1 div sh, a2 div sw).
  std::vector<int64_t> idx;
  for (int64_t c = 0; c < cg; ++c)
    for (int64_t a1 = 0; a1 < g.kh; ++a1)
      for (int64_t a2 = 0; a2 < g.kw; ++a2)
        idx.push_back((((c * sh + a1 % sh) * sw + a2 % sw) * kh + a1 / sh) * kw + a2 / sw);
  const at::Tensor index = at::tensor(idx, at::TensorOptions().dtype(at::kLong));
  cov.add_(big.index_select(1, index).index_select(2, index));
}

std::vector<ResidueRun> residue_runs(int64_t size, int64_t pad_lo, int64_t pad_hi, int64_t k, int64_t dil) {
  const int64_t out = size + pad_lo + pad_hi - dil * (k - 1);
  std::vector<ResidueRun> runs;
  for (int64_t r = 0; r < std::min(dil, out); ++r) {
    const int64_t len = (out - r + dil - 1) / dil + k - 1;  // the residue image: its outputs + k − 1
    const Segment real = inside(r - pad_lo, dil, len, size);
    if (real.size() == 0) continue;  // only padding: its patches are zero
    const ResidueRun run{1, r - pad_lo + dil * real.begin, real.size(), real.begin, len - real.end};
    ResidueRun* last = runs.empty() ? nullptr : &runs.back();
    if (last != nullptr && last->real == run.real && last->lo == run.lo && last->hi == run.hi &&
        last->start + last->count == run.start) {
      ++last->count;
    } else {
      runs.push_back(run);
    }
  }
  return runs;
}


ConvGeom residue_geometry(const ConvGeom& g, const ResidueRun& rows, const ResidueRun& cols) {
  return ConvGeom{g.kh, g.kw, 1, 1, rows.lo, rows.hi, cols.lo, cols.hi, 1, 1};
}

void accumulate_residues(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ShiftSums sums,
                         int64_t chunk_elements) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const std::vector<ResidueRun> rows = residue_runs(H, g.ph_lo, g.ph_hi, g.kh, g.dh);
  const std::vector<ResidueRun> cols = residue_runs(W, g.pw_lo, g.pw_hi, g.kw, g.dw);
  // residue): a chunk of whole images is one strided view of x, copied once.
  for (const ResidueRun& a : rows)
    for (const ResidueRun& b : cols) {
      const int64_t per_image = a.count * b.count;
      const auto fill = [&](const at::Tensor& dst, int64_t i0, int64_t c0) {
        const int64_t c = dst.size(0), n = dst.size(2) / per_image;
        const at::Tensor src = x.as_strided(
            {n, c, a.count, a.real, b.count, b.real},
            {x.stride(0), x.stride(1), x.stride(2), g.dh * x.stride(2), x.stride(3), g.dw * x.stride(3)},
            x.storage_offset() + i0 / per_image * x.stride(0) + c0 * x.stride(1) + a.start * x.stride(2) +
                b.start * x.stride(3));
        dst.view({c, a.real, n, a.count, b.count, b.real}).copy_(src.permute({1, 3, 0, 2, 4, 5}));
      };
      const ShiftImages residues{N * per_image, C, a.real, b.real, per_image, fill};
      accumulate_images(cov, residues, residue_geometry(g, a, b), sums, chunk_elements);
    }
}

}  // namespace deepunlearn
