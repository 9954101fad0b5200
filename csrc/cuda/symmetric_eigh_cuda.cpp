// symmetric_eigh on CUDA: cuSOLVER's batched eigensolver (cusolverDnXsyevBatched), one call for the
// whole stack, where torch.linalg.eigh makes one syevd call per matrix past 32 wide. Runs on the
// current stream; checking the flags and the spectra waits for it, as torch.linalg.eigh does.
#include <ATen/ATen.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../conv/forms.h"
#include "../ops.h"

namespace deepunlearn {

namespace {

#define CHECK_CUSOLVER(EXPR)                                                                      \
  do {                                                                                            \
    const cusolverStatus_t status_ = (EXPR);                                                      \
    TORCH_CHECK(status_ == CUSOLVER_STATUS_SUCCESS, "symmetric_eigh: ", #EXPR, " failed: ",        \
                at::cuda::solver::cusolverGetErrorMessage(status_));                              \
  } while (0)

// cuSOLVER's batched solver takes at most this many entries (n · lda · batch) in one call.
constexpr int64_t kMaxEntriesPerCall = std::numeric_limits<int32_t>::max();

// cusolverDnParams_t, destroyed when it goes out of scope (also when a check throws).
struct SolverParams {
  cusolverDnParams_t params = nullptr;
  SolverParams() { CHECK_CUSOLVER(cusolverDnCreateParams(&params)); }
  ~SolverParams() { cusolverDnDestroyParams(params); }
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
};

// cuSOLVER handles, one per device and thread: a thread keeps its handle while it lives and gives it
// back for another thread to take when it ends. (torch's own pool lives in a library torch loads
// only on its first linear-algebra call, so the extension keeps its own.) Handles are never
// destroyed: at process exit the CUDA context may already be gone.
class HandlePool {
 public:
  cusolverDnHandle_t take(int device) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      auto& free = free_[device];
      if (!free.empty()) {
        cusolverDnHandle_t handle = free.back();
        free.pop_back();
        return handle;
      }
    }
    cusolverDnHandle_t handle = nullptr;
    CHECK_CUSOLVER(cusolverDnCreate(&handle));  // on the current device (the caller's guard)
    return handle;
  }
  void give(int device, cusolverDnHandle_t handle) {
    const std::lock_guard<std::mutex> lock(mutex_);
    free_[device].push_back(handle);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<int, std::vector<cusolverDnHandle_t>> free_;
};

HandlePool& handle_pool() {
  static HandlePool* pool = new HandlePool();  // never destroyed: threads may give handles back at exit
  return *pool;
}

struct ThreadHandles {
  std::unordered_map<int, cusolverDnHandle_t> held;
  ~ThreadHandles() {
    for (const auto& [device, handle] : held) handle_pool().give(device, handle);
  }
};

// This thread's handle for the current device, bound to the current stream.
cusolverDnHandle_t current_handle() {
  thread_local ThreadHandles mine;
  const int device = c10::cuda::current_device();
  auto it = mine.held.find(device);
  if (it == mine.held.end()) it = mine.held.emplace(device, handle_pool().take(device)).first;
  CHECK_CUSOLVER(cusolverDnSetStream(it->second, c10::cuda::getCurrentCUDAStream()));
  return it->second;
}

}  // namespace

static std::tuple<at::Tensor, at::Tensor> symmetric_eigh_cuda(const at::Tensor& a) {
  TORCH_CHECK(a.is_cuda(), "symmetric_eigh: CUDA kernel called with ", a.device());
  check_eigh_args(a);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t b = a.size(0), d = a.size(1);
  // Row-major storage of a symmetric matrix is its column-major storage: cuSOLVER reads it as it is
  // and overwrites it with the eigenvectors as columns, which a row-major view holds as rows.
  at::Tensor vectors_t = a.clone(at::MemoryFormat::Contiguous);
  at::Tensor values = scratch({b, d}, a.options());  // every entry written by the solver
  if (b == 0 || d == 0) return {values, vectors_t.transpose(-2, -1)};

  const cudaDataType type = a.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  // The row-major lower triangle (what torch.linalg.eigh reads by default) is the column-major upper.
  const cublasFillMode_t uplo = CUBLAS_FILL_MODE_UPPER;
  const cusolverEigMode_t jobz = CUSOLVER_EIG_MODE_VECTOR;
  const int64_t per_call = std::max<int64_t>(1, kMaxEntriesPerCall / (d * d));
  cusolverDnHandle_t handle = current_handle();
  SolverParams params;
  at::Tensor info = at::zeros({b}, a.options().dtype(at::kInt));
  std::vector<std::vector<uint8_t>> host_work;  // one per call, kept until the solver is done
  const size_t elem = a.element_size();
  try {
    for (int64_t start = 0; start < b; start += per_call) {
      const int64_t count = std::min(per_call, b - start);
      void* mats = static_cast<uint8_t*>(vectors_t.data_ptr()) + start * d * d * elem;
      void* vals = static_cast<uint8_t*>(values.data_ptr()) + start * d * elem;
      size_t device_bytes = 0, host_bytes = 0;
      CHECK_CUSOLVER(cusolverDnXsyevBatched_bufferSize(handle, params.params, jobz, uplo, d, type, mats, d, type, vals,
                                                       type, &device_bytes, &host_bytes, count));
      at::Tensor device_work = at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))},
                                         a.options().dtype(at::kByte));
      host_work.emplace_back(host_bytes);
      CHECK_CUSOLVER(cusolverDnXsyevBatched(handle, params.params, jobz, uplo, d, type, mats, d, type, vals, type,
                                            device_work.data_ptr(), device_bytes,
                                            host_bytes ? host_work.back().data() : nullptr, host_bytes,
                                            info.data_ptr<int>() + start, count));
    }
  } catch (...) {
    c10::cuda::getCurrentCUDAStream().synchronize();  // calls already queued may still read host_work
    throw;
  }
  check_eigh_results(values, info);  // waits for the solver, so the host workspace outlives it
  return {values, vectors_t.transpose(-2, -1)};
}

TORCH_LIBRARY_IMPL(deepunlearn, CUDA, m) { m.impl("symmetric_eigh", &symmetric_eigh_cuda); }

}  // namespace deepunlearn
