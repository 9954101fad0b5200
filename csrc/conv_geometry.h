// The geometry of a convolution as the covariance ops see it. No torch header: the CUDA kernels'
// files (cuda/kernels.h) include it too.
#pragma once

#include <cstdint>

namespace deepunlearn {

// Geometry of a 1-d or 2-d convolution (1-d is 2-d with H = 1); padding may differ per side.
struct ConvGeom {
  int64_t kh, kw, sh, sw, ph_lo, ph_hi, pw_lo, pw_hi, dh, dw;
  int64_t out_h(int64_t h) const { return (h + ph_lo + ph_hi - dh * (kh - 1) - 1) / sh + 1; }
  int64_t out_w(int64_t w) const { return (w + pw_lo + pw_hi - dw * (kw - 1) - 1) / sw + 1; }
};

}  // namespace deepunlearn
