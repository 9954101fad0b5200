// Shared declarations and argument checks of deepunlearn's custom ops.
//
// Schemas live in ops.cpp (one place); each device's kernels live in cpu/ and cuda/, one file
// per op per device. Every op has a pure-PyTorch twin in deepunlearn/covariance.py or
// deepunlearn/edit.py that the tests compare against.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdlib>
#include <cstdint>

namespace deepunlearn {

// Geometry of a 1-d or 2-d convolution, as seen by the covariance ops (1-d is 2-d with H = 1).
struct ConvGeom {
  int64_t kh, kw, sh, sw, ph_lo, ph_hi, pw_lo, pw_hi, dh, dw;
  int64_t out_h(int64_t h) const { return (h + ph_lo + ph_hi - dh * (kh - 1) - 1) / sh + 1; }
  int64_t out_w(int64_t w) const { return (w + pw_lo + pw_hi - dw * (kw - 1) - 1) / sw + 1; }
};

ConvGeom parse_conv_geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation);

// cov: (d, d) float32/float64, contiguous, symmetric. x: (n, d).
void check_linear_cov_args(const at::Tensor& cov, const at::Tensor& x);
// cov: (groups, d_g, d_g); x: (N, C, H, W) or (N, C, L).
void check_conv_cov_args(const at::Tensor& cov, const at::Tensor& x, const ConvGeom& g);
// w: (g, o, d); m_r, m_f: (g, d, d); same dtype and device.
void check_edit_args(const at::Tensor& w, const at::Tensor& m_r, const at::Tensor& m_f);

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
void syrk_accumulate_cuda(at::Tensor& cov, const at::Tensor& a);
#endif

// Stride-1 convolutions by shifted cross-correlations (conv_shift.cpp, device-generic ATen):
// whether that beats the direct patch product into cov (groups, d_g, d_g), on its device, for N
// images of (H, W) with this geometry (DEEPUNLEARN_CONV_SHIFT=0 / 1 forces it off / on wherever
// stride and dilation are 1), and the accumulation itself (cov += …, x (N, C, H, W) unpadded)
// over chunks of about chunk_elements entries of the input's copies, in cov's dtype.
bool shift_pays(const at::Tensor& cov, const ConvGeom& g, int64_t N, int64_t H, int64_t W);
// Strided convs on the CPU with few channels per group (stems, strided depthwise): the same
// statistics from the stride-1 conv over the input's s_h·s_w phase images (channels (c, φ1, φ2),
// kernel ceil(k/s)), whose shifted form's fused pass is far cheaper than gathering; true where it
// took the call (DEEPUNLEARN_CONV_PHASES=0 / 1 forces it off / on wherever the geometry allows).
bool phase_accumulate_cpu(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements);
void shift_accumulate_chunked(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements);
// Dilated stride-1 convs (device-generic): the outputs of each residue class modulo the dilation
// are those of an undilated conv over the input's entries of that residue, so the statistics are
// the shifted form's over the residue images stacked as images; true where it took the call, by
// the cost model (DEEPUNLEARN_CONV_RESIDUES=0 / 1 forces it off / on wherever the geometry allows).
bool residue_accumulate(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements);

// Stride-1 convs from weight-gradient convolutions (conv_wgrad.cpp, device-generic ATen): the
// sums over the whole map for every shift in one call, the taps' borders subtracted; true where it
// took the call (by default only where a GPU measured a win; DEEPUNLEARN_CONV_WGRAD=1 / 0 forces it).
bool wgrad_accumulate(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements);

// A tuning knob: the positive integer in environment variable `name`, or 0 when it is unset or
// not positive (the caller's default then applies). Read per call, so benchmarks can sweep it.
inline int64_t env_knob(const char* name) {
  const char* v = std::getenv(name);
  const long long n = v ? std::atoll(v) : 0;
  return n > 0 ? n : 0;
}

// An on/off switch: 1 or 0 where environment variable `name` is "1" or "0", else -1 (unset).
inline int env_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v != nullptr && v[0] != 0 && v[1] == 0 && (v[0] == '0' || v[0] == '1')) return v[0] - '0';
  return -1;
}

}  // namespace deepunlearn
