// Stride-1 conv statistics from weight-gradient convolutions (device-generic ATen; cuDNN on the GPU,
// oneDNN or ATen's own on the CPU).
//
// For stride 1 the block of cov for kernel taps a and b is Σ_{u ∈ U_a} x[:, u] x[:, u + s]ᵀ with
// s = b − a, over the input positions U_a that tap a reads (x zero past the map). Over the whole
// map instead of U_a these sums, for every s in the (2k_h − 1) × (2k_w − 1) window, are exactly
// the weight gradient of a conv with that kernel whose output gradient and input are both x (one
// call, no unfolded copy): (2k − 1)² products of C × C per position instead of the k⁴ of the
// unfolded product, on the library's tuned kernels. U_a misses only a frame of the map (rows
// within k_h − 1 of its top or bottom, columns within k_w − 1 of its sides), so by inclusion and
// exclusion each block is the whole-map sum, minus the sums over the frame rows outside U_a and
// over its frame columns, plus those over the frame points in both; those small sums are weight
// gradients too, one grouped call per kind.
//
// Chosen by default only where a GPU measured a win (choose.cpp: wgrad_pays).
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "forms.h"

namespace deepunlearn {

namespace {

// Rows [y, y + h) and columns [x, x + w) of the map; they may reach past it.
struct Rect {
  int64_t y, h, x, w;
};

// x's entries in r, zero past the map: (n, C, r.h, r.w); a view where r lies inside the map.
at::Tensor window(const at::Tensor& x, const Rect& r) {
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t y0 = std::max<int64_t>(r.y, 0), y1 = std::min(r.y + r.h, H);
  const int64_t x0 = std::max<int64_t>(r.x, 0), x1 = std::min(r.x + r.w, W);
  if (y0 == r.y && y1 == r.y + r.h && x0 == r.x && x1 == r.x + r.w) return x.narrow(2, r.y, r.h).narrow(3, r.x, r.w);
  at::Tensor out = at::zeros({x.size(0), x.size(1), r.h, r.w}, x.options());
  if (y1 > y0 && x1 > x0)
    out.narrow(2, y0 - r.y, y1 - y0).narrow(3, x0 - r.x, x1 - x0).copy_(x.narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0));
  return out;
}

// For each rect m (all of one size): T[m][s][g·cg² + c·cg + c'] = Σ_{u ∈ rect m} x[c, u] x[c', u + s],
// c and c' channels of group g, s = (s1 + k_h − 1)·(2k_w − 1) + s2 + k_w − 1. One weight-gradient
// conv with a group per (rect, group); the whole map takes the conv's padding instead of a copy.
at::Tensor shift_sums(const at::Tensor& x, const std::vector<Rect>& rects, int64_t kh, int64_t kw, int64_t groups) {
  const int64_t m = static_cast<int64_t>(rects.size()), C = x.size(1), cg = C / groups;
  const int64_t S1 = 2 * kh - 1, S2 = 2 * kw - 1;
  const Rect& r0 = rects.front();
  const bool whole = m == 1 && r0.y == 0 && r0.x == 0 && r0.h == x.size(2) && r0.w == x.size(3);
  at::Tensor gy = x, in = x;
  if (!whole) {
    std::vector<at::Tensor> gys, ins;
    for (const Rect& r : rects) {
      gys.push_back(window(x, r));
      ins.push_back(window(x, {r.y - (kh - 1), r.h + 2 * (kh - 1), r.x - (kw - 1), r.w + 2 * (kw - 1)}));
    }
    gy = at::cat(gys, 1);
    in = at::cat(ins, 1);
  }
  const std::vector<int64_t> padding = whole ? std::vector<int64_t>{kh - 1, kw - 1} : std::vector<int64_t>{0, 0};
  const at::Tensor weight = at::empty({m * C, cg, S1, S2}, x.options());  // read for its shape only
  // any memory layout (the whole map passes the caller's, channels-last included, to cuDNN as is)
  const at::Tensor dw = std::get<1>(at::convolution_backward(gy, in, weight, std::nullopt, {1, 1}, padding, {1, 1},
                                                             false, {0, 0}, m * groups, {false, true, false}));
  return dw.reshape({m, groups * cg * cg, S1 * S2}).transpose(1, 2).contiguous();
}

// The map positions in [0, size) outside [a − pad_lo, a − pad_lo + out): those tap a never reads.
std::vector<int64_t> outside(int64_t a, int64_t pad_lo, int64_t out, int64_t size) {
  std::vector<int64_t> v;
  for (int64_t u = 0; u < size; ++u)
    if (u < a - pad_lo || u >= a - pad_lo + out) v.push_back(u);
  return v;
}

// One kind of frame term: its rects and, per rect, the pairs it adds to with `sign` and the shift
// each of them reads (index tensors on cov's device, made once per call).
struct Terms {
  std::vector<Rect> rects;
  std::vector<at::Tensor> pairs, shifts;
  double sign;
};

at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
}

}  // namespace

