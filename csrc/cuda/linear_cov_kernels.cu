// The symmetric update's mirror kernel (cuda/linear_cov_cuda.cpp runs it after the lower tiles' GEMMs).
#include <algorithm>

#include "kernels.h"

namespace deepunlearn::kernels {

namespace {

constexpr int kMirrorTile = 32;
constexpr int kMirrorRows = 8;  // thread rows per block: each thread copies kMirrorTile / kMirrorRows entries
constexpr int64_t kMaxGridZ = 65535;

// c_z[i][j] = c_z[j][i] for i < j, matrix z = blockIdx.z of (d × d) matrices d² apart, through a
// shared-memory tile so reads and writes are coalesced. T: an unsigned integer of the element's width.
template <typename T>
__global__ void mirror_lower_to_upper_tiles(T* __restrict__ c, int64_t d) {
  __shared__ T tile[kMirrorTile][kMirrorTile + 1];
  c += static_cast<int64_t>(blockIdx.z) * d * d;
  const int64_t tr = blockIdx.y, tc = blockIdx.x;  // destination tile (row, col)
  if (tr > tc) return;                              // lower tiles are sources only
  for (int j = threadIdx.y; j < kMirrorTile; j += blockDim.y) {
    const int64_t row = tc * kMirrorTile + j, col = tr * kMirrorTile + threadIdx.x;
    if (row < d && col < d) tile[j][threadIdx.x] = c[row * d + col];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < kMirrorTile; j += blockDim.y) {
    const int64_t row = tr * kMirrorTile + j, col = tc * kMirrorTile + threadIdx.x;
    if (row < d && col < d && col > row) c[row * d + col] = tile[threadIdx.x][j];
  }
}

template <typename T>
cudaError_t launch(void* c, int64_t d, int64_t batch, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>((d + kMirrorTile - 1) / kMirrorTile);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridZ) {
    const dim3 grid(tiles, tiles, static_cast<unsigned>(std::min(kMaxGridZ, batch - b0))), block(kMirrorTile, kMirrorRows);
    mirror_lower_to_upper_tiles<T><<<grid, block, 0, stream>>>(static_cast<T*>(c) + b0 * d * d, d);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t mirror_lower_to_upper(void* c, int64_t d, int64_t batch, int element_bytes, cudaStream_t stream) {
  switch (element_bytes) {
    case 4: return launch<uint32_t>(c, d, batch, stream);
    case 8: return launch<uint64_t>(c, d, batch, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace deepunlearn::kernels
