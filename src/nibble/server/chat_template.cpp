#include "nibble/server/chat_template.h"

#include <fstream>

#include <nlohmann/json.hpp>

#include "nibble/core/error.h"

namespace nibble::server {

namespace {
constexpr ChatFormat kFormats[] = {ChatFormat::Llama2, ChatFormat::Llama3, ChatFormat::Mistral, ChatFormat::ChatML};

// A tokenizer_config.json token is a string or an AddedToken object {"content": ...}.
std::string token_text(const nlohmann::json& config, const char* key, const char* fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) return (*it)["content"];
  return fallback;
}
}  // namespace

const char* chat_format_name(ChatFormat f) {
  switch (f) {
    case ChatFormat::Llama2: return "llama-2";
    case ChatFormat::Llama3: return "llama-3";
    case ChatFormat::Mistral: return "mistral";
    case ChatFormat::ChatML: return "chatml";
  }
  return "?";
}

ChatTemplate ChatTemplate::named(const std::string& name, std::string bos, std::string eos) {
  for (ChatFormat f : kFormats)
    if (name == chat_format_name(f)) return {f, std::move(bos), std::move(eos)};
  throw Error("--chat-template", fmt::format("unknown chat template '{}': nibble renders llama-2, llama-3, mistral "
                                             "and chatml",
                                             name));
}

std::optional<ChatTemplate> ChatTemplate::from_model(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "tokenizer_config.json";
  if (!std::filesystem::is_regular_file(path)) return std::nullopt;
  std::ifstream in(path);
  nlohmann::json config = nlohmann::json::parse(in, nullptr, false);
  check(!config.is_discarded(), path.string(), "not valid JSON");
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return std::nullopt;
  // A list of named templates: the "default" one serves chat.
  std::string text;
  if (it->is_string()) {
    text = it->get<std::string>();
  } else if (it->is_array()) {
    for (const auto& t : *it)
      if (t.value("name", "") == "default" && t.contains("template") && t["template"].is_string()) text = t["template"];
  }
  check(!text.empty(), path.string(), "chat_template is neither a string nor a list with a \"default\" template");
  // Each format's markers; Llama-2 is checked before Mistral, whose [INST] it shares.
  ChatFormat format;
  if (text.find("<|im_start|>") != std::string::npos) format = ChatFormat::ChatML;
  else if (text.find("<|start_header_id|>") != std::string::npos) format = ChatFormat::Llama3;
  else if (text.find("<<SYS>>") != std::string::npos) format = ChatFormat::Llama2;
  else if (text.find("[INST]") != std::string::npos) format = ChatFormat::Mistral;
  else
    throw Error(path.string(), "chat_template is none of the formats nibble renders (llama-2, llama-3, mistral, "
                               "chatml): give --chat-template NAME");
  return ChatTemplate{format, token_text(config, "bos_token", "<s>"), token_text(config, "eos_token", "</s>")};
}

std::string ChatTemplate::end_of_turn() const {
  switch (format) {
    case ChatFormat::Llama3: return "<|eot_id|>";
    case ChatFormat::ChatML: return "<|im_end|>";
    default: return eos;
  }
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages) const {
  check(!messages.empty(), "messages", "no message to answer");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    check(role == "system" || role == "user" || role == "assistant", fmt::format("messages[{}].role", i),
          "unknown role '{}' (system, user or assistant)", role);
  }
  std::string out;
  switch (format) {
    case ChatFormat::Llama3:
      out = "<|begin_of_text|>";
      for (const auto& m : messages)
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + m.content + "<|eot_id|>";
      return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
    case ChatFormat::ChatML:
      for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      return out + "<|im_start|>assistant\n";
    case ChatFormat::Llama2:
    case ChatFormat::Mistral: {
      // A system message goes into the first user turn: Llama-2 between <<SYS>> markers, Mistral
      // before the text (as Mistral's later templates do).
      std::string system;
      size_t first = 0;
      if (messages[0].role == "system") {
        system = format == ChatFormat::Llama2 ? "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n"
                                              : messages[0].content + "\n\n";
        first = 1;
      }
      const bool llama2 = format == ChatFormat::Llama2;
      if (!llama2) out = bos;  // Mistral opens the conversation with BOS, Llama-2 every user turn
      bool first_user = true;
      for (size_t i = first; i < messages.size(); ++i) {
        const auto& m = messages[i];
        check(m.role != "system", fmt::format("messages[{}].role", i), "a system message must come first");
        if (m.role == "user") {
          out += (llama2 ? bos : "") + "[INST] " + (first_user ? system : "") + m.content + " [/INST]";
          first_user = false;
        } else {
          out += llama2 ? " " + m.content + " " + eos : m.content + eos;
        }
      }
      return out;
    }
  }
  return out;
}

}  // namespace nibble::server