void accumulate_wgrad(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements) {
  // The sums run in cov's dtype (16-bit inputs widened: exact under tf32 too); the chooser takes this
  // form for a float32 input on a GPU only where cuDNN may round as cuBLAS may (wgrad_keeps_precision).
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t groups = cov.size(0), cg = C / groups, kh = g.kh, kw = g.kw, kk = kh * kw;
  const int64_t S2 = 2 * kw - 1, S = (2 * kh - 1) * S2;
  const int64_t ho = g.out_h(H), wo = g.out_w(W);
  std::vector<std::vector<int64_t>> rows_out, cols_out;  // per tap row / column: map rows / columns it misses
  for (int64_t a = 0; a < kh; ++a) rows_out.push_back(outside(a, g.ph_lo, ho, H));
  for (int64_t a = 0; a < kw; ++a) cols_out.push_back(outside(a, g.pw_lo, wo, W));
  // Pairs of taps a <= b (cov's upper blocks; the lower ones are their transposes) and their shifts.
  std::vector<int64_t> pair_a, pair_b, pair_shift;
  for (int64_t a = 0; a < kk; ++a)
    for (int64_t b = a; b < kk; ++b) {
      pair_a.push_back(a);
      pair_b.push_back(b);
      pair_shift.push_back((b / kw - a / kw + kh - 1) * S2 + (b % kw - a % kw + kw - 1));
    }
  const auto contains = [](const std::vector<int64_t>& v, int64_t u) { return std::find(v.begin(), v.end(), u) != v.end(); };
  // Frame rows (whole rows), frame columns (whole columns) and their crossings (single points).
  std::vector<int64_t> frame_rows, frame_cols;
  for (int64_t u = 0; u < H; ++u)
    if (std::any_of(rows_out.begin(), rows_out.end(), [&](const auto& v) { return contains(v, u); })) frame_rows.push_back(u);
  for (int64_t u = 0; u < W; ++u)
    if (std::any_of(cols_out.begin(), cols_out.end(), [&](const auto& v) { return contains(v, u); })) frame_cols.push_back(u);
  std::vector<Terms> kinds(3);
  kinds[0].sign = kinds[1].sign = -1.0;
  kinds[2].sign = 1.0;
  const auto add_term = [&](Terms& t, const Rect& r, auto&& uses) {
    std::vector<int64_t> ps, ss;
    for (size_t p = 0; p < pair_a.size(); ++p)
      if (uses(pair_a[p] / kw, pair_a[p] % kw)) {
        ps.push_back(static_cast<int64_t>(p));
        ss.push_back(pair_shift[p]);
      }
    if (ps.empty()) return;
    t.rects.push_back(r);
    t.pairs.push_back(index_tensor(ps, cov.device()));
    t.shifts.push_back(index_tensor(ss, cov.device()));
  };
  for (const int64_t r : frame_rows)
    add_term(kinds[0], Rect{r, 1, 0, W}, [&](int64_t a1, int64_t) { return contains(rows_out[a1], r); });
  for (const int64_t c : frame_cols)
    add_term(kinds[1], Rect{0, H, c, 1}, [&](int64_t, int64_t a2) { return contains(cols_out[a2], c); });
  for (const int64_t r : frame_rows)
    for (const int64_t c : frame_cols)
      add_term(kinds[2], Rect{r, 1, c, 1},
               [&](int64_t a1, int64_t a2) { return contains(rows_out[a1], r) && contains(cols_out[a2], c); });

  const auto to_index = [&](const std::vector<int64_t>& v) { return index_tensor(v, cov.device()); };
  const at::Tensor all_shifts = to_index(pair_shift);
  // Frame terms per weight-gradient call: their sums together at most about twice cov's size.
  const int64_t per_call = std::max<int64_t>(1, 2 * kk * kk / S);
  at::Tensor blocks;  // (pairs, groups·cg²): the upper blocks of this call's statistics
  const int64_t images = std::max<int64_t>(1, std::min(N, chunk_elements / std::max<int64_t>(1, C * H * W)));
  for (int64_t n0 = 0; n0 < N; n0 += images) {
    const at::Tensor xs = x.narrow(0, n0, std::min(images, N - n0)).to(cov.scalar_type());
    const at::Tensor whole = shift_sums(xs, {Rect{0, H, 0, W}}, kh, kw, groups);  // (1, S, groups·cg²)
    if (blocks.defined()) {
      blocks.add_(whole[0].index_select(0, all_shifts));
    } else {
      blocks = whole[0].index_select(0, all_shifts);
    }
    for (const Terms& t : kinds)
      for (size_t m0 = 0; m0 < t.rects.size(); m0 += per_call) {
        const size_t m1 = std::min(t.rects.size(), m0 + static_cast<size_t>(per_call));
        const at::Tensor sums = shift_sums(xs, {t.rects.begin() + m0, t.rects.begin() + m1}, kh, kw, groups);
        for (size_t m = m0; m < m1; ++m)
          blocks.index_add_(0, t.pairs[m], sums[m - m0].index_select(0, t.shifts[m]), t.sign);
      }
  }
  // cov's (groups, cg, kk, cg, kk) view gets block (a, b) at [:, :, a, :, b] and its transpose at
  // [:, :, b, :, a]; a diagonal block is made exactly symmetric first (IEEE addition commutes), so
  // that cov stays exactly symmetric. Rows of `source`: the kk symmetrised diagonal blocks, the
  // upper ones, their transposes; `order` picks one per (a, b) (gathers only: deterministic).
  std::vector<int64_t> diag, upper, order(kk * kk);
  for (size_t p = 0; p < pair_a.size(); ++p) (pair_a[p] == pair_b[p] ? diag : upper).push_back(static_cast<int64_t>(p));
  const int64_t n_upper = static_cast<int64_t>(upper.size());
  for (int64_t u = 0; u < n_upper; ++u) {
    order[pair_a[upper[u]] * kk + pair_b[upper[u]]] = kk + u;
    order[pair_b[upper[u]] * kk + pair_a[upper[u]]] = kk + n_upper + u;
  }
  for (int64_t a = 0; a < kk; ++a) order[a * kk + a] = a;  // diag lists the taps in order
  const at::Tensor b3 = blocks.view({-1, groups, cg, cg});
  const at::Tensor d3 = b3.index_select(0, to_index(diag)), u3 = b3.index_select(0, to_index(upper));
  const at::Tensor source = at::cat({(d3 + d3.transpose(2, 3)).mul_(0.5), u3, u3.transpose(2, 3)}, 0);
  cov.view({groups, cg, kk, cg, kk})
      .add_(source.index_select(0, to_index(order)).view({kk, kk, groups, cg, cg}).permute({2, 3, 0, 4, 1}));
}

}  // namespace deepunlearn
