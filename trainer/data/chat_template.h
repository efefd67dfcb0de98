// Chat templates: the Jinja subset that models' `chat_template`s use, rendered the way
// transformers' `apply_chat_template(tokenize=False)` renders them (Jinja with trim_blocks and
// lstrip_blocks, a single trailing newline of the template dropped, default Undefined).
//
// Supported: text, {{ expr }}, {% if/elif/else %}, {% for a[, b] in expr [if cond] %} with
// {% else %}, loop.index/index0/revindex/revindex0/first/last/length, {% break %}, {% continue %},
// {% set x = expr %}, namespace(...) with {% set ns.attr = expr %}, {% generation %} (rendered
// as its body), comments, whitespace control (-, +). Expressions: string/integer/bool/none
// literals, lists, dicts, attribute and subscript access, slices, not/and/or, ==, !=, <, <=, >,
// >=, in, not in, ~, +, -, *, //, %, conditional expressions, the tests defined, undefined,
// none, string, number, integer, boolean, mapping, iterable, sequence, true, false, odd, even,
// divisibleby, equalto/eq/==/ne/!=, the filters listed in chat_template.cpp, the functions
// raise_exception and namespace, a few string and dict methods. Everything else (macros,
// includes, imports, tools helpers like strftime_now, float arithmetic, {% raw %}, ...) is
// refused when the template is parsed, with its line:column.
//
// A template is untrusted input: nesting depth, work and output size are capped.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace strata {

struct ChatMessage {
  std::string role;
  std::string content;
};

struct ChatTemplateOptions {
  std::string bos_token, eos_token;  // as the template sees them
  bool add_generation_prompt = false;
  // Further string variables the template sees (e.g. pad_token, unk_token), name -> value.
  std::vector<std::pair<std::string, std::string>> extra_variables;
};

namespace chat_template_detail {
struct Program;
}

class ChatTemplate {
 public:
  // Parses once; throws DataError naming an unsupported construct and its line:column.
  ChatTemplate(std::string source, std::string origin);
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // Throws DataError for raise_exception(...), a runtime type error, or a cap exceeded.
  std::string render(const std::vector<ChatMessage>& messages,
                     const ChatTemplateOptions& options) const;

  const std::string& origin() const { return origin_; }

 private:
  std::string origin_;
  std::unique_ptr<chat_template_detail::Program> program_;
};

// The chat template and its special-token strings from a tokenizer_config.json (the file, or a
// directory holding one). chat_template may be a string or a list of {name, template} (the one
// named "default"). bos_token/eos_token may be strings or {"content": ...} objects. Throws
// DataError when there is no chat_template.
struct ChatTemplateSource {
  std::string source, origin, bos_token, eos_token;
};
ChatTemplateSource load_chat_template(const std::string& tokenizer_config_or_dir);

// The messages of a JSON text: a list of {"role", "content"} objects, or an object holding one
// under "messages" (one record of a chat JSONL file). Both fields must be strings; other fields
// are ignored. Throws DataError naming `origin` and the problem.
std::vector<ChatMessage> parse_chat_messages(const std::string& json_text,
                                             const std::string& origin);

}  // namespace strata
