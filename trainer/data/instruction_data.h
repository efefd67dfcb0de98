// Instruction data for `strata prepare-data --format jsonl`: JSON Lines records turned into
// token ids with a loss mask, and packed into fixed windows.
//
// A record is one JSON object per line, of one of three kinds:
//   {"text": "..."}                              every token is a target;
//   {"prompt": "...", "completion": "..."}       the completion's tokens are;
//   {"messages": [{"role": "...", "content": "..."}, ...]}
//                                                rendered with the chat template; the tokens
//                                                of the assistant turns are.
// A record starts with BOS when the tokenizer has one and ends with EOS (a target when the
// record's last tokens are), unless the rendered text already ends with it. Its first token is
// never a target: nothing of the record precedes it.
// The parts are tokenized separately and concatenated (prompt, then completion; the rendered
// chat cut where assistant turns begin and end), so no token straddles a target boundary.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "trainer/data/chat_template.h"

namespace strata {

class Tokenizer;

struct EncodedRecord {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;  // 1: the token is a training target
  int64_t targets() const;
};

class RecordEncoder {
 public:
  // `chat` (may be null: "messages" records are then refused) and its options must outlive
  // the encoder, as must `tokenizer`.
  RecordEncoder(const Tokenizer& tokenizer, const ChatTemplate* chat,
                ChatTemplateOptions chat_options);

  // One line of a JSONL file (untrusted). Throws DataError starting with `where`
  // ("data.jsonl:12") for anything that is not one record of a known kind.
  EncodedRecord encode(const std::string& line, const std::string& where) const;

 private:
  // Appends `text`'s tokens (no special tokens added) with mask value `target`.
  void append(EncodedRecord& record, const std::string& text, bool target) const;
  EncodedRecord encode_messages(const std::vector<ChatMessage>& messages,
                                const std::string& where) const;

  const Tokenizer& tokenizer_;
  const ChatTemplate* chat_;
  ChatTemplateOptions chat_options_;
};

// Packs records, in order, into windows of `window` tokens (seq_len + 1): a record goes into
// the current window when it fits, else the window is closed (filled with `pad_id`, never a
// target) and the record starts the next. A record longer than a window is cut to its first
// `window` tokens (`truncate`) or dropped. The emitted mask holds token_shard.h's flags: the
// records' targets, and a document start at each record's first token and at the padding.
struct PackingStats {
  int64_t records = 0;    // packed (whole or truncated)
  int64_t truncated = 0;  // records cut to one window
  int64_t dropped = 0;    // records longer than a window, left out
  int64_t windows = 0;
  int64_t tokens = 0;   // windows x window
  int64_t targets = 0;  // tokens that are targets
  int64_t padding = 0;  // pad tokens
};

class WindowPacker {
 public:
  using Emit =
      std::function<void(const std::vector<uint32_t>& tokens, const std::vector<uint8_t>& mask)>;
  WindowPacker(int64_t window, bool truncate, uint32_t pad_id, Emit emit);
  void add(EncodedRecord record);
  void finish();  // closes the last window, if any
  const PackingStats& stats() const { return stats_; }

 private:
  void close();
  int64_t window_;
  bool truncate_;
  uint32_t pad_id_;
  Emit emit_;
  std::vector<uint32_t> tokens_;
  std::vector<uint8_t> mask_;
  PackingStats stats_;
};

}  // namespace strata
