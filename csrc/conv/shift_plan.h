// The shifted cross-correlation form of the stride-1 patch covariance, and its plan (the CPU and
// CUDA kernels of conv_cov_accumulate_ both run it; shifted.cpp makes the sums by ATen's GEMMs and
// scatters them per device, cpu/fused_cpu.cpp makes them in one pass for few channels per group).
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
// than two cut ones (see padded_pays). A block whose window misses some of them subtracts those
// columns (thin GEMMs on copies of them).
//
// The pieces are summed over all chunks first and scattered into cov once per call, a pass over
// d² entries (cov's row c·kk + a holds block (a, b) for all b, interleaved), so the extra memory
// is O(d²) + O(chunk). The pieces of shift 0, the only ones in the diagonal blocks (a, a), are
// made exactly symmetric before the scatter (on the CPU their GEMMs are symmetric updates, half
// the work), so cov stays exactly symmetric whatever the GEMMs rounded.
//
// With few channels per group the CPU makes the sums in one fused pass over all groups instead
// of GEMMs (cpu/fused_cpu.cpp: per shift a grid of prefix sums, FusedLayout).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "../ops.h"

namespace deepunlearn {

struct Segment {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
  bool inside_window(int64_t a, int64_t out) const { return a <= begin && end <= a + out; }
};

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


// Whether one zero-padded copy per |s2| = q (shift_plan.cpp) beats two cut ones.
bool padded_pays(int64_t q, int64_t cg, int64_t W);

// Where each sum of a shift lives in a pool of (C_g, C_g) matrices, per group: one per row piece
// (whole rows) and one per (row piece, column segment) pair some block subtracts.
struct SumSlots {
  std::vector<std::vector<int64_t>> rows;  // [shift][piece]
  std::vector<std::vector<int64_t>> cols;  // [shift][piece · n_cols + segment], -1 where unused
  int64_t count = 0;
};

// One summand of a (C, C) block: weight · m or weight · mᵀ, m the sum in pool slot `slot`.
enum class TermSide { kDirect, kTransposed };
struct Term {
  int64_t slot;
  double weight;
  TermSide form;
};
using BlockTerms = std::vector<std::vector<Term>>;  // [a·kk + b]; empty: a zero block

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

// A geometry's shifts, where their sums live and each block's terms: built once per geometry and
// map size, then kept (a 7 × 7 kernel's take ~0.1 ms, longer than a small layer's whole call).
struct ShiftPlan {
  std::vector<Shift> shifts;
  SumSlots slots;     // the GEMMs' sums
  BlockTerms terms;
  FusedLayout fused;  // the fused pass's grids
};

std::shared_ptr<const ShiftPlan> shift_plan(const ConvGeom& g, int64_t H, int64_t W);

}  // namespace deepunlearn
