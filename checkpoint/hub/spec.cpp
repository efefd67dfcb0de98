// Hub spec grammar.
#include "checkpoint/hub/spec.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <regex>
#include <vector>

#include "checkpoint/safetensors_header.h"

namespace strata {
namespace {

// Length limits: the Hub's for repo id parts, generous ones for revisions and subfolders (a
// subfolder component is a file name: 255 bytes on common file systems).
constexpr size_t kMaxRepoPart = 96;
constexpr size_t kMaxRevision = 256;
constexpr size_t kMaxSubfolder = 1024;
constexpr size_t kMaxSubfolderPart = 255;
constexpr size_t kMaxQuoted = 120;  // longer specs are shortened in messages

// The spec as messages quote it: whole, or its start and its length when it is very long.
std::string quoted(const std::string& text) {
  if (text.size() <= kMaxQuoted) return "'" + text + "'";
  return fmt::format("'{}...' ({} characters)", text.substr(0, kMaxQuoted), text.size());
}

// A part of the spec for a message: whole, or its start when it is long.
std::string excerpt(const std::string& part) {
  if (part.size() <= 60) return part;
  std::string out(part, 0, 40);
  out.append(3, '.');
  return out;
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t end = text.find(sep, start);
    parts.push_back(text.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) return parts;
    start = end + 1;
  }
}

std::string percent_decode(const std::string& text, const std::string& spec) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out += text[i];
      continue;
    }
    if (i + 2 >= text.size() || !std::isxdigit(static_cast<unsigned char>(text[i + 1])) ||
        !std::isxdigit(static_cast<unsigned char>(text[i + 2]))) {
      throw CheckpointError(fmt::format("Hub spec {}: bad percent-encoding in revision '{}'",
                                        quoted(spec), excerpt(text)));
    }
    out += static_cast<char>(std::stoi(text.substr(i + 1, 2), nullptr, 16));
    i += 2;
  }
  return out;
}

// huggingface_hub's validate_repo_id, for one part of owner/repo.
std::string repo_part_problem(const std::string& part) {
  static const std::regex allowed(R"([A-Za-z0-9_.\-]+)");
  if (part.empty()) return "is empty";
  if (part.size() > kMaxRepoPart)
    return fmt::format("is {} characters long; the Hub allows at most {}", part.size(),
                       kMaxRepoPart);
  if (!std::regex_match(part, allowed)) return "may hold only letters, digits, '_', '-' and '.'";
  if (part.front() == '-' || part.front() == '.' || part.back() == '-' || part.back() == '.') {
    return "may not start or end with '-' or '.'";
  }
  if (part.find("--") != std::string::npos || part.find("..") != std::string::npos) {
    return "may not contain '--' or '..'";
  }
  if (part.size() >= 4 && part.compare(part.size() - 4, 4, ".git") == 0)
    return "may not end in '.git'";
  return "";
}

