#include "checkpoint/json_file.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <set>
#include <vector>

namespace strata {
namespace {

// nlohmann's messages start with "[json.exception.parse_error.101] ": keep what follows.
std::string without_exception_id(const std::string& message) {
  if (message.rfind("[json.exception.", 0) != 0) return message;
  const size_t end = message.find("] ");
  return end == std::string::npos ? message : message.substr(end + 2);
}

struct Refused {
  std::string reason;
};

}  // namespace

nlohmann::json parse_json_document(const std::string& text, const std::string& where) {
  std::vector<std::set<std::string>> keys;  // of each open object, innermost last
  std::vector<bool> is_object;              // each open container
  const nlohmann::json::parser_callback_t check = [&](int, nlohmann::json::parse_event_t event,
                                                      nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    switch (event) {
      case Event::object_start:
      case Event::array_start:
        if (is_object.size() >= static_cast<size_t>(kMaxJsonDepth))
          throw Refused{fmt::format("nesting deeper than {} levels", kMaxJsonDepth)};
        is_object.push_back(event == Event::object_start);
        if (event == Event::object_start) keys.emplace_back();
        break;
      case Event::object_end:
      case Event::array_end:
        if (!is_object.empty()) {
          if (is_object.back()) keys.pop_back();
          is_object.pop_back();
        }
        break;
      case Event::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
          throw Refused{
              fmt::format("the key \"{}\" appears twice in one object", parsed.get<std::string>())};
        break;
      case Event::value:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text, check);
  } catch (const Refused& r) {
    throw JsonDocumentError(where, r.reason);
  } catch (const nlohmann::json::exception& e) {
    throw JsonDocumentError(where, without_exception_id(e.what()));
  }
}

nlohmann::json read_json_file(const std::string& path, uint64_t max_bytes) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw CheckpointError(fmt::format("cannot read {}: {}", path, std::strerror(errno)));
  if (!S_ISREG(st.st_mode)) throw CheckpointError(fmt::format("{} is not a regular file", path));
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    throw CheckpointError(fmt::format("{} is {} bytes, more than the {} a JSON document may have",
                                      path, st.st_size, max_bytes));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(fmt::format("cannot read {}: {}", path, std::strerror(errno)));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() > max_bytes)
    throw CheckpointError(fmt::format("{} grew past {} bytes while being read", path, max_bytes));
  return parse_json_document(text, path);
}

}  // namespace strata
