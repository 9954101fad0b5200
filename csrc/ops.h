// Shared declarations and argument checks of deepunlearn's custom ops.
//
// Schemas live in ops.cpp (one place); each device's kernels live in cpu/ and cuda/, one file
// per op per device. Every op has a pure-PyTorch twin in deepunlearn/covariance.py or
// deepunlearn/edit.py that the tests compare against.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>

#include "conv_geometry.h"

namespace deepunlearn {

// cov: (d, d) float32/float64, contiguous, symmetric. x: (n, d). tile, split_k: >= 0 (they tune the
// CUDA kernel; the CPU's has neither and reads them as 0).
void check_linear_cov_args(const at::Tensor& cov, const at::Tensor& x, int64_t tile, int64_t split_k);
// The conv op's arguments as each of its kernels (and conv_cov_form) starts from: the geometry
// parsed, the arguments checked (cov: (groups, d_g, d_g); x: (N, C, H, W) or (N, C, L)), and x as
// (N, C, H, W) (conv1d's (N, C, L) with H = 1).
struct ConvCall {
  ConvGeom g;
  at::Tensor x;
};
ConvCall checked_conv_call(const at::Tensor& cov, const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation);
// w: (g, o, d); m_r, m_f: (g, d, d); same dtype and device.
void check_edit_args(const at::Tensor& w, const at::Tensor& m_r, const at::Tensor& m_f);

// a: (b, d, d), float32 or float64.
void check_eigh_args(const at::Tensor& a);
// Every matrix's eigenvalues values (b, d) finite and its solver flag info (b,) zero (info undefined:
// no flags); waits for the device. An error names the first matrix that failed.
void check_eigh_results(const at::Tensor& values, const at::Tensor& info);

// W − (W − W M_r) M_f with two batched GEMMs and one intermediate (device-generic ATen).
at::Tensor projected_edit_impl(const at::Tensor& w, const at::Tensor& m_r, const at::Tensor& m_f);

// cov (d, d) += aᵀ a for a (n, d), in cov's dtype, on the lower triangle and a staircase just
// above it (one GEMM per block of rows; the entries above the staircase keep their old values);
// the mirror then copies the strict lower triangle to the upper one, so that after any number of
// updates one mirror makes cov exactly symmetric. cov: unit column stride, any row stride; a: one
// unit stride (either), so that the GEMMs read it in place. beta = 0: cov ← aᵀ a instead (its old
// values are never read, so it may be uninitialised memory; the mirror then fills the rest).
void syrk_lower_cpu(at::Tensor& cov, const at::Tensor& a, double beta = 1.0);
void mirror_lower_to_upper_cpu(at::Tensor& cov);
#ifdef DEEPUNLEARN_WITH_CUDA
// cov (B, d, d) contiguous += a_bᵀ a_b for each a_b (n, d) of a (B, n, d), in cov's dtype, then an
// exact mirror; each a_b with one unit stride (either), the same stride between them. Where one
// GEMM covers d: one batched GEMM for all B (a grouped conv's groups), else the lower tiles, per matrix.
// tile, split_k: the linear op's tuning arguments (0: the kernel's own choice; linear_cov_cuda.cpp).
void syrk_accumulate_cuda(at::Tensor& cov, const at::Tensor& a, int64_t tile = 0, int64_t split_k = 0);
#endif

}  // namespace deepunlearn
