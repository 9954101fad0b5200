// The shifted cross-correlation form of the stride-1 patch covariance (the CPU and CUDA kernels
// of conv_cov_accumulate_ both call it; the GEMMs are ATen's, the final scatter per device).
//
// For stride 1 and dilation 1, block (a, b) of the patch covariance, for kernel taps a and b, is
// Σ_{u ∈ window(a)} x_u x_{u+s}ᵀ with s = b − a: every block of one shift is a sum over nearly the
// same positions. So one large GEMM per shift ((2k−1)² shifts, half of them by symmetry) plus thin
// corrections at the window edges replace the k⁴ blocks of the unfolded product.
//
// Layout. For a shift s, only the columns u with u and u + s2 both inside the map have products:
// a window of W − |s2| columns starting at lo = max(0, −s2), and its partner window at lo + s2.
// Each chunk of images is copied once per such window into (C, H, N, W − |s2|): rows of the map
// outermost, then images, then the window's columns. A set of whole rows of every image is then
// one contiguous (C, rows·N·(W − |s2|)) matrix, and its partner is the same rows s1 further on in
// the partner window's copy: each GEMM reads two copies in place and computes exactly the products
// of positions u where both u and u + s lie inside the map (on a 4-pixel map a zero-padded layout
// doubles the GEMM work). On wide maps with few channels one zero-padded copy per |s2| costs less
// than two cut ones (see ChunkCopies). A block whose window misses some of them subtracts those
// columns (thin GEMMs on copies of them).
//
// The pieces are summed over all chunks first and scattered into cov once per call, a pass over
// d² entries (cov's row c·kk + a holds block (a, b) for all b, interleaved), so the extra memory
// is O(d²) + O(chunk). The pieces of shift 0, the only ones in the diagonal blocks (a, a), are
// made exactly symmetric before the scatter (on the CPU their GEMMs are symmetric updates, half
// the work), so cov stays exactly symmetric whatever the GEMMs rounded.
//
// With few channels per group the CPU makes the sums in one fused pass over all groups instead
// of GEMMs (per shift a grid of prefix sums; see "Few channels per group" below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "ops.h"

namespace deepunlearn {

namespace {

// shift_pays' cost model, in multiply-adds of a large GEMM, fitted on the CPU (2 threads; forced
// runs of both forms over maps of 1-224 pixels, 1-512 channels per group, 1-32 groups, kernels
// 3-7, 1-64 images): updating one entry of cov outside a GEMM (the scatter, the mirror) costs
// about kCovPassCost multiply-adds, one pass over an entry of a (C_g, C_g) sum kSumPassCost, and
// each group about kShiftCallCost (planning, allocations and some 30 GEMM calls, whatever their
// size); the direct form's gather about kGatherCost per patch entry written and read back (it
// dominates on 3-channel stems), and each group kDirectGroupCost (its GEMM calls). The fused pass
// (few channels per group) does kFusedMacCost per multiply-add (kFusedHalfFactor times that in
// windows narrower than a vector, kFusedScalarFactor in those narrower than half a vector), plus
// kFusedTaskCost per task (group, shift, channel; charged per group and shift instead, it
// overcharged depthwise convs on small maps about fivefold and hid the residue form's gains
// there), kFusedBlockCost per group and block (the scatter's bookkeeping) and kFusedShiftCost per
// shift.
constexpr double kCovPassCost = 100.0, kSumPassCost = 15.0, kShiftCallCost = 15e6, kGatherCost = 100.0;
constexpr double kDirectGroupCost = 3e5, kFusedMacCost = 5.0, kFusedHalfFactor = 1.5, kFusedScalarFactor = 4.0,
                 kFusedTaskCost = 1.5e3, kFusedBlockCost = 1e2, kFusedShiftCost = 2e4;

// Channels per group up to which the CPU makes the shifted form's sums in one fused pass, not
// GEMMs: measured 1.5-7x faster up to 12 channels; with 16-24 channels slower on 3 × 3 kernels
// (by up to 1.9x) but 1.6-2.6x faster on 7 × 7 ones (85 shifts, many small GEMM calls each).
constexpr int64_t kFusedMaxChannels = 12, kFusedMaxChannelsWide = 24, kWideKernelTaps = 25;

struct Segment {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
  bool inside_window(int64_t a, int64_t out) const { return a <= begin && end <= a + out; }
};

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

// One block (a, b) of a shift: the sum of its row pieces' whole-row GEMMs, minus, on each of those
// pieces, the column segments outside its window.
struct Block {
  int64_t a, b;               // kernel taps, ky·kw + kx
  std::vector<size_t> rows;   // indices into Shift::rows
  std::vector<size_t> minus;  // indices into Shift::cols
};

struct Shift {
  int64_t s1, s2;                   // s1 >= 0, and s2 >= 0 where s1 == 0: the other half are transposes
  bool symmetric() const { return s1 == 0 && s2 == 0; }  // its pieces are Σ x_u x_uᵀ
  std::vector<Segment> rows, cols;  // row pieces (padded coordinates) and column segments
  std::vector<Block> blocks;
  std::vector<bool> subtracted;     // [piece · cols.size() + segment]: some block subtracts that pair
};

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

// One chunk's copies for the shifts with |s2| = q, each (cg, H, n, width) and at storage offset 0.
// Cut (see the layout above): the two windows, by the map column their rows start at. Padded: one
// copy of whole rows, each followed by q zero columns, read by both operands, the partner s2
// entries further on (where that runs past a row's end it wraps into zero columns, so those
// products vanish; q spare entries at the end): (W + q) / (W − q) times the cut copies' GEMM work
// but one copy instead of two. That pays on wide maps with few channels: 2 q C_g multiply-adds
// more per copied entry, against W − 3 q entries fewer to copy per row and image, each worth ~64
// multiply-adds on the CPU (cut copies made VGG features.4's calls, 64 channels at 112 × 112,
// about 10 % slower).
struct ChunkCopies {
  bool padded;
  std::map<int64_t, at::Tensor> by_column;  // padded: the one copy, at column 0
};

bool padded_pays(int64_t q, int64_t cg, int64_t W) { return q > 0 && 2 * q * cg < (W - 3 * q) * 64; }

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

// Where each sum of a shift lives in a pool of (C_g, C_g) matrices, per group: one per row piece
// (whole rows) and one per (row piece, column segment) pair some block subtracts.
struct SumSlots {
  std::vector<std::vector<int64_t>> rows;  // [shift][piece]
  std::vector<std::vector<int64_t>> cols;  // [shift][piece · n_cols + segment], -1 where unused
  int64_t count = 0;
};

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

// The sums of one shift as views of a group's pool (count, C_g, ld), for the GEMMs to write.
struct ShiftSums {
  std::vector<at::Tensor> rows;
  std::vector<at::Tensor> cols;  // undefined where unused
};

std::vector<ShiftSums> sum_views(const SumSlots& slots, const at::Tensor& pool_g, int64_t cg) {
  std::vector<ShiftSums> sums(slots.rows.size());
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
// are symmetric updates.
void accumulate_chunk(const std::vector<Shift>& shifts, std::vector<ShiftSums>& sums, const ChunkCopies& copies,
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

// One summand of a (C, C) block: weight · m or weight · mᵀ, m the sum in pool slot `slot`.
enum class Form { kDirect, kTransposed };
struct Term {
  int64_t slot;
  double weight;
  Form form;
};
using BlockTerms = std::vector<std::vector<Term>>;  // [a·kk + b]; empty: a zero block

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
        t.push_back({slots.rows[i][p], 1.0, Form::kDirect});
        for (size_t j : blk.minus) t.push_back({slots.cols[i][p * sh.cols.size() + j], -1.0, Form::kDirect});
      }
      if (blk.a == blk.b) {
        terms[blk.a * kk + blk.a] = std::move(t);
      } else {
        std::vector<Term> mirrored = t;
        for (Term& m : mirrored) m.form = Form::kTransposed;
        terms[blk.a * kk + blk.b] = std::move(t);
        terms[blk.b * kk + blk.a] = std::move(mirrored);
      }
    }
  }
  return terms;
}

