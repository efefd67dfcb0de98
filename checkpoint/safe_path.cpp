#include "checkpoint/safe_path.h"

#include <filesystem>
#include <fmt/format.h>

#include "checkpoint/errors.h"

namespace fs = std::filesystem;

namespace strata {
namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// `text` with every %XX decoded (repeatedly, so "%252e" is caught too); malformed escapes stay.
std::string percent_decoded(std::string text) {
  for (int round = 0; round < 4; ++round) {
    std::string out;
    bool changed = false;
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '%' && i + 2 < text.size() && hex_value(text[i + 1]) >= 0 &&
          hex_value(text[i + 2]) >= 0) {
        out += static_cast<char>(hex_value(text[i + 1]) * 16 + hex_value(text[i + 2]));
        i += 2;
        changed = true;
      } else {
        out += text[i];
      }
    }
    text = std::move(out);
    if (!changed) break;
  }
  return text;
}

bool inside(const fs::path& path, const fs::path& root) {
  auto p = path.begin();
  for (auto r = root.begin(); r != root.end(); ++r, ++p) {
    if (r->empty()) continue;  // a trailing separator
    if (p == path.end() || *p != *r) return false;
  }
  return true;
}

fs::path resolved(const fs::path& path) {
  std::error_code ec;
  fs::path out = fs::weakly_canonical(fs::absolute(path), ec);
  return ec ? fs::absolute(path).lexically_normal() : out;
}

}  // namespace

std::string unsafe_name_reason(const std::string& name) {
  if (name.empty()) return "it is empty";
  if (name.size() > kMaxPathBytes)
    return fmt::format("it is {} bytes long, more than {}", name.size(), kMaxPathBytes);
  for (unsigned char c : name) {
    if (c == 0 || c < 0x20 || c == 0x7f) return "it contains a control character";
    if (c == '\\') return "it contains a backslash";
  }
  const std::string decoded = percent_decoded(name);
  for (const std::string& form : {name, decoded}) {
    if (form.front() == '/' || form.front() == '~') return "it is an absolute path";
    if (form.find('\\') != std::string::npos || form.find('\0') != std::string::npos)
      return "it contains an encoded backslash or NUL";
    size_t start = 0;
    while (start <= form.size()) {
      size_t end = form.find('/', start);
      if (end == std::string::npos) end = form.size();
      const std::string part = form.substr(start, end - start);
      if (part == "..") return "it climbs out with '..'";
      if (part == ".") return "it has a '.' component";
      if (part.empty() && end != form.size()) return "it has an empty component ('//')";
      if (part.size() > kMaxNameBytes)
        return fmt::format("a component is {} bytes long, more than {}", part.size(),
                           kMaxNameBytes);
      start = end + 1;
    }
  }
  if (decoded != name && decoded.find('/') != std::string::npos &&
      name.find('/') == std::string::npos)
    return "it hides a '/' in percent-encoding";
  return "";
}

std::string confinement_root(const std::string& dir) {
  const fs::path abs = fs::absolute(dir).lexically_normal();
  for (fs::path p = abs; p.has_relative_path(); p = p.parent_path()) {
    if (p.parent_path().filename() == "snapshots" &&
        p.parent_path().parent_path().filename().string().rfind("models--", 0) == 0)
      return p.parent_path().parent_path().string();
  }
  return abs.string();
}

std::string path_inside(const std::string& base, const std::string& name, const std::string& what,
                        const std::string& resolve_root) {
  const std::string reason = unsafe_name_reason(name);
  if (!reason.empty())
    throw CheckpointError(fmt::format(
        "{}: '{}' is not a file name inside {} ({})\nHINT: the file was damaged or crafted; "
        "Strata only opens files inside the folder that names them",
        what, name, base, reason));
  const fs::path joined = fs::path(base) / name;
  const fs::path root = resolved(resolve_root.empty() ? base : resolve_root);
  if (!inside(resolved(joined), root))
    throw CheckpointError(fmt::format(
        "{}: '{}' resolves through a symbolic link to {}, outside {}\nHINT: the folder was "
        "damaged or crafted; Strata only opens files inside the folder that names them",
        what, name, resolved(joined).string(), root.string()));
  return joined.string();
}

}  // namespace strata
