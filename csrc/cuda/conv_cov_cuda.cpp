// conv_cov_accumulate_ on CUDA: implicit im2col in bounded chunks. A gather kernel
// (conv_cov_kernels.cu) writes a chunk of patches (in the input's dtype, so bf16/fp16 keep the
// tensor-core GEMM) straight from the input in any memory layout; the symmetric tile GEMMs of
// linear_cov_cuda.cpp accumulate it per group. Extra memory: one chunk buffer, whatever the batch size.
//
// The form is chosen by choose_conv_form (conv/forms.h), shared with the CPU: wide stride-1 convs
// whose GEMMs run on the CUDA cores may take the shifted family or the weight-gradient form instead.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "../conv/forms.h"
#include "../ops.h"
#include "kernels.h"

namespace deepunlearn {

namespace {

// Patch entries per chunk on the GPU: 128 MiB of buffer (64M bf16 entries). Measured on an H100
// (knob sweep in benchmarks/results/kernels_cuda_h100.md): the tile GEMMs need long sums (many rows
// per chunk) to fill the GPU; 4M-entry chunks ran 2-3x slower. The op's chunk_elements overrides it.
constexpr int64_t kChunkBytes = int64_t(128) << 20;

}  // namespace

static void conv_cov_accumulate_cuda(at::Tensor cov, const at::Tensor& x_in, at::IntArrayRef kernel,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     c10::string_view form, int64_t chunk_elements) {
  const auto [g, x] = checked_conv_call(cov, x_in, kernel, stride, padding, dilation);
  TORCH_CHECK(cov.is_cuda(), "conv_cov_accumulate_: CUDA kernel called with ", cov.device());
  TORCH_CHECK(chunk_elements >= 0, "conv_cov_accumulate_: chunk_elements must be >= 0 (0: the default), got ",
              chunk_elements);
  const c10::cuda::CUDAGuard guard(cov.device());
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
  const kernels::Strides strides{xs.stride(0), xs.stride(1), xs.stride(2), xs.stride(3)};
  for (int64_t row0 = 0; row0 < total; row0 += chunk) {
    const int64_t rows = std::min(chunk, total - row0);
    C10_CUDA_CHECK(kernels::gather_patches(xs.const_data_ptr(), strides, H, W, g, ho, wo, row0, rows, d, buf.stride(0),
                                           buf.mutable_data_ptr(), static_cast<int>(buf.element_size()), small, stream));
    // Group gi's patches are rows [gi·dg, (gi+1)·dg) of buf: a column-major (rows × dg) matrix.
    syrk_accumulate_cuda(cov, buf.narrow(1, 0, rows).view({groups, dg, rows}).transpose(1, 2));
  }
}

TORCH_LIBRARY_IMPL(deepunlearn, CUDA, m) { m.impl("conv_cov_accumulate_", &conv_cov_accumulate_cuda); }

}  // namespace deepunlearn
