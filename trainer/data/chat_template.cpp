// Chat templates: a small Jinja interpreter (lexer with Jinja's whitespace rules, a parser to a
// tree, a tree-walking evaluator) that renders what transformers' apply_chat_template renders.
// The values follow Python's and Jinja's semantics where the supported subset reaches them:
// code-point string indexing, Python truthiness, floor modulo, default Undefined (prints as
// nothing, is falsy, fails on attribute access and arithmetic).
#include "trainer/data/chat_template.h"

#include <fmt/format.h>

#include <algorithm>
#include <initializer_list>
#include <cctype>
#include <cstring>
#include <optional>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

#include "trainer/data/utf8.h"
#include "trainer/errors.h"

namespace strata {
namespace chat_template_detail {

constexpr size_t kMaxOutputBytes = size_t{64} << 20;  // rendering and any string value
constexpr int kMaxDepth = 100;                        // nesting of blocks and expressions
constexpr int64_t kMaxSteps = 50'000'000;             // evaluated nodes per rendering

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers (Python's str works on code points).

char32_t next_code_point(const std::string& s, size_t& i) {
  const auto c = static_cast<unsigned char>(s[i]);
  int extra;
  char32_t cp;
  if (c < 0x80) {
    ++i;
    return c;
  } else if (c >= 0xC0 && c < 0xE0) {
    extra = 1;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c < 0xF0) {
    extra = 2;
    cp = c & 0x0F;
  } else if (c >= 0xF0 && c < 0xF8) {
    extra = 3;
    cp = c & 0x07;
  } else {
    ++i;
    return 0xFFFD;  // not a lead byte
  }
  size_t j = i + 1;
  for (int k = 0; k < extra; ++k, ++j) {
    if (j >= s.size() || (static_cast<unsigned char>(s[j]) & 0xC0) != 0x80) {
      ++i;
      return 0xFFFD;
    }
    cp = (cp << 6) | (static_cast<unsigned char>(s[j]) & 0x3F);
  }
  i = j;
  return cp;
}

// Python's str.isspace() (and the `\s` of Python's regular expressions).
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

std::vector<std::pair<size_t, char32_t>> code_points(const std::string& s) {
  std::vector<std::pair<size_t, char32_t>> out;
  for (size_t i = 0; i < s.size();) {
    const size_t at = i;
    out.emplace_back(at, next_code_point(s, i));
  }
  return out;
}

size_t code_point_count(const std::string& s) {
  size_t n = 0;
  for (const char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Python's str.strip/lstrip/rstrip: whitespace, or any of `chars` when given.
std::string py_strip(const std::string& s, bool left, bool right, const std::string* chars) {
  std::vector<char32_t> set;
  if (chars) {
    for (const auto& [at, c] : code_points(*chars)) set.push_back(c);
  }
  auto strip_it = [&](char32_t c) {
    return chars ? std::find(set.begin(), set.end(), c) != set.end() : is_space(c);
  };
  const auto cps = code_points(s);
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_it(cps[b].second)) ++b;
  if (right)
    while (e > b && strip_it(cps[e - 1].second)) --e;
  const size_t from = b < cps.size() ? cps[b].first : s.size();
  const size_t to = e < cps.size() ? cps[e].first : s.size();
  return s.substr(from, to - from);
}

std::string ascii_upper(std::string s) {
  for (char& c : s)
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  return s;
}
std::string ascii_lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

// ---------------------------------------------------------------------------------------------
// Values.

enum class VT { Undefined, None, Bool, Int, Str, List, Dict, Namespace, Function };

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion order, like Python

struct Value {
  VT t = VT::Undefined;
  bool b = false;
  int64_t i = 0;
  std::string s;  // Str; Function name; Undefined: what was undefined (for messages)
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;  // Dict, Namespace (shared, so that ns.attr = ... is seen by all)

  static Value undefined(std::string what = "") {
    Value v;
    v.s = std::move(what);
    return v;
  }
  static Value none() {
    Value v;
    v.t = VT::None;
    return v;
  }
  static Value boolean(bool b) {
    Value v;
    v.t = VT::Bool;
    v.b = b;
    return v;
  }
  static Value integer(int64_t i) {
    Value v;
    v.t = VT::Int;
    v.i = i;
    return v;
  }
  static Value str(std::string s) {
    Value v;
    v.t = VT::Str;
    v.s = std::move(s);
    return v;
  }
  static Value make_list(List items) {
    Value v;
    v.t = VT::List;
    v.list = std::make_shared<List>(std::move(items));
    return v;
  }
  static Value make_dict(Dict items, VT t = VT::Dict) {
    Value v;
    v.t = t;
    v.dict = std::make_shared<Dict>(std::move(items));
    return v;
  }
  static Value function(std::string name) {
    Value v;
    v.t = VT::Function;
    v.s = std::move(name);
    return v;
  }
  bool is_number() const { return t == VT::Int || t == VT::Bool; }
  int64_t number() const { return t == VT::Bool ? (b ? 1 : 0) : i; }
  const Value* find(const std::string& key) const {
    if (!dict) return nullptr;
    for (const auto& [k, v] : *dict)
      if (k == key) return &v;
    return nullptr;
  }
};

const char* type_name(const Value& v) {
  switch (v.t) {
    case VT::Undefined:
      return "undefined";
    case VT::None:
      return "none";
    case VT::Bool:
      return "bool";
    case VT::Int:
      return "int";
    case VT::Str:
      return "string";
    case VT::List:
      return "list";
    case VT::Dict:
      return "dict";
    case VT::Namespace:
      return "namespace";
    case VT::Function:
      return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.t) {
    case VT::Undefined:
    case VT::None:
      return false;
    case VT::Bool:
      return v.b;
    case VT::Int:
      return v.i != 0;
    case VT::Str:
      return !v.s.empty();
    case VT::List:
      return !v.list->empty();
    case VT::Dict:
      return !v.dict->empty();
    case VT::Namespace:
    case VT::Function:
      return true;
  }
  return false;
}

// An error at a position of the template; the caller adds the origin and line:column.
struct TemplateError {
  size_t offset;
  std::string message;
};

std::string py_repr_string(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == quote || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (u < 0x20 || u == 0x7F) {
      out += fmt::format("\\x{:02x}", u);
    } else {
      out += c;
    }
  }
  return out + quote;
}

std::string repr(const Value& v, size_t offset);

// str(v), the way {{ v }} and ~ print it.
std::string to_str(const Value& v, size_t offset) {
  switch (v.t) {
    case VT::Undefined:
      return "";
    case VT::None:
      return "None";
    case VT::Bool:
      return v.b ? "True" : "False";
    case VT::Int:
      return std::to_string(v.i);
    case VT::Str:
      return v.s;
    case VT::List:
    case VT::Dict:
      return repr(v, offset);
    case VT::Namespace:
    case VT::Function:
      break;
  }
  throw TemplateError{offset, fmt::format("a {} cannot be printed", type_name(v))};
}

std::string repr(const Value& v, size_t offset) {
  if (v.t == VT::Str) return py_repr_string(v.s);
  if (v.t == VT::List) {
    std::string out = "[";
    for (size_t k = 0; k < v.list->size(); ++k) {
      if (k) out += ", ";
      out += repr((*v.list)[k], offset);
    }
    return out + "]";
  }
  if (v.t == VT::Dict) {
    std::string out = "{";
    bool first = true;
    for (const auto& [key, item] : *v.dict) {
      if (!first) out += ", ";
      first = false;
      out += py_repr_string(key) + ": " + repr(item, offset);
    }
    return out + "}";
  }
  if (v.t == VT::Undefined)
    throw TemplateError{offset, "an undefined value cannot be printed inside a list or dict"};
  return to_str(v, offset);
}

// Python's json.dumps(v, ensure_ascii=False, indent=indent) (transformers' tojson).
void to_json(const Value& v, int indent, int level, std::string& out, size_t offset) {
  auto newline = [&](int lvl) {
    out += '\n';
    out.append(static_cast<size_t>(indent) * lvl, ' ');
  };
  switch (v.t) {
    case VT::None:
      out += "null";
      return;
    case VT::Bool:
      out += v.b ? "true" : "false";
      return;
    case VT::Int:
      out += std::to_string(v.i);
      return;
    case VT::Str:
      out += '"';
      for (const char c : v.s) {
        const auto u = static_cast<unsigned char>(c);
        switch (c) {
          case '"':
            out += "\\\"";
            break;
          case '\\':
            out += "\\\\";
            break;
          case '\n':
            out += "\\n";
            break;
          case '\r':
            out += "\\r";
            break;
          case '\t':
            out += "\\t";
            break;
          case '\b':
            out += "\\b";
            break;
          case '\f':
            out += "\\f";
            break;
          default:
            if (u < 0x20)
              out += fmt::format("\\u{:04x}", u);
            else
              out += c;
        }
      }
      out += '"';
      return;
    case VT::List: {
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(level + 1);
        to_json((*v.list)[k], indent, level + 1, out, offset);
      }
      if (indent >= 0) newline(level);
      out += ']';
      return;
    }
    case VT::Dict: {
      if (v.dict->empty()) {
        out += "{}";
        return;
      }
      out += '{';
      bool first = true;
      for (const auto& [key, item] : *v.dict) {
        if (!first) out += indent >= 0 ? "," : ", ";
        first = false;
        if (indent >= 0) newline(level + 1);
        to_json(Value::str(key), indent, level + 1, out, offset);
        out += ": ";
        to_json(item, indent, level + 1, out, offset);
      }
      if (indent >= 0) newline(level);
      out += '}';
      return;
    }
    default:
      throw TemplateError{offset, fmt::format("a {} cannot be written as JSON", type_name(v))};
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.number() == b.number();
  if (a.t != b.t) return false;
  switch (a.t) {
    case VT::Undefined:
    case VT::None:
      return true;
    case VT::Str:
    case VT::Function:
      return a.s == b.s;
    case VT::List:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case VT::Dict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [key, item] : *a.dict) {
        const Value* other = b.find(key);
        if (!other || !equal(item, *other)) return false;
      }
      return true;
    case VT::Namespace:
      return a.dict == b.dict;
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Lexer: the template as text pieces and tags, with Jinja's whitespace handling
// (trim_blocks, lstrip_blocks, `-` and `+` markers).

enum class TK { Name, Str, Int, Op, End };
struct Token {
  TK kind;
  std::string text;  // Name, Op; Str: the decoded value
  int64_t value = 0;
  size_t offset = 0;
};

enum class PieceKind { Text, Output, Statement };
struct Piece {
  PieceKind kind;
  std::string text;
  std::vector<Token> tokens;  // Output and Statement, ending in an End token
  size_t offset;
};

class Lexer {
 public:
  explicit Lexer(const std::string& src) : src_(src) {}

  std::vector<Piece> run() {
    std::vector<Piece> pieces;
    size_t pos = 0;
    bool line_starting = true;
    while (pos <= src_.size()) {
      size_t open = std::string::npos;
      for (size_t p = src_.find('{', pos); p != std::string::npos; p = src_.find('{', p + 1)) {
        if (p + 1 < src_.size() &&
            (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) {
          open = p;
          break;
        }
      }
      if (open == std::string::npos) {
        if (pos < src_.size()) pieces.push_back({PieceKind::Text, src_.substr(pos), {}, pos});
        break;
      }
      const char type = src_[open + 1];
      const char sign = open + 2 < src_.size() ? src_[open + 2] : '\0';
      const bool has_sign = sign == '-' || sign == '+';
      std::string text = src_.substr(pos, open - pos);
      if (sign == '-') {
        text = py_strip(text, false, true, nullptr);
      } else if (sign != '+' && type != '{') {
        // lstrip_blocks: whitespace between the line start and a block or comment tag goes.
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size()) {
          bool all_space = true;
          for (size_t i = l_pos; i < text.size();) {
            if (!is_space(next_code_point(text, i))) {
              all_space = false;
              break;
            }
          }
          if (all_space) text.resize(l_pos);
        }
      }
      if (!text.empty()) pieces.push_back({PieceKind::Text, text, {}, pos});
      size_t inner = open + 2 + (has_sign ? 1 : 0);
      if (type == '#') {
        size_t close = src_.find("#}", inner);
        if (close == std::string::npos)
          throw TemplateError{open, "the comment is not closed (missing #})"};
        // The lazy match of Jinja's comment rule: "-#}" and "+#}" count from the first "#}".
        size_t end = close + 2;
        const char before = close > inner ? src_[close - 1] : '\0';
        if (before == '-') {
          end = skip_space(end);
        } else if (before != '+' && end < src_.size() && src_[end] == '\n') {
          ++end;
        }
        line_starting = src_[end - 1] == '\n';
        pos = end;
        continue;
      }
      Piece piece{type == '{' ? PieceKind::Output : PieceKind::Statement, "", {}, open};
      pos = lex_tag(inner, type == '%', piece.tokens);
      line_starting = src_[pos - 1] == '\n';
      if (piece.kind == PieceKind::Statement && piece.tokens.size() >= 2 &&
          piece.tokens[0].kind == TK::Name && piece.tokens[0].text == "raw")
        throw TemplateError{piece.tokens[0].offset,
                            "the statement 'raw' is not supported (supported: if, elif, else, "
                            "for, set, break, continue, generation)"};
      pieces.push_back(std::move(piece));
    }
    return pieces;
  }

 private:
  size_t skip_space(size_t p) const {
    while (p < src_.size()) {
      size_t q = p;
      if (!is_space(next_code_point(src_, q))) break;
      p = q;
    }
    return p;
  }

  // Tokens of one tag from `p`; returns the position after the end marker (and what it trims).
  size_t lex_tag(size_t p, bool block, std::vector<Token>& tokens) {
    std::vector<char> balance;
    const char close = block ? '%' : '}';
    while (true) {
      if (balance.empty()) {
        if (src_.compare(p, 3, std::string("-") + close + "}") == 0) {
          tokens.push_back({TK::End, "", 0, p});
          return skip_space(p + 3);
        }
        if (block && src_.compare(p, 3, "+%}") == 0) {
          tokens.push_back({TK::End, "", 0, p});
          return p + 3;
        }
        if (src_.compare(p, 2, std::string(1, close) + "}") == 0) {
          tokens.push_back({TK::End, "", 0, p});
          p += 2;
          if (block && p < src_.size() && src_[p] == '\n') ++p;  // trim_blocks
          return p;
        }
      }
      if (p >= src_.size())
        throw TemplateError{p, block ? "the tag is not closed (missing %})"
                                     : "the expression is not closed (missing }})"};
      size_t q = p;
      if (is_space(next_code_point(src_, q))) {
        p = q;
        continue;
      }
      const char c = src_[p];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = p;
        while (e < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
          ++e;
        tokens.push_back({TK::Name, src_.substr(p, e - p), 0, p});
        p = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = p;
        int64_t value = 0;
        while (e < src_.size() &&
               (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) {
          if (src_[e] != '_') {
            if (value > (INT64_MAX - 9) / 10) throw TemplateError{p, "the integer is too large"};
            value = value * 10 + (src_[e] - '0');
          }
          ++e;
        }
        if (e < src_.size() && (src_[e] == '.' || src_[e] == 'e' || src_[e] == 'E') &&
            e + 1 < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e + 1])))
          throw TemplateError{p, "floating-point numbers are not supported"};
        if (e < src_.size() && (std::isalpha(static_cast<unsigned char>(src_[e]))))
          throw TemplateError{p, "this number literal is not supported (only decimal integers)"};
        tokens.push_back({TK::Int, "", value, p});
        p = e;
      } else if (c == '\'' || c == '"') {
        tokens.push_back({TK::Str, lex_string(p), 0, p});
      } else {
        static const char* const kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "/",
                                           "*",  "%",  "~",  "[",  "]",  "(",  ")", "{", "}",
                                           "=",  "<",  ">",  ".",  ":",  "|",  ",", ";"};
        std::string op;
        for (const char* candidate : kOps) {
          if (src_.compare(p, std::strlen(candidate), candidate) == 0) {
            op = candidate;
            break;
          }
        }
        if (op.empty())
          throw TemplateError{p, fmt::format("unexpected character '{}'", std::string(1, c))};
        if (op == "(" || op == "[" || op == "{") {
          balance.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
        } else if (op == ")" || op == "]" || op == "}") {
          if (balance.empty() || balance.back() != op[0])
            throw TemplateError{p, fmt::format("unexpected '{}'", op)};
          balance.pop_back();
        }
        tokens.push_back({TK::Op, op, 0, p});
        p += op.size();
      }
    }
  }

