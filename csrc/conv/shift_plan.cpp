// Planning the shifted form (see shift_plan.h): the shifts with products, their row pieces and
// column segments cut at every window's edge, each block's terms, the fused pass's grids; built
// once per geometry and map size, then kept.
#include "shift_plan.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <map>
#include <mutex>

namespace deepunlearn {

namespace {

// [lo, hi) cut at the window edges a and a + out of every tap offset a in [a_lo, a_hi].
std::vector<Segment> cut(int64_t lo, int64_t hi, int64_t a_lo, int64_t a_hi, int64_t out) {
  std::vector<int64_t> pts{lo, hi};
  for (int64_t a = a_lo; a <= a_hi; ++a)
    for (int64_t p : {a, a + out}) pts.push_back(std::clamp(p, lo, hi));
  std::sort(pts.begin(), pts.end());
  pts.erase(std::unique(pts.begin(), pts.end()), pts.end());
  std::vector<Segment> segs;
  for (size_t i = 0; i + 1 < pts.size(); ++i) segs.push_back({pts[i], pts[i + 1]});
  return segs;
}

// Every shift with at least one real product, in coordinates of the map padded by the conv.
std::vector<Shift> plan(const ConvGeom& g, int64_t H, int64_t W) {
  const int64_t ho = g.out_h(H), wo = g.out_w(W);
  std::vector<Shift> shifts;
  for (int64_t s1 = 0; s1 < g.kh; ++s1)
    for (int64_t s2 = -(g.kw - 1); s2 < g.kw; ++s2) {
      if (s1 == 0 && s2 < 0) continue;
      // positions u (padded) with u and u + s both in the real map
      const int64_t r_lo = g.ph_lo, r_hi = g.ph_lo + H - s1;
      const int64_t c_lo = std::max(g.pw_lo, g.pw_lo - s2), c_hi = std::min(g.pw_lo + W, g.pw_lo + W - s2);
      if (r_lo >= r_hi || c_lo >= c_hi) continue;
      const int64_t a1_lo = 0, a1_hi = g.kh - 1 - s1, a2_lo = std::max<int64_t>(0, -s2),
                    a2_hi = g.kw - 1 - std::max<int64_t>(0, s2);
      Shift sh{s1, s2, {}, cut(c_lo, c_hi, a2_lo, a2_hi, wo), {}, {}};
      for (const Segment& r : cut(r_lo, r_hi, a1_lo, a1_hi, ho)) {
        bool used = false;
        for (int64_t a1 = a1_lo; a1 <= a1_hi; ++a1) used = used || r.inside_window(a1, ho);
        if (used) sh.rows.push_back(r);
      }
      for (int64_t a1 = a1_lo; a1 <= a1_hi; ++a1)
        for (int64_t a2 = a2_lo; a2 <= a2_hi; ++a2) {
          Block blk{a1 * g.kw + a2, (a1 + s1) * g.kw + a2 + s2, {}, {}};
          for (size_t i = 0; i < sh.rows.size(); ++i)
            if (sh.rows[i].inside_window(a1, ho)) blk.rows.push_back(i);
          for (size_t j = 0; j < sh.cols.size(); ++j)
            if (!sh.cols[j].inside_window(a2, wo)) blk.minus.push_back(j);
          if (!blk.rows.empty()) sh.blocks.push_back(std::move(blk));
        }
      sh.subtracted.assign(sh.rows.size() * sh.cols.size(), false);
      for (const Block& blk : sh.blocks)
        for (size_t p : blk.rows)
          for (size_t j : blk.minus) sh.subtracted[p * sh.cols.size() + j] = true;
      shifts.push_back(std::move(sh));
    }
  return shifts;
}

SumSlots sum_slots(const std::vector<Shift>& shifts) {
  SumSlots s;
  for (const Shift& sh : shifts) {
    s.rows.emplace_back();
    for (size_t p = 0; p < sh.rows.size(); ++p) s.rows.back().push_back(s.count++);
    s.cols.emplace_back();
    for (const bool used : sh.subtracted) s.cols.back().push_back(used ? s.count++ : -1);
  }
  return s;
}

// The terms of every tap pair's block: the shifts' planned half directly, the other half as
// transposes in the same order (so block (b, a) is exactly block (a, b)ᵀ); the diagonal blocks
// are sums of exactly symmetric pieces.
BlockTerms block_terms(const std::vector<Shift>& shifts, const SumSlots& slots, int64_t kk) {
  BlockTerms terms(kk * kk);
  for (size_t i = 0; i < shifts.size(); ++i) {
    const Shift& sh = shifts[i];
    for (const Block& blk : sh.blocks) {
      std::vector<Term> t;
      for (size_t p : blk.rows) {
        t.push_back({slots.rows[i][p], 1.0, TermSide::kDirect});
        for (size_t j : blk.minus) t.push_back({slots.cols[i][p * sh.cols.size() + j], -1.0, TermSide::kDirect});
      }
      if (blk.a == blk.b) {
        terms[blk.a * kk + blk.a] = std::move(t);
      } else {
        std::vector<Term> mirrored = t;
        for (Term& m : mirrored) m.form = TermSide::kTransposed;
        terms[blk.a * kk + blk.b] = std::move(t);
        terms[blk.b * kk + blk.a] = std::move(mirrored);
      }
    }
  }
  return terms;
}

FusedLayout fused_layout(const std::vector<Shift>& shifts, int64_t kk) {
  FusedLayout f;
  f.by_tap.resize(kk);
  for (const Shift& sh : shifts) {
    f.offset.push_back(f.count);
    const int64_t stride = int64_t(sh.cols.size()) + 1, base = f.count;
    f.count += (int64_t(sh.rows.size()) + 1) * stride;
    for (const Block& blk : sh.blocks) {
      const int64_t p0 = int64_t(blk.rows.front()), p1 = int64_t(blk.rows.back()) + 1;
      TORCH_INTERNAL_ASSERT(p1 - p0 == int64_t(blk.rows.size()), "a block's row pieces are not one run");
      std::vector<int64_t> inside;  // column segments in the block's window
      for (int64_t j = 0; j < stride - 1; ++j)
        if (std::find(blk.minus.begin(), blk.minus.end(), size_t(j)) == blk.minus.end()) inside.push_back(j);
      const int64_t j0 = inside.empty() ? 0 : inside.front(), j1 = inside.empty() ? 0 : inside.back() + 1;
      TORCH_INTERNAL_ASSERT(j1 - j0 == int64_t(inside.size()), "a block's column segments are not one run");
      const auto slot = [&](int64_t p, int64_t j) { return base + p * stride + j; };
      const GridBlock gb{blk.b, slot(p1, j1), slot(p0, j1), slot(p1, j0), slot(p0, j0), false};
      f.by_tap[blk.a].push_back(gb);
      if (blk.a != blk.b) f.by_tap[blk.b].push_back({blk.a, gb.q11, gb.q01, gb.q10, gb.q00, true});
    }
  }
  return f;
}

}  // namespace

// One chunk's copies for the shifts with |s2| = q, each (cg, H, n, width) and at storage offset 0.
// Cut (see the layout above): the two windows, by the map column their rows start at. Padded: one
// copy of whole rows, each followed by q zero columns, read by both operands, the partner s2
// entries further on (where that runs past a row's end it wraps into zero columns, so those
// products vanish; q spare entries at the end): (W + q) / (W − q) times the cut copies' GEMM work
// but one copy instead of two. That pays on wide maps with few channels: 2 q C_g multiply-adds
// more per copied entry, against W − 3 q entries fewer to copy per row and image, each worth ~64
// multiply-adds on the CPU (cut copies made VGG features.4's calls, 64 channels at 112 × 112,
// about 10 % slower).
bool padded_pays(int64_t q, int64_t cg, int64_t W) { return q > 0 && 2 * q * cg < (W - 3 * q) * 64; }

std::shared_ptr<const ShiftPlan> shift_plan(const ConvGeom& g, int64_t H, int64_t W) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 12>, std::shared_ptr<const ShiftPlan>> cache;
  const std::array<int64_t, 12> key{g.kh, g.kw, g.sh, g.sw, g.ph_lo, g.ph_hi, g.pw_lo, g.pw_hi, g.dh, g.dw, H, W};
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = cache.find(key); it != cache.end()) return it->second;
  }
  auto built = std::make_shared<ShiftPlan>();
  built->shifts = plan(g, H, W);
  built->slots = sum_slots(built->shifts);
  built->terms = block_terms(built->shifts, built->slots, g.kh * g.kw);
  built->fused = fused_layout(built->shifts, g.kh * g.kw);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= 256) cache.clear();  // a model has a few dozen geometries; a sweep may have more
  cache.emplace(key, built);
  return built;
}

}  // namespace deepunlearn
