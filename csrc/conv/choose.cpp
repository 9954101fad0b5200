// The one choice of conv_cov_accumulate_'s form, for both devices (see forms.h): a requested form
// checked against the geometry and device, or under "auto" the cheapest by a cost model.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>

#include "forms.h"

namespace deepunlearn {

namespace {

// The cost model, in multiply-adds of a large GEMM, fitted on the CPU (2 threads; forced
// runs of both forms over maps of 1-224 pixels, 1-512 channels per group, 1-32 groups, kernels
// 3-7, 1-64 images): updating one entry of cov outside a GEMM (the scatter, the mirror) costs
// about kCovPassCost multiply-adds, one pass over an entry of a (C_g, C_g) sum kSumPassCost, and
// each group about kShiftCallCost (planning, allocations and some 30 GEMM calls, whatever their
// size); the direct form's gather about kGatherCost per patch entry written and read back (it
// dominates on 3-channel stems), and each group kDirectGroupCost (its GEMM calls). The fused pass
// (few channels per group) does kFusedMacCost per multiply-add (kFusedHalfFactor times that in
// windows narrower than a vector, kFusedScalarFactor in those narrower than half a vector), plus
// kFusedTaskCost per task (group, shift, channel; charged per group and shift instead, it
// overcharged depthwise convs on small maps about fivefold and hid the residue form's gains
// there), kFusedBlockCost per group and block (the scatter's bookkeeping) and kFusedShiftCost per
// shift.
constexpr double kCovPassCost = 100.0, kSumPassCost = 15.0, kShiftCallCost = 15e6, kGatherCost = 100.0;
constexpr double kDirectGroupCost = 3e5, kFusedMacCost = 5.0, kFusedHalfFactor = 1.5, kFusedScalarFactor = 4.0,
                 kFusedTaskCost = 1.5e3, kFusedBlockCost = 1e2, kFusedShiftCost = 2e4;

// Channels per group up to which the CPU makes the shifted form's sums in one fused pass, not
// GEMMs: measured 1.5-7x faster up to 12 channels; with 16-24 channels slower on 3 × 3 kernels
// (by up to 1.9x) but 1.6-2.6x faster on 7 × 7 ones (85 shifts, many small GEMM calls each).
constexpr int64_t kFusedMaxChannels = 12, kFusedMaxChannelsWide = 24, kWideKernelTaps = 25;

// The direct form's cost (any stride) in the cost model's units: half of the unfolded product (the
// symmetric update), the gather of every patch, the mirror of all of cov.
double direct_cost(const ConvGeom& g, int64_t N, int64_t H, int64_t W, int64_t channels_per_group, int64_t groups) {
  const int64_t kk = g.kh * g.kw;
  const double cg2 = double(channels_per_group) * double(channels_per_group);
  const double positions = double(g.out_h(H)) * double(g.out_w(W)) * double(N);
  return double(groups) * ((0.5 * double(kk) * double(kk + 1) * positions + kCovPassCost * double(kk * kk)) * cg2 +
                           kGatherCost * positions * double(kk * channels_per_group) + kDirectGroupCost);
}

// The shifted form's cost for a stride-1 geometry, its sums made by the fused pass or by GEMMs, in
// entries of element_size bytes. GEMMs: the whole rows of its copies (cut or padded, as copy_chunk
// picks) and subtracted columns; passes over memory: only the blocks some shift reaches, and extra
// passes over its (C_g, C_g) sums (allocating them, reading every term of every block). The fused
// pass makes only the window's products (its column sums come from its accumulators).
double shifted_cost(const ConvGeom& g, int64_t N, int64_t H, int64_t W, int64_t channels_per_group, int64_t groups,
                    bool fused, int64_t element_size) {
  const std::shared_ptr<const ShiftPlan> sp = shift_plan(g, H, W);
  const std::vector<Shift>& shifts = sp->shifts;
  double gemm = 0, fused_macs = 0, sum_passes = 0, blocks = 0;
  for (const Shift& sh : shifts) {
    for (size_t p = 0; p < sh.rows.size(); ++p) {
      const int64_t q = std::abs(sh.s2);
      const int64_t w = W - q;  // the window: below a vector or half a vector wide, slower (add_products)
      const double factor =
          w < 16 / element_size ? kFusedScalarFactor : (w < 32 / element_size ? kFusedHalfFactor : 1.0);
      fused_macs += double(sh.rows[p].size()) * double(w) * factor;
      gemm += double(sh.rows[p].size()) * double(padded_pays(q, channels_per_group, W) ? W + q : W - q);
      for (size_t j = 0; j < sh.cols.size(); ++j)
        if (sh.subtracted[p * sh.cols.size() + j]) {
          gemm += double(sh.rows[p].size()) * double(sh.cols[j].size());
          sum_passes += 1;
        }
    }
    sum_passes += double(sh.rows.size());
    for (const Block& blk : sh.blocks) {
      sum_passes += 2.0 * double(blk.rows.size()) * double(1 + blk.minus.size());
      blocks += blk.a == blk.b ? 1 : 2;
    }
  }
  const double cg2 = double(channels_per_group) * double(channels_per_group);
  const double n_shifts = double(shifts.size());
  const double shifted =
      fused ? double(groups) * ((kFusedMacCost * fused_macs * double(N) + kCovPassCost * blocks) * cg2 +
                                kFusedTaskCost * double(channels_per_group) * n_shifts + kFusedBlockCost * blocks) +
                  kFusedShiftCost * n_shifts
            : double(groups) * (gemm * double(N) * cg2 + (kCovPassCost * blocks + kSumPassCost * sum_passes) * cg2 +
                                kShiftCallCost);
  return shifted;
}


// Where the shifted family may run on a GPU: only where the GEMMs run on the CUDA cores (float32
// without tf32, float64), which are compute-bound, so that its fewer multiply-adds pay, and only for
// wide layers on large maps. Measured on an H100 (float32, VGG-11 at 32 images, with the form's
// first version, which copied every shifted slice): 1.7-1.8x faster than the gather for 256
// channels at 56x56 and 512 at 28x28, slower for 64-128 channels or 256 at 28x28; on the tensor
// cores the gather and its few large GEMMs win.
bool shifted_may_pay_on_gpu(const at::Tensor& cov, const at::Tensor& x, int64_t channels_per_group, int64_t positions) {
  const at::ScalarType t = cov.scalar_type() == at::kDouble ? at::kDouble : x.scalar_type();  // the gather's dtype
  const bool cuda_cores = t == at::kDouble || (t == at::kFloat && !at::globalContext().allowTF32CuBLAS());
  return cuda_cores && channels_per_group >= 256 && channels_per_group * positions >= 512 * 28 * 28;
}

// Where the weight-gradient form won (measured on an H200, benchmarks/results/kernels_cuda_h200.md,
// the "wgrad form" rows and the form sweep): only on the CUDA cores (float32 without tf32), 1.6-3.6x
// over the gather or shifted form for 3x3 convs of >= 128 channels on maps of >= 14x14 (VGG-11
// features.8-22, ResNet-18 layer2), and 1.7x for depthwise 3x3 on 56x56. It lost on smaller maps
// (the frame is most of the map), with fewer channels, everywhere on the tensor cores (tf32, bf16),
// where cuDNN's wgrad runs below the gather's GEMM rate, and everywhere on the CPU (2 threads).
bool wgrad_pays(const at::Tensor& x, const ConvGeom& g, int64_t channels_per_group) {
  if (!x.is_cuda() || x.scalar_type() != at::kFloat || at::globalContext().allowTF32CuBLAS()) return false;
  if (g.kh != 3 || g.kw != 3) return false;
  const int64_t side = std::min(x.size(2), x.size(3));
  return (channels_per_group >= 128 && side >= 14) || (channels_per_group == 1 && side >= 56);
}

bool unit_stride(const ConvGeom& g) { return g.sh == 1 && g.sw == 1; }
bool undilated(const ConvGeom& g) { return g.dh == 1 && g.dw == 1; }

// Why `form` cannot run this geometry on this device, or nullptr where it can.
const char* unfit(ConvForm form, const at::Tensor& cov, const at::Tensor& x, const ConvGeom& g) {
  const bool one_tap = g.kh * g.kw == 1;
  switch (form) {
    case ConvForm::kShifted:
      if (!unit_stride(g) || !undilated(g) || one_tap) return "the shifted form needs a stride-1, undilated conv of more than one tap";
      return nullptr;
    case ConvForm::kResidues:
      if (!unit_stride(g) || undilated(g) || one_tap) return "the residue form needs a stride-1, dilated conv of more than one tap";
      return nullptr;
    case ConvForm::kPhases:
      if (unit_stride(g) || !undilated(g) || (g.kh <= g.sh && g.kw <= g.sw))
        return "the phase form needs a strided, undilated conv whose windows overlap (a kernel wider than its stride)";
      if (!cov.is_cpu()) return "the phase form runs on the CPU only";
      return nullptr;
    case ConvForm::kWgrad:
      if (!unit_stride(g) || !undilated(g) || one_tap) return "the weight-gradient form needs a stride-1, undilated conv of more than one tap";
      if (!wgrad_keeps_precision(x))
        return "the weight-gradient form would round a float32 input differently from the matrix products torch "
               "allows: torch.backends.cudnn.allow_tf32 differs from torch.backends.cuda.matmul.allow_tf32";
      return nullptr;
    default:
      return nullptr;
  }
}

// The form argument's spellings, for parsing it and for naming a choice.
constexpr std::pair<const char*, ConvForm> kFormNames[] = {
    {"auto", ConvForm::kAuto},         {"direct", ConvForm::kDirect}, {"shifted", ConvForm::kShifted},
    {"residues", ConvForm::kResidues}, {"phases", ConvForm::kPhases}, {"wgrad", ConvForm::kWgrad}};
constexpr std::pair<const char*, ShiftSums> kSumsNames[] = {
    {"fused", ShiftSums::kFused}, {"gemm", ShiftSums::kGemm}, {"generic", ShiftSums::kGeneric}};

// The sums the shifted family's `form` makes for x: resolved for the images it reads (a strided
// conv's phase images have more channels per group and a smaller kernel than the conv itself).
ShiftSums image_sums(ConvForm form, ShiftSums requested, const at::Tensor& cov, const at::Tensor& x, const ConvGeom& g) {
  const int64_t cg = x.size(1) / cov.size(0);
  if (form != ConvForm::kPhases) return resolve_sums(requested, cov, cg, g.kh * g.kw);
  const PhaseGeometry p = phase_geometry(g, cg, x.size(2), x.size(3));
  return resolve_sums(requested, cov, p.channels_per_group, p.conv.kh * p.conv.kw);
}

// The cost of the shifted family's form for x, its sums chosen automatically, under the cost model.
double form_cost(ConvForm form, const at::Tensor& cov, const at::Tensor& x, const ConvGeom& g) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), groups = cov.size(0), cg = x.size(1) / groups;
  const int64_t bytes = cov.element_size();
  const bool fused = image_sums(form, ShiftSums::kAuto, cov, x, g) == ShiftSums::kFused;
  if (form == ConvForm::kShifted) return shifted_cost(g, N, H, W, cg, groups, fused, bytes);
  if (form == ConvForm::kPhases) {
    const PhaseGeometry p = phase_geometry(g, cg, H, W);
    return shifted_cost(p.conv, N, p.hp, p.wp, p.channels_per_group, groups, fused, bytes);
  }
  double cost = 0;  // residues
  for (const ResidueRun& a : residue_runs(H, g.ph_lo, g.ph_hi, g.kh, g.dh))
    for (const ResidueRun& b : residue_runs(W, g.pw_lo, g.pw_hi, g.kw, g.dw))
      cost += shifted_cost(residue_geometry(g, a, b), N * a.count * b.count, a.real, b.real, cg, groups, fused, bytes);
  return cost;
}

}  // namespace