// The fused pass's layout: per shift, a (pieces + 1) × (segments + 1) grid of prefix sums, Q[p][j]
// = the products over row pieces < p and column segments < j. A block's rows are a run of pieces
// and its columns a run of segments (both are cut at every window's edges), so each block is four
// entries of its shift's grid, whatever the number of pieces it spans.
struct GridBlock {
  int64_t b;                    // partner tap (the block's row tap is the list it sits in)
  int64_t q11, q01, q10, q00;   // grid slots: Q[p1][j1] − Q[p0][j1] − Q[p1][j0] + Q[p0][j0]
  bool transposed;              // block (b, a) of a planned shift: the grid's matrices transposed
};

struct FusedLayout {
  std::vector<int64_t> offset;               // [shift]: its grid's first slot
  int64_t count = 0;                         // slots per group
  std::vector<std::vector<GridBlock>> by_tap;  // [a]: every block (a, ·)
};

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

// A geometry's shifts, where their sums live and each block's terms: built once per geometry and
// map size, then kept (a 7 × 7 kernel's take ~0.1 ms, longer than a small layer's whole call).
struct ShiftPlan {
  std::vector<Shift> shifts;
  SumSlots slots;     // the GEMMs' sums
  BlockTerms terms;
  FusedLayout fused;  // the fused pass's grids
};

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

// dst[c2·kk + b] += rows[b][c2] for every b < kk and c2 < n: kk streams interleaved into one.
template <typename T>
void interleave_add(T* dst, const T* const* rows, int64_t kk, int64_t n) {
  for (int64_t c2 = 0; c2 < n; ++c2, dst += kk)
    for (int64_t b = 0; b < kk; ++b) dst[b] += rows[b][c2];
}

