// linear_cov_accumulate_ on CUDA: GEMMs on the tiles on and below the diagonal with cuBLAS on the
// tensor cores (bf16/fp16 inputs with float32 accumulation; tf32 for float32 inputs when torch
// allows it: torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision), then a kernel
// (linear_cov_kernels.cu) that mirrors the strict lower triangle into the upper one. Runs on the current stream.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace deepunlearn {

namespace {

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "deepunlearn: unsupported dtype ", t);
  }
}

// Side of the square output tiles. Measured on an H100 (benchmarks/results/kernels_cuda.md, knob
// sweep): on the tensor cores (16-bit inputs, or float32 with tf32) small tiles starve the GPU (a
// 256×256 output is 4 CTAs for 132 SMs), so up to d = 1024 one full GEMM beats the half-work
// triangle and above it 1024 tiles win; on the CUDA cores (float32 without tf32, float64) the
// GEMMs are compute-bound and the triangle's half work pays from 256 tiles on. The linear op's
// `tile` asks for another (the benchmark sweeps it).
int64_t tile_for(int64_t d, at::ScalarType input, bool tf32, int64_t asked) {
  if (asked > 0) return std::min<int64_t>(asked, d);
  const bool tensor_cores = input == at::kBFloat16 || input == at::kHalf || (input == at::kFloat && tf32);
  if (tensor_cores) return d <= 1024 ? d : 1024;
  return d >= 2048 ? 512 : (d >= 512 ? 256 : d);
}

// Slices of the rows summed by separate GEMMs of one strided-batched call (split-K), for a cov
// that is one tile: its few output tiles (one CTA each for d = 27) leave most SMs idle over a long
// sum. Measured on an H200 (benchmarks/results/kernels_cuda_h200.md, the split-K sweep on the
// 3-channel stems, d = 27, 0.26M-1.6M rows): 512 slices ran 1.6x faster in float32 and 1.04-1.1x
// in bf16, while 8 or 64 slices ran 1.4-13x slower (cuBLAS picks poor kernels for those shapes),
// and at d = 768 any split lost. So the default takes kDefaultSlices for narrow covs (d <=
// kMaxSplitWidth) with enough rows for every slice to hold kMinSliceRows, else none.
// The linear op's split_k = S asks for S slices (1: none) wherever cov is one tile; the slices are
// capped so that each has at least kMinSliceRows rows and the partials take at most 64 MiB.
constexpr int64_t kMinSliceRows = 256;
constexpr int64_t kDefaultSlices = 512;  // the one count that won in the sweep
constexpr int64_t kMaxSplitWidth = 32;   // the widest cov the sweep timed (27) rounded up
int64_t split_for(int64_t d, int64_t n, int64_t tile, int64_t element_size, int64_t asked) {
  if (tile < d) return 1;
  if (asked == 0) asked = d <= kMaxSplitWidth && n >= kDefaultSlices * kMinSliceRows ? kDefaultSlices : 1;
  if (asked <= 1) return 1;
  const int64_t most = std::min(n / kMinSliceRows, (int64_t(64) << 20) / (d * d * element_size));
  return std::max<int64_t>(1, std::min(asked, most));
}

}  // namespace