ConvChoice parse_conv_form(c10::string_view form) {
  const std::string s(form.data(), form.size());
  const size_t slash = s.find('/');
  const std::string name = s.substr(0, slash), sums = slash == std::string::npos ? "" : s.substr(slash + 1);
  ConvChoice c{ConvForm::kAuto, ShiftSums::kAuto};
  const auto form_at = std::find_if(std::begin(kFormNames), std::end(kFormNames), [&](const auto& e) { return name == e.first; });
  TORCH_CHECK(form_at != std::end(kFormNames), "conv_cov_accumulate_: form must be 'auto', 'direct', 'shifted', 'residues', 'phases' or "
                   "'wgrad' (the last three of the shifted family optionally with '/fused', '/gemm' or '/generic'), "
                   "got '", s, "'");
  c.form = form_at->second;
  if (slash == std::string::npos) return c;
  const bool family = c.form == ConvForm::kShifted || c.form == ConvForm::kResidues || c.form == ConvForm::kPhases;
  TORCH_CHECK(family, "conv_cov_accumulate_: only 'shifted', 'residues' and 'phases' make sums a chosen way, got '", s, "'");
  const auto sums_at = std::find_if(std::begin(kSumsNames), std::end(kSumsNames), [&](const auto& e) { return sums == e.first; });
  TORCH_CHECK(sums_at != std::end(kSumsNames), "conv_cov_accumulate_: the sums must be '/fused', '/gemm' or '/generic', got '",
              s, "'");
  c.sums = sums_at->second;
  return c;
}

