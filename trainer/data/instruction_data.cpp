// JSONL records -> tokens + loss mask, and packing into windows.
#include "trainer/data/instruction_data.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <numeric>
#include <utility>

#include "checkpoint/json_file.h"
#include "trainer/data/token_shard.h"
#include "trainer/data/tokenizer.h"
#include "trainer/errors.h"

namespace strata {
namespace {

constexpr const char* kKinds =
    "HINT: each line is one JSON object: {\"text\": ...}, {\"prompt\": ..., \"completion\": "
    "...} or {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}";

// The string field `key` of `record`, or an error naming it.
std::string string_field(const nlohmann::json& record, const char* key, const std::string& where) {
  const nlohmann::json& value = record.at(key);
  if (!value.is_string()) {
    throw DataError(fmt::format("{}: \"{}\" must be a string, got {}\n{}", where, key,
                                value.type_name(), kKinds));
  }
  return value.get<std::string>();
}

}  // namespace

int64_t EncodedRecord::targets() const {
  return std::accumulate(mask.begin(), mask.end(), int64_t{0});
}

RecordEncoder::RecordEncoder(const Tokenizer& tokenizer, const ChatTemplate* chat,
                             ChatTemplateOptions chat_options)
    : tokenizer_(tokenizer), chat_(chat), chat_options_(std::move(chat_options)) {}

void RecordEncoder::append(EncodedRecord& record, const std::string& text, bool target) const {
  // The template's BOS and EOS strings are those tokens, whatever the tokenizer makes of the
  // text (a SentencePiece model would spell "<s>" out piece by piece).
  const std::pair<const std::string*, int64_t> specials[] = {
      {&chat_options_.bos_token, tokenizer_.bos_id()},
      {&chat_options_.eos_token, tokenizer_.eos_id()}};
  size_t at = 0;
  while (at < text.size()) {
    size_t next = std::string::npos;
    int64_t id = -1;
    size_t length = 0;
    for (const auto& [string, token] : specials) {
      if (string->empty() || token < 0) continue;
      const size_t found = text.find(*string, at);
      if (found < next) next = found, id = token, length = string->size();
    }
    const std::vector<uint32_t> ids = tokenizer_.encode(text.substr(at, next - at));
    record.tokens.insert(record.tokens.end(), ids.begin(), ids.end());
    record.mask.insert(record.mask.end(), ids.size(), target ? 1 : 0);
    if (next == std::string::npos) break;
    record.tokens.push_back(static_cast<uint32_t>(id));
    record.mask.push_back(target ? 1 : 0);
    at = next + length;
  }
}

EncodedRecord RecordEncoder::encode(const std::string& line, const std::string& where) const {
  nlohmann::json record;
  try {
    record = parse_json_document(line, where);
  } catch (const JsonDocumentError& e) {
    throw DataError(fmt::format("{}\n{}", e.what(), kKinds));
  }
  if (!record.is_object()) {
    throw DataError(fmt::format("{}: a record must be a JSON object, got {}\n{}", where,
                                record.type_name(), kKinds));
  }
  const bool text = record.contains("text"), prompt = record.contains("prompt"),
             completion = record.contains("completion"), messages = record.contains("messages");
  const int kinds = int{text} + int{prompt || completion} + int{messages};
  if (kinds != 1 || prompt != completion) {
    std::vector<std::string> keys;
    for (const auto& [key, value] : record.items()) keys.push_back('"' + key + '"');
    throw DataError(fmt::format(
        "{}: a record with keys {} is none of the known kinds\n{}", where,
        keys.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(keys, ", ")), kKinds));
  }

  EncodedRecord out;
  const int64_t bos = tokenizer_.bos_id(), eos = tokenizer_.eos_id();
  if (messages) {
    const nlohmann::json& list = record.at("messages");
    if (!list.is_array() || list.empty()) {
      throw DataError(fmt::format("{}: \"messages\" must be a non-empty list\n{}", where, kKinds));
    }
    std::vector<ChatMessage> chat;
    for (size_t i = 0; i < list.size(); ++i) {
      const nlohmann::json& m = list[i];
      const std::string at = fmt::format("{} message {}", where, i);
      if (!m.is_object() || !m.contains("role") || !m.contains("content")) {
        throw DataError(fmt::format(
            "{}: a message must be an object with \"role\" and \"content\"\n{}", at, kKinds));
      }
      chat.push_back({string_field(m, "role", at), string_field(m, "content", at)});
    }
    out = encode_messages(chat, where);
  } else {
    if (bos >= 0) {
      out.tokens.push_back(static_cast<uint32_t>(bos));
      out.mask.push_back(0);
    }
    if (text) {
      append(out, string_field(record, "text", where), true);
    } else {
      append(out, string_field(record, "prompt", where), false);
      append(out, string_field(record, "completion", where), true);
    }
  }
  // Records are separated by EOS; it is a target when what it ends is.
  if (eos >= 0 && (out.tokens.empty() || out.tokens.back() != static_cast<uint32_t>(eos))) {
    const uint8_t last = out.mask.empty() ? 0 : out.mask.back();
    out.tokens.push_back(static_cast<uint32_t>(eos));
    out.mask.push_back(last);
  }
  // Nothing of the record precedes its first token: it is never a target (packed after another
  // record, predicting it would learn across the document boundary).
  if (!out.mask.empty()) out.mask.front() = 0;
  return out;
}

