// A C interface to SentencePiece, built as its own shared module and loaded by
// trainer/tokenizer.cpp into a separate linker namespace (dlmopen).
//
// Why: Debian's libsentencepiece carries a private copy of protobuf-lite and exports its
// symbols; LibTorch loads the system libprotobuf. In one namespace each library binds some
// of its protobuf calls to the other's copy and the process aborts (at start-up or at the
// first tokenizer load, depending on link order). A separate namespace keeps them apart.
//
// Only C types cross the boundary: the two namespaces have separate heaps. Results are kept
// in the handle until the next call (a handle is not thread-safe).
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

struct Handle {
  sentencepiece::SentencePieceProcessor processor;
  std::vector<int> ids;
  std::string text;
};

void set_error(const sentencepiece::util::Status& status, char* error, size_t error_size) {
  if (error_size == 0) return;
  std::strncpy(error, status.ToString().c_str(), error_size - 1);
  error[error_size - 1] = '\0';
}

}  // namespace

#define STRATA_EXPORT extern "C" __attribute__((visibility("default")))

STRATA_EXPORT void* strata_spm_load(const char* path, char* error, size_t error_size) {
  auto* handle = new Handle();
  const auto status = handle->processor.Load(path);
  if (!status.ok()) {
    set_error(status, error, error_size);
    delete handle;
    return nullptr;
  }
  return handle;
}

STRATA_EXPORT void strata_spm_free(void* handle) { delete static_cast<Handle*>(handle); }

STRATA_EXPORT int strata_spm_piece_size(void* handle) {
  return static_cast<Handle*>(handle)->processor.GetPieceSize();
}
STRATA_EXPORT int strata_spm_bos_id(void* handle) {
  return static_cast<Handle*>(handle)->processor.bos_id();
}
STRATA_EXPORT int strata_spm_eos_id(void* handle) {
  return static_cast<Handle*>(handle)->processor.eos_id();
}

// Encodes text; returns the number of ids (read them with strata_spm_ids), or -1 on error.
STRATA_EXPORT long strata_spm_encode(void* handle, const char* text, size_t length, char* error,
                                     size_t error_size) {
  auto* h = static_cast<Handle*>(handle);
  const auto status = h->processor.Encode(std::string(text, length), &h->ids);
  if (!status.ok()) {
    set_error(status, error, error_size);
    return -1;
  }
  return static_cast<long>(h->ids.size());
}
STRATA_EXPORT const int* strata_spm_ids(void* handle) {
  return static_cast<Handle*>(handle)->ids.data();
}

// Decodes ids; returns the text length (read it with strata_spm_text), or -1 on error.
STRATA_EXPORT long strata_spm_decode(void* handle, const int* ids, size_t count, char* error,
                                     size_t error_size) {
  auto* h = static_cast<Handle*>(handle);
  const auto status = h->processor.Decode(std::vector<int>(ids, ids + count), &h->text);
  if (!status.ok()) {
    set_error(status, error, error_size);
    return -1;
  }
  return static_cast<long>(h->text.size());
}
STRATA_EXPORT const char* strata_spm_text(void* handle) {
  return static_cast<Handle*>(handle)->text.data();
}

// Trains a model from `count` key/value options (SentencePiece's flag names without "--");
// returns 0 on success. The map form, unlike the command-line string, logs nothing at
// minloglevel 2.
STRATA_EXPORT int strata_spm_train(const char* const* keys, const char* const* values,
                                   size_t count, char* error, size_t error_size) {
  std::unordered_map<std::string, std::string> options;
  for (size_t i = 0; i < count; ++i) options[keys[i]] = values[i];
  const auto status = sentencepiece::SentencePieceTrainer::Train(options);
  if (!status.ok()) {
    set_error(status, error, error_size);
    return 1;
  }
  return 0;
}
