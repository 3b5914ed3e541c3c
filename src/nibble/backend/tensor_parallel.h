// Tensor parallelism (notes/tensor-parallel.md): one model served by `world` rank executors, each
// over its shard (backend/shard_plan.h), one thread per rank in this process. The engine and the
// scheduler stay single: the group is one Executor whose forward() hands every rank the same batch
// and returns rank 0's logits (every rank gathers all of them), and whose KV pool applies each
// call to every rank's pool (the same calls give the same sequence ids and pages on each).
//   Threads rather than processes: nibble has no interpreter lock and owns its threads, so the
//   engine, tokenizer and scheduler need no copies and the step's batch needs no broadcast.
#pragma once

#include <memory>
#include <vector>

#include "nibble/backend/backend.h"
#include "nibble/model/communicator.h"

namespace nibble {

// `world` communicators over host memory for `world` threads of this process (rank r is [r]).
// Collectives block until every rank has called them; when one rank's step fails, the group's
// abort() wakes the others with a nibble::Error.
std::vector<std::unique_ptr<Communicator>> make_host_communicators(int world);

// The group for opt.tp ranks on opt.device (cpu: host communicators). The shards are copies, so
// `model` may go once this returns. Throws nibble::Error naming what does not split (ShardPlan)
// or what the device cannot do.
std::unique_ptr<Executor> make_tensor_parallel_executor(const Model& model, const RuntimeOptions& opt);

}  // namespace nibble
