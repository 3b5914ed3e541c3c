#include "nibble/tokenizer/pipeline.h"

#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include "nibble/core/error.h"
#include "nibble/io/text_file.h"
#include "nibble/tokenizer/utf8.h"

namespace nibble::tokenizer {

namespace {

// NFC through ICU. The text is valid UTF-8 here (the tokenizer checks it first).
std::string nfc(const std::string& text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFCInstance(status);
  check(U_SUCCESS(status), "tokenizer", "ICU's NFC normalizer is unavailable: {}", u_errorName(status));
  const icu::UnicodeString in = icu::UnicodeString::fromUTF8(text);
  if (n->isNormalized(in, status) && U_SUCCESS(status)) return text;
  status = U_ZERO_ERROR;
  const icu::UnicodeString out = n->normalize(in, status);
  check(U_SUCCESS(status), "tokenizer", "NFC normalization failed: {}", u_errorName(status));
  std::string s;
  out.toUTF8String(s);
  return s;
}

std::string component_type(const JsonNode& node) { return node.at("type").string(); }

// Calls `add` for the node, or for each member of a {"type": "Sequence", list_key: [...]}.
// Nesting is bounded so that a hostile file cannot exhaust the stack.
template <typename Add>
void for_each_in_sequence(const JsonNode& node, const char* list_key, Add&& add, int depth = 0) {
  if (component_type(node) != "Sequence") return add(node);
  if (depth == 8) node.fail("Sequences nested more than 8 deep");
  const JsonNode list = node.at(list_key);
  for (size_t i = 0; i < list.array().size(); ++i) for_each_in_sequence(list.at(i), list_key, add, depth + 1);
}

[[noreturn]] void unsupported(const JsonNode& node, const char* stage, const char* supported) {
  node.fail(fmt::format("{} type '{}' is not supported (supported: {})", stage, component_type(node), supported));
}

// Hugging Face's Split with behavior Isolated: every match and every gap between matches is a
// word of its own; empty words are dropped.
void split_isolated(const Pattern& pattern, std::string_view text, std::vector<std::string>& words) {
  size_t done = 0;
  for (const Span m : pattern.find_all(text)) {
    if (m.begin > done) words.emplace_back(text.substr(done, m.begin - done));
    if (m.end > m.begin) words.emplace_back(text.substr(m.begin, m.end - m.begin));
    done = m.end;
  }
  if (done < text.size()) words.emplace_back(text.substr(done));
}

// The regex GPT-2's ByteLevel pre-tokenizer applies when use_regex is true.
constexpr const char* kGpt2SplitRegex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace

// ---- Pattern ----

Pattern Pattern::parse(const JsonNode& node) {
  if (const auto expr = node.find("Regex")) return regex(expr->string(), node.where(), expr->path());
  const auto literal = node.find("String");
  if (!literal) node.fail("a pattern is {\"String\": ...} or {\"Regex\": ...}");
  Pattern p;
  p.literal_ = literal->string();
  return p;
}

Pattern Pattern::regex(const std::string& pattern, std::string where, std::string label) {
  Pattern p;
  p.regex_.emplace(pattern, std::move(where), std::move(label));
  return p;
}

std::vector<Span> Pattern::find_all(std::string_view text) const {
  if (regex_) return regex_->find_all(text);
  std::vector<Span> spans;
  if (literal_.empty()) return spans;  // an empty literal matches nowhere, as in Hugging Face
  for (size_t pos = text.find(literal_); pos != std::string_view::npos; pos = text.find(literal_, pos + literal_.size()))
    spans.push_back({pos, pos + literal_.size()});
  return spans;
}

std::string Pattern::replace_all(std::string_view text, std::string_view content) const {
  std::string out;
  out.reserve(text.size());
  size_t done = 0;
  for (const Span m : find_all(text)) {
    out.append(text.substr(done, m.begin - done));
    out.append(content);
    done = m.end;
  }
  out.append(text.substr(done));
  return out;
}

// ---- Normalizer ----

Normalizer Normalizer::parse(const std::optional<JsonNode>& node) {
  Normalizer n;
  if (node) for_each_in_sequence(*node, "normalizers", [&](const JsonNode& step) { n.add(step); });
  return n;
}

void Normalizer::add(const JsonNode& node) {
  const std::string type = component_type(node);
  if (type == "Prepend") steps_.push_back(Prepend{node.at("prepend").string()});
  else if (type == "Replace") steps_.push_back(Replace{Pattern::parse(node.at("pattern")), node.at("content").string()});
  else if (type == "NFC") steps_.push_back(Nfc{});
  else unsupported(node, "normalizer", "Sequence, Prepend, Replace, NFC");
}

std::string Normalizer::apply(std::string_view text) const {
  std::string s(text);
  for (const Step& step : steps_) {
    if (const auto* prepend = std::get_if<Prepend>(&step)) {
      if (!s.empty()) s.insert(0, prepend->prefix);  // Prepend leaves empty text alone
    } else if (const auto* replace = std::get_if<Replace>(&step)) {
      s = replace->pattern.replace_all(s, replace->content);
    } else {
      s = nfc(s);
    }
  }
  return s;
}

// ---- PreTokenizer ----

PreTokenizer PreTokenizer::parse(const std::optional<JsonNode>& node) {
  PreTokenizer p;
  if (node) for_each_in_sequence(*node, "pretokenizers", [&](const JsonNode& step) { p.add(step); });
  return p;
}

void PreTokenizer::add(const JsonNode& node) {
  const std::string type = component_type(node);
  if (type == "Split") {
    const std::string behavior = node.at("behavior").string();
    if (behavior != "Isolated") node.fail(fmt::format("Split behavior '{}' is not supported (supported: Isolated)", behavior));
    if (node.boolean_or("invert", false)) node.fail("Split with invert=true is not supported");
    steps_.push_back(Step{false, Pattern::parse(node.at("pattern")), false});
  } else if (type == "ByteLevel") {
    Step step{node.boolean_or("add_prefix_space", true), std::nullopt, true};
    if (node.boolean_or("use_regex", true))
      step.split = Pattern::regex(kGpt2SplitRegex, node.where(), node.path() + " (GPT-2 split)");
    steps_.push_back(std::move(step));
  } else {
    unsupported(node, "pre_tokenizer", "Sequence, Split, ByteLevel");
  }
}

std::vector<std::string> PreTokenizer::apply(std::string_view text) const {
  std::vector<std::string> words{std::string(text)};
  for (const Step& step : steps_) {
    std::vector<std::string> next;
    next.reserve(words.size());
    for (std::string& w : words) {
      if (step.add_prefix_space && !w.starts_with(' ')) w.insert(w.begin(), ' ');
      if (step.split) split_isolated(*step.split, w, next);
      else next.push_back(std::move(w));
    }
    if (step.byte_level) {
      for (std::string& w : next) {
        std::string mapped;
        mapped.reserve(w.size() * 2);
        for (const char c : w) mapped += byte_to_char(uint8_t(c));
        w = std::move(mapped);
      }
    }
    words = std::move(next);
  }
  return words;
}

// ---- Decoder ----

int byte_fallback_value(std::string_view token) {
  if (token.size() != 6 || !token.starts_with("<0x") || token[5] != '>') return -1;
  auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
  const int hi = hex(token[3]), lo = hex(token[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

Decoder Decoder::parse(const std::optional<JsonNode>& node) {
  Decoder d;
  d.present_ = node.has_value();
  if (node) for_each_in_sequence(*node, "decoders", [&](const JsonNode& step) { d.add(step); });
  return d;
}

void Decoder::add(const JsonNode& node) {
  const std::string type = component_type(node);
  if (type == "Replace") {
    steps_.push_back(Replace{Pattern::parse(node.at("pattern")), node.at("content").string()});
  } else if (type == "ByteFallback") {
    steps_.push_back(ByteFallback{});
  } else if (type == "Fuse") {
    steps_.push_back(Fuse{});
  } else if (type == "Strip") {
    const JsonNode content = node.at("content");
    const std::string ch = content.string();
    if (ch.empty() || utf8_char_length(uint8_t(ch[0])) != ch.size()) content.fail("Strip content must be one character");
    const int64_t start = node.at("start").integer();
    if (start < 0) node.fail("Strip start must not be negative");
    // Stripping the end of the text would make streamed output depend on tokens not yet seen.
    if (node.at("stop").integer() != 0) node.fail("Strip decoder with stop != 0 is not supported");
    steps_.push_back(Strip{ch, size_t(start)});
  } else if (type == "ByteLevel") {
    steps_.push_back(ByteLevel{});
  } else {
    unsupported(node, "decoder", "Sequence, Replace, ByteFallback, Fuse, Strip, ByteLevel");
  }
}

bool Decoder::has_byte_fallback() const {
  for (const Step& step : steps_) {
    if (std::holds_alternative<ByteFallback>(step)) return true;
  }
  return false;
}

namespace {

// Runs of <0xXX> pieces become their bytes when those form valid UTF-8, otherwise one U+FFFD per
// piece (Hugging Face's ByteFallback decoder).
std::vector<std::string> reassemble_bytes(std::vector<std::string> tokens) {
  std::vector<std::string> out;
  out.reserve(tokens.size());
  std::string run;
  size_t run_pieces = 0;
  auto close_run = [&] {
    if (run_pieces == 0) return;
    if (find_invalid_utf8(run) == std::string_view::npos) {
      out.push_back(run);
    } else {
      for (size_t i = 0; i < run_pieces; ++i) out.emplace_back(kReplacementChar);
    }
    run.clear();
    run_pieces = 0;
  };
  for (std::string& token : tokens) {
    if (const int byte = byte_fallback_value(token); byte >= 0) {
      run += char(byte);
      ++run_pieces;
    } else {
      close_run();
      out.push_back(std::move(token));
    }
  }
  close_run();
  return out;
}

// ByteLevel: every token's characters back to bytes (a token with characters outside the
// alphabet, such as an added token, keeps its own bytes), then one lossy UTF-8 string.
std::string byte_level_decode(const std::vector<std::string>& tokens) {
  std::string bytes;
  for (const std::string& token : tokens) {
    std::string token_bytes;
    for (size_t i = 0; i < token.size(); i += utf8_char_length(uint8_t(token[i]))) {
      const int b = char_to_byte(code_point_at(token, i));
      if (b < 0) {
        token_bytes = token;
        break;
      }
      token_bytes += char(b);
    }
    bytes += token_bytes;
  }
  std::string text;
  append_utf8_lossy(text, bytes);
  return text;
}

std::string join(const std::vector<std::string>& tokens, std::string_view separator) {
  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i) out += separator;
    out += tokens[i];
  }
  return out;
}

}  // namespace

std::string Decoder::decode(std::vector<std::string> tokens, bool continues_text) const {
  if (!present_) {  // Hugging Face joins the tokens with spaces when there is no decoder
    const std::string text = join(tokens, " ");
    return continues_text && !tokens.empty() ? " " + text : text;
  }
  bool first_is_continuation = false;  // tokens[0] is fused text that follows earlier output
  for (const Step& step : steps_) {
    if (const auto* replace = std::get_if<Replace>(&step)) {
      for (std::string& t : tokens) t = replace->pattern.replace_all(t, replace->content);
    } else if (std::holds_alternative<ByteFallback>(step)) {
      tokens = reassemble_bytes(std::move(tokens));
    } else if (std::holds_alternative<Fuse>(step)) {
      tokens = {join(tokens, "")};
      first_is_continuation = continues_text;
    } else if (const auto* strip = std::get_if<Strip>(&step)) {
      for (size_t i = first_is_continuation ? 1 : 0; i < tokens.size(); ++i) {
        size_t cut = 0;
        for (size_t n = 0; n < strip->start && tokens[i].compare(cut, strip->content.size(), strip->content) == 0; ++n)
          cut += strip->content.size();
        tokens[i].erase(0, cut);
      }
    } else {
      tokens = {byte_level_decode(tokens)};
      first_is_continuation = continues_text;
    }
  }
  return join(tokens, "");
}

// ---- PostProcessor ----

namespace {

void add_template(const JsonNode& node, PostProcessor& pp) {
  const JsonNode single = node.at("single");
  const JsonNode special_tokens = node.at("special_tokens");
  PostProcessor local;
  bool seen_sequence = false;
  for (size_t i = 0; i < single.array().size(); ++i) {
    const JsonNode item = single.at(i);
    if (const auto seq = item.find("Sequence")) {
      if (seen_sequence || seq->at("id").string() != "A")
        seq->fail("a single-sequence template holds the sequence $A exactly once");
      seen_sequence = true;
    } else if (const auto special = item.find("SpecialToken")) {
      const std::string name = special->at("id").string();
      const JsonNode entry = special_tokens.at(name);
      const JsonNode ids = entry.at("ids");
      for (size_t k = 0; k < ids.array().size(); ++k) {
        const int64_t id = ids.at(k).integer();
        if (id < 0 || id > INT32_MAX) ids.at(k).fail(fmt::format("token id {} is out of range", id));
        (seen_sequence ? local.suffix : local.prefix).push_back(int32_t(id));
      }
    } else {
      item.fail("a template item is {\"Sequence\": ...} or {\"SpecialToken\": ...}");
    }
  }
  if (!seen_sequence) single.fail("the template has no $A sequence");
  // A later processor wraps the output of the earlier ones.
  pp.prefix.insert(pp.prefix.begin(), local.prefix.begin(), local.prefix.end());
  pp.suffix.insert(pp.suffix.end(), local.suffix.begin(), local.suffix.end());
}

}  // namespace

PostProcessor PostProcessor::parse(const std::optional<JsonNode>& node) {
  PostProcessor pp;
  if (!node) return pp;
  for_each_in_sequence(*node, "processors", [&](const JsonNode& step) {
    const std::string type = component_type(step);
    if (type == "TemplateProcessing") add_template(step, pp);
    else if (type != "ByteLevel") unsupported(step, "post_processor", "Sequence, TemplateProcessing, ByteLevel");
    // ByteLevel only adjusts offsets, which nibble does not report.
  });
  return pp;
}

}  // namespace nibble::tokenizer
