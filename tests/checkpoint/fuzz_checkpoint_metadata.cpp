// libFuzzer target: any byte string read as a step directory's metadata.json or train_state.json
// either validates or raises CheckpointError naming the file; anything else (a crash, a
// sanitizer report, another exception) is a bug. A document that validates keeps the promises
// the readers rely on.
#include <cstddef>
#include <cstdint>
#include <string>

#include "checkpoint/checkpoint_metadata.h"
#include "checkpoint/errors.h"
#include "checkpoint/json_file.h"
#include "checkpoint/safe_path.h"
#include "trainer/train_state.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  nlohmann::json doc;
  try {
    doc = strata::parse_json_document(text, "fuzz/metadata.json");
  } catch (const strata::CheckpointError&) {
    return 0;
  }
  try {
    const strata::CheckpointMetadata meta =
        strata::validate_checkpoint_metadata(doc, "fuzz/metadata.json", "fuzz/step-0000007");
    if (meta.step != 7) __builtin_trap();
    for (const auto& [name, file] : meta.files) {
      if (!strata::unsafe_name_reason(name).empty() || file.block_bytes == 0) __builtin_trap();
    }
    for (const auto& [key, tensor] : meta.tensors) {
      int64_t numel = 1, covered = 0;
      for (int64_t d : tensor.shape) {
        if (d < 0) __builtin_trap();
        numel *= d;
      }
      for (const strata::CheckpointChunk& c : tensor.chunks) {
        if (c.begin != covered || c.end <= c.begin || !meta.files.count(c.file)) __builtin_trap();
        covered = c.end;
      }
      if (covered != numel) __builtin_trap();
    }
  } catch (const strata::CheckpointError&) {
  }
  try {
    const strata::TrainState::Saved saved =
        strata::TrainState::validate(doc, "fuzz/train_state.json", 7);
    if (saved.data_step < 0 || saved.data_step > 7 || saved.optimizer_steps < 0) __builtin_trap();
  } catch (const strata::CheckpointError&) {
  }
  return 0;
}
