#include "nibble/tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "nibble/core/error.h"
#include "nibble/tokenizer/utf8.h"

namespace nibble::tokenizer {

namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

// Per-call matching state: match data and a JIT stack large enough for long whitespace runs.
class Matcher {
 public:
  explicit Matcher(const pcre2_code* code)
      : data_(pcre2_match_data_create_from_pattern(code, nullptr)),
        context_(pcre2_match_context_create(nullptr)),
        jit_stack_(pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr)) {
    pcre2_jit_stack_assign(context_, nullptr, jit_stack_);
  }
  ~Matcher() {
    pcre2_jit_stack_free(jit_stack_);
    pcre2_match_context_free(context_);
    pcre2_match_data_free(data_);
  }
  Matcher(const Matcher&) = delete;
  Matcher& operator=(const Matcher&) = delete;

  // Returns false on no match; throws on matcher errors (limits hit by a pathological pattern).
  bool match(const pcre2_code* code, std::string_view text, size_t pos, uint32_t options, const std::string& where,
             const std::string& label) {
    const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos,
                               options | PCRE2_NO_UTF_CHECK, data_, context_);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) throw Error(where, fmt::format("{}: regex match failed at byte {}: {}", label, pos, pcre2_message(rc)));
    return true;
  }
  Span span() const {
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data_);
    return {ovector[0], ovector[1]};
  }

 private:
  pcre2_match_data* data_;
  pcre2_match_context* context_;
  pcre2_jit_stack* jit_stack_;
};

}  // namespace

struct Regex::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

Regex::Regex(const std::string& pattern, std::string where, std::string label)
    : where_(std::move(where)), label_(std::move(label)) {
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  auto code = std::make_shared<Code>();
  code->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                             &error, &error_offset, nullptr);
  check(code->code != nullptr, where_, "{}: regex does not compile at offset {}: {} (pattern {})", label_, error_offset,
        pcre2_message(error), pattern);
  // JIT makes the Llama-3 split several times faster; without it PCRE2 interprets, still correct.
  pcre2_jit_compile(code->code, PCRE2_JIT_COMPLETE);
  code_ = std::move(code);
}

std::vector<Span> Regex::find_all(std::string_view text) const {
  Matcher matcher(code_->code);
  std::vector<Span> spans;
  size_t pos = 0;
  size_t last_end = std::string_view::npos;
  while (pos <= text.size() && matcher.match(code_->code, text, pos, 0, where_, label_)) {
    const Span m = matcher.span();
    if (m.begin == m.end && m.end == last_end) {
      if (m.end == text.size()) break;
      pos = m.end + utf8_char_length(static_cast<unsigned char>(text[m.end]));
      continue;
    }
    spans.push_back(m);
    last_end = m.end;
    // An empty match not following a match is reported, then skipped on the next search.
    pos = m.end;
  }
  return spans;
}

bool Regex::matches_at(std::string_view text, size_t pos) const {
  Matcher matcher(code_->code);
  return matcher.match(code_->code, text, pos, PCRE2_ANCHORED, where_, label_);
}

}  // namespace nibble::tokenizer
