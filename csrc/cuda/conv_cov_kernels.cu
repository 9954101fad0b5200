// The conv covariance's gather kernel (cuda/conv_cov_cuda.cpp runs it chunk by chunk).
//
// The chunk is stored column-major, (d, rows) with the output positions contiguous: consecutive
// threads read consecutive output positions, which are consecutive input elements of an NCHW
// tensor at stride 1, and write consecutive buffer elements; each thread writes one output
// position's entries for a block of columns, so its position is decomposed once for all of them.
#include <algorithm>

#include "kernels.h"

namespace deepunlearn::kernels {

namespace {

// Patch columns each block writes. A thread decomposes its output position once (two integer
// divisions, which cost more than the copy of one entry) and reuses it for all of them.
constexpr int64_t kGatherColumns = 32;
constexpr int kGatherThreads = 256;

// T: an unsigned integer of the element's width. I: the index type (32-bit where it fits).
template <typename T, typename I>
__global__ void gather_patches_colmajor(const T* __restrict__ x, Strides st, I H, I W, ConvGeom g, I ho, I wo,
                                        int64_t row0, I rows, int64_t d, int64_t ld, T* __restrict__ buf) {
  const I r = static_cast<I>(blockIdx.x) * kGatherThreads + static_cast<I>(threadIdx.x);
  if (r >= rows) return;
  const I p = static_cast<I>(row0) + r;  // fits I: the caller checks row0 + rows against I's range
  const I hw = ho * wo, n = p / hw, rem = p - n * hw, oy = rem / wo, ox = rem - oy * wo;
  const I iy0 = oy * static_cast<I>(g.sh) - static_cast<I>(g.ph_lo), ix0 = ox * static_cast<I>(g.sw) - static_cast<I>(g.pw_lo);
  const I kh = static_cast<I>(g.kh), kw = static_cast<I>(g.kw), kk = kh * kw;
  const T* xn = x + n * st.n;
  for (int64_t first = blockIdx.y * kGatherColumns; first < d; first += int64_t(gridDim.y) * kGatherColumns) {
    const int64_t last = first + kGatherColumns < d ? first + kGatherColumns : d;
    I c = static_cast<I>(first / kk), k = static_cast<I>(first % kk), ky = k / kw, kx = k - ky * kw;
    for (int64_t col = first; col < last; ++col) {
      const I iy = iy0 + ky * static_cast<I>(g.dh), ix = ix0 + kx * static_cast<I>(g.dw);
      buf[col * ld + r] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? xn[c * st.c + iy * st.h + ix * st.w] : T(0);
      if (++kx == kw) {  // next column: (c, ky, kx) advanced without dividing
        kx = 0;
        if (++ky == kh) {
          ky = 0;
          ++c;
        }
      }
    }
  }
}

template <typename T, typename I>
cudaError_t launch(const void* x, Strides st, int64_t height, int64_t width, const ConvGeom& g, int64_t ho,
                   int64_t wo, int64_t row0, int64_t rows, int64_t d, int64_t ld, void* buf, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + kGatherThreads - 1) / kGatherThreads),
                  static_cast<unsigned>(std::min<int64_t>((d + kGatherColumns - 1) / kGatherColumns, 65535)));
  gather_patches_colmajor<T, I><<<grid, kGatherThreads, 0, stream>>>(
      static_cast<const T*>(x), st, static_cast<I>(height), static_cast<I>(width), g, static_cast<I>(ho),
      static_cast<I>(wo), row0, static_cast<I>(rows), d, ld, static_cast<T*>(buf));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_indexed(bool index32, const void* x, Strides st, int64_t height, int64_t width, const ConvGeom& g,
                           int64_t ho, int64_t wo, int64_t row0, int64_t rows, int64_t d, int64_t ld, void* buf,
                           cudaStream_t stream) {
  return index32 ? launch<T, int32_t>(x, st, height, width, g, ho, wo, row0, rows, d, ld, buf, stream)
                 : launch<T, int64_t>(x, st, height, width, g, ho, wo, row0, rows, d, ld, buf, stream);
}

}  // namespace

cudaError_t gather_patches(const void* x, Strides strides, int64_t height, int64_t width, const ConvGeom& g,
                           int64_t ho, int64_t wo, int64_t row0, int64_t rows, int64_t d, int64_t ld, void* buf,
                           int element_bytes, bool index32, cudaStream_t stream) {
  switch (element_bytes) {
    case 2: return launch_indexed<uint16_t>(index32, x, strides, height, width, g, ho, wo, row0, rows, d, ld, buf, stream);
    case 4: return launch_indexed<uint32_t>(index32, x, strides, height, width, g, ho, wo, row0, rows, d, ld, buf, stream);
    case 8: return launch_indexed<uint64_t>(index32, x, strides, height, width, g, ho, wo, row0, rows, d, ld, buf, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace deepunlearn::kernels
