// Operator schemas, shared checks, and the Python module that loads them.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "conv/forms.h"
#include "ops.h"

namespace deepunlearn {

static ConvGeom parse_conv_geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nd = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(nd == 1 || nd == 2, "conv_cov_accumulate_: 1 or 2 spatial dims supported, got ", nd);
  TORCH_CHECK(x.dim() == nd + 2, "conv_cov_accumulate_: x must be (N, C, *spatial) with ", nd,
              " spatial dims, got shape ", x.sizes());
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == nd && static_cast<int64_t>(dilation.size()) == nd &&
                  static_cast<int64_t>(padding.size()) == 2 * nd,
              "conv_cov_accumulate_: stride and dilation need ", nd, " entries and padding ", 2 * nd,
              " (low, high per spatial dim)");
  for (int64_t i = 0; i < nd; ++i) {
    TORCH_CHECK(kernel[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1, "conv_cov_accumulate_: kernel, stride and "
                "dilation must be positive");
    TORCH_CHECK(padding[2 * i] >= 0 && padding[2 * i + 1] >= 0, "conv_cov_accumulate_: padding must be >= 0");
  }
  ConvGeom g{};
  if (nd == 1) {
    g = {1, kernel[0], 1, stride[0], 0, 0, padding[0], padding[1], 1, dilation[0]};
  } else {
    g = {kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], padding[2], padding[3], dilation[0], dilation[1]};
  }
  const int64_t h = nd == 1 ? 1 : x.size(2), w = x.size(-1);
  TORCH_CHECK(g.out_h(h) >= 1 && g.out_w(w) >= 1, "conv_cov_accumulate_: the kernel does not fit the padded input ",
              x.sizes());
  return g;
}

static void check_cov(const at::Tensor& cov, const char* op) {
  TORCH_CHECK(cov.scalar_type() == at::kFloat || cov.scalar_type() == at::kDouble, op,
              ": cov must be float32 or float64, got ", cov.scalar_type());
  TORCH_CHECK(cov.is_contiguous(), op, ": cov must be contiguous");
}

static void check_input_dtype(const at::Tensor& cov, const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble, op,
              ": x must be float32, bfloat16, float16 or float64, got ", t);
  TORCH_CHECK(t != at::kDouble || cov.scalar_type() == at::kDouble, op,
              ": float64 x needs a float64 cov (accumulating it in float32 would lose its precision)");
  TORCH_CHECK(cov.device() == x.device(), op, ": cov is on ", cov.device(), " but x is on ", x.device());
}

void check_linear_cov_args(const at::Tensor& cov, const at::Tensor& x, int64_t tile, int64_t split_k) {
  check_cov(cov, "linear_cov_accumulate_");
  TORCH_CHECK(tile >= 0 && split_k >= 0, "linear_cov_accumulate_: tile and split_k must be >= 0 (0: the kernel's own "
              "choice), got ", tile, " and ", split_k);

  check_input_dtype(cov, x, "linear_cov_accumulate_");
  TORCH_CHECK(cov.dim() == 2 && cov.size(0) == cov.size(1), "linear_cov_accumulate_: cov must be (d, d), got ",
              cov.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cov.size(0), "linear_cov_accumulate_: x must be (n, ", cov.size(0),
              "), got ", x.sizes());
}

static void check_conv_cov_args(const at::Tensor& cov, const at::Tensor& x, const ConvGeom& g) {
  check_cov(cov, "conv_cov_accumulate_");
  check_input_dtype(cov, x, "conv_cov_accumulate_");
  TORCH_CHECK(cov.dim() == 3 && cov.size(1) == cov.size(2), "conv_cov_accumulate_: cov must be (groups, d, d), got ",
              cov.sizes());
  const int64_t groups = cov.size(0), c = x.size(1);
  TORCH_CHECK(groups >= 1 && c % groups == 0, "conv_cov_accumulate_: ", c, " channels do not split into ", groups,
              " groups");
  TORCH_CHECK(cov.size(1) == c / groups * g.kh * g.kw, "conv_cov_accumulate_: cov has d = ", cov.size(1),
              " but C/groups * prod(kernel) = ", c / groups * g.kh * g.kw);
}

ConvCall checked_conv_call(const at::Tensor& cov, const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const ConvGeom g = parse_conv_geometry(x, kernel, stride, padding, dilation);
  check_conv_cov_args(cov, x, g);
  return {g, x.dim() == 3 ? x.unsqueeze(2) : x};
}

void check_edit_args(const at::Tensor& w, const at::Tensor& m_r, const at::Tensor& m_f) {
  TORCH_CHECK(w.dim() == 3 && m_r.dim() == 3 && m_f.dim() == 3, "projected_edit: w must be (g, o, d) and m_r, m_f (g, d, d)");
  TORCH_CHECK(m_r.sizes() == m_f.sizes() && m_r.size(0) == w.size(0) && m_r.size(1) == w.size(2) &&
                  m_r.size(2) == w.size(2),
              "projected_edit: shapes do not match: w ", w.sizes(), ", m_r ", m_r.sizes(), ", m_f ", m_f.sizes());
  TORCH_CHECK(w.scalar_type() == m_r.scalar_type() && w.scalar_type() == m_f.scalar_type(),
              "projected_edit: w, m_r and m_f must share a dtype");
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "projected_edit: floating-point tensors required");
  TORCH_CHECK(w.device() == m_r.device() && w.device() == m_f.device(), "projected_edit: tensors on different devices");
}

