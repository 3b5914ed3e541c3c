// Tensor parallelism's two collectives, as the forward pass of one rank calls them (NCCL's
// semantics; backend/tensor_parallel.h implements them over host threads, the CUDA backend over
// NCCL). Every rank of a group calls the same collectives in the same order with the same counts.
#pragma once

#include <cstdint>

#include "nibble/core/error.h"

namespace nibble {

// What a collective throws in the ranks that did not fail when another rank's failure aborted
// the group: the failing rank's own error is the one worth reporting.
class CollectiveAborted : public Error {
 public:
  using Error::Error;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // x := the elementwise sum of every rank's x, summed in rank order, so every rank holds the
  // same bits afterwards.
  virtual void all_reduce_sum(float* x, int64_t n) = 0;
  // out[r·n .. (r+1)·n) := rank r's x[0 .. n); out holds world()·n values.
  virtual void all_gather(const float* x, int64_t n, float* out) = 0;
  // Called by the thread that saw its rank fail: the ranks waiting in a collective of the group
  // throw CollectiveAborted instead of waiting forever. The group is not used again after it.
  virtual void abort() = 0;
};

// Where one rank's shard sits in the unsharded model (backend/shard_plan.h makes it): the forward
// pass reduces after each row-parallel product and gathers what column-parallel ones split.
struct TensorParallelRank {
  // Null on a device backend's shard: its own collectives (NCCL) follow the fields below, and
  // this model's forward is not run.
  Communicator* comm = nullptr;
  int64_t vocab_begin = 0;     // the embedding and LM head rows this rank holds start here
  int64_t vocab_per_rank = 0;  // rows of every rank's slice (the last one may hold fewer)
  // o_proj's input permutation mixes heads: its shard reads the whole attention output, gathered.
  bool gather_attention = false;
};

}  // namespace nibble
