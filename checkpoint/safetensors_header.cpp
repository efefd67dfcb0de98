// safetensors headers: validation as the reference (Rust) reader does it.
#include "checkpoint/safetensors_header.h"

#include <fmt/format.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

namespace strata {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference reader's limit

// Every dtype the reference reader knows, in its enum (alignment) order.
const std::vector<SafetensorsDtype>& dtype_table() {
  static const std::vector<SafetensorsDtype> table = {
      {"BOOL", 8, 0},    {"F4", 4, 1},          {"F6_E2M3", 6, 2},      {"F6_E3M2", 6, 3},
      {"U8", 8, 4},      {"I8", 8, 5},          {"F8_E5M2", 8, 6},      {"F8_E4M3", 8, 7},
      {"F8_E8M0", 8, 8}, {"F8_E4M3FNUZ", 8, 9}, {"F8_E5M2FNUZ", 8, 10}, {"I16", 16, 11},
      {"U16", 16, 12},   {"F16", 16, 13},       {"BF16", 16, 14},       {"I32", 32, 15},
      {"U32", 32, 16},   {"F32", 32, 17},       {"C64", 64, 18},        {"F64", 64, 19},
      {"I64", 64, 20},   {"U64", 64, 21}};
  return table;
}

const SafetensorsDtype* find_dtype(const std::string& name) {
  for (const SafetensorsDtype& d : dtype_table()) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

[[noreturn]] void malformed(const std::string& file, const std::string& what) {
  throw CheckpointError(
      fmt::format("{} is not a valid safetensors file: {}\nHINT: the file is "
                  "damaged or was not written completely; re-create or "
                  "re-download it",
                  file, what));
}

}  // namespace

const SafetensorsDtype* find_safetensors_dtype(const std::string& name) {
  return find_dtype(name);
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size,
                                           const std::string& file) {
  if (size < 8)
    malformed(file, fmt::format("{} bytes, shorter than the 8-byte header length", size));
  uint64_t n = 0;
  std::memcpy(&n, data, 8);  // little-endian on every platform Strata builds for
  if (n > kMaxHeaderBytes) {
    malformed(file,
              fmt::format("header length {} exceeds the limit of {} bytes", n, kMaxHeaderBytes));
  }
  if (8 + n > size) {
    malformed(file, fmt::format("header length {} runs past the end of the {}-byte file", n, size));
  }

  // Parse, rejecting duplicate top-level keys (the reference format disallows them).
  std::set<std::string> seen;
  std::string duplicate;
  const nlohmann::json::parser_callback_t detect_duplicates =
      [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
        if (depth == 1 && event == nlohmann::json::parse_event_t::key &&
            !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        return true;
      };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(data + 8, data + 8 + n, detect_duplicates);
  } catch (const nlohmann::json::exception& e) {
    malformed(file, fmt::format("header is not valid UTF-8 JSON ({})", e.what()));
  }
  if (!header.is_object()) malformed(file, "header is not a JSON object");
  if (!duplicate.empty())
    malformed(file, fmt::format("tensor '{}' appears twice in the header", duplicate));

  SafetensorsHeader out;
  out.data_offset = 8 + n;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) malformed(file, "__metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) {
          malformed(file, fmt::format("__metadata__ value of '{}' is not a string", k));
        }
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") ||
        !value.contains("data_offsets")) {
      malformed(file, fmt::format("tensor '{}' lacks dtype, shape or data_offsets", key));
    }
    const nlohmann::json& dtype = value["dtype"];
    const nlohmann::json& shape = value["shape"];
    const nlohmann::json& offsets = value["data_offsets"];
    if (!dtype.is_string() || !find_dtype(dtype.get<std::string>())) {
      malformed(file, fmt::format("tensor '{}' has unknown dtype {}", key, dtype.dump()));
    }
    SafetensorsEntry entry{key, dtype.get<std::string>(), {}, 0, 0};
    if (!shape.is_array()) malformed(file, fmt::format("tensor '{}' shape is not a list", key));
    for (const nlohmann::json& d : shape) {
      if (!d.is_number_unsigned()) {
        malformed(file, fmt::format("tensor '{}' shape {} holds a non-integer or negative size",
                                    key, shape.dump()));
      }
      entry.shape.push_back(d.get<int64_t>());
    }
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      malformed(file, fmt::format("tensor '{}' data_offsets {} is not [begin, end]", key,
                                  offsets.dump()));
    }
    entry.begin = offsets[0].get<uint64_t>();
    entry.end = offsets[1].get<uint64_t>();
    if (entry.end < entry.begin) {
      malformed(file, fmt::format("tensor '{}' ends (byte {}) before it begins (byte {})", key,
                                  entry.end, entry.begin));
    }
    out.entries.push_back(std::move(entry));
  }

  // Contiguous from 0, sizes matching shape x dtype, and nothing after the last tensor.
  std::sort(out.entries.begin(), out.entries.end(), [](const auto& a, const auto& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  uint64_t expected_begin = 0;
  for (const SafetensorsEntry& e : out.entries) {
    if (e.begin != expected_begin) {
      malformed(file, fmt::format("tensor '{}' starts at byte {} but the previous one ends at {} "
                                  "(gap or overlap)",
                                  e.name, e.begin, expected_begin));
    }
    unsigned __int128 bits = find_dtype(e.dtype)->bits;
    for (int64_t d : e.shape) {
      bits *= static_cast<uint64_t>(d);
      if (bits > static_cast<unsigned __int128>(UINT64_MAX)) {
        malformed(file, fmt::format("tensor '{}' shape overflows", e.name));
      }
    }
    if (bits % 8 != 0)
      malformed(file, fmt::format("tensor '{}' is not a whole number of bytes", e.name));
    if (static_cast<uint64_t>(bits / 8) != e.end - e.begin) {
      malformed(file, fmt::format("tensor '{}' of dtype {} and shape {} needs {} bytes, its "
                                  "data_offsets give {}",
                                  e.name, e.dtype, nlohmann::json(e.shape).dump(),
                                  static_cast<uint64_t>(bits / 8), e.end - e.begin));
    }
    expected_begin = e.end;
  }
  if (out.data_offset + expected_begin != size) {
    malformed(file, fmt::format(
                        "the tensors end at byte {} but the file has {} bytes ({})",
                        out.data_offset + expected_begin, size,
                        out.data_offset + expected_begin < size ? "trailing bytes" : "truncated"));
  }
  return out;
}

}  // namespace strata