void check_eigh_args(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 3 && a.size(1) == a.size(2), "symmetric_eigh: a must be a stack (b, d, d) of square matrices, got ",
              a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "symmetric_eigh: a must be float32 or float64, got ", a.scalar_type());
}

void check_eigh_results(const at::Tensor& values, const at::Tensor& info) {
  // one transfer for both: a row of the solver's flags (zeros where it has none) and one of finiteness
  const at::Tensor flags = info.defined() ? info.to(at::kInt) : at::zeros({values.size(0)}, values.options().dtype(at::kInt));
  const at::Tensor host = at::stack({flags, values.isfinite().all(1).to(at::kInt)}).cpu();
  const int* solver = host.data_ptr<int>();
  const int* finite = solver + values.size(0);
  for (int64_t k = 0; k < values.size(0); ++k) {
    TORCH_CHECK(solver[k] >= 0, "symmetric_eigh: the solver rejected its argument ", -solver[k], " (matrix ", k, ")");
    TORCH_CHECK(finite[k], "symmetric_eigh: matrix ", k, " of ", values.size(0),
                " gave no finite spectrum (solver flag ", solver[k], "); are its entries finite?");
    // finite but not converged: a LinAlgError, as torch.linalg.eigh raises, so that callers can solve again
    TORCH_CHECK_LINALG(solver[k] == 0, "symmetric_eigh: the solver did not converge on matrix ", k, " of ",
                       values.size(0), " (flag ", solver[k], ")");
  }
}

at::Tensor projected_edit_impl(const at::Tensor& w, const at::Tensor& m_r, const at::Tensor& m_f) {
  check_edit_args(w, m_r, m_f);
  // T = W − W M_r in one GEMM (beta = 1, alpha = −1), then W − T M_f in a second: one intermediate.
  at::Tensor t = at::baddbmm(w, w, m_r, /*beta=*/1, /*alpha=*/-1);
  return at::baddbmm(w, t, m_f, /*beta=*/1, /*alpha=*/-1);
}

TORCH_LIBRARY(deepunlearn, m) {
  // cov += xᵀ x for x (n, d); cov (d, d) float32 (or float64), symmetric. Lower tiles only, then
  // mirrored. tile, split_k: the CUDA kernel's output tile side and row slices (0: its own choice;
  // the CPU kernel has neither).
  m.def("linear_cov_accumulate_(Tensor(a!) cov, Tensor x, int tile=0, int split_k=0) -> ()");
  // cov[g] += Σ patch patchᵀ over every patch of group g of a zero-padded conv1d/2d input, without
  // materialising the unfolded tensor. padding is (low, high) per spatial dim. form: "auto" (the
  // cost model's choice) or one forced (conv/forms.h); chunk_elements: entries of the input's
  // copies per chunk (0: the device's default; smaller bounds memory, and the tests cover chunking).
  m.def("conv_cov_accumulate_(Tensor(a!) cov, Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation, "
        "str form=\"auto\", int chunk_elements=0) -> ()");
  // The form conv_cov_accumulate_ runs for these arguments, spelt as its form argument ("direct",
  // "shifted/fused", ...): its choice, made visible.
  m.def("conv_cov_form(Tensor cov, Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation, "
        "str form=\"auto\") -> str");
  // W − (W (I − M_r)) M_f per group; w (g, o, d), m_r and m_f (g, d, d).
  m.def("projected_edit(Tensor w, Tensor m_r, Tensor m_f) -> Tensor");
  // Eigenvalues (b, d), ascending, and eigenvectors (b, d, d), as columns, of a stack a (b, d, d)
  // of symmetric float32/float64 matrices (its lower triangles read), as torch.linalg.eigh gives
  // them; on CUDA in one batched cuSOLVER call where torch.linalg.eigh loops past 32 wide.
  m.def("symmetric_eigh(Tensor a) -> (Tensor eigenvalues, Tensor eigenvectors)");
}

}  // namespace deepunlearn

#ifndef DEEPUNLEARN_TORCH_VERSION
#define DEEPUNLEARN_TORCH_VERSION "unknown"
#endif

namespace {

// _C.set_poison_scratch(on) -> the previous setting: scratch memory filled with NaN before use, so
// that the tests see any entry a kernel leaves unwritten (conv/forms.h: scratch).
PyObject* set_poison_scratch(PyObject*, PyObject* on) {
  const int flag = PyObject_IsTrue(on);
  if (flag < 0) return nullptr;
  return PyBool_FromLong(deepunlearn::set_poison_scratch(flag == 1));
}

PyMethodDef methods[] = {
    {"set_poison_scratch", set_poison_scratch, METH_O, "Fill scratch memory with NaN before use (for tests)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing this module loads the library, whose static initialisers register the ops with the
// dispatcher. It records what it was built with.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "deepunlearn's compiled ops", -1, methods};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "BUILT_WITH_TORCH", DEEPUNLEARN_TORCH_VERSION);
#ifdef DEEPUNLEARN_WITH_CUDA
  PyModule_AddStringConstant(mod, "BUILT_WITH_CUDA", DEEPUNLEARN_CUDA_VERSION);
#else
  Py_INCREF(Py_None);
  PyModule_AddObject(mod, "BUILT_WITH_CUDA", Py_None);
#endif
  return mod;
}
}