// The assistant turns' characters in the full rendering: for assistant message i, what the
// template adds after rendering messages [0, i) with the generation prompt, up to rendering
// messages [0, i] without it (the reply and its end-of-turn marker), cut after the last EOS
// string in it.
EncodedRecord RecordEncoder::encode_messages(const std::vector<ChatMessage>& messages,
                                             const std::string& where) const {
  if (!chat_) {
    throw DataError(fmt::format(
        "{}: a \"messages\" record needs a chat template\nHINT: give prepare-data "
        "--chat-template (a template file or a tokenizer_config.json), or use a tokenizer "
        "whose tokenizer_config.json has a chat_template",
        where));
  }
  auto render = [&](size_t count, bool generation_prompt) {
    ChatTemplateOptions options = chat_options_;
    options.add_generation_prompt = generation_prompt;
    return chat_->render(std::vector<ChatMessage>(messages.begin(), messages.begin() + count),
                         options);
  };
  const std::string full = render(messages.size(), false);
  std::vector<std::pair<size_t, size_t>> spans;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].role != "assistant") continue;
    const std::string before = render(i, true), through = render(i + 1, false);
    if (through.compare(0, before.size(), before) != 0 ||
        full.compare(0, through.size(), through) != 0) {
      throw DataError(fmt::format(
          "{}: chat template {} renders the conversation up to message {} differently from the "
          "start of the whole conversation, so the assistant's tokens cannot be told apart\n"
          "HINT: use a template whose rendering of each shorter conversation (with the "
          "generation prompt) begins the rendering of the whole one, as most chat templates do, "
          "or write the records as {{\"prompt\", \"completion\"}}",
          where, chat_->origin(), i));
    }
    // The turn ends with its EOS: what the template writes after it (a newline before the
    // next turn) is not the assistant's to predict.
    size_t end = through.size();
    if (!chat_options_.eos_token.empty()) {
      const size_t eos = through.rfind(chat_options_.eos_token);
      if (eos != std::string::npos && eos >= before.size())
        end = eos + chat_options_.eos_token.size();
    }
    if (end > before.size()) spans.emplace_back(before.size(), end);
  }
  EncodedRecord out;
  // A template that does not write BOS itself gets it from the tokenizer.
  const int64_t bos = tokenizer_.bos_id();
  if (bos >= 0 && (chat_options_.bos_token.empty() ||
                   full.compare(0, chat_options_.bos_token.size(), chat_options_.bos_token) != 0)) {
    out.tokens.push_back(static_cast<uint32_t>(bos));
    out.mask.push_back(0);
  }
  size_t at = 0;
  for (const auto& [begin, end] : spans) {
    append(out, full.substr(at, begin - at), false);
    append(out, full.substr(begin, end - begin), true);
    at = end;
  }
  append(out, full.substr(at), false);
  return out;
}

WindowPacker::WindowPacker(int64_t window, bool truncate, uint32_t pad_id, Emit emit)
    : window_(window), truncate_(truncate), pad_id_(pad_id), emit_(std::move(emit)) {}

void WindowPacker::add(EncodedRecord record) {
  const int64_t n = static_cast<int64_t>(record.tokens.size());
  if (n == 0) return;
  if (n > window_) {
    if (!truncate_) {
      ++stats_.dropped;
      return;
    }
    ++stats_.truncated;
    record.tokens.resize(static_cast<size_t>(window_));
    record.mask.resize(static_cast<size_t>(window_));
  }
  if (static_cast<int64_t>(tokens_.size() + record.tokens.size()) > window_) close();
  tokens_.insert(tokens_.end(), record.tokens.begin(), record.tokens.end());
  const size_t start = mask_.size();
  mask_.insert(mask_.end(), record.mask.begin(), record.mask.end());
  mask_[start] |= kMaskDocumentStart;
  ++stats_.records;
}

void WindowPacker::close() {
  if (tokens_.empty()) return;
  const size_t pad = static_cast<size_t>(window_) - tokens_.size();
  stats_.padding += static_cast<int64_t>(pad);
  tokens_.insert(tokens_.end(), pad, pad_id_);
  mask_.insert(mask_.end(), pad, 0);
  if (pad > 0)
    mask_[mask_.size() - pad] = kMaskDocumentStart;  // the padding: a document of its own
  ++stats_.windows;
  stats_.tokens += window_;
  stats_.targets +=
      std::count_if(mask_.begin(), mask_.end(), [](uint8_t m) { return (m & kMaskTarget) != 0; });
  emit_(tokens_, mask_);
  tokens_.clear();
  mask_.clear();
}

void WindowPacker::finish() {
  close();
}

}  // namespace strata
