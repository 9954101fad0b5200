// conv_cov_accumulate_ on CUDA: implicit im2col in bounded chunks. A gather kernel writes a chunk
// of patches (in the input's dtype, so bf16/fp16 keep the tensor-core GEMM) straight from the
// input in any memory layout; the symmetric tile GEMMs of linear_cov_cuda.cu accumulate it per
// group. Extra memory: one chunk buffer, whatever the batch size.
//
// The form is chosen by choose_conv_form (conv/forms.h), shared with the CPU: wide stride-1 convs
// whose GEMMs run on the CUDA cores may take the shifted family or the weight-gradient form instead.
//
// The chunk is stored column-major, (d, rows) with the output positions contiguous: consecutive
// threads read consecutive output positions, which are consecutive input elements of an NCHW
// tensor at stride 1, and write consecutive buffer elements; each thread writes one output
// position's entries for a block of columns, so its position is decomposed once for all of them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "../conv/forms.h"
#include "../ops.h"

namespace deepunlearn {

namespace {

struct Strides {
  int64_t n, c, h, w;
};

// Patch entries per chunk on the GPU: 128 MiB of buffer (64M bf16 entries). Measured on an H100
// (knob sweep in benchmarks/results/kernels_cuda_h100.md): the tile GEMMs need long sums (many rows
// per chunk) to fill the GPU; 4M-entry chunks ran 2-3x slower. The op's chunk_elements overrides it.
constexpr int64_t kChunkBytes = int64_t(128) << 20;

// Patch columns each block writes. A thread decomposes its output position once (two integer
// divisions, which cost more than the copy of one entry) and reuses it for all of them.
constexpr int64_t kGatherColumns = 32;
constexpr int kGatherThreads = 256;

// buf[col * ld + r] = patch entry `col` = c·kh·kw + ky·kw + kx of output position row0 + r.
// Index type I: 32-bit when every position index and input offset fits, which keeps the divisions cheap.
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
void launch_gather(const at::Tensor& x, const ConvGeom& g, int64_t ho, int64_t wo, int64_t row0, int64_t rows,
                   int64_t d, at::Tensor& buf, cudaStream_t stream) {
  const Strides st{x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const dim3 grid(static_cast<unsigned>((rows + kGatherThreads - 1) / kGatherThreads),
                  static_cast<unsigned>(std::min<int64_t>((d + kGatherColumns - 1) / kGatherColumns, 65535)));
  gather_patches_colmajor<T, I><<<grid, kGatherThreads, 0, stream>>>(
      x.const_data_ptr<T>(), st, static_cast<I>(x.size(2)), static_cast<I>(x.size(3)), g, static_cast<I>(ho),
      static_cast<I>(wo), row0, static_cast<I>(rows), d, buf.stride(0), buf.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

static void conv_cov_accumulate_cuda(at::Tensor cov, const at::Tensor& x_in, at::IntArrayRef kernel,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     c10::string_view form, int64_t chunk_elements) {
  const ConvGeom g = parse_conv_geometry(x_in, kernel, stride, padding, dilation);
  check_conv_cov_args(cov, x_in, g);
  TORCH_CHECK(cov.is_cuda(), "conv_cov_accumulate_: CUDA kernel called with ", cov.device());
  TORCH_CHECK(chunk_elements >= 0, "conv_cov_accumulate_: chunk_elements must be >= 0 (0: the default), got ",
              chunk_elements);
  const c10::cuda::CUDAGuard guard(cov.device());
  const at::Tensor x = x_in.dim() == 3 ? x_in.unsqueeze(2) : x_in;
  const ConvChoice choice = choose_conv_form(cov, x, g, parse_conv_form(form));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t ho = g.out_h(H), wo = g.out_w(W), total = N * ho * wo;
  if (total == 0) return;
  const int64_t groups = cov.size(0), dg = cov.size(1), d = C * g.kh * g.kw;
  // float64 statistics gather in float64; otherwise the chunk keeps the input's dtype.
  const at::ScalarType buf_t = cov.scalar_type() == at::kDouble ? at::kDouble : x.scalar_type();
  if (choice.form != ConvForm::kDirect) {
    accumulate_by_form(cov, x, g, choice, chunk_elements > 0 ? chunk_elements : kChunkBytes / cov.element_size());
    return;
  }
  // Rows per chunk: a multiple of 16 (the buffer's leading dimension), so every column starts
  // 16-byte aligned. Measured on an H100: an odd leading dimension pushed cuBLAS onto kernels
  // 2-3x slower.
  int64_t chunk = std::max<int64_t>(1, (chunk_elements > 0 ? chunk_elements : kChunkBytes / c10::elementSize(buf_t)) / d);
  chunk = chunk >= total ? total : std::max<int64_t>(16, chunk / 16 * 16);
  const at::Tensor xs = x.scalar_type() == buf_t ? x : x.to(buf_t);
  // Column-major chunk (d, rows); its leading dimension is rounded up to 16 elements too.
  at::Tensor buf = at::empty({d, (chunk + 15) / 16 * 16}, x.options().dtype(buf_t)).narrow(1, 0, chunk);
  // 32-bit indices when positions and input offsets fit (the common case), else 64-bit.
  const int64_t max_offset = (N - 1) * std::abs(xs.stride(0)) + (C - 1) * std::abs(xs.stride(1)) +
                             (H - 1) * std::abs(xs.stride(2)) + (W - 1) * std::abs(xs.stride(3));
  const bool small = total < INT_MAX && max_offset < INT_MAX && H < INT_MAX / 2 && W < INT_MAX / 2;
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t row0 = 0; row0 < total; row0 += chunk) {
    const int64_t rows = std::min(chunk, total - row0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf_t, "conv_cov_gather_cuda", [&] {
      if (small) {
        launch_gather<scalar_t, int32_t>(xs, g, ho, wo, row0, rows, d, buf, stream);
      } else {
        launch_gather<scalar_t, int64_t>(xs, g, ho, wo, row0, rows, d, buf, stream);
      }
    });
    // Group gi's patches are rows [gi·dg, (gi+1)·dg) of buf: a column-major (rows × dg) matrix.
    syrk_accumulate_cuda(cov, buf.narrow(1, 0, rows).view({groups, dg, rows}).transpose(1, 2));
  }
}

TORCH_LIBRARY_IMPL(deepunlearn, CUDA, m) { m.impl("conv_cov_accumulate_", &conv_cov_accumulate_cuda); }

}  // namespace deepunlearn
