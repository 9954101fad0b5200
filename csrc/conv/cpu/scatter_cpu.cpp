// The scatter of the shifted form's GEMM sums into cov on the CPU (SSE where the build has it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "../forms.h"

namespace deepunlearn {

namespace {

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
void scatter_blocks(at::Tensor& cov_g, const BlockTerms& terms, const T* pool, int64_t ldm, int64_t C, int64_t kk) {
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
          if (term.form == TermSide::kDirect) {  // rows c0.. of m
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

}  // namespace

void scatter_blocks_cpu(at::Tensor& cov_g, const BlockTerms& terms, const at::Tensor& pool, int64_t C, int64_t kk) {
  AT_DISPATCH_FLOATING_TYPES(cov_g.scalar_type(), "scatter_blocks_cpu", [&] {
    scatter_blocks<scalar_t>(cov_g, terms, pool.const_data_ptr<scalar_t>(), pool.stride(1), C, kk);
  });
}

}  // namespace deepunlearn
