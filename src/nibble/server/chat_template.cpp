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

ChatTemplate ChatTemplate::named(const std::string& name) {
  for (ChatFormat f : kFormats)
    if (name == chat_format_name(f))
      return {f, f == ChatFormat::Llama3 ? "<|begin_of_text|>" : "<s>", f == ChatFormat::Llama3 ? "<|end_of_text|>" : "</s>"};
  throw Error("--chat-template", fmt::format("unknown chat template '{}': nibble renders llama-2, llama-3, mistral "
                                             "and chatml, or give a template file",
                                             name));
}

void ChatTemplate::use_tokens_of(const std::string& model_bos, const std::string& model_eos) {
  if (!model_bos.empty()) bos = model_bos;
  if (!model_eos.empty()) eos = model_eos;
}

namespace {
// The format whose markers a Jinja template's text holds; `where` names it in the error.
ChatFormat recognise(const std::string& text, const std::string& where) {
  // Llama-2 is checked before Mistral, whose [INST] it shares.
  if (text.find("<|im_start|>") != std::string::npos) return ChatFormat::ChatML;
  if (text.find("<|start_header_id|>") != std::string::npos) return ChatFormat::Llama3;
  if (text.find("<<SYS>>") != std::string::npos) return ChatFormat::Llama2;
  if (text.find("[INST]") != std::string::npos) return ChatFormat::Mistral;
  throw Error(where, "chat_template is none of the formats nibble renders (llama-2, llama-3, mistral, chatml): give "
                     "--chat-template NAME");
}

// A tokenizer_config.json's chat_template (a string, or a list of named ones whose "default"
// serves chat); empty when it has none.
std::string template_text(const nlohmann::json& config, const std::string& where) {
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return "";
  std::string text;
  if (it->is_string()) {
    text = it->get<std::string>();
  } else if (it->is_array()) {
    for (const auto& t : *it)
      if (t.value("name", "") == "default" && t.contains("template") && t["template"].is_string()) text = t["template"];
  }
  check(!text.empty(), where, "chat_template is neither a string nor a list with a \"default\" template");
  return text;
}
}  // namespace

ChatTemplate ChatTemplate::from_option(const std::string& file_or_name) {
  if (!std::filesystem::is_regular_file(file_or_name)) return named(file_or_name);
  std::ifstream in(file_or_name, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const nlohmann::json config = nlohmann::json::parse(text, nullptr, false);
  if (config.is_object()) {  // a tokenizer_config.json
    const std::string tmpl = template_text(config, file_or_name);
    check(!tmpl.empty(), file_or_name, "no chat_template in this JSON file");
    return named(chat_format_name(recognise(tmpl, file_or_name)));
  }
  return named(chat_format_name(recognise(text, file_or_name)));
}

std::optional<ChatTemplate> ChatTemplate::from_model(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "tokenizer_config.json";
  if (!std::filesystem::is_regular_file(path)) return std::nullopt;
  std::ifstream in(path);
  nlohmann::json config = nlohmann::json::parse(in, nullptr, false);
  check(!config.is_discarded(), path.string(), "not valid JSON");
  const std::string text = template_text(config, path.string());
  if (text.empty()) return std::nullopt;
  ChatTemplate t = named(chat_format_name(recognise(text, path.string())));
  t.use_tokens_of(token_text(config, "bos_token", ""), token_text(config, "eos_token", ""));
  return t;
}

std::string ChatTemplate::end_of_turn() const {
  switch (format) {
    case ChatFormat::Llama3: return "<|eot_id|>";
    case ChatFormat::ChatML: return "<|im_end|>";
    default: return eos;
  }
}

namespace {
// Python's str.strip() / Jinja's trim, for ASCII whitespace.
std::string strip(const std::string& s) {
  const char* space = " \t\n\r\v\f";
  const size_t a = s.find_first_not_of(space);
  return a == std::string::npos ? "" : s.substr(a, s.find_last_not_of(space) - a + 1);
}
}  // namespace

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
      for (const auto& m : messages)
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + strip(m.content) + "<|eot_id|>";
      return bos + out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
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
      for (size_t i = first; i < messages.size(); ++i) {
        const auto& m = messages[i];
        // Their templates raise_exception unless the turns go user, assistant, user, ...
        check(m.role == ((i - first) % 2 == 0 ? "user" : "assistant"), fmt::format("messages[{}].role", i),
              "'{}': after an optional system message, the turns must alternate user/assistant/user/...", m.role);
        const std::string content = (i == first ? system : "") + m.content;
        if (m.role == "user") out += (llama2 ? bos + "[INST] " + strip(content) : "[INST] " + content) + " [/INST]";
        else out += llama2 ? " " + strip(content) + " " + eos : content + eos;
      }
      return out;
    }
  }
  return out;
}

}  // namespace nibble::server
