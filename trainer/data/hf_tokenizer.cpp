// tokenizer.json: the pipeline of the `tokenizers` library, step by step, on plain strings.
// Offsets are not tracked: ids and decoded text need only whether a piece starts the input
// (Metaspace's prepend_scheme "first").
#define PCRE2_CODE_UNIT_WIDTH 8
#include "trainer/data/hf_tokenizer.h"

#include <fmt/format.h>
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "checkpoint/json_file.h"
#include "trainer/data/utf8.h"
#include "trainer/errors.h"

namespace strata {
namespace {

using json = nlohmann::json;

// --- UTF-8 -------------------------------------------------------------------------------------

// Length of the valid UTF-8 sequence at s[i], or 0 with *invalid = bytes of the maximal
// invalid subpart (the unit one U+FFFD replaces, as Rust's from_utf8_lossy and Python's
// errors="replace" do).
size_t utf8_sequence(std::string_view s, size_t i, size_t* invalid) {
  const auto b = static_cast<uint8_t>(s[i]);
  if (b < 0x80) return 1;
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    need = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    need = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    need = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else {
    *invalid = 1;
    return 0;
  }
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) {
      *invalid = k;
      return 0;
    }
    const auto c = static_cast<uint8_t>(s[i + k]);
    const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (c < l || c > h) {
      *invalid = k;
      return 0;
    }
  }
  return need;
}

const char* const kReplacementChar = "\xEF\xBF\xBD";

std::string utf8_lossy(std::string_view s) {
  size_t i = 0;
  // Fast path: ASCII and valid text are returned as they are.
  for (size_t invalid = 0; i < s.size();) {
    const size_t n = utf8_sequence(s, i, &invalid);
    if (n == 0) break;
    i += n;
  }
  if (i == s.size()) return std::string(s);
  std::string out(s.substr(0, i));
  while (i < s.size()) {
    size_t invalid = 0;
    const size_t n = utf8_sequence(s, i, &invalid);
    if (n) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      out += kReplacementChar;
      i += invalid;
    }
  }
  return out;
}

