// conv_cov_accumulate_ on CUDA: implicit im2col in bounded chunks. A gather kernel writes a chunk
// of patches (in the input's dtype, so bf16/fp16 keep the tensor-core GEMM) straight from the
// input in any memory layout; the symmetric tile GEMMs of linear_cov_cuda.cu accumulate it per
// group. Extra memory: one chunk buffer, whatever the batch size.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"

namespace deepunlearn {

namespace {

struct Strides {
  int64_t n, c, h, w;
};

// One thread per (row, column) of the chunk: row = output position, column = c·k² + ky·kw + kx.
template <typename T>
__global__ void gather_patches_kernel(const T* __restrict__ x, Strides st, int64_t C, int64_t H, int64_t W,
                                      ConvGeom g, int64_t ho, int64_t wo, int64_t row0, int64_t rows,
                                      T* __restrict__ buf) {
  const int64_t kk = g.kh * g.kw, d = C * kk;
  const int64_t total = rows * d;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / d, col = idx % d;
    const int64_t c = col / kk, k = col % kk, ky = k / g.kw, kx = k % g.kw;
    const int64_t p = row0 + r;
    const int64_t n = p / (ho * wo), oy = (p / wo) % ho, ox = p % wo;
    const int64_t iy = oy * g.sh - g.ph_lo + ky * g.dh, ix = ox * g.sw - g.pw_lo + kx * g.dw;
    buf[idx] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[n * st.n + c * st.c + iy * st.h + ix * st.w] : T(0);
  }
}

}  // namespace

static void conv_cov_accumulate_cuda(at::Tensor cov, const at::Tensor& x_in, at::IntArrayRef kernel,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const ConvGeom g = parse_conv_geometry(x_in, kernel, stride, padding, dilation);
  check_conv_cov_args(cov, x_in, g);
  TORCH_CHECK(cov.is_cuda(), "conv_cov_accumulate_: CUDA kernel called with ", cov.device());
  const c10::cuda::CUDAGuard guard(cov.device());
  const at::Tensor x = x_in.dim() == 3 ? x_in.unsqueeze(2) : x_in;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t ho = g.out_h(H), wo = g.out_w(W), total = N * ho * wo;
  if (total == 0) return;
  const int64_t groups = cov.size(0), dg = cov.size(1), d = C * g.kh * g.kw;
  const int64_t chunk = std::max<int64_t>(1, std::min(total, kChunkElements / d));
  // float64 statistics gather in float64; otherwise the chunk keeps the input's dtype.
  const at::ScalarType buf_t = cov.scalar_type() == at::kDouble ? at::kDouble : x.scalar_type();
  const at::Tensor xs = x.scalar_type() == buf_t ? x : x.to(buf_t);
  at::Tensor buf = at::empty({chunk, d}, x.options().dtype(buf_t));
  const Strides st{xs.stride(0), xs.stride(1), xs.stride(2), xs.stride(3)};
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t row0 = 0; row0 < total; row0 += chunk) {
    const int64_t rows = std::min(chunk, total - row0);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((rows * d + threads - 1) / threads, 65535 * 8);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf_t, "conv_cov_gather_cuda", [&] {
      gather_patches_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          xs.const_data_ptr<scalar_t>(), st, C, H, W, g, ho, wo, row0, rows, buf.mutable_data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor part = buf.narrow(0, 0, rows);
    for (int64_t gi = 0; gi < groups; ++gi) {
      at::Tensor cg = cov.select(0, gi);
      syrk_accumulate_cuda(cg, part.narrow(1, gi * dg, dg));
    }
  }
}

TORCH_LIBRARY_IMPL(deepunlearn, CUDA, m) { m.impl("conv_cov_accumulate_", &conv_cov_accumulate_cuda); }

}  // namespace deepunlearn