ShiftSums resolve_sums(ShiftSums requested, const at::Tensor& cov, int64_t channels_per_group, int64_t kk) {
  if (requested != ShiftSums::kAuto) {
    TORCH_CHECK(requested == ShiftSums::kGeneric || cov.is_cpu(), "conv_cov_accumulate_: the fused and gemm sums are "
                "the CPU's; a GPU makes the generic ones");
    return requested;
  }
  if (!cov.is_cpu()) return ShiftSums::kGeneric;
  return channels_per_group <= (kk >= kWideKernelTaps ? kFusedMaxChannelsWide : kFusedMaxChannels) ? ShiftSums::kFused
                                                                                                    : ShiftSums::kGemm;
}

bool wgrad_keeps_precision(const at::Tensor& x) {
  const at::Context& ctx = at::globalContext();
  return !(x.is_cuda() && x.scalar_type() == at::kFloat && ctx.allowTF32CuDNN() != ctx.allowTF32CuBLAS());
}

ConvChoice choose_conv_form(const at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ConvChoice requested) {
  if (requested.form != ConvForm::kAuto) {
    const char* why = unfit(requested.form, cov, x, g);
    TORCH_CHECK(why == nullptr, "conv_cov_accumulate_: ", why, " (kernel ", g.kh, "x", g.kw, ", stride ", g.sh, "x", g.sw,
                ", dilation ", g.dh, "x", g.dw, ")");
    return requested;
  }
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), groups = cov.size(0), cg = x.size(1) / groups;
  const ConvChoice direct{ConvForm::kDirect, ShiftSums::kAuto};
  if (g.kh * g.kw == 1) return direct;
  ConvForm candidate;
  if (unit_stride(g) && undilated(g)) {
    if (wgrad_pays(x, g, cg) && wgrad_keeps_precision(x)) return {ConvForm::kWgrad, ShiftSums::kAuto};
    candidate = ConvForm::kShifted;
  } else if (unit_stride(g)) {
    candidate = ConvForm::kResidues;
  } else if (undilated(g) && cov.is_cpu() && unfit(ConvForm::kPhases, cov, x, g) == nullptr) {
    // only where the fused pass makes the phase images' sums
    if (image_sums(ConvForm::kPhases, ShiftSums::kAuto, cov, x, g) != ShiftSums::kFused) return direct;
    candidate = ConvForm::kPhases;
  } else {
    return direct;
  }
  if (!cov.is_cpu() && !shifted_may_pay_on_gpu(cov, x, cg, g.out_h(H) * g.out_w(W))) return direct;
  if (!(form_cost(candidate, cov, x, g) < direct_cost(g, N, H, W, cg, groups))) return direct;
  return {candidate, ShiftSums::kAuto};
}