size_t utf8_char_len(std::string_view s, size_t i) {  // s is valid UTF-8
  const auto b = static_cast<uint8_t>(s[i]);
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

uint32_t utf8_decode(std::string_view s, size_t i, size_t* len) {
  const auto b = static_cast<uint8_t>(s[i]);
  *len = utf8_char_len(s, i);
  if (*len == 1) return b;
  uint32_t cp = b & (*len == 2 ? 0x1F : *len == 3 ? 0x0F : 0x07);
  for (size_t k = 1; k < *len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3F);
  return cp;
}

std::string utf8_encode(uint32_t cp) {
  std::string out;
  append_utf8(out, cp);
  return out;
}

// Rust's char::is_whitespace (the White_Space property).
bool is_whitespace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// GPT-2's byte-level alphabet: each byte as a printable character.
struct ByteAlphabet {
  std::array<std::string, 256> chars;
  std::unordered_map<uint32_t, uint8_t> bytes;
  ByteAlphabet() {
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      const uint32_t cp = printable ? b : 256 + extra++;
      chars[b] = utf8_encode(cp);
      bytes[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// --- Regular expressions (PCRE2, JIT-compiled) ------------------------------------------------

struct JitStack {
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* context = nullptr;
  JitStack() {
    stack = pcre2_jit_stack_create(32 << 10, 8 << 20, nullptr);
    context = pcre2_match_context_create(nullptr);
    if (stack && context) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~JitStack() {
    if (context) pcre2_match_context_free(context);
    if (stack) pcre2_jit_stack_free(stack);
  }
};

class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    const uint32_t options = literal ? PCRE2_LITERAL | PCRE2_UTF : PCRE2_UTF | PCRE2_UCP;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                          &error, &offset, nullptr);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      throw DataError(fmt::format("{} cannot be compiled at offset {}: {}", where, offset,
                                  reinterpret_cast<const char*>(message)));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls on_match(start, end) for every non-overlapping match of `s` (valid UTF-8), left to
  // right; after an empty match the search goes on one character further.
  template <typename F>
  void for_each_match(std::string_view s, F&& on_match) const {
    thread_local JitStack jit_stack;
    pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
    const auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t start = 0;
    while (start <= s.size()) {
      int rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, data,
                           jit_ ? jit_stack.context : nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, data,
                         nullptr);
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(data);
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        throw DataError(fmt::format("tokenizer pattern failed on a text: {}",
                                    reinterpret_cast<const char*>(message)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data);
      const size_t b = ov[0], e = ov[1];
      on_match(b, e);
      if (e > b) {
        start = e;
      } else {
        if (e >= s.size()) break;
        start = e + utf8_char_len(s, e);
      }
    }
    pcre2_match_data_free(data);
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// --- Pieces of the pipeline ---------------------------------------------------------------------

struct Piece {
  std::string text;
  bool at_origin;  // starts at offset 0 of the input
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// `tokenizers`' SplitDelimiterBehavior on (range, is_match) segments covering a string.
using Segment = std::pair<std::pair<size_t, size_t>, bool>;
std::vector<std::pair<size_t, size_t>> apply_behavior(const std::vector<Segment>& segments,
                                                      Behavior behavior) {
  std::vector<std::pair<size_t, size_t>> out;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kRemoved:
      for (const auto& [range, is_match] : segments)
        if (!is_match) out.push_back(range);
      break;
    case Behavior::kIsolated:
      for (const auto& [range, is_match] : segments) out.push_back(range);
      break;
    case Behavior::kMergedWithPrevious:
      for (const auto& [range, is_match] : segments) {
        if (is_match && !previous_match && !out.empty()) {
          out.back().second = range.second;
        } else {
          out.push_back(range);
        }
        previous_match = is_match;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        const auto& [range, is_match] = *it;
        if (is_match && !previous_match && !out.empty()) {
          out.back().first = range.first;
        } else {
          out.push_back(range);
        }
        previous_match = is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    case Behavior::kContiguous:
      for (const auto& [range, is_match] : segments) {
        if (is_match == previous_match && !out.empty()) {
          out.back().second = range.second;
        } else {
          out.push_back(range);
        }
        previous_match = is_match;
      }
      break;
  }
  return out;
}

// Splits every piece of `pieces` at the matches `find` reports; empty pieces are dropped.
template <typename Find>
void split_pieces(std::vector<Piece>& pieces, Behavior behavior, bool invert, Find&& find) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  std::vector<Segment> segments;
  for (Piece& piece : pieces) {
    const std::string& s = piece.text;
    segments.clear();
    if (s.empty()) continue;
    size_t prev = 0;
    find(s, [&](size_t b, size_t e) {
      if (prev != b) segments.push_back({{prev, b}, invert});
      segments.push_back({{b, e}, !invert});
      prev = e;
    });
    if (prev != s.size()) segments.push_back({{prev, s.size()}, invert});
    for (const auto& [b, e] : apply_behavior(segments, behavior)) {
      if (e > b) out.push_back({s.substr(b, e - b), piece.at_origin && b == 0});
    }
  }
  pieces = std::move(out);
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out += to;
  }
  if (pos == 0) return;
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

// Unicode normalisation (NFC, NFD, NFKC, NFKD) by ICU, through UTF-16. ASCII text is in every
// form already.
void unicode_normalize(std::string& s, const UNormalizer2* form) {
  if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<uint8_t>(c) < 0x80; }))
    return;
  UErrorCode error = U_ZERO_ERROR;
  int32_t length = 0;
  u_strFromUTF8(nullptr, 0, &length, s.data(), static_cast<int32_t>(s.size()), &error);
  std::u16string wide(static_cast<size_t>(length), u'\0');
  error = U_ZERO_ERROR;
  u_strFromUTF8(wide.data(), length, &length, s.data(), static_cast<int32_t>(s.size()), &error);
  if (U_FAILURE(error)) throw DataError("cannot normalise a text: it is not UTF-8");
  if (unorm2_isNormalized(form, wide.data(), length, &error) && U_SUCCESS(error)) return;
  error = U_ZERO_ERROR;
  const int32_t needed = unorm2_normalize(form, wide.data(), length, nullptr, 0, &error);
  std::u16string out(static_cast<size_t>(needed), u'\0');
  error = U_ZERO_ERROR;
  unorm2_normalize(form, wide.data(), length, out.data(), needed, &error);
  if (U_FAILURE(error)) throw DataError("cannot normalise a text");
  int32_t bytes = 0;
  error = U_ZERO_ERROR;
  u_strToUTF8(nullptr, 0, &bytes, out.data(), needed, &error);
  std::string result(static_cast<size_t>(bytes), '\0');
  error = U_ZERO_ERROR;
  u_strToUTF8(result.data(), bytes, &bytes, out.data(), needed, &error);
  if (U_FAILURE(error)) throw DataError("cannot normalise a text");
  s = std::move(result);
}

struct Normalizer {
  enum Kind { kPrepend, kReplace, kUnicode } kind;
  std::string a, b;                    // Prepend: a; Replace: a -> b
  const UNormalizer2* form = nullptr;  // kUnicode
  void apply(std::string& s) const {
    if (kind == kPrepend) {
      if (!s.empty()) s.insert(0, a);
    } else if (kind == kReplace) {
      replace_all(s, a, b);
    } else {
      unicode_normalize(s, form);
    }
  }
};

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct PreTokenizer {
  enum Kind { kByteLevel, kSplit, kMetaspace, kDigits } kind;
  bool add_prefix_space = false, use_regex = true;  // ByteLevel
  std::shared_ptr<Regex> regex;                     // ByteLevel (use_regex), Split, Digits
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  std::string replacement;  // Metaspace
  enum Prepend { kFirst, kAlways, kNever } prepend = kAlways;
  bool split = true;

  void apply(std::vector<Piece>& pieces) const {
    auto regex_find = [&](const std::string& s, auto&& emit) { regex->for_each_match(s, emit); };
    switch (kind) {
      case kByteLevel: {
        if (add_prefix_space) {
          for (Piece& p : pieces)
            if (!p.text.empty() && p.text[0] != ' ') p.text = ' ' + p.text;
        }
        if (use_regex) split_pieces(pieces, Behavior::kIsolated, false, regex_find);
        const ByteAlphabet& alphabet = byte_alphabet();
        for (Piece& p : pieces) {
          std::string mapped;
          mapped.reserve(p.text.size() * 2);
          for (char c : p.text) mapped += alphabet.chars[static_cast<uint8_t>(c)];
          p.text = std::move(mapped);
        }
        break;
      }
      case kSplit:
      case kDigits:
        split_pieces(pieces, behavior, invert, regex_find);
        break;
      case kMetaspace: {
        for (Piece& p : pieces) {
          if (p.text.empty()) continue;
          replace_all(p.text, " ", replacement);
          const bool starts = p.text.compare(0, replacement.size(), replacement) == 0;
          if (!starts && (prepend == kAlways || (prepend == kFirst && p.at_origin)))
            p.text.insert(0, replacement);
        }
        if (split) {
          split_pieces(pieces, Behavior::kMergedWithNext, false,
                       [&](const std::string& s, auto&& emit) {
                         for (size_t pos = 0; (pos = s.find(replacement, pos)) != std::string::npos;
                              pos += replacement.size())
                           emit(pos, pos + replacement.size());
                       });
        }
        break;
      }
    }
  }
};

struct Decoder {
  enum Kind { kByteLevel, kMetaspace, kByteFallback, kFuse, kStrip, kReplace } kind;
  std::string a, b;  // Metaspace: replacement; Strip: content; Replace: a -> b
  bool prepend = true;
  int64_t start = 0, stop = 0;

  void apply(std::vector<std::string>& tokens) const {
    switch (kind) {
      case kByteLevel: {
        const ByteAlphabet& alphabet = byte_alphabet();
        std::string bytes;
        for (const std::string& t : tokens) {
          const size_t mark = bytes.size();
          bool ok = true;
          for (size_t i = 0, len = 0; i < t.size(); i += len) {
            const uint32_t cp = utf8_decode(t, i, &len);
            const auto it = alphabet.bytes.find(cp);
            if (it == alphabet.bytes.end()) {
              ok = false;
              break;
            }
            bytes += static_cast<char>(it->second);
          }
          if (!ok) {
            bytes.resize(mark);
            bytes += t;
          }
        }
        tokens.assign(1, utf8_lossy(bytes));
        break;
      }
      case kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          replace_all(tokens[i], a, i == 0 && prepend ? "" : " ");
        }
        break;
      case kByteFallback: {
        std::vector<std::string> out;
        std::string bytes;
        size_t count = 0;
        auto flush = [&] {
          if (!count) return;
          size_t invalid = 0, i = 0;
          while (i < bytes.size()) {
            const size_t n = utf8_sequence(bytes, i, &invalid);
            if (!n) break;
            i += n;
          }
          if (i == bytes.size()) {
            out.push_back(bytes);
          } else {
            std::string repl;
            for (size_t k = 0; k < count; ++k) repl += kReplacementChar;
            out.push_back(repl);
          }
          bytes.clear();
          count = 0;
        };
        for (std::string& t : tokens) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::isxdigit(static_cast<uint8_t>(t[3])) &&
              std::isxdigit(static_cast<uint8_t>(t[4]))) {
            bytes += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
            ++count;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        tokens = std::move(out);
        break;
      }
      case kFuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        tokens.assign(1, all);
        break;
      }
      case kStrip:
        for (std::string& t : tokens) {
          // Up to `start` leading and `stop` trailing characters equal to the content.
          size_t begin = 0, end = t.size();
          for (int64_t k = 0;
               k < start && begin < end && t.compare(begin, a.size(), a) == 0 && !a.empty(); ++k)
            begin += a.size();
          for (int64_t k = 0; k < stop && end >= begin + a.size() && !a.empty() &&
                              t.compare(end - a.size(), a.size(), a) == 0;
               ++k)
            end -= a.size();
          t = t.substr(begin, end - begin);
        }
        break;
      case kReplace:
        for (std::string& t : tokens) replace_all(t, a, b);
        break;
    }
  }
};