void syrk_accumulate_cuda(at::Tensor& cov, const at::Tensor& a_in, int64_t tile, int64_t split_k) {
  const int64_t batch = cov.size(0), d = cov.size(1), n = a_in.size(1);
  if (n == 0 || batch == 0) return;
  at::Tensor a = a_in;
  if (cov.scalar_type() == at::kDouble && a.scalar_type() != at::kDouble) a = a.to(at::kDouble);
  // Each row-major a_b (stride(2) == 1) is cuBLAS's column-major (d × n) matrix; each
  // column-major a_b (stride(1) == 1, as the conv gather writes it) is cuBLAS's (n × d) matrix.
  const bool row_major = a.stride(2) == 1 && (d == 1 || a.stride(1) >= d);
  TORCH_CHECK(row_major || (a.stride(1) == 1 && a.stride(2) >= n),
              "syrk_accumulate_cuda: rows or columns must be contiguous");
  const int64_t ld64 = row_major ? a.stride(1) : a.stride(2);
  TORCH_CHECK(n <= INT32_MAX && ld64 <= INT32_MAX && batch <= INT32_MAX,
              "deepunlearn: too many rows for one cuBLAS call; split the batch");
  const bool dbl = cov.scalar_type() == at::kDouble;
  const bool tf32 = !dbl && a.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS();
  const cublasComputeType_t compute = dbl ? CUBLAS_COMPUTE_64F : (tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  const float one_f = 1.f, zero_f = 0.f;
  const double one_d = 1.0, zero_d = 0.0;
  const void* one = dbl ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f);
  const void* zero = dbl ? static_cast<const void*>(&zero_d) : static_cast<const void*>(&zero_f);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const cudaDataType_t at_ = cuda_type(a.scalar_type()), ct = cuda_type(cov.scalar_type());
  const int ld = static_cast<int>(std::max<int64_t>(ld64, 1)), ldc = static_cast<int>(d);
  const char* ap = static_cast<const char*>(a.const_data_ptr());
  char* cp = static_cast<char*>(cov.mutable_data_ptr());
  const int64_t ae = a.element_size(), ce = cov.element_size(), t = tile_for(d, a.scalar_type(), tf32, tile);
  // Row-major C[I, J] (I ≥ J) is, in cuBLAS's column-major view, the (tj × ti) matrix A_Jᵀ A_I,
  // A_J being columns J of a: (tj × n) op N for row-major a, (n × tj) op T for column-major a.
  const cublasOperation_t op_j = row_major ? CUBLAS_OP_N : CUBLAS_OP_T, op_i = row_major ? CUBLAS_OP_T : CUBLAS_OP_N;
  // elements between matrices / rows / columns of a
  const int64_t batch_step = a.stride(0), row_step = a.stride(1), col_step = a.stride(2);
  // `count` whole (d × d) products in one strided-batched GEMM: the first `rows` rows of the
  // matrix at from + b·from_step (elements) into the one at to + b·d², times beta.
  auto whole = [&](const char* from, int64_t from_step, int64_t rows, const void* beta, void* to, int64_t count) {
    TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, op_j, op_i, static_cast<int>(d), static_cast<int>(d), static_cast<int>(rows), one, from, at_, ld,
        from_step, from, at_, ld, from_step, beta, to, ct, ldc, d * d, static_cast<int>(count), compute,
        CUBLAS_GEMM_DEFAULT));
  };
  // cov_b's lower tiles += (rows [r0, r0 + rows) of a_b)ᵀ (the same rows)
  auto lower_tiles = [&](int64_t b, int64_t r0, int64_t rows) {
    const char* ar = ap + (b * batch_step + r0 * row_step) * ae;
    char* cb = cp + b * d * d * ce;
    for (int64_t i0 = 0; i0 < d; i0 += t) {
      const int ti = static_cast<int>(std::min(t, d - i0));
      for (int64_t j0 = 0; j0 <= i0; j0 += t) {
        const int tj = static_cast<int>(std::min(t, d - j0));
        TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, op_j, op_i, tj, ti, static_cast<int>(rows), one,
                                          ar + j0 * col_step * ae, at_, ld, ar + i0 * col_step * ae, at_, ld, one,
                                          cb + (i0 * d + j0) * ce, ct, ldc, compute, CUBLAS_GEMM_DEFAULT));
      }
    }
  };
  const int64_t split = batch == 1 ? split_for(d, n, t, ce, split_k) : 1;
  if (batch > 1 && t == d) {
    // Many small products (a grouped conv's, one per group): one batched call, not one per group.
    whole(ap, batch_step, n, one, cp, batch);
  } else if (split > 1) {
    // Slice s (rows [s·k, (s+1)·k)) into its own (d × d) partial, then cov += their sum; the
    // n − split·k rows left over go straight into cov.
    const int64_t k = n / split;
    at::Tensor partial = at::empty({split, d, d}, cov.options());
    whole(ap, k * row_step, k, zero, partial.mutable_data_ptr(), split);
    cov.add_(partial.sum(0, /*keepdim=*/true));
    if (n > split * k) lower_tiles(0, split * k, n - split * k);
  } else {
    for (int64_t b = 0; b < batch; ++b) lower_tiles(b, 0, n);
  }
  C10_CUDA_CHECK(kernels::mirror_lower_to_upper(cov.mutable_data_ptr(), d, batch, static_cast<int>(ce),
                                                at::cuda::getCurrentCUDAStream()));
}

static void linear_cov_accumulate_cuda(at::Tensor cov, const at::Tensor& x, int64_t tile, int64_t split_k) {
  check_linear_cov_args(cov, x, tile, split_k);
  TORCH_CHECK(cov.is_cuda(), "linear_cov_accumulate_: CUDA kernel called with ", cov.device());
  const c10::cuda::CUDAGuard guard(cov.device());
  const bool usable = (x.stride(1) == 1 && x.stride(0) >= x.size(1)) || (x.stride(0) == 1 && x.stride(1) >= x.size(0));
  at::Tensor a = usable ? x : x.contiguous();
  at::Tensor cov_batch = cov.unsqueeze(0);
  syrk_accumulate_cuda(cov_batch, a.unsqueeze(0), tile, split_k);
}

TORCH_LIBRARY_IMPL(deepunlearn, CUDA, m) { m.impl("linear_cov_accumulate_", &linear_cov_accumulate_cuda); }

}  // namespace deepunlearn