#if defined(__SSE2__)
// float: 4 × 4 tiles of (b, c2) transposed in registers (a third of the scalar loop's instructions).
template <>
void interleave_add<float>(float* dst, const float* const* rows, int64_t kk, int64_t n) {
  int64_t c2 = 0;
  for (; c2 + 4 <= n; c2 += 4) {
    float* out = dst + c2 * kk;
    // cov's row, 1 KiB ahead: the hardware's prefetchers stop at each page's end.
    for (int64_t ahead = 256; ahead < 256 + 48; ahead += 16) __builtin_prefetch(out + ahead, 1);
    int64_t b = 0;
    for (; b + 4 <= kk; b += 4) {
      __m128 r0 = _mm_loadu_ps(rows[b] + c2), r1 = _mm_loadu_ps(rows[b + 1] + c2);
      __m128 r2 = _mm_loadu_ps(rows[b + 2] + c2), r3 = _mm_loadu_ps(rows[b + 3] + c2);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_j = rows[b .. b + 3][c2 + j]
      _mm_storeu_ps(out + b, _mm_add_ps(_mm_loadu_ps(out + b), r0));
      _mm_storeu_ps(out + kk + b, _mm_add_ps(_mm_loadu_ps(out + kk + b), r1));
      _mm_storeu_ps(out + 2 * kk + b, _mm_add_ps(_mm_loadu_ps(out + 2 * kk + b), r2));
      _mm_storeu_ps(out + 3 * kk + b, _mm_add_ps(_mm_loadu_ps(out + 3 * kk + b), r3));
    }
    for (; b < kk; ++b)
      for (int64_t j = 0; j < 4; ++j) out[j * kk + b] += rows[b][c2 + j];
  }
  for (; c2 < n; ++c2)
    for (int64_t b = 0; b < kk; ++b) dst[c2 * kk + b] += rows[b][c2];
}
#endif

// out[i · ld + j] += w · m[(j0 + j) · ldm + c0 + i] for i < tc, j < jn: a tile of mᵀ.
template <typename T>
void add_transposed_tile(T* out, int64_t ld, const T* m, int64_t ldm, int64_t c0, int64_t j0, int64_t tc, int64_t jn,
                         T w) {
  for (int64_t i = 0; i < tc; ++i)
    for (int64_t j = 0; j < jn; ++j) out[i * ld + j] += w * m[(j0 + j) * ldm + c0 + i];
}

#if defined(__SSE2__)
// float: 4 × 4 sub-tiles transposed in registers (rows of m read 4 wide instead of one entry at a
// time); edges of fewer than 4 rows or columns take the scalar loop.
template <>
void add_transposed_tile<float>(float* out, int64_t ld, const float* m, int64_t ldm, int64_t c0, int64_t j0,
                                int64_t tc, int64_t jn, float w) {
  const int64_t tc4 = tc & ~int64_t(3), jn4 = jn & ~int64_t(3);
  const __m128 wv = _mm_set1_ps(w);
  for (int64_t j = 0; j < jn4; j += 4) {
    const float* src = m + (j0 + j) * ldm + c0;
    for (int64_t i = 0; i < tc4; i += 4) {
      __m128 r0 = _mm_loadu_ps(src + i), r1 = _mm_loadu_ps(src + ldm + i);
      __m128 r2 = _mm_loadu_ps(src + 2 * ldm + i), r3 = _mm_loadu_ps(src + 3 * ldm + i);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_q = m[j0 + j .. j0 + j + 3][c0 + i + q]
      const __m128 t[4] = {r0, r1, r2, r3};
      for (int64_t q = 0; q < 4; ++q) {
        float* o = out + (i + q) * ld + j;
        _mm_storeu_ps(o, _mm_add_ps(_mm_loadu_ps(o), _mm_mul_ps(wv, t[q])));
      }
    }
  }
  for (int64_t i = 0; i < tc; ++i)  // edges: columns from jn4 in every row, all columns in rows from tc4
    for (int64_t j = i < tc4 ? jn4 : 0; j < jn; ++j) out[i * ld + j] += w * m[(j0 + j) * ldm + c0 + i];
}
#endif