struct AddedToken {
  std::string content;  // matched against the input (normalised for a normalized token)
  std::string raw;      // as written in the file
  uint32_t id;
  bool special, lstrip, rstrip, normalized;
};

// Leftmost-longest matching of a set of added tokens.
class AddedMatcher {
 public:
  void add(const AddedToken* token) {
    if (token->content.empty()) return;
    auto& bucket = buckets_[static_cast<uint8_t>(token->content[0])];
    bucket.push_back(token);
    std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken* a, const AddedToken* b) {
      return a->content.size() > b->content.size();
    });
    any_ = true;
  }
  bool empty() const { return !any_; }

  // Calls piece(start, end) for the text between tokens and token(t) for each token.
  template <typename OnText, typename OnToken>
  void split(std::string_view s, OnText&& on_text, OnToken&& on_token) const {
    size_t offset = 0;  // start of the pending text
    size_t i = 0;
    while (i < s.size()) {
      const auto& bucket = buckets_[static_cast<uint8_t>(s[i])];
      const AddedToken* hit = nullptr;
      for (const AddedToken* t : bucket) {
        if (s.compare(i, t->content.size(), t->content) == 0) {
          hit = t;
          break;
        }
      }
      if (!hit) {
        ++i;
        continue;
      }
      size_t start = i, stop = i + hit->content.size();
      if (hit->lstrip) {
        size_t j = start;
        while (j > offset) {
          size_t k = j - 1;
          while (k > 0 && (static_cast<uint8_t>(s[k]) & 0xC0) == 0x80) --k;
          size_t len = 0;
          if (!is_whitespace(utf8_decode(s, k, &len))) break;
          j = k;
        }
        start = j;
      }
      if (hit->rstrip) {
        size_t len = 0;
        while (stop < s.size() && is_whitespace(utf8_decode(s, stop, &len))) stop += len;
      }
      if (offset < start) on_text(offset, start);
      on_token(*hit);
      offset = stop;
      i = stop;
    }
    if (offset < s.size()) on_text(offset, s.size());
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> buckets_;
  bool any_ = false;
};

// --- JSON reading -----------------------------------------------------------------------------