  // A string literal, decoded the way Jinja decodes it (Python's unicode-escape).
  std::string lex_string(size_t& p) {
    const char quote = src_[p];
    const size_t start = p;
    std::string out;
    size_t i = p + 1;
    auto hex = [&](size_t at, int digits) -> char32_t {
      char32_t v = 0;
      for (int k = 0; k < digits; ++k) {
        if (at + k >= src_.size() || !std::isxdigit(static_cast<unsigned char>(src_[at + k])))
          throw TemplateError{start, "a string literal has a truncated \\x, \\u or \\U escape"};
        const char h = src_[at + k];
        v = v * 16 +
            (std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (h | 0x20) - 'a' + 10);
      }
      return v;
    };
    while (true) {
      if (i >= src_.size()) throw TemplateError{start, "the string literal is not closed"};
      const char c = src_[i];
      if (c == quote) break;
      if (c != '\\') {
        out += c;
        ++i;
        continue;
      }
      if (i + 1 >= src_.size()) throw TemplateError{start, "the string literal is not closed"};
      const char e = src_[i + 1];
      i += 2;
      switch (e) {
        case '\n':
          break;
        case '\\':
          out += '\\';
          break;
        case '\'':
          out += '\'';
          break;
        case '"':
          out += '"';
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'v':
          out += '\v';
          break;
        case 'x':
          append_utf8(out, hex(i, 2));
          i += 2;
          break;
        case 'u':
          append_utf8(out, hex(i, 4));
          i += 4;
          break;
        case 'U': {
          const char32_t cp = hex(i, 8);
          if (cp > 0x10FFFF) throw TemplateError{start, "a \\U escape is out of range"};
          append_utf8(out, cp);
          i += 8;
          break;
        }
        case 'N':
          throw TemplateError{start, "\\N{...} escapes are not supported"};
        default:
          if (e >= '0' && e <= '7') {
            char32_t v = e - '0';
            for (int k = 0; k < 2 && i < src_.size() && src_[i] >= '0' && src_[i] <= '7'; ++k)
              v = v * 8 + (src_[i++] - '0');
            append_utf8(out, v);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    p = i + 1;
    return out;
  }

  const std::string& src_;
};

// ---------------------------------------------------------------------------------------------
// The tree.

enum class EK {
  Literal,
  Name,
  Attr,
  Item,
  Slice,
  Call,
  Filter,
  Test,
  Not,
  Neg,
  Binary,
  Compare,
  And,
  Or,
  Cond,
  ListLit,
  DictLit
};

struct Expr {
  EK kind;
  size_t offset = 0;
  std::string name;              // Name, Attr, Call (function or method), Filter, Test, Binary op
  Value literal;                 // Literal
  bool negated = false;          // Test: is not
  std::vector<std::string> ops;  // Compare: the operators between kids
  std::vector<std::unique_ptr<Expr>> kids;  // operands; Slice: object, start, stop, step (nullable)
  std::vector<std::string> kwarg_names;     // Call/Filter/Test: names of the trailing kwargs
};
using ExprP = std::unique_ptr<Expr>;

enum class SK { Text, Output, If, For, Set, Break, Continue, Block };

struct Stmt {
  Stmt(SK k, size_t off) : kind(k), offset(off) {}
  SK kind;
  size_t offset = 0;
  std::string text;                       // Text
  ExprP expr;                             // Output, Set value, For iterable
  std::vector<ExprP> conds;               // If: one per branch; For: the optional filter
  std::vector<std::vector<Stmt>> bodies;  // If: one per branch (+ else); For: body, else
  std::vector<std::string> targets;       // For: loop variables; Set: name [, attribute]
  bool has_else = false;
};

}  // namespace chat_template_detail

namespace chat_template_detail {

const std::set<std::string>& supported_filters() {
  static const std::set<std::string> s = {
      "capitalize", "count",  "d",          "default", "first",  "items",      "join",
      "last",       "length", "list",       "lower",   "reject", "rejectattr", "replace",
      "reverse",    "select", "selectattr", "string",  "tojson", "trim",       "upper"};
  return s;
}
const std::set<std::string>& supported_tests() {
  static const std::set<std::string> s = {
      "==",     "!=",    "boolean",  "defined",  "divisibleby", "eq",       "equalto",
      "even",   "false", "integer",  "iterable", "mapping",     "ne",       "none",
      "number", "odd",   "sequence", "string",   "true",        "undefined"};
  return s;
}
const std::set<std::string>& supported_methods() {
  static const std::set<std::string> s = {"endswith", "get",     "items",  "keys",  "lower",
                                          "lstrip",   "replace", "rstrip", "split", "startswith",
                                          "strip",    "upper",   "values"};
  return s;
}
std::string joined(const std::set<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

struct Program {
  std::string source;  // newline-normalised, as Jinja lexes it
  std::vector<Stmt> body;
};

// ---------------------------------------------------------------------------------------------
// Parser.

class Parser {
 public:
  explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  std::vector<Stmt> parse_template() {
    std::string end;
    std::vector<Stmt> body = parse_body({}, &end);
    return body;
  }

 private:
  // Statements up to one of `ends` (a statement keyword), which is consumed and reported.
  std::vector<Stmt> parse_body(const std::set<std::string>& ends, std::string* hit) {
    if (++depth_ > kMaxDepth)
      throw TemplateError{pieces_[std::min(at_, pieces_.size() - 1)].offset,
                          fmt::format("blocks are nested deeper than {}", kMaxDepth)};
    std::vector<Stmt> out;
    while (at_ < pieces_.size()) {
      Piece& piece = pieces_[at_];
      if (piece.kind == PieceKind::Text) {
        Stmt s{SK::Text, piece.offset};
        s.text = piece.text;
        out.push_back(std::move(s));
        ++at_;
        continue;
      }
      toks_ = &piece.tokens;
      tp_ = 0;
      if (piece.kind == PieceKind::Output) {
        ++at_;
        Stmt s{SK::Output, piece.offset};
        s.expr = parse_expression();
        expect_end();
        out.push_back(std::move(s));
        continue;
      }
      const Token& kw = cur();
      if (kw.kind != TK::Name) throw TemplateError{kw.offset, "a statement name is expected here"};
      if (ends.count(kw.text)) {
        *hit = kw.text;
        ++tp_;
        ++at_;
        --depth_;
        return out;
      }
      ++at_;
      ++tp_;
      out.push_back(parse_statement(kw));
    }
    if (!ends.empty()) {
      const char* missing = ends.count("endif")    ? "endif"
                            : ends.count("endfor") ? "endfor"
                                                   : "endgeneration";
      throw TemplateError{
          pieces_.empty() ? 0 : pieces_.back().offset,
          fmt::format("the template ends inside a block (missing {{% {} %}})", missing)};
    }
    --depth_;
    return out;
  }

  Stmt parse_statement(const Token& kw) {
    const std::string& name = kw.text;
    if (name == "if") return parse_if(kw.offset);
    if (name == "for") return parse_for(kw.offset);
    if (name == "set") return parse_set(kw.offset);
    if (name == "break" || name == "continue") {
      if (loop_depth_ == 0)
        throw TemplateError{kw.offset, fmt::format("'{}' outside of a for loop", name)};
      expect_end();
      return Stmt{name == "break" ? SK::Break : SK::Continue, kw.offset};
    }
    if (name == "generation") {
      expect_end();
      Stmt s{SK::Block, kw.offset};
      std::string hit;
      s.bodies.push_back(parse_body({"endgeneration"}, &hit));
      expect_end();
      return s;
    }
    if (name == "elif" || name == "else" || name == "endif" || name == "endfor" ||
        name == "endgeneration")
      throw TemplateError{kw.offset, fmt::format("unexpected '{}'", name)};
    throw TemplateError{kw.offset,
                        fmt::format("the statement '{}' is not supported (supported: if, elif, "
                                    "else, for, set, break, continue, generation)",
                                    name)};
  }

  Stmt parse_if(size_t offset) {
    Stmt s{SK::If, offset};
    s.conds.push_back(parse_expression());
    expect_end();
    while (true) {
      std::string hit;
      s.bodies.push_back(parse_body({"elif", "else", "endif"}, &hit));
      if (hit == "endif") break;
      if (hit == "elif") {
        s.conds.push_back(parse_expression());
        expect_end();
        continue;
      }
      expect_end();
      s.has_else = true;
      std::string hit2;
      s.bodies.push_back(parse_body({"endif"}, &hit2));
      break;
    }
    expect_end();
    return s;
  }

  Stmt parse_for(size_t offset) {
    Stmt s{SK::For, offset};
    do {
      const Token& t = cur();
      if (t.kind != TK::Name) throw TemplateError{t.offset, "a loop variable name is expected"};
      s.targets.push_back(t.text);
      ++tp_;
    } while (accept_op(","));
    if (!(cur().kind == TK::Name && cur().text == "in"))
      throw TemplateError{cur().offset, "'in' is expected in the for statement"};
    ++tp_;
    s.expr = parse_or();  // no conditional expression here: `if` filters the loop
    if (cur().kind == TK::Name && cur().text == "if") {
      ++tp_;
      s.conds.push_back(parse_expression());
    }
    if (cur().kind == TK::Name && cur().text == "recursive")
      throw TemplateError{cur().offset, "recursive loops are not supported"};
    expect_end();
    ++loop_depth_;
    std::string hit;
    s.bodies.push_back(parse_body({"else", "endfor"}, &hit));
    --loop_depth_;
    if (hit == "else") {
      expect_end();
      s.has_else = true;
      std::string hit2;
      s.bodies.push_back(parse_body({"endfor"}, &hit2));
    }
    expect_end();
    return s;
  }

  Stmt parse_set(size_t offset) {
    Stmt s{SK::Set, offset};
    const Token& t = cur();
    if (t.kind != TK::Name) throw TemplateError{t.offset, "a variable name is expected after set"};
    s.targets.push_back(t.text);
    ++tp_;
    if (accept_op(".")) {
      const Token& attr = cur();
      if (attr.kind != TK::Name) throw TemplateError{attr.offset, "an attribute name is expected"};
      s.targets.push_back(attr.text);
      ++tp_;
    }
    if (cur().kind == TK::Op && cur().text == ",")
      throw TemplateError{cur().offset, "setting several variables at once is not supported"};
    if (cur().kind == TK::End || (cur().kind == TK::Op && cur().text == "|"))
      throw TemplateError{offset,
                          "block assignments ({% set x %}...{% endset %}) are not supported"};
    if (!accept_op("=")) throw TemplateError{cur().offset, "'=' is expected in the set statement"};
    s.expr = parse_expression();
    expect_end();
    return s;
  }

  // --- expressions -----------------------------------------------------------------------------
  const Token& cur() const { return (*toks_)[tp_]; }
  bool is_op(const char* op) const { return cur().kind == TK::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().kind == TK::Name && cur().text == n; }
  bool accept_op(const char* op) {
    if (!is_op(op)) return false;
    ++tp_;
    return true;
  }
  void expect_op(const char* op) {
    if (!accept_op(op)) throw TemplateError{cur().offset, fmt::format("'{}' is expected here", op)};
  }
  void expect_end() {
    if (cur().kind != TK::End)
      throw TemplateError{
          cur().offset,
          fmt::format("unexpected '{}'", cur().kind == TK::Str   ? "string"
                                         : cur().kind == TK::Int ? std::to_string(cur().value)
                                                                 : cur().text)};
  }

  ExprP node(EK kind, size_t offset) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->offset = offset;
    return e;
  }

  struct DepthGuard {
    int& d;
    DepthGuard(int& depth, size_t offset) : d(depth) {
      if (++d > kMaxDepth * 4)
        throw TemplateError{offset, fmt::format("the expression is nested too deeply")};
    }
    ~DepthGuard() { --d; }
  };

  ExprP parse_expression() {
    DepthGuard g(expr_depth_, cur().offset);
    ExprP e = parse_or();
    if (is_name("if")) {
      const size_t off = cur().offset;
      ++tp_;
      auto c = node(EK::Cond, off);
      ExprP cond = parse_or();
      ExprP otherwise;
      if (is_name("else")) {
        ++tp_;
        otherwise = parse_expression();
      }
      c->kids.push_back(std::move(cond));
      c->kids.push_back(std::move(e));
      c->kids.push_back(std::move(otherwise));
      return c;
    }
    return e;
  }
  // operand (OP operand)*, left-associative, for the operators `ops` (symbols, or the keywords
  // "or" / "and"); `make(op, offset, left, right)` builds each node.
  template <class Operand, class Make>
  ExprP left_chain(std::initializer_list<const char*> ops, Operand operand, Make make) {
    ExprP e = operand();
    for (;;) {
      const auto op = std::find_if(ops.begin(), ops.end(),
                                   [&](const char* o) { return is_op(o) || is_name(o); });
      if (op == ops.end()) return e;
      const size_t off = cur().offset;
      ++tp_;
      e = make(std::string(*op), off, std::move(e), operand());
    }
  }
  ExprP pair(EK kind, size_t off, ExprP a, ExprP b) {
    auto n = node(kind, off);
    n->kids.push_back(std::move(a));
    n->kids.push_back(std::move(b));
    return n;
  }
  ExprP parse_or() {
    return left_chain(
        {"or"}, [&] { return parse_and(); },
        [&](const std::string&, size_t off, ExprP a, ExprP b) {
          return pair(EK::Or, off, std::move(a), std::move(b));
        });
  }
  ExprP parse_and() {
    return left_chain(
        {"and"}, [&] { return parse_not(); },
        [&](const std::string&, size_t off, ExprP a, ExprP b) {
          return pair(EK::And, off, std::move(a), std::move(b));
        });
  }
  ExprP parse_not() {
    if (is_name("not")) {
      DepthGuard g(expr_depth_, cur().offset);
      auto n = node(EK::Not, cur().offset);
      ++tp_;
      n->kids.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }
  ExprP parse_compare() {
    ExprP first = parse_math1();
    ExprP cmp;
    while (true) {
      std::string op;
      const size_t off = cur().offset;
      if (cur().kind == TK::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                   cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        ++tp_;
      } else if (is_name("in")) {
        op = "in";
        ++tp_;
      } else if (is_name("not") && tp_ + 1 < toks_->size() && (*toks_)[tp_ + 1].kind == TK::Name &&
                 (*toks_)[tp_ + 1].text == "in") {
        op = "not in";
        tp_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(EK::Compare, off);
        cmp->kids.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->kids.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }
  // The `make` of left_chain for arithmetic: an EK::Binary node named by its operator.
  auto binary_node() {
    return [this](const std::string& op, size_t off, ExprP a, ExprP b) {
      ExprP n = pair(EK::Binary, off, std::move(a), std::move(b));
      n->name = op;
      return n;
    };
  }
  ExprP parse_math1() {
    return left_chain(
        {"+", "-"}, [&] { return parse_concat(); }, binary_node());
  }
  ExprP parse_concat() {
    return left_chain(
        {"~"}, [&] { return parse_math2(); }, binary_node());
  }
  ExprP parse_math2() {
    return left_chain(
        {"*", "//", "%"}, [&] { return parse_pow(); }, binary_node());
  }
  // A multiplicative operand; the operators Strata leaves out are refused where they stand.
  ExprP parse_pow() {
    ExprP e = parse_unary(true);
    if (is_op("**")) throw TemplateError{cur().offset, "the operator '**' is not supported"};
    if (is_op("/")) {
      throw TemplateError{cur().offset,
                          "the operator '/' (true division) is not supported; use '//'"};
    }
    return e;
  }
  ExprP parse_unary(bool with_filter) {
    DepthGuard g(expr_depth_, cur().offset);
    ExprP e;
    if (is_op("-") || is_op("+")) {
      const bool neg = is_op("-");
      const size_t off = cur().offset;
      ++tp_;
      ExprP operand = parse_unary(false);
      if (neg) {
        e = node(EK::Neg, off);
        e->kids.push_back(std::move(operand));
      } else {
        e = std::move(operand);
      }
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_chain(std::move(e));
    return e;
  }
  ExprP parse_primary() {
    const Token& t = cur();
    if (t.kind == TK::Str) {
      std::string s;
      while (cur().kind == TK::Str) s += (*toks_)[tp_++].text;  // adjacent literals join
      auto n = node(EK::Literal, t.offset);
      n->literal = Value::str(std::move(s));
      return n;
    }
    if (t.kind == TK::Int) {
      ++tp_;
      auto n = node(EK::Literal, t.offset);
      n->literal = Value::integer(t.value);
      return n;
    }
    if (t.kind == TK::Name) {
      ++tp_;
      auto n = node(EK::Literal, t.offset);
      if (t.text == "true" || t.text == "True") {
        n->literal = Value::boolean(true);
      } else if (t.text == "false" || t.text == "False") {
        n->literal = Value::boolean(false);
      } else if (t.text == "none" || t.text == "None") {
        n->literal = Value::none();
      } else {
        n->kind = EK::Name;
        n->name = t.text;
      }
      return n;
    }
    if (is_op("(")) {
      ++tp_;
      ExprP e = parse_expression();
      if (is_op(",")) throw TemplateError{cur().offset, "tuples are not supported; use a list"};
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      auto n = node(EK::ListLit, t.offset);
      ++tp_;
      while (!is_op("]")) {
        if (!n->kids.empty()) expect_op(",");
        if (is_op("]")) break;
        n->kids.push_back(parse_expression());
      }
      ++tp_;
      return n;
    }
    if (is_op("{")) {
      auto n = node(EK::DictLit, t.offset);
      ++tp_;
      while (!is_op("}")) {
        if (!n->kids.empty()) expect_op(",");
        if (is_op("}")) break;
        n->kids.push_back(parse_expression());
        expect_op(":");
        n->kids.push_back(parse_expression());
      }
      ++tp_;
      return n;
    }
    if (t.kind == TK::End) throw TemplateError{t.offset, "an expression is expected here"};
    throw TemplateError{t.offset, fmt::format("unexpected '{}'", t.text)};
  }
  ExprP parse_postfix(ExprP e) {
    while (true) {
      if (is_op(".")) {
        ++tp_;
        const Token& t = cur();
        if (t.kind == TK::Name) {
          auto n = node(EK::Attr, t.offset);
          n->name = t.text;
          n->kids.push_back(std::move(e));
          ++tp_;
          e = std::move(n);
        } else if (t.kind == TK::Int) {
          auto n = node(EK::Item, t.offset);
          n->kids.push_back(std::move(e));
          auto idx = node(EK::Literal, t.offset);
          idx->literal = Value::integer(t.value);
          n->kids.push_back(std::move(idx));
          ++tp_;
          e = std::move(n);
        } else {
          throw TemplateError{t.offset, "an attribute name is expected after '.'"};
        }
      } else if (is_op("[")) {
        const size_t off = cur().offset;
        ++tp_;
        ExprP parts[3];
        int colons = 0;
        while (true) {
          if (is_op("]")) break;
          if (is_op(":")) {
            if (++colons > 2) throw TemplateError{cur().offset, "unexpected ':'"};
            ++tp_;
            continue;
          }
          if (parts[colons]) throw TemplateError{cur().offset, "']' is expected here"};
          parts[colons] = parse_expression();
        }
        ++tp_;
        if (colons == 0) {
          if (!parts[0]) throw TemplateError{off, "an index is expected inside []"};
          auto n = node(EK::Item, off);
          n->kids.push_back(std::move(e));
          n->kids.push_back(std::move(parts[0]));
          e = std::move(n);
        } else {
          auto n = node(EK::Slice, off);
          n->kids.push_back(std::move(e));
          for (auto& p : parts) n->kids.push_back(std::move(p));
          e = std::move(n);
        }
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
  // Arguments of a call, filter or test: positional, then name=value.
  void parse_args(Expr& n) {
    expect_op("(");
    int seen = 0;
    while (!is_op(")")) {
      if (seen++ > 0) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*") || is_op("**"))
        throw TemplateError{cur().offset, "*args and **kwargs are not supported"};
      if (cur().kind == TK::Name && tp_ + 1 < toks_->size() && (*toks_)[tp_ + 1].kind == TK::Op &&
          (*toks_)[tp_ + 1].text == "=") {
        n.kwarg_names.push_back(cur().text);
        tp_ += 2;
        n.kids.push_back(parse_expression());
      } else {
        if (!n.kwarg_names.empty())
          throw TemplateError{cur().offset, "a positional argument follows a keyword argument"};
        n.kids.push_back(parse_expression());
      }
    }
    ++tp_;
  }
  void parse_args_fresh(Expr& n) { parse_args(n); }
  ExprP parse_call(ExprP callee) {
    const size_t off = cur().offset;
    auto n = node(EK::Call, callee->offset);
    if (callee->kind == EK::Name) {
      if (callee->name != "raise_exception" && callee->name != "namespace")
        throw TemplateError{callee->offset,
                            fmt::format("the function '{}' is not supported (supported: "
                                        "raise_exception, namespace)",
                                        callee->name)};
      n->name = callee->name;
    } else if (callee->kind == EK::Attr) {
      if (!supported_methods().count(callee->name))
        throw TemplateError{callee->offset,
                            fmt::format("the method '{}' is not supported (supported: {})",
                                        callee->name, joined(supported_methods()))};
      n->name = "." + callee->name;
      n->kids.push_back(std::move(callee->kids[0]));
    } else {
      throw TemplateError{off, "only functions and methods can be called"};
    }
    const size_t fixed = n->kids.size();
    auto args = node(EK::Call, off);
    parse_args_fresh(*args);
    for (auto& a : args->kids) n->kids.push_back(std::move(a));
    n->kwarg_names = std::move(args->kwarg_names);
    n->literal = Value::integer(static_cast<int64_t>(fixed));  // index of the first argument
    return n;
  }
  ExprP parse_filter_chain(ExprP e) {
    while (true) {
      if (is_op("|")) {
        ++tp_;
        const Token& t = cur();
        if (t.kind != TK::Name)
          throw TemplateError{t.offset, "a filter name is expected after '|'"};
        if (!supported_filters().count(t.text))
          throw TemplateError{
              t.offset, fmt::format("the filter '{}' is not supported (supported: {})", t.text,
                                    joined(supported_filters()))};
        auto n = node(EK::Filter, t.offset);
        n->name = t.text;
        ++tp_;
        n->kids.push_back(std::move(e));
        if (is_op("(")) {
          auto args = node(EK::Call, cur().offset);
          parse_args_fresh(*args);
          for (auto& a : args->kids) n->kids.push_back(std::move(a));
          n->kwarg_names = std::move(args->kwarg_names);
        }
        e = std::move(n);
      } else if (is_name("is")) {
        ++tp_;
        bool negated = false;
        if (is_name("not")) {
          negated = true;
          ++tp_;
        }
        const Token& t = cur();
        std::string test;
        if (t.kind == TK::Name) {
          test = t.text;
        } else if (t.kind == TK::Op && (t.text == "==" || t.text == "!=")) {
          test = t.text;
        } else {
          throw TemplateError{t.offset, "a test name is expected after 'is'"};
        }
        if (!supported_tests().count(test))
          throw TemplateError{t.offset,
                              fmt::format("the test '{}' is not supported (supported: {})", test,
                                          joined(supported_tests()))};
        auto n = node(EK::Test, t.offset);
        n->name = test;
        n->negated = negated;
        ++tp_;
        n->kids.push_back(std::move(e));
        if (is_op("(")) {
          auto args = node(EK::Call, cur().offset);
          parse_args_fresh(*args);
          for (auto& a : args->kids) n->kids.push_back(std::move(a));
          n->kwarg_names = std::move(args->kwarg_names);
        } else if ((cur().kind == TK::Name || cur().kind == TK::Str || cur().kind == TK::Int ||
                    is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and") && !is_name("is") &&
                   !is_name("if")) {
          // `x is divisibleby 3`: one argument without parentheses.
          n->kids.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(n);
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  std::vector<Piece> pieces_;
  size_t at_ = 0;
  std::vector<Token>* toks_ = nullptr;
  size_t tp_ = 0;
  int depth_ = 0;
  int expr_depth_ = 0;
  int loop_depth_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Evaluator.

enum class Flow { Normal, Break, Continue };

class Renderer {
 public:
  explicit Renderer(std::string& out) : out_(out) {}

  void set_global(const std::string& name, Value v) { scopes_.front()[name] = std::move(v); }

  Flow exec(const std::vector<Stmt>& body) {
    for (const Stmt& s : body) {
      const Flow f = exec(s);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

 private:
  void step(size_t offset) {
    if (++steps_ > kMaxSteps)
      throw TemplateError{offset, fmt::format("rendering takes more than {} steps", kMaxSteps)};
  }
  void emit(const std::string& s, size_t offset) {
    if (out_.size() + s.size() > kMaxOutputBytes)
      throw TemplateError{offset,
                          fmt::format("the rendering exceeds {} MiB", kMaxOutputBytes >> 20)};
    out_ += s;
  }
  static Value checked_str(std::string s, size_t offset) {
    if (s.size() > kMaxOutputBytes)
      throw TemplateError{offset, fmt::format("a string exceeds {} MiB", kMaxOutputBytes >> 20)};
    return Value::str(std::move(s));
  }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value::undefined("'" + name + "' is undefined");
  }

  Flow exec(const Stmt& s) {
    step(s.offset);
    switch (s.kind) {
      case SK::Text:
        emit(s.text, s.offset);
        return Flow::Normal;
      case SK::Output:
        emit(to_str(eval(*s.expr), s.expr->offset), s.offset);
        return Flow::Normal;
      case SK::If:
        for (size_t k = 0; k < s.conds.size(); ++k)
          if (truthy(eval(*s.conds[k]))) return exec(s.bodies[k]);
        if (s.has_else) return exec(s.bodies.back());
        return Flow::Normal;
      case SK::Set: {
        Value v = eval(*s.expr);
        if (s.targets.size() == 1) {
          scopes_.back()[s.targets[0]] = std::move(v);
        } else {
          Value ns = lookup(s.targets[0]);
          if (ns.t != VT::Namespace)
            throw TemplateError{s.offset, fmt::format("'{}' is not a namespace; only namespace "
                                                      "attributes can be set",
                                                      s.targets[0])};
          set_attr(*ns.dict, s.targets[1], std::move(v));
        }
        return Flow::Normal;
      }
      case SK::Break:
        return Flow::Break;
      case SK::Continue:
        return Flow::Continue;
      case SK::Block:
        return exec(s.bodies[0]);
      case SK::For:
        exec_for(s);
        return Flow::Normal;
    }
    return Flow::Normal;
  }

  static void set_attr(Dict& d, const std::string& key, Value v) {
    for (auto& [k, item] : d)
      if (k == key) {
        item = std::move(v);
        return;
      }
    d.emplace_back(key, std::move(v));
  }

  List iterate(const Value& v, size_t offset) {
    switch (v.t) {
      case VT::Undefined:
        return {};
      case VT::List:
        return *v.list;
      case VT::Dict: {
        List keys;
        for (const auto& [k, item] : *v.dict) keys.push_back(Value::str(k));
        return keys;
      }
      case VT::Str: {
        List chars;
        for (const auto& [at, c] : code_points(v.s)) {
          std::string one;
          append_utf8(one, c);
          chars.push_back(Value::str(one));
        }
        return chars;
      }
      default:
        throw TemplateError{offset, fmt::format("a {} cannot be iterated over", type_name(v))};
    }
  }

  void exec_for(const Stmt& s) {
    List items = iterate(eval(*s.expr), s.expr->offset);
    auto bind = [&](std::map<std::string, Value>& scope, const Value& item) {
      if (s.targets.size() == 1) {
        scope[s.targets[0]] = item;
        return;
      }
      List parts = iterate(item, s.offset);
      if (parts.size() != s.targets.size())
        throw TemplateError{s.offset, fmt::format("cannot unpack {} values into {} loop variables",
                                                  parts.size(), s.targets.size())};
      for (size_t k = 0; k < parts.size(); ++k) scope[s.targets[k]] = parts[k];
    };
    if (!s.conds.empty()) {
      List kept;
      for (const Value& item : items) {
        scopes_.emplace_back();
        bind(scopes_.back(), item);
        const bool keep = truthy(eval(*s.conds[0]));
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      if (s.has_else) exec(s.bodies[1]);
      return;
    }
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      scopes_.emplace_back();
      auto& scope = scopes_.back();
      scope["loop"] =
          Value::make_dict({{"index", Value::integer(k + 1)},
                            {"index0", Value::integer(k)},
                            {"revindex", Value::integer(n - k)},
                            {"revindex0", Value::integer(n - k - 1)},
                            {"first", Value::boolean(k == 0)},
                            {"last", Value::boolean(k == n - 1)},
                            {"length", Value::integer(n)},
                            {"previtem", k > 0 ? items[k - 1] : Value::undefined()},
                            {"nextitem", k + 1 < n ? items[k + 1] : Value::undefined()}});
      bind(scope, items[k]);
      const Flow f = exec(s.bodies[0]);
      scopes_.pop_back();
      if (f == Flow::Break) break;
    }
  }

  static void require_defined(const Value& v, size_t offset) {
    if (v.t == VT::Undefined)
      throw TemplateError{offset, v.s.empty() ? std::string("a value is undefined") : v.s};
  }

  static Value get_attr(const Value& obj, const std::string& name, size_t offset) {
    require_defined(obj, offset);
    if (obj.t == VT::Dict || obj.t == VT::Namespace) {
      if (const Value* v = obj.find(name)) return *v;
      return Value::undefined(fmt::format("'{}' has no attribute '{}'", type_name(obj), name));
    }
    return Value::undefined(fmt::format("'{}' has no attribute '{}'", type_name(obj), name));
  }

  static int64_t normalize_index(int64_t i, int64_t n) { return i < 0 ? i + n : i; }

  static Value get_item(const Value& obj, const Value& key, size_t offset) {
    require_defined(obj, offset);
    if (obj.t == VT::Dict || obj.t == VT::Namespace) {
      if (key.t == VT::Str) return get_attr(obj, key.s, offset);
      return Value::undefined("the dict has no such key");
    }
    if ((obj.t == VT::List || obj.t == VT::Str) && key.is_number()) {
      if (obj.t == VT::List) {
        const auto n = static_cast<int64_t>(obj.list->size());
        const int64_t i = normalize_index(key.number(), n);
        if (i < 0 || i >= n) return Value::undefined("the list index is out of range");
        return (*obj.list)[i];
      }
      const auto cps = code_points(obj.s);
      const auto n = static_cast<int64_t>(cps.size());
      const int64_t i = normalize_index(key.number(), n);
      if (i < 0 || i >= n) return Value::undefined("the string index is out of range");
      std::string one;
      append_utf8(one, cps[i].second);
      return Value::str(one);
    }
    return Value::undefined(
        fmt::format("a {} cannot be indexed by a {}", type_name(obj), type_name(key)));
  }

  Value slice(const Value& obj, const Expr& e) {
    require_defined(obj, e.offset);
    auto bound = [&](const ExprP& x) -> std::optional<int64_t> {
      if (!x) return std::nullopt;
      Value v = eval(*x);
      if (v.t == VT::None) return std::nullopt;
      if (!v.is_number()) throw TemplateError{x->offset, "slice bounds must be integers"};
      return v.number();
    };
    const auto start = bound(e.kids[1]), stop = bound(e.kids[2]), stride = bound(e.kids[3]);
    const int64_t st = stride.value_or(1);
    if (st == 0) throw TemplateError{e.offset, "the slice step cannot be zero"};
    std::vector<Value> items;
    if (obj.t == VT::List) {
      items = *obj.list;
    } else if (obj.t == VT::Str) {
      items = iterate(obj, e.offset);
    } else {
      throw TemplateError{e.offset, fmt::format("a {} cannot be sliced", type_name(obj))};
    }
    const auto n = static_cast<int64_t>(items.size());
    // Python's slice.indices().
    auto clamp = [&](std::optional<int64_t> b, int64_t dflt) {
      if (!b) return dflt;
      int64_t v = *b;
      if (v < 0) {
        v += n;
        if (v < 0) v = st < 0 ? -1 : 0;
      } else if (v >= n) {
        v = st < 0 ? n - 1 : n;
      }
      return v;
    };
    const int64_t lo = clamp(start, st < 0 ? n - 1 : 0);
    const int64_t hi = clamp(stop, st < 0 ? -1 : n);
    List out;
    for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st) out.push_back(items[i]);
    if (obj.t == VT::List) return Value::make_list(std::move(out));
    std::string s;
    for (const Value& c : out) s += c.s;
    return Value::str(s);
  }

  Value binary(const std::string& op, const Value& a, const Value& b, size_t offset) {
    if (op == "~") return checked_str(to_str(a, offset) + to_str(b, offset), offset);
    require_defined(a, offset);
    require_defined(b, offset);
    auto type_error = [&]() {
      return TemplateError{offset, fmt::format("unsupported operand types for {}: {} and {}", op,
                                               type_name(a), type_name(b))};
    };
    if (op == "+") {
      if (a.is_number() && b.is_number()) return Value::integer(a.number() + b.number());
      if (a.t == VT::Str && b.t == VT::Str) return checked_str(a.s + b.s, offset);
      if (a.t == VT::List && b.t == VT::List) {
        List l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::make_list(std::move(l));
      }
      throw type_error();
    }
    if (op == "-") {
      if (a.is_number() && b.is_number()) return Value::integer(a.number() - b.number());
      throw type_error();
    }
    if (op == "*") {
      if (a.is_number() && b.is_number()) return Value::integer(a.number() * b.number());
      const Value* s = a.t == VT::Str ? &a : b.t == VT::Str ? &b : nullptr;
      const Value* k = a.is_number() ? &a : b.is_number() ? &b : nullptr;
      if (s && k) {
        const int64_t times = k->number();
        if (times > 0 && s->s.size() * static_cast<uint64_t>(times) > kMaxOutputBytes)
          throw TemplateError{offset, "a repeated string exceeds the size limit"};
        std::string r;
        for (int64_t t = 0; t < times; ++t) r += s->s;
        return Value::str(r);
      }
      throw type_error();
    }
    if (op == "//" || op == "%") {
      if (a.t == VT::Str && op == "%")
        throw TemplateError{offset, "string formatting with '%' is not supported"};
      if (!a.is_number() || !b.is_number()) throw type_error();
      const int64_t x = a.number(), y = b.number();
      if (y == 0) throw TemplateError{offset, "integer division or modulo by zero"};
      int64_t q = x / y, r = x % y;
      if (r != 0 && ((r < 0) != (y < 0))) {
        q -= 1;
        r += y;
      }
      return Value::integer(op == "//" ? q : r);
    }
    throw type_error();
  }

  static bool contains(const Value& container, const Value& item, size_t offset) {
    switch (container.t) {
      case VT::Undefined:
        return false;
      case VT::Str:
        if (item.t != VT::Str)
          throw TemplateError{offset, "'in <string>' requires a string on the left"};
        return container.s.find(item.s) != std::string::npos;
      case VT::List:
        for (const Value& v : *container.list)
          if (equal(v, item)) return true;
        return false;
      case VT::Dict:
      case VT::Namespace:
        return item.t == VT::Str && container.find(item.s) != nullptr;
      default:
        throw TemplateError{offset, fmt::format("'in' needs a string, list or dict on the right, "
                                                "not a {}",
                                                type_name(container))};
    }
  }

  static int order(const Value& a, const Value& b, const std::string& op, size_t offset) {
    require_defined(a, offset);
    require_defined(b, offset);
    if (a.is_number() && b.is_number())
      return a.number() < b.number() ? -1 : a.number() > b.number() ? 1 : 0;
    if (a.t == VT::Str && b.t == VT::Str) return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
    if (a.t == VT::List && b.t == VT::List) {
      const size_t n = std::min(a.list->size(), b.list->size());
      for (size_t k = 0; k < n; ++k) {
        if (equal((*a.list)[k], (*b.list)[k])) continue;
        return order((*a.list)[k], (*b.list)[k], op, offset);
      }
      return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
    }
    throw TemplateError{offset, fmt::format("'{}' is not supported between a {} and a {}", op,
                                            type_name(a), type_name(b))};
  }

  bool compare(const std::string& op, const Value& a, const Value& b, size_t offset) {
    if (op == "==") return equal(a, b);
    if (op == "!=") return !equal(a, b);
    if (op == "in") return contains(b, a, offset);
    if (op == "not in") return !contains(b, a, offset);
    const int c = order(a, b, op, offset);
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  // Positional and keyword arguments of a call, filter or test, from kids[first].
  struct Args {
    std::vector<Value> positional;
    std::vector<std::pair<std::string, Value>> named;
    const Value* get(size_t pos, const char* name) const {
      if (pos < positional.size()) return &positional[pos];
      for (const auto& [n, v] : named)
        if (n == name) return &v;
      return nullptr;
    }
  };
  Args eval_args(const Expr& e, size_t first) {
    Args a;
    const size_t n_named = e.kwarg_names.size();
    const size_t n_pos = e.kids.size() - first - n_named;
    for (size_t k = 0; k < n_pos; ++k) a.positional.push_back(eval(*e.kids[first + k]));
    for (size_t k = 0; k < n_named; ++k)
      a.named.emplace_back(e.kwarg_names[k], eval(*e.kids[first + n_pos + k]));
    return a;
  }
  static const std::string& want_str(const Value* v, const char* what, size_t offset) {
    if (!v || v->t != VT::Str)
      throw TemplateError{offset, fmt::format("{} must be a string", what)};
    return v->s;
  }
  static const std::string& want_str_input(const Value& v, const std::string& what, size_t offset) {
    if (v.t != VT::Str)
      throw TemplateError{offset, fmt::format("{} needs a string, not a {}", what, type_name(v))};
    return v.s;
  }

  bool apply_test(const std::string& name, const Value& v, const Args& args, size_t offset) {
    if (name == "defined") return v.t != VT::Undefined;
    if (name == "undefined") return v.t == VT::Undefined;
    if (name == "none") return v.t == VT::None;
    if (name == "string") return v.t == VT::Str;
    if (name == "number") return v.t == VT::Int || v.t == VT::Bool;
    if (name == "integer") return v.t == VT::Int;
    if (name == "boolean") return v.t == VT::Bool;
    if (name == "true") return v.t == VT::Bool && v.b;
    if (name == "false") return v.t == VT::Bool && !v.b;
    if (name == "mapping") return v.t == VT::Dict;
    if (name == "iterable")
      return v.t == VT::List || v.t == VT::Dict || v.t == VT::Str || v.t == VT::Undefined;
    if (name == "sequence")
      return v.t == VT::List || v.t == VT::Dict || v.t == VT::Str || v.t == VT::Undefined;
    if (name == "odd" || name == "even" || name == "divisibleby") {
      require_defined(v, offset);
      if (!v.is_number()) throw TemplateError{offset, fmt::format("'{}' needs a number", name)};
      if (name == "odd") return v.number() % 2 != 0;
      if (name == "even") return v.number() % 2 == 0;
      const Value* d = args.get(0, "num");
      if (!d || !d->is_number() || d->number() == 0)
        throw TemplateError{offset, "'divisibleby' needs a non-zero integer argument"};
      return v.number() % d->number() == 0;
    }
    const Value* other = args.get(0, "other");
    if (!other) throw TemplateError{offset, fmt::format("the test '{}' needs an argument", name)};
    if (name == "==" || name == "eq" || name == "equalto") return equal(v, *other);
    return !equal(v, *other);  // != and ne
  }

  Value apply_filter(const std::string& name, const Value& v, const Args& args, size_t offset) {
    if (name == "default" || name == "d") {
      const Value* dflt = args.get(0, "default_value");
      const Value* boolean = args.get(1, "boolean");
      const bool use = boolean && truthy(*boolean) ? !truthy(v) : v.t == VT::Undefined;
      if (use) return dflt ? *dflt : Value::str("");
      return v;
    }
    if (name == "length" || name == "count") {
      switch (v.t) {
        case VT::Undefined:
          return Value::integer(0);
        case VT::Str:
          return Value::integer(static_cast<int64_t>(code_point_count(v.s)));
        case VT::List:
          return Value::integer(static_cast<int64_t>(v.list->size()));
        case VT::Dict:
          return Value::integer(static_cast<int64_t>(v.dict->size()));
        default:
          throw TemplateError{offset, fmt::format("a {} has no length", type_name(v))};
      }
    }
    if (name == "string") return Value::str(to_str(v, offset));
    if (name == "trim") {
      const Value* chars = args.get(0, "chars");
      const std::string s = to_str(v, offset);
      return Value::str(
          py_strip(s, true, true, chars && chars->t == VT::Str ? &chars->s : nullptr));
    }
    if (name == "upper") return Value::str(ascii_upper(to_str(v, offset)));
    if (name == "lower") return Value::str(ascii_lower(to_str(v, offset)));
    if (name == "capitalize") {
      std::string s = ascii_lower(to_str(v, offset));
      if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
      return Value::str(s);
    }
    if (name == "replace") {
      const std::string s = to_str(v, offset);
      return replace(s, want_str(args.get(0, "old"), "replace's old", offset),
                     want_str(args.get(1, "new"), "replace's new", offset), args.get(2, "count"),
                     offset);
    }
    if (name == "tojson") {
      const Value* indent = args.get(0, "indent");
      int ind = -1;
      if (indent && indent->t != VT::None) {
        if (!indent->is_number() || indent->number() < 0 || indent->number() > 64)
          throw TemplateError{offset, "tojson's indent must be an integer from 0 to 64"};
        ind = static_cast<int>(indent->number());
      }
      for (const auto& [n, val] : args.named)
        if (n != "indent")
          throw TemplateError{offset, fmt::format("tojson's argument '{}' is not supported", n)};
      std::string out;
      to_json(v, ind, 0, out, offset);
      return checked_str(std::move(out), offset);
    }
    if (name == "items") {
      if (v.t == VT::Undefined) return Value::make_list({});
      if (v.t != VT::Dict) throw TemplateError{offset, "'items' needs a dict"};
      List pairs;
      for (const auto& [k, item] : *v.dict)
        pairs.push_back(Value::make_list({Value::str(k), item}));
      return Value::make_list(std::move(pairs));
    }
    // The rest work on a sequence.
    List items = iterate(v, offset);
    if (name == "list") return Value::make_list(std::move(items));
    if (name == "reverse") {
      if (v.t == VT::Str) {
        std::string s;
        for (auto it = items.rbegin(); it != items.rend(); ++it) s += it->s;
        return Value::str(s);
      }
      std::reverse(items.begin(), items.end());
      return Value::make_list(std::move(items));
    }
    if (name == "first")
      return items.empty() ? Value::undefined("the sequence is empty") : items.front();
    if (name == "last")
      return items.empty() ? Value::undefined("the sequence is empty") : items.back();
    if (name == "join") {
      const Value* sep = args.get(0, "d");
      const Value* attribute = args.get(1, "attribute");
      std::string out;
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += sep ? to_str(*sep, offset) : "";
        out += to_str(attribute ? get_attr(items[k], to_str(*attribute, offset), offset) : items[k],
                      offset);
        if (out.size() > kMaxOutputBytes) return checked_str(std::move(out), offset);
      }
      return Value::str(out);
    }
    // select / reject / selectattr / rejectattr
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool keep_matching = name == "select" || name == "selectattr";
    size_t next = 0;
    std::string attribute;
    if (by_attr) {
      if (args.positional.empty() || args.positional[0].t != VT::Str)
        throw TemplateError{offset, fmt::format("'{}' needs an attribute name", name)};
      attribute = args.positional[0].s;
      next = 1;
    }
    std::string test;
    Args test_args;
    if (args.positional.size() > next) {
      if (args.positional[next].t != VT::Str)
        throw TemplateError{offset, fmt::format("'{}' needs a test name", name)};
      test = args.positional[next].s;
      if (!supported_tests().count(test))
        throw TemplateError{offset, fmt::format("the test '{}' is not supported (supported: {})",
                                                test, joined(supported_tests()))};
      test_args.positional.assign(args.positional.begin() + static_cast<long>(next) + 1,
                                  args.positional.end());
    }
    List out;
    for (const Value& item : items) {
      const Value subject = by_attr ? get_attr(item, attribute, offset) : item;
      const bool match =
          test.empty() ? truthy(subject) : apply_test(test, subject, test_args, offset);
      if (match == keep_matching) out.push_back(item);
    }
    return Value::make_list(std::move(out));
  }

  static Value replace(const std::string& s, const std::string& from, const std::string& to,
                       const Value* count, size_t offset) {
    int64_t left = count && count->is_number() ? count->number() : -1;
    std::string out;
    if (from.empty()) {
      // Python inserts `to` around every code point.
      const auto cps = code_points(s);
      for (size_t k = 0; k <= cps.size(); ++k) {
        if (left != 0) {
          out += to;
          if (left > 0) --left;
        }
        if (k < cps.size()) {
          const size_t end = k + 1 < cps.size() ? cps[k + 1].first : s.size();
          out += s.substr(cps[k].first, end - cps[k].first);
        }
        if (out.size() > kMaxOutputBytes) return checked_str(std::move(out), offset);
      }
      return Value::str(out);
    }
    size_t pos = 0;
    while (left != 0) {
      const size_t hit = s.find(from, pos);
      if (hit == std::string::npos) break;
      out += s.substr(pos, hit - pos) + to;
      pos = hit + from.size();
      if (left > 0) --left;
      if (out.size() > kMaxOutputBytes) return checked_str(std::move(out), offset);
    }
    out += s.substr(pos);
    return checked_str(std::move(out), offset);
  }

  Value call(const Expr& e) {
    const auto first = static_cast<size_t>(e.literal.i);
    if (e.name == "raise_exception") {
      Args a = eval_args(e, first);
      const Value* msg = a.get(0, "message");
      throw TemplateError{e.offset, "raise_exception: " + (msg ? to_str(*msg, e.offset) : "")};
    }
    if (e.name == "namespace") {
      Args a = eval_args(e, first);
      Dict attrs;
      for (const Value& p : a.positional) {
        if (p.t != VT::Dict)
          throw TemplateError{e.offset, "namespace() takes a dict or name=value"};
        for (const auto& [k, v] : *p.dict) set_attr(attrs, k, v);
      }
      for (auto& [k, v] : a.named) set_attr(attrs, k, v);
      return Value::make_dict(std::move(attrs), VT::Namespace);
    }
    // Methods: kids[0] is the object.
    const std::string method = e.name.substr(1);
    const Value obj = eval(*e.kids[0]);
    Args a = eval_args(e, first);
    require_defined(obj, e.offset);
    if (obj.t == VT::Str) {
      const std::string& s = obj.s;
      if (method == "strip" || method == "lstrip" || method == "rstrip") {
        const Value* chars = a.get(0, "chars");
        const std::string* set = chars && chars->t == VT::Str ? &chars->s : nullptr;
        return Value::str(py_strip(s, method != "rstrip", method != "lstrip", set));
      }
      if (method == "upper") return Value::str(ascii_upper(s));
      if (method == "lower") return Value::str(ascii_lower(s));
      if (method == "startswith" || method == "endswith") {
        const std::string& x = want_str(a.get(0, "prefix"), method.c_str(), e.offset);
        if (x.size() > s.size()) return Value::boolean(false);
        return Value::boolean(method == "startswith"
                                  ? s.compare(0, x.size(), x) == 0
                                  : s.compare(s.size() - x.size(), x.size(), x) == 0);
      }
      if (method == "replace")
        return replace(s, want_str(a.get(0, "old"), "replace's old", e.offset),
                       want_str(a.get(1, "new"), "replace's new", e.offset), a.get(2, "count"),
                       e.offset);
      if (method == "split") {
        const Value* sep = a.get(0, "sep");
        List parts;
        if (!sep || sep->t == VT::None) {
          const auto cps = code_points(s);
          size_t k = 0;
          while (k < cps.size()) {
            while (k < cps.size() && is_space(cps[k].second)) ++k;
            if (k == cps.size()) break;
            const size_t b = k;
            while (k < cps.size() && !is_space(cps[k].second)) ++k;
            const size_t from = cps[b].first, to = k < cps.size() ? cps[k].first : s.size();
            parts.push_back(Value::str(s.substr(from, to - from)));
          }
        } else {
          const std::string& d = want_str(sep, "split's separator", e.offset);
          if (d.empty()) throw TemplateError{e.offset, "empty separator"};
          size_t pos = 0;
          while (true) {
            const size_t hit = s.find(d, pos);
            if (hit == std::string::npos) break;
            parts.push_back(Value::str(s.substr(pos, hit - pos)));
            pos = hit + d.size();
          }
          parts.push_back(Value::str(s.substr(pos)));
        }
        return Value::make_list(std::move(parts));
      }
    }
    if (obj.t == VT::Dict) {
      if (method == "get") {
        const Value* key = a.get(0, "key");
        const Value* dflt = a.get(1, "default");
        if (key && key->t == VT::Str)
          if (const Value* v = obj.find(key->s)) return *v;
        return dflt ? *dflt : Value::none();
      }
      if (method == "items") return apply_filter("items", obj, Args{}, e.offset);
      if (method == "keys") return Value::make_list(iterate(obj, e.offset));
      if (method == "values") {
        List vals;
        for (const auto& [k, v] : *obj.dict) vals.push_back(v);
        return Value::make_list(std::move(vals));
      }
    }
    throw TemplateError{e.offset, fmt::format("a {} has no method '{}'", type_name(obj), method)};
  }

  Value eval(const Expr& e) {
    step(e.offset);
    switch (e.kind) {
      case EK::Literal:
        return e.literal;
      case EK::Name:
        return lookup(e.name);
      case EK::Attr: {
        const Value obj = eval(*e.kids[0]);
        return get_attr(obj, e.name, e.offset);
      }
      case EK::Item: {
        const Value obj = eval(*e.kids[0]);
        return get_item(obj, eval(*e.kids[1]), e.offset);
      }
      case EK::Slice:
        return slice(eval(*e.kids[0]), e);
      case EK::Call:
        return call(e);
      case EK::Filter: {
        const Value v = eval(*e.kids[0]);
        return apply_filter(e.name, v, eval_args(e, 1), e.offset);
      }
      case EK::Test: {
        const Value v = eval(*e.kids[0]);
        return Value::boolean(apply_test(e.name, v, eval_args(e, 1), e.offset) != e.negated);
      }
      case EK::Not:
        return Value::boolean(!truthy(eval(*e.kids[0])));
      case EK::Neg: {
        const Value v = eval(*e.kids[0]);
        require_defined(v, e.offset);
        if (!v.is_number()) throw TemplateError{e.offset, "unary '-' needs a number"};
        return Value::integer(-v.number());
      }
      case EK::Binary:
        return binary(e.name, eval(*e.kids[0]), eval(*e.kids[1]), e.offset);
      case EK::Compare: {
        Value left = eval(*e.kids[0]);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.kids[k + 1]);
          if (!compare(e.ops[k], left, right, e.offset)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case EK::And: {
        Value a = eval(*e.kids[0]);
        return truthy(a) ? eval(*e.kids[1]) : a;
      }
      case EK::Or: {
        Value a = eval(*e.kids[0]);
        return truthy(a) ? a : eval(*e.kids[1]);
      }
      case EK::Cond:
        if (truthy(eval(*e.kids[0]))) return eval(*e.kids[1]);
        return e.kids[2] ? eval(*e.kids[2]) : Value::undefined();
      case EK::ListLit: {
        List l;
        for (const auto& k : e.kids) l.push_back(eval(*k));
        return Value::make_list(std::move(l));
      }
      case EK::DictLit: {
        Dict d;
        for (size_t k = 0; k + 1 < e.kids.size(); k += 2) {
          Value key = eval(*e.kids[k]);
          if (key.t != VT::Str) throw TemplateError{e.kids[k]->offset, "dict keys must be strings"};
          set_attr(d, key.s, eval(*e.kids[k + 1]));
        }
        return Value::make_dict(std::move(d));
      }
    }
    return Value::undefined();
  }

  std::string& out_;
  std::vector<std::map<std::string, Value>> scopes_{1};
  int64_t steps_ = 0;
};

std::string where(const std::string& source, const std::string& origin, size_t offset) {
  offset = std::min(offset, source.size());
  int line = 1;
  size_t line_start = 0;
  for (size_t k = 0; k < offset; ++k)
    if (source[k] == '\n') {
      ++line;
      line_start = k + 1;
    }
  const size_t col = code_point_count(source.substr(line_start, offset - line_start)) + 1;
  return fmt::format("chat template{}{} line {}:{}", origin.empty() ? "" : " ", origin, line, col);
}

}  // namespace chat_template_detail

using namespace chat_template_detail;

ChatTemplate::ChatTemplate(std::string source, std::string origin)
    : origin_(std::move(origin)), program_(std::make_unique<Program>()) {
  // Jinja's view of the text: \r\n and \r are newlines, and one trailing newline is dropped.
  std::string text;
  text.reserve(source.size());
  for (size_t k = 0; k < source.size(); ++k) {
    if (source[k] == '\r') {
      text += '\n';
      if (k + 1 < source.size() && source[k + 1] == '\n') ++k;
    } else {
      text += source[k];
    }
  }
  if (!text.empty() && text.back() == '\n') text.pop_back();
  program_->source = std::move(text);
  try {
    Lexer lexer(program_->source);
    Parser parser(lexer.run());
    program_->body = parser.parse_template();
  } catch (const TemplateError& e) {
    throw DataError(fmt::format("{}: {}", where(program_->source, origin_, e.offset), e.message));
  }
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages,
                                 const ChatTemplateOptions& options) const {
  std::string out;
  Renderer r(out);
  List list;
  for (const ChatMessage& m : messages)
    list.push_back(
        Value::make_dict({{"role", Value::str(m.role)}, {"content", Value::str(m.content)}}));
  r.set_global("messages", Value::make_list(std::move(list)));
  r.set_global("tools", Value::none());
  r.set_global("documents", Value::none());
  r.set_global("add_generation_prompt", Value::boolean(options.add_generation_prompt));
  r.set_global("bos_token", Value::str(options.bos_token));
  r.set_global("eos_token", Value::str(options.eos_token));
  for (const auto& [name, value] : options.extra_variables) r.set_global(name, Value::str(value));
  r.set_global("raise_exception", Value::function("raise_exception"));
  r.set_global("namespace", Value::function("namespace"));
  try {
    r.exec(program_->body);
  } catch (const TemplateError& e) {
    throw DataError(fmt::format("{}: {}", where(program_->source, origin_, e.offset), e.message));
  }
  return out;
}

ChatTemplateSource load_chat_template(const std::string& tokenizer_config_or_dir) {
  namespace fs = std::filesystem;
  fs::path path = tokenizer_config_or_dir;
  std::error_code ec;
  if (fs::is_directory(path, ec)) path /= "tokenizer_config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(fmt::format("cannot read {}", path.string()));
  std::stringstream buffer;
  buffer << in.rdbuf();
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(buffer.str());
  } catch (const nlohmann::json::exception& e) {
    throw DataError(fmt::format("{} is not valid JSON: {}", path.string(), e.what()));
  }
  if (!config.is_object()) throw DataError(fmt::format("{} is not a JSON object", path.string()));
  ChatTemplateSource out;
  out.origin = path.string();
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null())
    throw DataError(fmt::format("{} has no chat_template", path.string()));
  if (it->is_string()) {
    out.source = it->get<std::string>();
  } else if (it->is_array()) {
    std::vector<std::string> names;
    for (const auto& entry : *it) {
      if (!entry.is_object() || !entry.contains("name") || !entry.contains("template") ||
          !entry["name"].is_string() || !entry["template"].is_string())
        throw DataError(fmt::format("{}: chat_template entries must be {{\"name\", \"template\"}}",
                                    path.string()));
      names.push_back(entry["name"].get<std::string>());
      if (names.back() == "default") out.source = entry["template"].get<std::string>();
    }
    if (out.source.empty() && std::find(names.begin(), names.end(), "default") == names.end()) {
      std::string list;
      for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
      throw DataError(fmt::format("{} has no chat_template named \"default\" (it has: {})",
                                  path.string(), list));
    }
  } else {
    throw DataError(fmt::format("{}: chat_template must be a string or a list", path.string()));
  }
  auto token = [&](const char* key) -> std::string {
    const auto t = config.find(key);
    if (t == config.end() || t->is_null()) return "";
    if (t->is_string()) return t->get<std::string>();
    if (t->is_object() && t->contains("content") && (*t)["content"].is_string())
      return (*t)["content"].get<std::string>();
    throw DataError(
        fmt::format("{}: {} must be a string or an object with \"content\"", path.string(), key));
  };
  out.bos_token = token("bos_token");
  out.eos_token = token("eos_token");
  return out;
}

std::vector<ChatMessage> parse_chat_messages(const std::string& json_text,
                                             const std::string& origin) {
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    throw DataError(fmt::format("{} is not valid JSON: {}", origin, e.what()));
  }
  if (doc.is_object()) {
    const auto it = doc.find("messages");
    if (it == doc.end())
      throw DataError(fmt::format("{}: the object has no \"messages\" list", origin));
    doc = *it;
  }
  if (!doc.is_array())
    throw DataError(
        fmt::format("{}: the messages must be a JSON list of {{\"role\", \"content\"}}", origin));
  std::vector<ChatMessage> out;
  for (size_t k = 0; k < doc.size(); ++k) {
    const auto& m = doc[k];
    if (!m.is_object() || !m.contains("role") || !m.contains("content") || !m["role"].is_string() ||
        !m["content"].is_string())
      throw DataError(fmt::format(
          "{}: message {} must be an object with string \"role\" and \"content\"", origin, k));
    out.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  }
  return out;
}

}  // namespace strata