// cov_g (kk·C, kk·C, entries [c, a, c', b]) += the blocks, on the CPU; sum slot k is the (C, C)
// matrix at pool + k · C · ld, rows ld apart. Per tap a and tile of
// channels c, the tile's rows of every block (a, ·) are summed from their terms into a small
// buffer (rows of direct terms, columns a tile wide of transposed ones), then each of the tile's
// rows of cov, a contiguous d-vector holding block (a, b) for every b interleaved, is updated in
// one pass.
template <typename T>
void scatter_blocks_cpu(at::Tensor& cov_g, const BlockTerms& terms, const T* pool, int64_t ldm, int64_t C, int64_t kk) {
  constexpr int64_t kTileC = 16;
  const int64_t d = C * kk, tiles = (C + kTileC - 1) / kTileC;
  T* cov = cov_g.mutable_data_ptr<T>();
  at::parallel_for(0, kk * tiles, 1, [&](int64_t begin, int64_t end) {
    // Buffer rows padded off a power-of-two stride, so the tile's rows do not share cache sets.
    const int64_t ld = C + 16;
    std::vector<T> buf(kk * kTileC * ld);
    std::vector<const T*> rows(kk);
    for (int64_t task = begin; task < end; ++task) {
      // Taps fastest: consecutive tasks read the same rows of the sums (cache reuse), and each
      // thread's range holds every tap.
      const int64_t a = task % kk, c0 = (task / kk) * kTileC, tc = std::min(C, c0 + kTileC) - c0;
      std::vector<int64_t> present;
      for (int64_t b = 0; b < kk; ++b) {
        if (terms[a * kk + b].empty()) continue;
        present.push_back(b);
        T* out = buf.data() + b * kTileC * ld;
        for (int64_t i = 0; i < tc; ++i) std::fill(out + i * ld, out + i * ld + C, T(0));
        for (const Term& term : terms[a * kk + b]) {
          const T* m = pool + term.slot * C * ldm;
          const T w = static_cast<T>(term.weight);
          if (term.form == Form::kDirect) {  // rows c0.. of m
            for (int64_t i = 0; i < tc; ++i)
              for (int64_t c2 = 0; c2 < C; ++c2) out[i * ld + c2] += w * m[(c0 + i) * ldm + c2];
            continue;
          }
          // Columns c0.. of m, kTileC rows of m at a time: their cache lines stay in L1 while the
          // tile's rows are updated; the next kTileC rows are prefetched (each on another page, so
          // the hardware's prefetchers miss them; measured 30 % of the scatter on 512 channels).
          for (int64_t j0 = 0; j0 < C; j0 += kTileC) {
            for (int64_t j = j0 + kTileC; j < std::min(C, j0 + 2 * kTileC); ++j) __builtin_prefetch(m + j * ldm + c0);
            add_transposed_tile(out + j0, ld, m, ldm, c0, j0, tc, std::min(kTileC, C - j0), w);
          }
        }
      }
      for (int64_t i = 0; i < tc; ++i) {
        T* dst = cov + ((c0 + i) * kk + a) * d;
        for (size_t k = 0; k < present.size(); ++k) rows[k] = buf.data() + present[k] * kTileC * ld + i * ld;
        if (int64_t(present.size()) == kk) {  // every block: no index lookups
          interleave_add(dst, rows.data(), kk, C);
        } else {
          for (int64_t c2 = 0; c2 < C; ++c2, dst += kk)
            for (size_t k = 0; k < present.size(); ++k) dst[present[k]] += rows[k][c2];
        }
      }
    }
  });
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
        blk.add_(term.form == Form::kTransposed ? m.t() : m, term.weight);
      }
      row.push_back(blk);
    }
    by_tap.select(1, a).add_(at::stack(row, 2));
  }
}

// Memory the caller writes in full before reading it; DEEPUNLEARN_POISON_SCRATCH=1 fills it with NaN
// first, so that the tests catch any entry left unwritten.
at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (env_switch("DEEPUNLEARN_POISON_SCRATCH") == 1) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Few channels per group, on the CPU. The shifts' products are then (C_g, C_g) matrices over long
// rows: ATen's GEMMs run such shapes far below their rate, each call costs microseconds, and a
// depthwise conv would make ~30 calls per group. Here one parallel pass makes every group's sums
// straight from the chunk's (C, H, n, W) copy: per (group, shift, channel c1), each piece's rows are
// multiplied column-wise into one accumulator per column and partner channel c2, whose sums over
// the column segments fill the shift's grid of prefix sums (FusedLayout; shift 0's written to both
// triangles, exactly symmetric). pool: (groups, count, C_g, C_g).

// 32-byte vectors of GCC's / Clang's vector extension (the baseline build lowers them to SSE
// pairs), and 16-byte ones for windows narrower than those. (Passed only between always-inlined
// functions, so GCC's note on their ABI without AVX is moot.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <typename T, int kBytes> struct Vec;
template <> struct Vec<float, 32> { typedef float type __attribute__((vector_size(32))); };
template <> struct Vec<double, 32> { typedef double type __attribute__((vector_size(32))); };
template <> struct Vec<float, 16> { typedef float type __attribute__((vector_size(16))); };
template <> struct Vec<double, 16> { typedef double type __attribute__((vector_size(16))); };

template <typename V, typename T>
inline __attribute__((always_inline)) V load_vec(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));  // unaligned
  return v;
}

// acc[c · ld + x] += Σ_r a[r · stride + x] · b[c][r · stride + x] for kV vectors of kBytes bytes
// of columns from x0 (those from x0 + skip added: an overlapping last block), r < rows and kC
// partner channels c. The accumulators stay in registers over all rows: each row costs one load of
// a and one of each b per kC vector multiply-adds.
template <typename T, int kC, int kV, int kBytes = 32>
inline __attribute__((always_inline)) void product_block(T* acc, int64_t ld, const T* a, const T* const* b,
                                                         int64_t x0, int64_t skip, int64_t rows, int64_t stride) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kL = kBytes / sizeof(T);
  V s[kC][kV] = {};
  for (int64_t r = 0; r < rows; ++r) {
    V av[kV];
    for (int v = 0; v < kV; ++v) av[v] = load_vec<V>(a + r * stride + x0 + v * kL);
    for (int c = 0; c < kC; ++c)
      for (int v = 0; v < kV; ++v) s[c][v] += av[v] * load_vec<V>(b[c] + r * stride + x0 + v * kL);
  }
  for (int c = 0; c < kC; ++c)
    for (int v = 0; v < kV; ++v)
      for (int l = 0; l < kL; ++l)
        if (v * kL + l >= skip) acc[c * ld + x0 + v * kL + l] += s[c][v][l];
}