HubSpec parse_body(const std::string& body, const std::string& text) {
  auto fail = [&](const std::string& what) -> HubSpec {
    throw CheckpointError(
        fmt::format("Hub spec {}: {}\nHINT: write hf://owner/repo[/subdir][@revision] "
                    "(or hf://owner/repo@revision[/subdir]); refs/pr/N goes right "
                    "after the repo id",
                    quoted(text), what));
  };
  if (body.find('\\') != std::string::npos) return fail("backslashes are not allowed");
  if (const auto ats = std::count(body.begin(), body.end(), '@'); ats > 1) {
    return fail(ats == 2 ? "'@' appears in two places: give the revision once"
                         : fmt::format("'@' appears {} times: give the revision once", ats));
  }
  std::vector<std::string> segments = split(body, '/');
  if (segments.size() >= 1 && segments[0] == "models") segments.erase(segments.begin());
  if (segments.size() < 2) return fail("expected owner/repo");
  HubSpec spec;
  spec.text = text;
  std::string name = segments[1];
  size_t next = 2;
  std::string early_revision;
  if (const size_t at = name.find('@'); at != std::string::npos) {  // official placement
    early_revision = name.substr(at + 1);
    name = name.substr(0, at);
    if (early_revision == "refs" && next < segments.size()) {  // refs/pr/N, refs/convert/NAME
      if ((segments[next] == "pr" || segments[next] == "convert") && next + 1 < segments.size()) {
        early_revision += "/" + segments[next] + "/" + segments[next + 1];
        next += 2;
      }
    }
    if (early_revision.empty()) return fail("empty revision after '@'");
  }
  for (const std::string& part : {segments[0], name}) {
    const std::string problem = repo_part_problem(part);
    if (!problem.empty()) return fail(fmt::format("repo id part '{}' {}", excerpt(part), problem));
  }
  spec.repo_id = segments[0] + "/" + name;
  std::vector<std::string> sub(segments.begin() + static_cast<std::ptrdiff_t>(next),
                               segments.end());
  std::string late_revision;
  if (!sub.empty()) {
    std::string& last = sub.back();
    if (const size_t at = last.rfind('@'); at != std::string::npos) {  // owner/repo/sub@rev
      late_revision = last.substr(at + 1);
      last = last.substr(0, at);
      if (late_revision.empty()) return fail("empty revision after '@'");
    }
  }
  if (!early_revision.empty() && !late_revision.empty()) {
    return fail("'@' appears in two places: give the revision once");
  }
  for (const std::string& segment : sub) {
    if (segment.empty()) return fail("empty path segment (a '//', a leading or a trailing '/')");
    if (segment == "." || segment == "..")
      return fail(fmt::format("path segment '{}' is not allowed", segment));
    if (segment.size() > kMaxSubfolderPart) {
      return fail(fmt::format("subfolder component '{}' is {} characters long; at most {}",
                              excerpt(segment), segment.size(), kMaxSubfolderPart));
    }
    if (segment.find('@') != std::string::npos)
      return fail("'@' appears in two places: give the revision once");
  }
  for (size_t i = 0; i < sub.size(); ++i) spec.subfolder += (i ? "/" : "") + sub[i];
  if (spec.subfolder.size() > kMaxSubfolder) {
    return fail(fmt::format("the subfolder is {} characters long; at most {}",
                            spec.subfolder.size(), kMaxSubfolder));
  }
  const std::string& written = early_revision.empty() ? late_revision : early_revision;
  if (written.size() > 3 * kMaxRevision) {  // percent-encoded, 3 characters a byte at most
    return fail(fmt::format("the revision is {} characters long; at most {}", written.size(),
                            kMaxRevision));
  }
  spec.revision = percent_decode(written, text);
  if (spec.revision.size() > kMaxRevision) {
    return fail(fmt::format("the revision is {} characters long; at most {}", spec.revision.size(),
                            kMaxRevision));
  }
  if (spec.revision.find("..") != std::string::npos ||
      (!spec.revision.empty() && spec.revision.front() == '/')) {
    return fail(
        fmt::format("revision '{}' is not a branch, tag, commit or refs/... name", spec.revision));
  }
  if (spec.revision.rfind("refs/pr/", 0) == 0) {
    const std::string number = spec.revision.substr(8);
    if (number.empty() || !std::all_of(number.begin(), number.end(),
                                       [](unsigned char c) { return std::isdigit(c); })) {
      return fail(
          fmt::format("revision '{}' is no pull request: refs/pr/ must be followed by its number "
                      "(e.g. refs/pr/12)",
                      spec.revision));
    }
  }
  return spec;
}

}  // namespace

std::optional<HubSpec> parse_hub_spec(const std::string& text, bool local_path_exists) {
  const std::string scheme = "hf://";
  if (text.rfind(scheme, 0) == 0) return parse_body(text.substr(scheme.size()), text);
  if (local_path_exists) return std::nullopt;
  // A bare name: the Hub only when it looks like owner/repo (not absolute, not ./ ../ ~).
  if (text.empty() || text.front() == '/' || text.front() == '.' || text.front() == '~' ||
      text.find('/') == std::string::npos) {
    return std::nullopt;
  }
  try {
    return parse_body(text, text);
  } catch (const CheckpointError& e) {
    throw CheckpointError(
        fmt::format("{} is no existing local path, and not a Hub spec either: {}", quoted(text),
                    std::string(e.what()).substr(std::string(e.what()).find(": ") + 2)));
  }
}

}  // namespace strata
