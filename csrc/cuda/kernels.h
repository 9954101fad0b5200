// The CUDA ops' device code, behind plain launchers. The .cu files that hold it include no torch
// header, so nvcc's passes (the host's and one per GPU architecture) parse only these few lines;
// the ops themselves, in .cpp files, are compiled once by the C++ compiler.
//
// Elements are passed by width (2, 4 or 8 bytes): the kernels only copy values and write zeros,
// and zero is all-zero bits in every floating-point format.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../conv_geometry.h"

namespace deepunlearn::kernels {

// A 4-d tensor's strides, in elements.
struct Strides {
  int64_t n, c, h, w;
};

// The column-major chunk of patches: buf[col * ld + r] = patch entry col = c·kh·kw + ky·kw + kx of
// output position row0 + r, for r < rows and col < d, read from x (N, C, H, W) with the given
// strides; zero where the patch reads padding. index32: every position index and input offset
// fits 32 bits (cheaper divisions). Launched on `stream`; returns the launch's error.
cudaError_t gather_patches(const void* x, Strides strides, int64_t height, int64_t width, const ConvGeom& g,
                           int64_t ho, int64_t wo, int64_t row0, int64_t rows, int64_t d, int64_t ld, void* buf,
                           int element_bytes, bool index32, cudaStream_t stream);

// c_z[i][j] = c_z[j][i] for i < j, for `batch` (d × d) row-major matrices d² elements apart
// starting at c. Launched on `stream`; returns the launch's error.
cudaError_t mirror_lower_to_upper(void* c, int64_t d, int64_t batch, int element_bytes, cudaStream_t stream);

}  // namespace deepunlearn::kernels