// The same for columns x < w: blocks of a cache line (two vectors), the last one overlapping its
// predecessor where w is no multiple of it; windows narrower than a vector by two overlapping
// half-width vectors (4-7 floats, 2-3 doubles: a 7 × 7 map, small residue images), narrower ones
// column by column.
template <typename T, int kC>
inline __attribute__((always_inline)) void add_products(T* acc, int64_t ld, const T* a, const T* const* b, int64_t w,
                                                        int64_t rows, int64_t stride) {
  constexpr int64_t kL = 32 / sizeof(T);
  if (w >= 2 * kL) {
    int64_t x0 = 0;
    for (; x0 + 2 * kL <= w; x0 += 2 * kL) product_block<T, kC, 2>(acc, ld, a, b, x0, 0, rows, stride);
    if (x0 < w) product_block<T, kC, 2>(acc, ld, a, b, w - 2 * kL, x0 - (w - 2 * kL), rows, stride);
  } else if (w >= kL) {
    product_block<T, kC, 1>(acc, ld, a, b, 0, 0, rows, stride);
    if (w > kL) product_block<T, kC, 1>(acc, ld, a, b, w - kL, 2 * kL - w, rows, stride);
  } else if (w >= kL / 2) {
    product_block<T, kC, 1, 16>(acc, ld, a, b, 0, 0, rows, stride);
    if (w > kL / 2) product_block<T, kC, 1, 16>(acc, ld, a, b, w - kL / 2, kL - w, rows, stride);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < kC; ++c)
        for (int64_t x = 0; x < w; ++x) acc[c * ld + x] += a[r * stride + x] * b[c][r * stride + x];
  }
}

// Compiled for AVX2 + FMA as well as the baseline, the right one picked at load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define DEEPUNLEARN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DEEPUNLEARN_CLONES
#endif

template <typename T>
DEEPUNLEARN_CLONES void add_products_upto4(T* acc, int64_t ld, const T* a, const T* const* b, int nc, int64_t w,
                                           int64_t rows, int64_t stride) {
  switch (nc) {
    case 4: add_products<T, 4>(acc, ld, a, b, w, rows, stride); break;
    case 3: add_products<T, 3>(acc, ld, a, b, w, rows, stride); break;
    case 2: add_products<T, 2>(acc, ld, a, b, w, rows, stride); break;
    default: add_products<T, 1>(acc, ld, a, b, w, rows, stride); break;
  }
}

template <typename T>
void fused_sums_cpu(const T* whole, int64_t C, int64_t H, int64_t n, int64_t W, const std::vector<Shift>& shifts,
                    const FusedLayout& layout, const ConvGeom& g, int64_t cg, T* pool, bool overwrite) {
  const int64_t groups = C / cg, n_shifts = int64_t(shifts.size()), tasks = groups * n_shifts * cg;
  const int64_t plane = H * n * W;  // one channel of the copy
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(cg * W), prev;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c1 = task % cg, i = (task / cg) % n_shifts, gi = task / (cg * n_shifts);
      const Shift& sh = shifts[i];
      const int64_t lo = std::max<int64_t>(0, -sh.s2), w = W - std::abs(sh.s2);  // the window's map columns
      const int64_t c2_end = sh.symmetric() ? c1 + 1 : cg, stride = int64_t(sh.cols.size()) + 1;
      const T* a_plane = whole + (gi * cg + c1) * plane + lo;
      T* grid = pool + (gi * layout.count + layout.offset[i]) * cg * cg;
      const auto put = [&](int64_t slot, int64_t c2, T v) {  // shift 0: both triangles, the same value
        T* m = grid + slot * cg * cg;
        if (overwrite) {
          m[c1 * cg + c2] = v;
          if (sh.symmetric()) m[c2 * cg + c1] = v;
        } else {
          m[c1 * cg + c2] += v;
          if (sh.symmetric() && c2 != c1) m[c2 * cg + c1] += v;
        }
      };
      prev.assign(c2_end * stride, T(0));  // this chunk's Q[p], per partner channel
      for (int64_t c2 = 0; c2 < c2_end; ++c2)
        for (int64_t j = 0; j < stride; ++j) put(j, c2, T(0));
      for (size_t p = 0; p < sh.rows.size(); ++p) {
        const int64_t r0 = sh.rows[p].begin - g.ph_lo, rows = sh.rows[p].size() * n;  // image rows, all images
        std::fill(acc.begin(), acc.begin() + c2_end * w, T(0));
        for (int64_t c2 = 0; c2 < c2_end; c2 += 4) {
          const T* b[4];
          const int nc = int(std::min<int64_t>(4, c2_end - c2));
          for (int c = 0; c < nc; ++c) b[c] = whole + (gi * cg + c2 + c) * plane + (r0 + sh.s1) * n * W + lo + sh.s2;
          add_products_upto4<T>(acc.data() + c2 * w, w, a_plane + r0 * n * W, b, nc, w, rows, W);
        }
        for (int64_t c2 = 0; c2 < c2_end; ++c2) {  // Q[p + 1][j + 1] = Q[p][j + 1] + Σ_{j' <= j} segment j'
          const T* col = acc.data() + c2 * w;
          T* q = prev.data() + c2 * stride;
          T run = 0;
          put((int64_t(p) + 1) * stride, c2, T(0));
          for (size_t j = 0; j < sh.cols.size(); ++j) {
            const int64_t x0 = sh.cols[j].begin - g.pw_lo - lo;
            for (int64_t x = x0; x < x0 + sh.cols[j].size(); ++x) run += col[x];
            q[j + 1] += run;
            put((int64_t(p) + 1) * stride + int64_t(j) + 1, c2, q[j + 1]);
          }
        }
      }
    }
  });
}