void accumulate_by_form(at::Tensor& cov, const at::Tensor& x, const ConvGeom& g, ConvChoice choice,
                        int64_t chunk_elements) {
  switch (choice.form) {
    case ConvForm::kShifted: {
      const ShiftImages plain{x.size(0), x.size(1), x.size(2), x.size(3), 1,
                              [&x](const at::Tensor& dst, int64_t i0, int64_t c0) {
                                dst.copy_(x.narrow(0, i0, dst.size(2)).narrow(1, c0, dst.size(0)).permute({1, 2, 0, 3}));
                              }};
      accumulate_images(cov, plain, g, choice.sums, chunk_elements);
      return;
    }
    case ConvForm::kResidues: accumulate_residues(cov, x, g, choice.sums, chunk_elements); return;
    case ConvForm::kPhases: accumulate_phases(cov, x, g, choice.sums, chunk_elements); return;
    case ConvForm::kWgrad: accumulate_wgrad(cov, x, g, chunk_elements); return;
    default: TORCH_INTERNAL_ASSERT(false, "accumulate_by_form: the direct form is the device's own");
  }
}

namespace {

template <typename T, size_t n>
const char* name_of(const std::pair<const char*, T> (&names)[n], T value) {
  for (const auto& e : names)
    if (e.second == value) return e.first;
  return "?";
}

// conv_cov_form: what conv_cov_accumulate_ would run for these arguments, as the form argument
// that forces it ("shifted/fused", "direct", ...): the choice made visible to tests and benchmarks.
std::string conv_cov_form(const at::Tensor& cov, const at::Tensor& x_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view form) {
  const auto [g, x] = checked_conv_call(cov, x_in, kernel, stride, padding, dilation);
  const ConvChoice c = choose_conv_form(cov, x, g, parse_conv_form(form));
  const std::string name = name_of(kFormNames, c.form);
  if (c.form != ConvForm::kShifted && c.form != ConvForm::kResidues && c.form != ConvForm::kPhases) return name;
  return name + "/" + name_of(kSumsNames, image_sums(c.form, c.sums, cov, x, g));
}

}  // namespace

TORCH_LIBRARY_IMPL(deepunlearn, CompositeExplicitAutograd, m) { m.impl("conv_cov_form", &conv_cov_form); }

}  // namespace deepunlearn
