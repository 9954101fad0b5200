// The forms of conv_cov_accumulate_, and the one place that chooses among them for both devices
// (choose.cpp). Every form makes the same statistics exactly; they differ in speed only.
//
// * direct: the patches gathered in bounded chunks and summed by symmetric GEMMs; any geometry
//   (the device's own file: cpu/conv_cov_cpu.cpp, cuda/conv_cov_cuda.cpp).
// * shifted: stride-1, undilated convs by shifted cross-correlations (shift_plan.h, shifted.cpp).
// * residues: dilated stride-1 convs: the shifted form over the input's residue images (images.cpp).
// * phases: strided, undilated convs with overlapping windows: the shifted form over the input's
//   phase images (images.cpp; the CPU's, where its fused pass makes the sums).
// * wgrad: stride-1, undilated convs from weight-gradient convolutions (wgrad.cpp). Measured to win
//   only on a GPU's CUDA cores; never chosen on the CPU.
//
// The shifted family makes its sums one of three ways: "fused", the CPU's one pass over all groups
// for few channels per group (cpu/fused_cpu.cpp); "gemm", the CPU's GEMMs with symmetric updates and
// its SIMD scatter (cpu/scatter_cpu.cpp); "generic", ATen's GEMMs and scatter, what a GPU runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "../ops.h"
#include "shift_plan.h"

namespace deepunlearn {

enum class ConvForm { kAuto, kDirect, kShifted, kResidues, kPhases, kWgrad };
enum class ShiftSums { kAuto, kFused, kGemm, kGeneric };

struct ConvChoice {
  ConvForm form;
  ShiftSums sums;
};

// The op's `form` argument: "auto", "direct", "wgrad", or "shifted", "residues" or "phases", each
// optionally with "/fused", "/gemm" or "/generic"; an error names the accepted spellings.
ConvChoice parse_conv_form(c10::string_view form);

// The form (and sums) the op runs for cov (groups, d, d) and x (N, C, H, W): the requested one,
// checked against the geometry and device (an error that says why where it cannot run), or under
// "auto" the cheapest by the cost model of choose.cpp.
ConvChoice choose_conv_form(const at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ConvChoice requested);

// cov += x's statistics by `choice` (not the direct form, which the device's file runs), in chunks
// of about chunk_elements entries of the images' copies.
void accumulate_by_form(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ConvChoice choice,
                        int64_t chunk_elements);

// The sums for images of channels_per_group channels and kk taps: the requested ones (fused and
// gemm only on the CPU), or under "auto" fused on the CPU up to a channel count, gemm beyond it,
// generic elsewhere.
ShiftSums resolve_sums(ShiftSums requested, const at::Tensor& cov, int64_t channels_per_group, int64_t kk);

// The images of a stride-1 conv that the shifted form reads, copied chunk by chunk into its
// (channels, H, images, W) layout: a conv's own input, or images made from another conv's input
// (the phase images of a strided conv, the residue images of a dilated one), which then exist only
// as those chunks.
struct ShiftImages {
  int64_t count, channels, H, W;
  int64_t granule = 1;  // chunks hold a multiple of this many images
  // dst (c, H, n, W), in cov's dtype ← channels [c0, c0 + c) of images [i0, i0 + n); i0 and n are
  // multiples of granule (n may be cut at count)
  std::function<void(const at::Tensor& dst, int64_t i0, int64_t c0)> fill;

  int64_t per_chunk(int64_t images) const { return std::max(granule, images / granule * granule); }
};

// cov += the statistics of the stride-1 conv g over `in`'s images (shifted.cpp).
void accumulate_images(at::Tensor& cov, const ShiftImages& in, const ConvGeom& g, ShiftSums sums,
                       int64_t chunk_elements);
// The same over a strided conv's phase images, or a dilated conv's residue images (images.cpp).
void accumulate_phases(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ShiftSums sums, int64_t chunk_elements);
void accumulate_residues(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ShiftSums sums,
                         int64_t chunk_elements);
// Stride-1, undilated convs by weight-gradient convolutions (wgrad.cpp).
void accumulate_wgrad(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, int64_t chunk_elements);

// A strided conv's phase images: tap a = s·α + φ of output o reads the input at s·(o + α) + φ, i.e.
// tap α of the stride-1 conv `conv` (kernel ceil(k/s)) over phase image φ (hp × wp), whose
// channels are (c, φ1, φ2): channels_per_group of them per group.
struct PhaseGeometry {
  ConvGeom conv;
  int64_t channels_per_group, hp, wp;
};
PhaseGeometry phase_geometry(const ConvGeom& g, int64_t channels_per_group, int64_t H, int64_t W);

// One dimension of a dilated stride-1 conv, by output residue: output o = r + δ·m (δ the
// dilation) has its taps at padded input r + δ·(m + a), so the outputs of residue r are those of
// an undilated conv over the residue image, the padded input's entries r + δ·m. A run holds
// `count` consecutive residues whose images have the same shape: `real` input entries from
// start + j (residue j of the run), δ apart, after `lo` and before `hi` entries of padding.
struct ResidueRun {
  int64_t count, start, real, lo, hi;
};
std::vector<ResidueRun> residue_runs(int64_t size, int64_t pad_lo, int64_t pad_hi, int64_t k, int64_t dil);
// The undilated conv over the residue images of a pair of runs (rows, columns).
ConvGeom residue_geometry(const ConvGeom& g, const ResidueRun& rows, const ResidueRun& cols);

// Whether the weight-gradient form keeps the precision torch allows x's matrix products: not for a
// float32 input on a GPU where cuDNN's tf32 switch differs from cuBLAS's.
bool wgrad_keeps_precision(const at::Tensor& x);

// Memory the caller writes in full before reading it. With poisoning on (the tests switch it on
// through deepunlearn._C.set_poison_scratch) it is filled with NaN first, so that any entry left
// unwritten shows.
at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& opts);
bool set_poison_scratch(bool on);  // returns the previous setting

// The CPU's own sums and scatter (cpu/): the fused pass for few channels per group, and the
// scatter of the GEMMs' sums (pool (count, C, ld)) into cov_g (kk·C, kk·C).
void accumulate_fused_cpu(at::Tensor& cov, const ShiftImages& in, const ConvGeom& g, int64_t chunk_elements,
                          const ShiftPlan& plan);
void scatter_blocks_cpu(at::Tensor& cov_g, const BlockTerms& terms, const at::Tensor& pool, int64_t C, int64_t kk);

}  // namespace deepunlearn