// cov_g (kk·C, kk·C, entries [c, a, c', b]) += every block of tap a, each from four entries of its
// shift's grid (q: (count, C, C)); the rows c·kk + a of cov, for every c, are this task's alone.
template <typename T>
void scatter_grid_blocks(T* cov_g, const FusedLayout& layout, const T* q, int64_t C, int64_t kk, int64_t a) {
  const int64_t d = C * kk, mat = C * C;
  for (const GridBlock& gb : layout.by_tap[a]) {
    const T *q11 = q + gb.q11 * mat, *q01 = q + gb.q01 * mat, *q10 = q + gb.q10 * mat, *q00 = q + gb.q00 * mat;
    for (int64_t c = 0; c < C; ++c) {
      T* row = cov_g + (c * kk + a) * d + gb.b;
      for (int64_t c2 = 0; c2 < C; ++c2) {
        const int64_t e = gb.transposed ? c2 * C + c : c * C + c2;
        row[c2 * kk] += q11[e] - q01[e] - q10[e] + q00[e];  // one order for a block and its transpose
      }
    }
  }
}

// The images of a stride-1 conv that the shifted form reads, copied chunk by chunk into its
// (channels, H, images, W) layout: a conv's own input, or images made from another conv's input
// (the phase images of a strided conv, the residue images of a dilated one), which then exist only
// as those chunks.
struct ShiftImages {
  int64_t count, channels, H, W;
  int64_t granule = 1;  // chunks hold a multiple of this many images
  // dst (c, H, n, W), in cov's dtype ← channels [c0, c0 + c) of images [i0, i0 + n); i0 and n are
  // multiples of granule (n may be cut at count)
  std::function<void(const at::Tensor& dst, int64_t i0, int64_t c0)> fill;

  int64_t per_chunk(int64_t images) const { return std::max(granule, images / granule * granule); }
};

ShiftImages plain_images(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), 1, [x](const at::Tensor& dst, int64_t i0, int64_t c0) {
            dst.copy_(x.narrow(0, i0, dst.size(2)).narrow(1, c0, dst.size(0)).permute({1, 2, 0, 3}));
          }};
}

// The CPU's own kernels (symmetric updates for shift 0, the tiled scatter, the fused pass), or the
// device-generic ATen path the GPU runs; DEEPUNLEARN_CONV_SHIFT_GENERIC=1 forces the latter on the
// CPU, so that the CPU tests cover it too.
bool cpu_kernels_on(const at::Tensor& cov) {
  return cov.is_cpu() && env_switch("DEEPUNLEARN_CONV_SHIFT_GENERIC") != 1;
}

// Whether the fused pass makes the sums (DEEPUNLEARN_CONV_FUSED=0 / 1 forces it off / on there).
bool fused_sums_on(const at::Tensor& cov, int64_t cg, int64_t kk) {
  if (!cpu_kernels_on(cov)) return false;
  if (const int forced = env_switch("DEEPUNLEARN_CONV_FUSED"); forced >= 0) return forced == 1;
  return cg <= (kk >= kWideKernelTaps ? kFusedMaxChannelsWide : kFusedMaxChannels);
}

void shift_accumulate_fused_cpu(at::Tensor& cov, const ShiftImages& in, const ConvGeom& g, int64_t chunk_elements,
                                const std::vector<Shift>& shifts, const FusedLayout& layout) {
  const int64_t N = in.count, C = in.channels, H = in.H, W = in.W;
  const int64_t groups = cov.size(0), cg = C / groups, kk = g.kh * g.kw;
  const int64_t images = in.per_chunk(chunk_elements / (C * H * W));
  const at::Tensor pool = scratch({groups, layout.count, cg, cg}, cov.options());  // the first chunk writes it
  for (int64_t n0 = 0; n0 < N; n0 += images) {
    const int64_t n = std::min(images, N - n0);
    at::Tensor whole = scratch({C, H, n, W}, cov.options());  // in cov's dtype, written by fill
    in.fill(whole, n0, 0);
    AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "fused_sums_cpu", [&] {
      fused_sums_cpu<scalar_t>(whole.const_data_ptr<scalar_t>(), C, H, n, W, shifts, layout, g, cg,
                               pool.mutable_data_ptr<scalar_t>(), n0 == 0);
    });
  }
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "scatter_grid_blocks", [&] {
    const scalar_t* grids = pool.const_data_ptr<scalar_t>();
    scalar_t* out = cov.mutable_data_ptr<scalar_t>();
    const int64_t d = cg * kk;
    at::parallel_for(0, groups * kk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t gi = task / kk;
        scatter_grid_blocks(out + gi * d * d, layout, grids + gi * layout.count * cg * cg, cg, kk, task % kk);
      }
    });
  });
}

}  // namespace