struct Reader {
  std::string file;

  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw DataError(fmt::format("{}: {} {}", file, path, what));
  }
  [[noreturn]] void unsupported(const std::string& path, const std::string& what) const {
    throw DataError(
        fmt::format("{}: {} is not supported", file, path.empty() ? what : path + " " + what));
  }
  const json& get(const json& obj, const std::string& key, const std::string& path) const {
    if (!obj.is_object()) fail(path, "must be an object");
    const auto it = obj.find(key);
    if (it == obj.end()) fail(path + "." + key, "is missing");
    return *it;
  }
  const json* find(const json& obj, const std::string& key) const {
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  std::string str(const json& v, const std::string& path) const {
    if (!v.is_string()) fail(path, "must be a string");
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const std::string& key, const std::string& path, bool dflt) const {
    const json* v = find(obj, key);
    if (!v) return dflt;
    if (!v->is_boolean()) fail(path + "." + key, "must be true or false");
    return v->get<bool>();
  }
  std::string type(const json& obj, const std::string& path) const {
    if (!obj.is_object()) fail(path, "must be an object");
    return str(get(obj, "type", path), path + ".type");
  }
  [[noreturn]] void unsupported_type(const std::string& path, const std::string& type,
                                     const std::string& supported) const {
    throw DataError(fmt::format("{}: {}.type '{}' is not supported (supported: {})", file, path,
                                type, supported));
  }
  [[noreturn]] void unsupported_option(const std::string& path, const json& value,
                                       const std::string& supported) const {
    throw DataError(
        fmt::format("{}: {} {} is not supported ({})", file, path, value.dump(), supported));
  }
};

}  // namespace

// --- The tokenizer ------------------------------------------------------------------------------

struct HfTokenizer::Impl {
  std::string path;
  // Model
  std::unordered_map<std::string, uint32_t> vocab;
  std::vector<std::string> id_to_model_token;
  std::vector<bool> has_model_token;
  struct MergeTarget {
    uint32_t rank, id;
  };
  std::unordered_map<uint64_t, MergeTarget> merges;
  bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
  std::optional<uint32_t> unk;
  std::array<std::optional<uint32_t>, 256> byte_ids;
  // Pipeline
  std::vector<AddedToken> added;
  AddedMatcher raw_matcher, normalized_matcher;
  std::unordered_map<uint32_t, const AddedToken*> added_by_id;
  std::unordered_map<std::string, uint32_t> added_by_content;
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  std::vector<uint32_t> template_prefix, template_suffix;
  std::vector<std::string> template_tokens;
  std::vector<Decoder> decoders;
  bool has_decoder = false;
  int64_t vocab_size = 0;
  // Word cache, in shards (encode runs on several threads).
  static constexpr size_t kShards = 16, kShardCapacity = 4096, kMaxCachedWord = 256;
  struct CacheShard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<uint32_t>> map;
  };
  mutable std::array<CacheShard, kShards> cache;

  void load(const json& root);
  void load_model(const Reader& r, const json& model);
  void load_added(const Reader& r, const json& tokens);
  void load_normalizer(const Reader& r, const json& n, const std::string& path);
  void load_pre_tokenizer(const Reader& r, const json& p, const std::string& path);
  void load_post_processor(const Reader& r, const json& p, const std::string& path);
  void load_decoder(const Reader& r, const json& d, const std::string& path);

  void bpe(const std::string& word, std::vector<uint32_t>& out) const;
  void merge_word(const std::string& word, std::vector<uint32_t>& out) const;
  void encode_text(const std::string& text, bool at_origin, std::vector<uint32_t>& out) const;
};

void HfTokenizer::Impl::load(const json& root) {
  const Reader r{path};
  if (!root.is_object()) r.fail("the document", "must be a JSON object");
  for (const char* key : {"truncation", "padding"}) {
    if (const json* v = r.find(root, key))
      r.unsupported_option(key, *v, "only null: Strata encodes whole texts");
  }
  load_model(r, r.get(root, "model", ""));
  if (const json* tokens = r.find(root, "added_tokens")) load_added(r, *tokens);
  if (const json* n = r.find(root, "normalizer")) load_normalizer(r, *n, "normalizer");
  if (const json* p = r.find(root, "pre_tokenizer")) load_pre_tokenizer(r, *p, "pre_tokenizer");
  if (const json* p = r.find(root, "post_processor")) load_post_processor(r, *p, "post_processor");
  if (const json* d = r.find(root, "decoder")) {
    has_decoder = true;
    load_decoder(r, *d, "decoder");
  }
  // Normalized added tokens are matched in the normalised text.
  for (AddedToken& t : added) {
    if (t.normalized) {
      for (const Normalizer& n : normalizers) n.apply(t.content);
    }
  }
  // Ids far beyond the vocabulary would make every per-id table of the trainer huge.
  const uint64_t id_limit = 64ull * (id_to_model_token.size() + added.size()) + (1u << 20);
  for (size_t i = 0; i < added.size(); ++i) {
    if (added[i].id >= id_limit) {
      r.fail(fmt::format("added_tokens[{}].id", i),
             fmt::format("{} is far beyond the vocabulary's {} tokens", added[i].id,
                         id_to_model_token.size()));
    }
  }
  for (const AddedToken& t : added) {
    (t.normalized ? normalized_matcher : raw_matcher).add(&t);
    added_by_id[t.id] = &t;
    added_by_content.emplace(t.raw, t.id);
    vocab_size = std::max<int64_t>(vocab_size, static_cast<int64_t>(t.id) + 1);
  }
  vocab_size = std::max<int64_t>(vocab_size, static_cast<int64_t>(id_to_model_token.size()));
  for (const std::vector<uint32_t>* ids : {&template_prefix, &template_suffix}) {
    for (uint32_t id : *ids) {
      const bool known =
          added_by_id.count(id) || (id < has_model_token.size() && has_model_token[id]);
      if (!known)
        r.fail("post_processor",
               fmt::format("adds id {}, which is no token of the vocabulary", id));
    }
  }
}

