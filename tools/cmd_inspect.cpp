// nibble inspect -m MODEL: architecture, parameter count and the tensor table.
#include <cstdio>

#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct InspectArgs {
  std::string model;
  bool json = false, tensors = true;
};

void run_inspect(const InspectArgs& a) {
  auto model = Model::load(a.model);
  const ModelConfig& c = model->config();
  const Checkpoint ckpt = Checkpoint::open(a.model);
  nlohmann::json j = {{"model", a.model}, {"config", c.to_json()}, {"parameters", model->parameter_count()},
                      {"kv_cache", model->kv_format().describe()}};
  int64_t bytes = 0;
  nlohmann::json table = nlohmann::json::array();
  for (const std::string& name : ckpt.names()) {
    const TensorInfo& t = ckpt.get(name);
    bytes += int64_t(t.nbytes);
    table.push_back({{"name", name}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"bytes", t.nbytes}});
  }
  j["tensor_bytes"] = bytes;
  if (a.json) {
    j["tensors"] = table;
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("model:        %s\narchitecture: %s\n", a.model.c_str(), arch_name(c.arch));
  std::printf("parameters:   %lld (%.2f M)\n", (long long)model->parameter_count(), double(model->parameter_count()) / 1e6);
  std::printf("layers %lld, hidden %lld, intermediate %lld, heads %lld (KV %lld, head_dim %lld), vocab %lld\n",
              (long long)c.num_layers, (long long)c.hidden_size, (long long)c.intermediate_size, (long long)c.num_heads,
              (long long)c.num_kv_heads, (long long)c.head_dim, (long long)c.vocab_size);
  std::printf("context %lld, rope theta %g (%s scaling), rms eps %g, tied embeddings %s, q/k/v bias %s",
              (long long)c.max_position_embeddings, c.rope_theta, c.rope_scaling.type.c_str(), c.rms_norm_eps,
              c.tie_word_embeddings ? "yes" : "no", c.attention_bias ? "yes" : "no");
  if (c.num_experts) std::printf(", experts %lld (top %lld)", (long long)c.num_experts, (long long)c.num_experts_per_tok);
  std::printf("\ntensors:      %zu, %.2f MB in %zu file(s)\n", table.size(), double(bytes) / 1e6, ckpt.files().size());
  if (!a.tensors) return;
  std::printf("\n%-56s %-8s %-18s %12s\n", "name", "dtype", "shape", "bytes");
  for (const auto& t : table) {
    std::string shape = "[";
    for (size_t i = 0; i < t["shape"].size(); ++i) shape += (i ? ", " : "") + std::to_string(t["shape"][i].get<int64_t>());
    shape += "]";
    std::printf("%-56s %-8s %-18s %12zu\n", t["name"].get<std::string>().c_str(), t["dtype"].get<std::string>().c_str(),
                shape.c_str(), t["bytes"].get<size_t>());
  }
}
}  // namespace

void add_inspect_command(CLI::App& app) {
  auto a = std::make_shared<InspectArgs>();
  CLI::App* cmd = app.add_subcommand("inspect", "Show a model's architecture, parameter count and tensor table");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory or packed nibble .safetensors")->required();
  cmd->add_flag("--json", a->json, "print everything as one JSON object");
  cmd->add_flag("!--no-tensors", a->tensors, "omit the tensor table");
  cmd->callback([a] { run_inspect(*a); });
}

}  // namespace nibble::cli
