// The shifted form's sums on the CPU for few channels per group, in one fused pass (AVX2 + FMA
// where the processor has it, picked at load time).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../forms.h"

namespace deepunlearn {

namespace {

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

}  // namespace


void accumulate_fused_cpu(at::Tensor& cov, const ShiftImages& in, const ConvGeom& g, int64_t chunk_elements,
                          const ShiftPlan& plan) {
  const std::vector<Shift>& shifts = plan.shifts;
  const FusedLayout& layout = plan.fused;
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

}  // namespace deepunlearn