namespace {

// The direct form's cost (any stride) in shift_pays' units: half of the unfolded product (the
// symmetric update), the gather of every patch, the mirror of all of cov.
double direct_cost(const ConvGeom& g, int64_t N, int64_t H, int64_t W, int64_t channels_per_group, int64_t groups) {
  const int64_t kk = g.kh * g.kw;
  const double cg2 = double(channels_per_group) * double(channels_per_group);
  const double positions = double(g.out_h(H)) * double(g.out_w(W)) * double(N);
  return double(groups) * ((0.5 * double(kk) * double(kk + 1) * positions + kCovPassCost * double(kk * kk)) * cg2 +
                           kGatherCost * positions * double(kk * channels_per_group) + kDirectGroupCost);
}

// The shifted form's cost for a stride-1 geometry, its sums made by the fused pass or by GEMMs, in
// entries of element_size bytes. GEMMs: the whole rows of its copies (cut or padded, as copy_chunk
// picks) and subtracted columns; passes over memory: only the blocks some shift reaches, and extra
// passes over its (C_g, C_g) sums (allocating them, reading every term of every block). The fused
// pass makes only the window's products (its column sums come from its accumulators).
double shifted_cost(const ConvGeom& g, int64_t N, int64_t H, int64_t W, int64_t channels_per_group, int64_t groups,
                    bool fused, int64_t element_size) {
  const std::shared_ptr<const ShiftPlan> sp = shift_plan(g, H, W);
  const std::vector<Shift>& shifts = sp->shifts;
  double gemm = 0, fused_macs = 0, sum_passes = 0, blocks = 0;
  for (const Shift& sh : shifts) {
    for (size_t p = 0; p < sh.rows.size(); ++p) {
      const int64_t q = std::abs(sh.s2);
      const int64_t w = W - q;  // the window: below a vector or half a vector wide, slower (add_products)
      const double factor =
          w < 16 / element_size ? kFusedScalarFactor : (w < 32 / element_size ? kFusedHalfFactor : 1.0);
      fused_macs += double(sh.rows[p].size()) * double(w) * factor;
      gemm += double(sh.rows[p].size()) * double(padded_pays(q, channels_per_group, W) ? W + q : W - q);
      for (size_t j = 0; j < sh.cols.size(); ++j)
        if (sh.subtracted[p * sh.cols.size() + j]) {
          gemm += double(sh.rows[p].size()) * double(sh.cols[j].size());
          sum_passes += 1;
        }
    }
    sum_passes += double(sh.rows.size());
    for (const Block& blk : sh.blocks) {
      sum_passes += 2.0 * double(blk.rows.size()) * double(1 + blk.minus.size());
      blocks += blk.a == blk.b ? 1 : 2;
    }
  }
  const double cg2 = double(channels_per_group) * double(channels_per_group);
  const double n_shifts = double(shifts.size());
  const double shifted =
      fused ? double(groups) * ((kFusedMacCost * fused_macs * double(N) + kCovPassCost * blocks) * cg2 +
                                kFusedTaskCost * double(channels_per_group) * n_shifts + kFusedBlockCost * blocks) +
                  kFusedShiftCost * n_shifts
            : double(groups) * (gemm * double(N) * cg2 + (kCovPassCost * blocks + kSumPassCost * sum_passes) * cg2 +
                                kShiftCallCost);
  return shifted;
}

}  // namespace

bool shift_pays(const at::Tensor& cov, const ConvGeom& g, int64_t N, int64_t H, int64_t W) {
  const int64_t kk = g.kh * g.kw, groups = cov.size(0), channels_per_group = cov.size(1) / kk;
  if (g.sh != 1 || g.sw != 1 || g.dh != 1 || g.dw != 1 || kk == 1) return false;
  if (const int forced = env_switch("DEEPUNLEARN_CONV_SHIFT"); forced >= 0) return forced == 1;
  const bool fused = fused_sums_on(cov, channels_per_group, kk);
  return shifted_cost(g, N, H, W, channels_per_group, groups, fused, cov.element_size()) <
         direct_cost(g, N, H, W, channels_per_group, groups);
}

namespace {

// cov += the statistics of the stride-1 conv g over `in`'s images, in chunks of about
// chunk_elements entries of their copies.
void accumulate_images(at::Tensor& cov, const ShiftImages& in, const ConvGeom& g, int64_t chunk_elements) {
  const int64_t N = in.count, C = in.channels, H = in.H, W = in.W;
  const int64_t groups = cov.size(0), cg = C / groups, kk = g.kh * g.kw;
  const std::shared_ptr<const ShiftPlan> sp = shift_plan(g, H, W);
  const std::vector<Shift>& shifts = sp->shifts;
  if (fused_sums_on(cov, cg, kk)) {
    shift_accumulate_fused_cpu(cov, in, g, chunk_elements, shifts, sp->fused);
    return;
  }
  const SumSlots& slots = sp->slots;
  const BlockTerms& terms = sp->terms;
  // Copies per image at most: the whole map and the two windows of one |s2| (made and dropped in
  // turn), at most 3 W columns.
  const int64_t images = in.per_chunk(chunk_elements / (cg * H * 3 * W));
  const at::TensorOptions opts = cov.options();
  const bool cpu = cpu_kernels_on(cov);
  for (int64_t gi = 0; gi < groups; ++gi) {
    // All sums in one allocation, rows padded off a power-of-two length: the scatter reads their
    // columns, and rows 2^k bytes apart would share a few cache sets and evict each other.
    const at::Tensor pool = scratch({slots.count, cg, cg + 16}, opts);  // the first chunk's GEMMs write it
    std::vector<ShiftSums> sums = sum_views(slots, pool, cg);
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
      AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "scatter_blocks_cpu", [&] {
        scatter_blocks_cpu<scalar_t>(cov_g, terms, pool.const_data_ptr<scalar_t>(), pool.stride(1), cg, kk);
      });
    } else {
      scatter_blocks_generic(cov_g, terms, pool, cg, kk);
    }
  }
}

}  // namespace

