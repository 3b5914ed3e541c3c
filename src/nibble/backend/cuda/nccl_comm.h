// One rank of an NCCL communicator over GPUs 0..world-1 of this process (ncclCommInitAll: one
// process, one thread per GPU, notes/tensor-parallel.md), and the collectives the CUDA executor
// queues on its stream. They are captured into a step's CUDA graph like any kernel; every rank
// must queue the same collectives in the same order.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace nibble::cuda {

class NcclComm {
 public:
  // Rank r on GPU r, for `world` GPUs. Throws nibble::Error when fewer GPUs are visible or NCCL
  // fails (naming its error). Sets NCCL_NVLS_ENABLE=0 unless the environment sets it (NVLink
  // multicast is off on the lent machines).
  static std::vector<std::unique_ptr<NcclComm>> create_all(int world);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const { return rank_; }
  int world() const;
  // x := the sum over ranks, in place (fp16 sums as NCCL adds them: in fp16).
  void all_reduce_sum(float* x, int64_t n, cudaStream_t stream);
  void all_reduce_sum(__half* x, int64_t n, cudaStream_t stream);
  // out[r·n .. (r+1)·n) := rank r's x.
  void all_gather(const float* x, int64_t n, float* out, cudaStream_t stream);
  void all_gather(const __half* x, int64_t n, __half* out, cudaStream_t stream);
  // After a failed step on this rank: every communicator of the group is aborted (ncclCommAbort,
  // callable while other threads wait on it), so the ranks blocked in a collective are released;
  // the group cannot run another step.
  void abort();
  bool aborted() const;

 private:
  struct Group;  // the group's ncclComm_t handles and whether it was aborted
  NcclComm(std::shared_ptr<Group> group, int rank) : group_(std::move(group)), rank_(rank) {}
  std::shared_ptr<Group> group_;
  int rank_;
};

}  // namespace nibble::cuda
