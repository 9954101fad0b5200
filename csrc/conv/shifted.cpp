// The shifted form's sums by ATen's GEMMs, chunk by chunk, and their scatter into cov (see
// shift_plan.h for the form and its layout).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <map>

#include "forms.h"

namespace deepunlearn {

namespace {

// One chunk's copies for the shifts with |s2| = q (see padded_pays).
struct ChunkCopies {
  bool padded;
  std::map<int64_t, at::Tensor> by_column;  // padded: the one copy, at column 0
};

ChunkCopies copy_chunk(const at::Tensor& whole, int64_t q) {  // whole: (cg, H, n, W), contiguous
  const int64_t cg = whole.size(0), H = whole.size(1), n = whole.size(2), W = whole.size(3);
  ChunkCopies c{padded_pays(q, cg, W), {}};
  const int64_t width = c.padded ? W + q : W - q;  // entries per row segment
  if (c.padded) {
    const at::Tensor grid = at::zeros({cg * H * n * width + q}, whole.options())
                                .narrow(0, 0, cg * H * n * width)
                                .view({cg, H, n, width});
    grid.narrow(3, 0, W).copy_(whole);
    c.by_column[0] = grid;
  } else {
    for (const int64_t lo : {int64_t(0), q}) c.by_column[lo] = whole.narrow(3, lo, width).contiguous();
  }
  return c;
}

// The sums of one shift as views of a group's pool (count, C_g, ld), for the GEMMs to write.
struct SumViews {
  std::vector<at::Tensor> rows;
  std::vector<at::Tensor> cols;  // undefined where unused
};

std::vector<SumViews> sum_views(const SumSlots& slots, const at::Tensor& pool_g, int64_t cg) {
  std::vector<SumViews> sums(slots.rows.size());
  const auto view = [&](int64_t slot) { return slot < 0 ? at::Tensor() : pool_g.select(0, slot).narrow(1, 0, cg); };
  for (size_t i = 0; i < sums.size(); ++i) {
    for (const int64_t slot : slots.rows[i]) sums[i].rows.push_back(view(slot));
    for (const int64_t slot : slots.cols[i]) sums[i].cols.push_back(view(slot));
  }
  return sums;
}

// sums += the products of one chunk for the shifts with |s2| = q, read from its copies (in the
// plan's coordinates, padded by the conv, the map starts at row ph_lo and column pw_lo). The first
// chunk's GEMMs write the sums (beta = 0), the others add to them. On the CPU, shift 0's products

void accumulate_chunk(const std::vector<Shift>& shifts, std::vector<SumViews>& sums, const ChunkCopies& copies,
                      int64_t q, const ConvGeom& g, int64_t cg, bool cpu, double beta) {
  for (size_t i = 0; i < shifts.size(); ++i) {
    const Shift& sh = shifts[i];
    if (std::abs(sh.s2) != q) continue;
    // Map columns where the operands' rows start, and how many entries further the partner's are.
    const int64_t first_col = copies.padded ? 0 : std::max<int64_t>(0, -sh.s2);
    const int64_t partner_col = copies.padded ? 0 : first_col + sh.s2, shift = sh.s2 - (partner_col - first_col);
    const at::Tensor& A = copies.by_column.at(first_col);
    const at::Tensor& B = copies.by_column.at(partner_col);
    const int64_t rs = A.stride(1), cs = A.stride(0);  // entries per row of the map (all images) and per channel
    const bool syrk = sh.symmetric() && cpu;
    for (size_t p = 0; p < sh.rows.size(); ++p) {
      const Segment r{sh.rows[p].begin - g.ph_lo, sh.rows[p].end - g.ph_lo};  // rows of the copies
      const at::Tensor a = A.as_strided({cg, r.size() * rs}, {cs, 1}, r.begin * rs);
      if (syrk) {
        syrk_lower_cpu(sums[i].rows[p], a.t(), beta);
      } else {
        const at::Tensor b = B.as_strided({cg, r.size() * rs}, {cs, 1}, (r.begin + sh.s1) * rs + shift);
        sums[i].rows[p].addmm_(a, b.t(), beta);
      }
      for (size_t j = 0; j < sh.cols.size(); ++j) {
        if (!sh.subtracted[p * sh.cols.size() + j]) continue;
        at::Tensor& out = sums[i].cols[p * sh.cols.size() + j];
        const int64_t c0 = sh.cols[j].begin - g.pw_lo, cn = sh.cols[j].size();  // map columns
        const at::Tensor ac = A.slice(1, r.begin, r.end).narrow(3, c0 - first_col, cn).reshape({cg, -1});
        if (syrk) {
          syrk_lower_cpu(out, ac.t(), beta);
          continue;
        }
        const at::Tensor bc =
            B.slice(1, r.begin + sh.s1, r.end + sh.s1).narrow(3, c0 + sh.s2 - partner_col, cn).reshape({cg, -1});
        out.addmm_(ac, bc.t(), beta);
      }
    }
  }
}

// The same on any device with ATen (pool_g: (count, C, ld)): each block summed from its terms, one
// stacked (C, C, kk) slab per tap a.
void scatter_blocks_generic(at::Tensor& cov_g, const BlockTerms& terms, const at::Tensor& pool_g, int64_t C,
                            int64_t kk) {
  const at::Tensor by_tap = cov_g.view({C, kk, C, kk});
  for (int64_t a = 0; a < kk; ++a) {
    std::vector<at::Tensor> row;
    for (int64_t b = 0; b < kk; ++b) {
      at::Tensor blk = at::zeros({C, C}, cov_g.options());
      for (const Term& term : terms[a * kk + b]) {
        const at::Tensor m = pool_g.select(0, term.slot).narrow(1, 0, C);
        blk.add_(term.form == TermSide::kTransposed ? m.t() : m, term.weight);
      }
      row.push_back(blk);
    }
    by_tap.select(1, a).add_(at::stack(row, 2));
  }
}

std::atomic<bool> poison{false};  // scratch filled with NaN first (set_poison_scratch)

}  // namespace

bool set_poison_scratch(bool on) { return poison.exchange(on); }

at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison.load()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// cov += the statistics of the stride-1 conv g over `in`'s images, in chunks of about
// chunk_elements entries of their copies.
void accumulate_images(at::Tensor& cov, const ShiftImages& in, const ConvGeom& g, ShiftSums sums_by,
                       int64_t chunk_elements) {
  const int64_t N = in.count, C = in.channels, H = in.H, W = in.W;
  const int64_t groups = cov.size(0), cg = C / groups, kk = g.kh * g.kw;
  const std::shared_ptr<const ShiftPlan> sp = shift_plan(g, H, W);
  const std::vector<Shift>& shifts = sp->shifts;
  sums_by = resolve_sums(sums_by, cov, cg, kk);
  if (sums_by == ShiftSums::kFused) {
    accumulate_fused_cpu(cov, in, g, chunk_elements, *sp);
    return;
  }
  const SumSlots& slots = sp->slots;
  const BlockTerms& terms = sp->terms;
  // Copies per image at most: the whole map and the two windows of one |s2| (made and dropped in
  // turn), at most 3 W columns.
  const int64_t images = in.per_chunk(chunk_elements / (cg * H * 3 * W));
  const at::TensorOptions opts = cov.options();
  const bool cpu = sums_by == ShiftSums::kGemm;  // the CPU's symmetric updates and scatter
  for (int64_t gi = 0; gi < groups; ++gi) {
    // All sums in one allocation, rows padded off a power-of-two length: the scatter reads their
    // columns, and rows 2^k bytes apart would share a few cache sets and evict each other.
    const at::Tensor pool = scratch({slots.count, cg, cg + 16}, opts);  // the first chunk's GEMMs write it
    std::vector<SumViews> sums = sum_views(slots, pool, cg);
    for (int64_t n0 = 0; n0 < N; n0 += images) {
      const int64_t n = std::min(images, N - n0);
      // (cg, H, n, W) in cov's dtype: the whole map once, each window sliced from that copy
      at::Tensor whole = scratch({cg, H, n, W}, opts);  // written by fill
      in.fill(whole, n0, gi * cg);
      for (int64_t q = 0; q < std::min(W, g.kw); ++q)  // shifts by q columns either way
        accumulate_chunk(shifts, sums, copy_chunk(whole, q), q, g, cg, cpu, n0 == 0 ? 0.0 : 1.0);
    }
    for (size_t i = 0; i < shifts.size(); ++i) {  // shift 0's pieces: exactly symmetric
      if (!shifts[i].symmetric()) continue;
      for (std::vector<at::Tensor>* list : {&sums[i].rows, &sums[i].cols})
        for (at::Tensor& m : *list) {
          if (!m.defined()) continue;
          if (cpu) {
            mirror_lower_to_upper_cpu(m);  // after symmetric updates
          } else {
            m.copy_(m + m.t()).mul_(0.5);  // (IEEE addition commutes)
          }
        }
    }
    at::Tensor cov_g = cov.select(0, gi);
    if (cpu) {
      scatter_blocks_cpu(cov_g, terms, pool, cg, kk);
    } else {
      scatter_blocks_generic(cov_g, terms, pool, cg, kk);
    }
  }
}


}  // namespace deepunlearn