void HfTokenizer::Impl::load_model(const Reader& r, const json& model) {
  const std::string type = r.find(model, "type") ? r.type(model, "model") : "BPE";
  if (type != "BPE") r.unsupported_type("model", type, "BPE");
  if (const json* v = r.find(model, "dropout"))
    r.unsupported_option("model.dropout", *v, "only null");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (const json* v = r.find(model, key)) {
      if (!v->is_string() || !v->get<std::string>().empty())
        r.unsupported_option(std::string("model.") + key, *v, "only null or \"\"");
    }
  }
  ignore_merges = r.boolean(model, "ignore_merges", "model", false);
  byte_fallback = r.boolean(model, "byte_fallback", "model", false);
  fuse_unk = r.boolean(model, "fuse_unk", "model", false);
  const json& v = r.get(model, "vocab", "model");
  if (!v.is_object()) r.fail("model.vocab", "must be an object of token: id");
  vocab.reserve(v.size());
  for (const auto& [token, id] : v.items()) {
    if (!id.is_number_unsigned() || id.get<uint64_t>() >= (1u << 31))
      r.fail(fmt::format("model.vocab[{}]", json(token).dump()), "must be an id in [0, 2^31)");
    const auto i = id.get<uint32_t>();
    vocab[token] = i;
    if (i >= id_to_model_token.size()) {
      if (i > 64u * v.size() + (1u << 20)) {
        r.fail(fmt::format("model.vocab[{}]", json(token).dump()),
               fmt::format("id {} is far beyond the vocabulary's {} tokens", i, v.size()));
      }
      id_to_model_token.resize(i + 1);
      has_model_token.resize(i + 1);
    }
    id_to_model_token[i] = token;
    has_model_token[i] = true;
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = vocab.find(fmt::format("<0x{:02X}>", b));
    if (it != vocab.end()) byte_ids[b] = it->second;
  }
  if (const json* u = r.find(model, "unk_token")) {
    const std::string name = r.str(*u, "model.unk_token");
    const auto it = vocab.find(name);
    if (it == vocab.end())
      r.fail("model.unk_token", fmt::format("'{}' is not in the vocabulary", name));
    unk = it->second;
  }
  const json* m = r.find(model, "merges");
  if (!m) return;
  if (!m->is_array()) r.fail("model.merges", "must be an array");
  merges.reserve(m->size());
  uint32_t rank = 0;
  for (const json& merge : *m) {
    const std::string where = fmt::format("model.merges[{}]", rank);
    std::string a, b;
    if (merge.is_string()) {
      const std::string s = merge.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos) r.fail(where, "must be two tokens separated by a space");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      a = merge[0].get<std::string>();
      b = merge[1].get<std::string>();
    } else {
      r.fail(where, "must be \"a b\" or [\"a\", \"b\"]");
    }
    const auto ia = vocab.find(a), ib = vocab.find(b), ic = vocab.find(a + b);
    for (const auto& [it, name] : {std::pair(ia, a), std::pair(ib, b), std::pair(ic, a + b)}) {
      if (it == vocab.end())
        r.fail(where, fmt::format("names {} which is not in the vocabulary", json(name).dump()));
    }
    merges[(static_cast<uint64_t>(ia->second) << 32) | ib->second] = {rank, ic->second};
    ++rank;
  }
}

void HfTokenizer::Impl::load_added(const Reader& r, const json& tokens) {
  if (!tokens.is_array()) r.fail("added_tokens", "must be an array");
  added.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string path = fmt::format("added_tokens[{}]", i);
    const json& t = tokens[i];
    AddedToken token;
    const json& id = r.get(t, "id", path);
    if (!id.is_number_unsigned() || id.get<uint64_t>() >= (1u << 31))
      r.fail(path + ".id", "must be an id in [0, 2^31)");
    token.id = id.get<uint32_t>();
    token.raw = token.content = r.str(r.get(t, "content", path), path + ".content");
    token.special = r.boolean(t, "special", path, false);
    token.lstrip = r.boolean(t, "lstrip", path, false);
    token.rstrip = r.boolean(t, "rstrip", path, false);
    token.normalized = r.boolean(t, "normalized", path, !token.special);
    if (r.boolean(t, "single_word", path, false))
      r.unsupported_option(path + ".single_word", true, "only false");
    added.push_back(std::move(token));
  }
}