void shift_accumulate_chunked(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements) {
  accumulate_images(cov, plain_images(x), g, chunk_elements);
}

namespace {

// The indices m < count with 0 <= offset + step·m < size (step > 0): a run, maybe empty.
Segment inside(int64_t offset, int64_t step, int64_t count, int64_t size) {
  const int64_t begin = std::min(count, offset >= 0 ? 0 : (step - 1 - offset) / step);
  const int64_t end = offset >= size ? 0 : (size - 1 - offset) / step + 1;
  return {begin, std::max(begin, std::min(end, count))};
}

}  // namespace

bool phase_accumulate_cpu(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements) {
  // Strided, undilated, with overlapping windows (k > s in some dim): tap a = s·α + φ of output o
  // reads the input at s·(o + α) + φ, i.e. tap α of a stride-1 conv over phase image φ.
  if ((g.sh == 1 && g.sw == 1) || g.dh != 1 || g.dw != 1 || (g.kh <= g.sh && g.kw <= g.sw)) return false;
  const int forced = env_switch("DEEPUNLEARN_CONV_PHASES");
  if (forced == 0) return false;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), groups = cov.size(0), cg = C / groups;
  const int64_t sh = g.sh, sw = g.sw, kh = (g.kh + sh - 1) / sh, kw = (g.kw + sw - 1) / sw, cp = cg * sh * sw;
  const int64_t ho = g.out_h(H), wo = g.out_w(W), hp = ho + kh - 1, wp = wo + kw - 1;  // phase image size
  const ConvGeom pg{kh, kw, 1, 1, 0, 0, 0, 0, 1, 1};
  if (forced != 1 && !(fused_sums_on(cov, cp, kh * kw) &&
                       shifted_cost(pg, N, hp, wp, cp, groups, true, cov.element_size()) <
                           direct_cost(g, N, H, W, cg, groups)))
    return false;
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
  accumulate_images(big, phases, pg, chunk_elements);
  // cov's entry (c, a1, a2) is big's (c, a1 mod sh, a2 mod sw, a1 div sh, a2 div sw).
  std::vector<int64_t> idx;
  for (int64_t c = 0; c < cg; ++c)
    for (int64_t a1 = 0; a1 < g.kh; ++a1)
      for (int64_t a2 = 0; a2 < g.kw; ++a2)
        idx.push_back((((c * sh + a1 % sh) * sw + a2 % sw) * kh + a1 / sh) * kw + a2 / sw);
  const at::Tensor index = at::tensor(idx, at::TensorOptions().dtype(at::kLong));
  cov.add_(big.index_select(1, index).index_select(2, index));
  return true;
}

namespace {

// One dimension of a dilated stride-1 conv, by output residue: output o = r + δ·m (δ the
// dilation) has its taps at padded input r + δ·(m + a), so the outputs of residue r are those of
// an undilated conv over the residue image, the padded input's entries r + δ·m. A run holds
// `count` consecutive residues whose images have the same shape: `real` input entries from
// start + j (residue j of the run), δ apart, after `lo` and before `hi` entries of padding.
struct ResidueRun {
  int64_t count, start, real, lo, hi;
};

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

}  // namespace

bool residue_accumulate(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements) {
  if (g.sh != 1 || g.sw != 1 || (g.dh == 1 && g.dw == 1) || g.kh * g.kw == 1) return false;
  const int forced = env_switch("DEEPUNLEARN_CONV_RESIDUES");
  if (forced == 0) return false;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), groups = cov.size(0), cg = C / groups;
  const std::vector<ResidueRun> rows = residue_runs(H, g.ph_lo, g.ph_hi, g.kh, g.dh);
  const std::vector<ResidueRun> cols = residue_runs(W, g.pw_lo, g.pw_hi, g.kw, g.dw);
  const auto geometry = [&](const ResidueRun& a, const ResidueRun& b) {
    return ConvGeom{g.kh, g.kw, 1, 1, a.lo, a.hi, b.lo, b.hi, 1, 1};
  };
  if (forced != 1) {
    const bool fused = fused_sums_on(cov, cg, g.kh * g.kw);
    double cost = 0;
    for (const ResidueRun& a : rows)
      for (const ResidueRun& b : cols)
        cost += shifted_cost(geometry(a, b), N * a.count * b.count, a.real, b.real, cg, groups, fused,
                             cov.element_size());
    if (!(cost < direct_cost(g, N, H, W, cg, groups))) return false;
  }
  // Per pair of runs one call over its residue images, ordered (image, row residue, column
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
      accumulate_images(cov, residues, geometry(a, b), chunk_elements);
    }
  return true;
}

}  // namespace deepunlearn
