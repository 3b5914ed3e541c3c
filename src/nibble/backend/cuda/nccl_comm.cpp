#include "nibble/backend/cuda/nccl_comm.h"

#include "nibble/backend/cuda/cuda_check.h"

#if !NIBBLE_HAVE_NCCL

namespace nibble::cuda {

struct NcclComm::Group {};

std::vector<std::unique_ptr<NcclComm>> NcclComm::create_all(int world) {
  throw Error("--tp", "this nibble was built without NCCL (nccl.h or libnccl was not found beside CUDA), so it "
                      "cannot split a model across GPUs");
}
NcclComm::~NcclComm() = default;
int NcclComm::world() const { return 1; }
void NcclComm::all_reduce_sum(float*, int64_t, cudaStream_t) {}
void NcclComm::all_reduce_sum(__half*, int64_t, cudaStream_t) {}
void NcclComm::all_gather(const float*, int64_t, float*, cudaStream_t) {}
void NcclComm::all_gather(const __half*, int64_t, __half*, cudaStream_t) {}
void NcclComm::abort() {}
bool NcclComm::aborted() const { return false; }

}  // namespace nibble::cuda

#else

#include <nccl.h>

#include <cstdlib>
#include <mutex>
#include <numeric>

namespace nibble::cuda {

namespace {

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw Error("--tp (NCCL)", cformat("{}: {}", what, ncclGetErrorString(r)));
}

}  // namespace

struct NcclComm::Group {
  std::vector<ncclComm_t> comms;
  mutable std::mutex mutex;
  bool aborted = false;
};

std::vector<std::unique_ptr<NcclComm>> NcclComm::create_all(int world) {
  int devices = 0;
  NIBBLE_CUDA_CHECK(cudaGetDeviceCount(&devices));
  require(world >= 1 && world <= devices, "--tp", "{} ranks need {} GPUs; {} visible", world, world, devices);
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  auto group = std::make_shared<Group>();
  group->comms.resize(static_cast<size_t>(world));
  std::vector<int> gpus(static_cast<size_t>(world));
  std::iota(gpus.begin(), gpus.end(), 0);
  check_nccl(ncclCommInitAll(group->comms.data(), world, gpus.data()), "ncclCommInitAll");
  std::vector<std::unique_ptr<NcclComm>> out;
  for (int r = 0; r < world; ++r) out.push_back(std::unique_ptr<NcclComm>(new NcclComm(group, r)));
  return out;
}

NcclComm::~NcclComm() {
  if (!aborted()) ncclCommDestroy(group_->comms[size_t(rank_)]);
}

int NcclComm::world() const { return int(group_->comms.size()); }

void NcclComm::all_reduce_sum(float* x, int64_t n, cudaStream_t stream) {
  ncclComm_t c = group_->comms[size_t(rank_)];
  check_nccl(ncclAllReduce(x, x, size_t(n), ncclFloat32, ncclSum, c, stream), "ncclAllReduce");
}

void NcclComm::all_reduce_sum(__half* x, int64_t n, cudaStream_t stream) {
  ncclComm_t c = group_->comms[size_t(rank_)];
  check_nccl(ncclAllReduce(x, x, size_t(n), ncclFloat16, ncclSum, c, stream), "ncclAllReduce");
}

void NcclComm::all_gather(const float* x, int64_t n, float* out, cudaStream_t stream) {
  ncclComm_t c = group_->comms[size_t(rank_)];
  check_nccl(ncclAllGather(x, out, size_t(n), ncclFloat32, c, stream), "ncclAllGather");
}

void NcclComm::all_gather(const __half* x, int64_t n, __half* out, cudaStream_t stream) {
  ncclComm_t c = group_->comms[size_t(rank_)];
  check_nccl(ncclAllGather(x, out, size_t(n), ncclFloat16, c, stream), "ncclAllGather");
}

void NcclComm::abort() {
  std::lock_guard lock(group_->mutex);
  if (group_->aborted) return;
  group_->aborted = true;
  for (ncclComm_t c : group_->comms) ncclCommAbort(c);
}

bool NcclComm::aborted() const {
  std::lock_guard lock(group_->mutex);
  return group_->aborted;
}

}  // namespace nibble::cuda

#endif  // NIBBLE_HAVE_NCCL