void HfTokenizer::Impl::load_normalizer(const Reader& r, const json& n, const std::string& path) {
  const std::string type = r.type(n, path);
  if (type == "Sequence") {
    const json& list = r.get(n, "normalizers", path);
    if (!list.is_array()) r.fail(path + ".normalizers", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_normalizer(r, list[i], fmt::format("{}.normalizers[{}]", path, i));
  } else if (type == "Prepend") {
    normalizers.push_back(
        {Normalizer::kPrepend, r.str(r.get(n, "prepend", path), path + ".prepend"), ""});
  } else if (type == "Replace") {
    const json& pattern = r.get(n, "pattern", path);
    if (!pattern.is_object() || !pattern.contains("String"))
      r.unsupported_option(path + ".pattern", pattern, "only a String pattern");
    normalizers.push_back({Normalizer::kReplace, r.str(pattern["String"], path + ".pattern.String"),
                           r.str(r.get(n, "content", path), path + ".content")});
  } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    UErrorCode error = U_ZERO_ERROR;
    const UNormalizer2* form = type == "NFC"    ? unorm2_getNFCInstance(&error)
                               : type == "NFD"  ? unorm2_getNFDInstance(&error)
                               : type == "NFKC" ? unorm2_getNFKCInstance(&error)
                                                : unorm2_getNFKDInstance(&error);
    if (U_FAILURE(error) || !form)
      throw DataError(
          fmt::format("{}: {} needs ICU's {} data, which is missing", r.file, path, type));
    normalizers.push_back({Normalizer::kUnicode, "", "", form});
  } else {
    r.unsupported_type(path, type, "NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence");
  }
}

