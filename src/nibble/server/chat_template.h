// Chat templates: the four prompt formats nibble renders itself (no Jinja engine), chosen by name
// or recognised in a model's tokenizer_config.json by each format's distinctive markers.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace nibble::server {

struct ChatMessage {
  std::string role;  // system, user or assistant
  std::string content;
};

enum class ChatFormat { Llama2, Llama3, Mistral, ChatML };

struct ChatTemplate {
  ChatFormat format;
  std::string bos, eos;  // the tokenizer's BOS and EOS text, which Llama-2 and Mistral write between turns

  // Names: llama-2, llama-3, mistral, chatml. Throws nibble::Error naming the known ones.
  static ChatTemplate named(const std::string& name, std::string bos = "<s>", std::string eos = "</s>");
  // The template of a Hugging Face model directory's tokenizer_config.json: nullopt when it has
  // none; throws nibble::Error when its chat_template is none of the four formats.
  static std::optional<ChatTemplate> from_model(const std::filesystem::path& model_dir);

  // The prompt for `messages`, ending where the assistant's answer begins. Throws nibble::Error on
  // an unknown role or no message.
  std::string render(const std::vector<ChatMessage>& messages) const;
  // The text that ends an assistant turn (a special token in these formats).
  std::string end_of_turn() const;
};

const char* chat_format_name(ChatFormat f);

}  // namespace nibble::server
