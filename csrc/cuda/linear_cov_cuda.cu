// linear_cov_accumulate_ on CUDA: GEMMs on the tiles on and below the diagonal with cuBLAS on the
// tensor cores (bf16/fp16 inputs with float32 accumulation; tf32 for float32 inputs when torch
// allows it: torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision), then a kernel
// that mirrors the strict lower triangle into the upper one. Runs on the current stream.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include "../ops.h"

namespace deepunlearn {

namespace {

constexpr int kMirrorTile = 32;

// c[i][j] = c[j][i] for i < j, through a shared-memory tile so reads and writes are coalesced.
template <typename T>
__global__ void mirror_lower_to_upper(T* __restrict__ c, int64_t d) {
  __shared__ T tile[kMirrorTile][kMirrorTile + 1];
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

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "deepunlearn: unsupported dtype ", t);
  }
}

int64_t tile_for(int64_t d) { return d >= 2048 ? 512 : (d >= 512 ? 256 : d); }

}  // namespace

void syrk_accumulate_cuda(at::Tensor& cov, const at::Tensor& a_in) {
  const int64_t d = cov.size(0), n = a_in.size(0);
  if (n == 0) return;
  at::Tensor a = a_in;
  if (cov.scalar_type() == at::kDouble && a.scalar_type() != at::kDouble) a = a.to(at::kDouble);
  TORCH_CHECK(a.stride(1) == 1, "syrk_accumulate_cuda: rows must be contiguous");
  TORCH_CHECK(n <= INT32_MAX && a.stride(0) <= INT32_MAX, "deepunlearn: too many rows for one cuBLAS call; split the batch");
  const bool dbl = cov.scalar_type() == at::kDouble;
  const cublasComputeType_t compute =
      dbl ? CUBLAS_COMPUTE_64F
          : (a.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                                  : CUBLAS_COMPUTE_32F);
  const float one_f = 1.f;
  const double one_d = 1.0;
  const void* one = dbl ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const cudaDataType_t at_ = cuda_type(a.scalar_type()), ct = cuda_type(cov.scalar_type());
  const int lda = static_cast<int>(a.stride(0)), ldc = static_cast<int>(d);
  const char* ap = static_cast<const char*>(a.const_data_ptr());
  char* cp = static_cast<char*>(cov.mutable_data_ptr());
  const int64_t ae = a.element_size(), ce = cov.element_size(), t = tile_for(d);
  // Row-major C[I, J] (I ≥ J) is, in cuBLAS's column-major view, the (tj × ti) matrix
  // A_J · A_Iᵀ where A_J is the (tj × n) column-major view of the row-major columns J of a.
  for (int64_t i0 = 0; i0 < d; i0 += t) {
    const int ti = static_cast<int>(std::min(t, d - i0));
    for (int64_t j0 = 0; j0 <= i0; j0 += t) {
      const int tj = static_cast<int>(std::min(t, d - j0));
      TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, tj, ti, static_cast<int>(n), one,
                                        ap + j0 * ae, at_, lda, ap + i0 * ae, at_, lda, one,
                                        cp + (i0 * d + j0) * ce, ct, ldc, compute, CUBLAS_GEMM_DEFAULT));
    }
  }
  const dim3 grid((d + kMirrorTile - 1) / kMirrorTile, (d + kMirrorTile - 1) / kMirrorTile), block(kMirrorTile, 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (dbl) {
    mirror_lower_to_upper<double><<<grid, block, 0, stream>>>(cov.mutable_data_ptr<double>(), d);
  } else {
    mirror_lower_to_upper<float><<<grid, block, 0, stream>>>(cov.mutable_data_ptr<float>(), d);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

static void linear_cov_accumulate_cuda(at::Tensor cov, const at::Tensor& x) {
  check_linear_cov_args(cov, x);
  TORCH_CHECK(cov.is_cuda(), "linear_cov_accumulate_: CUDA kernel called with ", cov.device());
  const c10::cuda::CUDAGuard guard(cov.device());
  at::Tensor a = x.stride(1) == 1 && x.stride(0) >= x.size(1) ? x : x.contiguous();
  syrk_accumulate_cuda(cov, a);
}

TORCH_LIBRARY_IMPL(deepunlearn, CUDA, m) { m.impl("linear_cov_accumulate_", &linear_cov_accumulate_cuda); }

}  // namespace deepunlearn