void HfTokenizer::Impl::load_pre_tokenizer(const Reader& r, const json& p,
                                           const std::string& path) {
  const std::string type = r.type(p, path);
  PreTokenizer pre;
  if (type == "Sequence") {
    const json& list = r.get(p, "pretokenizers", path);
    if (!list.is_array()) r.fail(path + ".pretokenizers", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_pre_tokenizer(r, list[i], fmt::format("{}.pretokenizers[{}]", path, i));
    return;
  } else if (type == "ByteLevel") {
    pre.kind = PreTokenizer::kByteLevel;
    pre.add_prefix_space = r.boolean(p, "add_prefix_space", path, true);
    pre.use_regex = r.boolean(p, "use_regex", path, true);
    if (pre.use_regex) pre.regex = std::make_shared<Regex>(kGpt2Pattern, false, path);
  } else if (type == "Split") {
    pre.kind = PreTokenizer::kSplit;
    const json& pattern = r.get(p, "pattern", path);
    if (pattern.is_object() && pattern.contains("Regex")) {
      pre.regex = std::make_shared<Regex>(r.str(pattern["Regex"], path + ".pattern.Regex"), false,
                                          fmt::format("{}: {}.pattern.Regex", path, r.file));
    } else if (pattern.is_object() && pattern.contains("String")) {
      pre.regex = std::make_shared<Regex>(r.str(pattern["String"], path + ".pattern.String"), true,
                                          fmt::format("{}: {}.pattern", path, r.file));
    } else {
      r.fail(path + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
    }
    const std::string behavior = r.str(r.get(p, "behavior", path), path + ".behavior");
    static const std::map<std::string, Behavior> behaviors = {
        {"Removed", Behavior::kRemoved},
        {"Isolated", Behavior::kIsolated},
        {"MergedWithPrevious", Behavior::kMergedWithPrevious},
        {"MergedWithNext", Behavior::kMergedWithNext},
        {"Contiguous", Behavior::kContiguous}};
    const auto it = behaviors.find(behavior);
    if (it == behaviors.end())
      r.unsupported_option(path + ".behavior", behavior,
                           "supported: Removed, Isolated, MergedWithPrevious, MergedWithNext, "
                           "Contiguous");
    pre.behavior = it->second;
    pre.invert = r.boolean(p, "invert", path, false);
  } else if (type == "Metaspace") {
    pre.kind = PreTokenizer::kMetaspace;
    pre.replacement = r.str(r.get(p, "replacement", path), path + ".replacement");
    size_t len = 0;
    if (pre.replacement.empty() || utf8_lossy(pre.replacement) != pre.replacement ||
        (utf8_decode(pre.replacement, 0, &len), len != pre.replacement.size()))
      r.fail(path + ".replacement", "must be one character");
    const json* scheme = r.find(p, "prepend_scheme");
    const std::string s = scheme
                              ? r.str(*scheme, path + ".prepend_scheme")
                              : (r.boolean(p, "add_prefix_space", path, true) ? "always" : "never");
    if (s == "first") {
      pre.prepend = PreTokenizer::kFirst;
    } else if (s == "always") {
      pre.prepend = PreTokenizer::kAlways;
    } else if (s == "never") {
      pre.prepend = PreTokenizer::kNever;
    } else {
      r.unsupported_option(path + ".prepend_scheme", s, "supported: first, always, never");
    }
    pre.split = r.boolean(p, "split", path, true);
  } else if (type == "Digits") {
    pre.kind = PreTokenizer::kDigits;
    const bool individual = r.boolean(p, "individual_digits", path, false);
    // Rust's char::is_numeric is the N category; contiguous runs are one piece.
    pre.regex = std::make_shared<Regex>(individual ? "\\p{N}" : "\\p{N}+", false, path);
    pre.behavior = Behavior::kIsolated;
  } else {
    r.unsupported_type(path, type, "ByteLevel, Split, Metaspace, Sequence, Digits");
  }
  pre_tokenizers.push_back(std::move(pre));
}

void HfTokenizer::Impl::load_post_processor(const Reader& r, const json& p,
                                            const std::string& path) {
  const std::string type = r.type(p, path);
  if (type == "Sequence") {
    const json& list = r.get(p, "processors", path);
    if (!list.is_array()) r.fail(path + ".processors", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_post_processor(r, list[i], fmt::format("{}.processors[{}]", path, i));
  } else if (type == "ByteLevel") {
    // Offsets only.
  } else if (type == "TemplateProcessing") {
    if (!template_tokens.empty() || !template_prefix.empty())
      r.unsupported_option(path, "a second TemplateProcessing", "one at most");
    const json& special = r.get(p, "special_tokens", path);
    if (!special.is_object()) r.fail(path + ".special_tokens", "must be an object");
    const json& single = r.get(p, "single", path);
    if (!single.is_array()) r.fail(path + ".single", "must be an array");
    bool seen_sequence = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string where = fmt::format("{}.single[{}]", path, i);
      const json& item = single[i];
      if (item.is_object() && item.contains("Sequence")) {
        const json& seq = item["Sequence"];
        if (!seq.is_object() || !seq.contains("id") || seq["id"] != "A")
          r.unsupported_option(where, item, "a single template holds sequence A only");
        if (seen_sequence) r.unsupported_option(where, item, "sequence A once");
        seen_sequence = true;
      } else if (item.is_object() && item.contains("SpecialToken")) {
        const json& tok = item["SpecialToken"];
        const std::string name =
            r.str(r.get(tok, "id", where + ".SpecialToken"), where + ".SpecialToken.id");
        const auto it = special.find(name);
        if (it == special.end())
          r.fail(where, fmt::format("names '{}', which special_tokens lacks", name));
        const json& ids = r.get(*it, "ids", path + ".special_tokens." + name);
        if (!ids.is_array()) r.fail(path + ".special_tokens." + name + ".ids", "must be an array");
        for (const json& id : ids) {
          if (!id.is_number_unsigned() || id.get<uint64_t>() >= (1u << 31))
            r.fail(path + ".special_tokens." + name + ".ids", "must hold ids");
          (seen_sequence ? template_suffix : template_prefix).push_back(id.get<uint32_t>());
        }
        template_tokens.push_back(name);
      } else {
        r.fail(where, "must be {\"Sequence\": ...} or {\"SpecialToken\": ...}");
      }
    }
    if (!seen_sequence) r.fail(path + ".single", "has no Sequence A");
  } else {
    r.unsupported_type(path, type, "TemplateProcessing, ByteLevel, Sequence");
  }
}

void HfTokenizer::Impl::load_decoder(const Reader& r, const json& d, const std::string& path) {
  const std::string type = r.type(d, path);
  Decoder dec;
  if (type == "Sequence") {
    const json& list = r.get(d, "decoders", path);
    if (!list.is_array()) r.fail(path + ".decoders", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_decoder(r, list[i], fmt::format("{}.decoders[{}]", path, i));
    return;
  } else if (type == "ByteLevel") {
    dec.kind = Decoder::kByteLevel;
  } else if (type == "Metaspace") {
    dec.kind = Decoder::kMetaspace;
    dec.a = r.str(r.get(d, "replacement", path), path + ".replacement");
    const json* scheme = r.find(d, "prepend_scheme");
    const std::string s = scheme
                              ? r.str(*scheme, path + ".prepend_scheme")
                              : (r.boolean(d, "add_prefix_space", path, true) ? "always" : "never");
    if (s != "first" && s != "always" && s != "never")
      r.unsupported_option(path + ".prepend_scheme", s, "supported: first, always, never");
    dec.prepend = s != "never";
  } else if (type == "ByteFallback") {
    dec.kind = Decoder::kByteFallback;
  } else if (type == "Fuse") {
    dec.kind = Decoder::kFuse;
  } else if (type == "Strip") {
    dec.kind = Decoder::kStrip;
    dec.a = r.str(r.get(d, "content", path), path + ".content");
    const json& start = r.get(d, "start", path);
    const json& stop = r.get(d, "stop", path);
    if (!start.is_number_unsigned() || !stop.is_number_unsigned())
      r.fail(path, "start and stop must be counts");
    dec.start = start.get<int64_t>();
    dec.stop = stop.get<int64_t>();
  } else if (type == "Replace") {
    dec.kind = Decoder::kReplace;
    const json& pattern = r.get(d, "pattern", path);
    if (!pattern.is_object() || !pattern.contains("String"))
      r.unsupported_option(path + ".pattern", pattern, "only a String pattern");
    dec.a = r.str(pattern["String"], path + ".pattern.String");
    dec.b = r.str(r.get(d, "content", path), path + ".content");
  } else {
    r.unsupported_type(path, type,
                       "ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence");
  }
  decoders.push_back(std::move(dec));
}

// BPE on one pre-tokenized word.
void HfTokenizer::Impl::merge_word(const std::string& word, std::vector<uint32_t>& out) const {
  struct Symbol {
    uint32_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  bool previous_unk = false;
  for (size_t i = 0, len = 0; i < word.size(); i += len) {
    len = utf8_char_len(word, i);
    const auto it = vocab.find(word.substr(i, len));
    if (it != vocab.end()) {
      symbols.push_back({it->second, 0, 0, true});
      previous_unk = false;
      continue;
    }
    if (byte_fallback) {
      bool all = true;
      for (size_t k = 0; k < len; ++k) all = all && byte_ids[static_cast<uint8_t>(word[i + k])];
      if (all) {
        for (size_t k = 0; k < len; ++k)
          symbols.push_back({*byte_ids[static_cast<uint8_t>(word[i + k])], 0, 0, true});
        previous_unk = false;
        continue;
      }
    }
    if (unk) {
      if (!(fuse_unk && previous_unk)) symbols.push_back({*unk, 0, 0, true});
      previous_unk = true;
    }
  }
  const int n = static_cast<int>(symbols.size());
  for (int i = 0; i < n; ++i) {
    symbols[i].prev = i - 1;
    symbols[i].next = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    uint32_t rank;
    int pos;
    uint32_t id;
    bool operator<(const Candidate& o) const {  // the heap's top: lowest rank, then leftmost
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  auto lookup = [&](uint32_t a, uint32_t b) -> const MergeTarget* {
    const auto it = merges.find((static_cast<uint64_t>(a) << 32) | b);
    return it == merges.end() ? nullptr : &it->second;
  };
  std::priority_queue<Candidate> queue;
  for (int i = 0; i + 1 < n; ++i) {
    if (const MergeTarget* m = lookup(symbols[i].id, symbols[i + 1].id))
      queue.push({m->rank, i, m->id});
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    const MergeTarget* m = lookup(left.id, right.id);
    if (!m || m->id != top.id) continue;
    left.id = top.id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) {
      if (const MergeTarget* p = lookup(symbols[left.prev].id, left.id))
        queue.push({p->rank, left.prev, p->id});
    }
    if (left.next >= 0) {
      if (const MergeTarget* p = lookup(left.id, symbols[left.next].id))
        queue.push({p->rank, top.pos, p->id});
    }
  }
  for (int i = n ? 0 : -1; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
}

void HfTokenizer::Impl::bpe(const std::string& word, std::vector<uint32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    const auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() > kMaxCachedWord) {
    merge_word(word, out);
    return;
  }
  CacheShard& shard = cache[std::hash<std::string>()(word) % kShards];
  {
    std::lock_guard<std::mutex> lock(shard.mutex);
    const auto it = shard.map.find(word);
    if (it != shard.map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t mark = out.size();
  merge_word(word, out);
  std::lock_guard<std::mutex> lock(shard.mutex);
  if (shard.map.size() < kShardCapacity)
    shard.map.emplace(word, std::vector<uint32_t>(out.begin() + mark, out.end()));
}

// Normalise a text between added tokens, split it at normalized added tokens, pre-tokenize
// and BPE the rest.
void HfTokenizer::Impl::encode_text(const std::string& text, bool at_origin,
                                    std::vector<uint32_t>& out) const {
  std::string normalized = text;
  for (const Normalizer& n : normalizers) n.apply(normalized);
  auto on_text = [&](size_t b, size_t e) {
    std::vector<Piece> pieces = {{normalized.substr(b, e - b), at_origin && b == 0}};
    for (const PreTokenizer& p : pre_tokenizers) p.apply(pieces);
    for (const Piece& piece : pieces) bpe(piece.text, out);
  };
  if (normalized_matcher.empty()) {
    if (!normalized.empty()) on_text(0, normalized.size());
  } else {
    normalized_matcher.split(normalized, on_text,
                             [&](const AddedToken& t) { out.push_back(t.id); });
  }
}

HfTokenizer::HfTokenizer(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  json root;
  try {
    root = read_json_file(path, 1ull << 30);
  } catch (const std::exception& e) {
    throw DataError(fmt::format("cannot load tokenizer {}: {}", path, e.what()));
  }
  try {
    impl_->load(root);
  } catch (const json::exception& e) {
    throw DataError(fmt::format("{}: malformed tokenizer: {}", path, e.what()));
  }
}

HfTokenizer::~HfTokenizer() = default;
HfTokenizer::HfTokenizer(HfTokenizer&&) noexcept = default;
HfTokenizer& HfTokenizer::operator=(HfTokenizer&&) noexcept = default;

std::vector<uint32_t> HfTokenizer::encode(const std::string& input, bool add_special_tokens) const {
  const Impl& m = *impl_;
  const std::string text = utf8_lossy(input);
  std::vector<uint32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens) ids.insert(ids.end(), m.template_prefix.begin(), m.template_prefix.end());
  if (m.raw_matcher.empty()) {
    if (!text.empty()) m.encode_text(text, true, ids);
  } else {
    m.raw_matcher.split(
        text, [&](size_t b, size_t e) { m.encode_text(text.substr(b, e - b), b == 0, ids); },
        [&](const AddedToken& t) { ids.push_back(t.id); });
  }
  if (add_special_tokens) ids.insert(ids.end(), m.template_suffix.begin(), m.template_suffix.end());
  return ids;
}

std::string HfTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int64_t id : ids) {
    if (auto token = id_to_token(id)) tokens.push_back(std::move(*token));
  }
  if (!impl_->has_decoder) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  for (const Decoder& d : impl_->decoders) d.apply(tokens);
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

int64_t HfTokenizer::vocab_size() const {
  return impl_->vocab_size;
}

std::optional<int64_t> HfTokenizer::token_to_id(const std::string& token) const {
  const auto a = impl_->added_by_content.find(token);
  if (a != impl_->added_by_content.end()) return a->second;
  const auto it = impl_->vocab.find(token);
  if (it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> HfTokenizer::id_to_token(int64_t id) const {
  if (id < 0 || id >= impl_->vocab_size) return std::nullopt;
  const auto a = impl_->added_by_id.find(static_cast<uint32_t>(id));
  if (a != impl_->added_by_id.end()) return a->second->raw;
  if (static_cast<size_t>(id) < impl_->has_model_token.size() && impl_->has_model_token[id])
    return impl_->id_to_model_token[id];
  return std::nullopt;
}

const std::vector<uint32_t>& HfTokenizer::template_prefix() const {
  return impl_->template_prefix;
}
const std::vector<uint32_t>& HfTokenizer::template_suffix() const {
  return impl_->template_suffix;
}

}  // namespace strata
