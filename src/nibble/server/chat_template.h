// Chat templates: the four prompt formats nibble renders itself (Debian has no C++ Jinja engine),
// chosen by name or recognised, by each format's distinctive markers, in a model's
// tokenizer_config.json or a template file. Each renders as its Hugging Face template does.
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
  // The tokenizer's BOS and EOS text, which Llama-2, Llama-3 and Mistral write (use_tokens_of sets them).
  std::string bos, eos;

  // Names: llama-2, llama-3, mistral, chatml, with the BOS and EOS text of the format's own
  // models. Throws nibble::Error naming the known ones.
  static ChatTemplate named(const std::string& name);
  // --chat-template: a file (a Jinja template, or a tokenizer_config.json) recognised as one of
  // the four formats, else a name. Throws nibble::Error when it is neither.
  static ChatTemplate from_option(const std::string& file_or_name);
  // The template of a Hugging Face model directory's tokenizer_config.json: nullopt when it has
  // none; throws nibble::Error when its chat_template is none of the four formats.
  static std::optional<ChatTemplate> from_model(const std::filesystem::path& model_dir);
  // Writes the model's own BOS and EOS text (empty: the format's default stays).
  void use_tokens_of(const std::string& model_bos, const std::string& model_eos);

  // The prompt for `messages`, ending where the assistant's answer begins. Throws nibble::Error on
  // an unknown role, no message, or (Llama-2, Mistral) turns that do not alternate user/assistant.
  std::string render(const std::vector<ChatMessage>& messages) const;
  // The text that ends an assistant turn (a special token in these formats).
  std::string end_of_turn() const;
};

const char* chat_format_name(ChatFormat f);

}  // namespace nibble::server
