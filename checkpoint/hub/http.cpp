// libcurl transport for the Hub.
#include "checkpoint/hub/http.h"

#include <curl/curl.h>
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "checkpoint/file_io.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int kMaxRedirects = 10;
constexpr size_t kMaxErrorBody = 64 << 10;

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  return text;
}

std::string trim(const std::string& text) {
  const size_t begin = text.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  return text.substr(begin, text.find_last_not_of(" \t\r\n") - begin + 1);
}

void init_curl() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// A URL parsed by libcurl; `base` resolves a relative `url` against it.
class Url {
 public:
  explicit Url(const std::string& url, const std::string& base = "") : handle_(curl_url()) {
    if (!base.empty() && curl_url_set(handle_, CURLUPART_URL, base.c_str(), 0) != CURLUE_OK)
      ok_ = false;
    if (ok_ && curl_url_set(handle_, CURLUPART_URL, url.c_str(), 0) != CURLUE_OK) ok_ = false;
  }
  ~Url() { curl_url_cleanup(handle_); }
  Url(const Url&) = delete;
  Url& operator=(const Url&) = delete;
  bool ok() const { return ok_; }
  std::string part(CURLUPart which, unsigned flags = 0) const {
    char* value = nullptr;
    if (!ok_ || curl_url_get(handle_, which, &value, flags) != CURLUE_OK) return "";
    std::string out = value;
    curl_free(value);
    return out;
  }
  // scheme://host:port, the unit a token is scoped to.
  std::string origin() const {
    return lower(part(CURLUPART_SCHEME)) + "://" + lower(part(CURLUPART_HOST)) + ":" +
           part(CURLUPART_PORT, CURLU_DEFAULT_PORT);
  }

 private:
  CURLU* handle_;
  bool ok_ = true;
};

bool is_absolute_location(const std::string& location) {
  if (location.rfind("//", 0) == 0) return true;
  const size_t colon = location.find(':');
  const size_t slash = location.find('/');
  return colon != std::string::npos && (slash == std::string::npos || colon < slash);
}

bool transient_status(long status) {
  return status == 429 || status >= 500;
}

bool transient_curl(CURLcode code) {
  switch (code) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
      return true;
    default:
      return false;
  }
}

// A URL for messages: without its query, which for a CDN holds signatures.
std::string shown(const std::string& url) {
  const size_t query = url.find('?');
  return query == std::string::npos ? url : url.substr(0, query) + "?...";
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) {
    bytes /= 1024;
    ++unit;
  }
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[unit]);
}

// "HTTP 404 (RepoNotFound: Repository not found) for GET URL", with the server's text and the
// URL redacted (before the body is cut to an excerpt, so that no part of a secret is left).
std::string status_message(const std::string& method, const HttpResponse& response,
                           const std::string& token) {
  std::string detail = response.header("x-error-message");
  if (detail.empty() && !response.body.empty()) {
    try {
      const auto body = nlohmann::json::parse(response.body);
      if (body.is_object() && body.contains("error") && body["error"].is_string())
        detail = body["error"];
    } catch (const nlohmann::json::exception&) {
      detail = redact_secrets(response.body, token).substr(0, 200);
    }
  }
  const std::string code = response.header("x-error-code");
  std::string paren;
  if (!code.empty() || !detail.empty()) {
    paren =
        fmt::format(" ({}{}{})", code, !code.empty() && !detail.empty() ? ": " : "", trim(detail));
  }
  return redact_secrets(
      fmt::format("HTTP {}{} for {} {}", response.status, paren, method, shown(response.url)),
      token);
}

// Characters that end a credential in text: whitespace, quotes, brackets and separators.
bool ends_secret(char c) {
  return c == '\0' || std::isspace(static_cast<unsigned char>(c)) ||
         std::strchr("\"'<>,;()[]{}\\", c) != nullptr;
}

void sleep_backoff(int attempt) {
  const double seconds = std::min(0.5 * std::pow(2.0, attempt - 1), 8.0);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
}

uint64_t file_size_or_zero(const std::string& path) {
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  return ec ? 0 : static_cast<uint64_t>(size);
}

}  // namespace

std::string redact_secrets(const std::string& text, const std::string& token) {
  static const std::string kRedacted = "<redacted>";
  std::string s = text;
  if (!token.empty()) {
    for (const std::string& form : {token, url_quote(token)}) {
      for (size_t at = s.find(form); at != std::string::npos;
           at = s.find(form, at + kRedacted.size()))
        s.replace(at, form.size(), kRedacted);
    }
  }
  const std::string low = lower(s);
  auto secret_end = [&](size_t from) {
    while (from < s.size() && !ends_secret(s[from])) ++from;
    return from;
  };
  auto word_start = [&](size_t at) {
    return at == 0 || !std::isalnum(static_cast<unsigned char>(s[at - 1]));
  };
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    if (low.compare(i, 6, "bearer") == 0 && word_start(i)) {  // Bearer <credentials>
      size_t k = i + 6;
      while (k < s.size() && (s[k] == ' ' || s[k] == '\t')) ++k;
      if (k > i + 6 && k < s.size() && !ends_secret(s[k]) &&
          s.compare(k, kRedacted.size(), kRedacted) != 0) {
        out += s.substr(i, k - i) + kRedacted;
        i = secret_end(k);
        continue;
      }
    }
    if (low.compare(i, 13, "authorization") == 0 && word_start(i)) {  // Authorization: <value>
      size_t k = i + 13;
      while (k < s.size() && (s[k] == '"' || s[k] == '\'' || s[k] == ' ')) ++k;
      if (k < s.size() && (s[k] == ':' || s[k] == '=')) {
        ++k;
        while (k < s.size() && (s[k] == '"' || s[k] == '\'' || s[k] == ' ' || s[k] == '\t')) ++k;
        if (k < s.size() && !ends_secret(s[k]) && low.compare(k, 6, "bearer") != 0 &&
            s.compare(k, kRedacted.size(), kRedacted) != 0) {
          out += s.substr(i, k - i) + kRedacted;  // the scheme and credentials, to the line's end
          i = k;
          while (i < s.size() && std::strchr("\r\n\"'<>,;)]}", s[i]) == nullptr) ++i;
          continue;
        }
      }
    }
    if (low.compare(i, 3, "hf_") == 0 && word_start(i)) {  // hf_ and 30+ letters and digits
      size_t k = i + 3;
      while (k < s.size() && std::isalnum(static_cast<unsigned char>(s[k]))) ++k;
      if (k - i - 3 >= 30) {
        out += kRedacted;
        i = k;
        continue;
      }
    }
    if (s.compare(i, 3, "://") == 0) {  // scheme://user:password@host
      size_t k = i + 3;
      while (k < s.size() && !ends_secret(s[k]) && std::strchr("/?#@", s[k]) == nullptr) ++k;
      if (k > i + 3 && k < s.size() && s[k] == '@') {
        out += "://" + kRedacted;
        i = k;
        continue;
      }
    }
    out += s[i++];
  }
  return out;
}

std::string HttpResponse::header(const std::string& name) const {
  const auto it = headers.find(lower(name));
  return it == headers.end() ? "" : it->second;
}

std::string url_quote(const std::string& text, const std::string& safe) {
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' ||
        safe.find(static_cast<char>(c)) != std::string::npos) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("%{:02X}", c);
    }
  }
  return out;
}

struct HubHttp::Request {
  std::string method = "GET", url;
  std::vector<std::string> headers;
  double timeout_s = 0;        // whole request; 0: none (downloads use the stall timeout)
  bool stall_timeout = false;  // fail when no byte arrives for settings.download_timeout_s
  // Receives the body of a 2xx answer; returns false to abort (a local write failure).
  std::function<bool(const char*, size_t, long)> sink;
  // Called often during a transfer, also while it stalls; returns false to abort it.
  std::function<bool(double received)> progress;
  // Filled by the callbacks.
  HttpResponse response;
  std::string sink_error;
};

namespace {

size_t on_header(char* data, size_t size, size_t count, void* user) {
  HttpResponse& response = *static_cast<HttpResponse*>(user);
  const std::string line(data, size * count);
  if (line.rfind("HTTP/", 0) == 0) {
    response.headers.clear();  // a new response (after 100 Continue)
  } else if (const size_t colon = line.find(':'); colon != std::string::npos) {
    response.headers[lower(trim(line.substr(0, colon)))] = trim(line.substr(colon + 1));
  }
  return size * count;
}

struct WriteTarget {
  void* curl;
  void* request;
};

}  // namespace

HubHttp::HubHttp(const HubSettings& settings, Log log)
    : settings_(settings),
      log_([log = std::move(log), token = settings.token](const std::string& line) {
        log(redact_secrets(line, token));
      }) {
  init_curl();
  curl_ = curl_easy_init();
  if (!curl_) throw CheckpointError("libcurl: cannot create a handle");
  const Url endpoint(settings_.endpoint);
  if (!endpoint.ok() || endpoint.part(CURLUPART_HOST).empty()) {
    throw CheckpointError(
        fmt::format("HF_ENDPOINT '{}' is not a URL\nHINT: unset it for the public Hub, or give "
                    "http(s)://host[:port]",
                    settings_.endpoint));
  }
  endpoint_origin_ = endpoint.origin();
}

HubHttp::~HubHttp() {
  curl_easy_cleanup(static_cast<CURL*>(curl_));
}

std::string HubHttp::redact(const std::string& text) const {
  return redact_secrets(text, settings_.token);
}

bool HubHttp::to_endpoint_host(const std::string& url) const {
  const Url parsed(url);
  return parsed.ok() && parsed.origin() == endpoint_origin_;
}

HttpResponse HubHttp::send(Request& request) {
  CURL* curl = static_cast<CURL*>(curl_);
  curl_easy_reset(curl);  // keeps the connection cache
  request.response = HttpResponse();
  request.response.url = request.url;
  char error_buffer[CURL_ERROR_SIZE] = {};
  curl_easy_setopt(curl, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error_buffer);
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
  if (request.method == "HEAD") curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(settings_.metadata_timeout_s * 1000));
  if (request.timeout_s > 0)
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(request.timeout_s * 1000));
  if (request.sink) curl_easy_setopt(curl, CURLOPT_BUFFERSIZE, 256L << 10);
  if (request.stall_timeout) {
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME,
                     static_cast<long>(std::ceil(settings_.download_timeout_s)));
  }
  curl_slist* headers = nullptr;
  std::vector<std::string> lines = {"Accept-Encoding: identity", "User-Agent: strata/0.1"};
  lines.insert(lines.end(), request.headers.begin(), request.headers.end());
  // The token goes to the Hub's own host only: never to a CDN a download is redirected to.
  if (!settings_.token.empty() && to_endpoint_host(request.url))
    lines.push_back("Authorization: Bearer " + settings_.token);
  for (const std::string& line : lines) headers = curl_slist_append(headers, line.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &request.response);
  WriteTarget target{curl, &request};
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &target);
  curl_easy_setopt(
      curl, CURLOPT_WRITEFUNCTION,
      +[](char* data, size_t size, size_t count, void* user) -> size_t {
        auto* t = static_cast<WriteTarget*>(user);
        auto* r = static_cast<Request*>(t->request);
        long status = 0;
        curl_easy_getinfo(static_cast<CURL*>(t->curl), CURLINFO_RESPONSE_CODE, &status);
        const size_t bytes = size * count;
        if (status >= 200 && status < 300 && r->sink) {
          try {  // no exception may cross libcurl's C frames
            return r->sink(data, bytes, status) ? bytes : 0;
          } catch (const std::exception& e) {
            r->sink_error = e.what();
            return 0;
          }
        }
        if (r->response.body.size() < kMaxErrorBody) r->response.body.append(data, bytes);
        return bytes;
      });
  if (request.progress) {
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &request);
    curl_easy_setopt(
        curl, CURLOPT_XFERINFOFUNCTION,
        +[](void* user, curl_off_t, curl_off_t now, curl_off_t, curl_off_t) -> int {
          try {  // no exception may cross libcurl's C frames
            return static_cast<Request*>(user)->progress(static_cast<double>(now)) ? 0 : 1;
          } catch (...) {
          }
          return 0;
        });
  }
  const CURLcode code = curl_easy_perform(curl);
  // Nothing the handle keeps may point at this frame or at freed lists.
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, nullptr);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, nullptr);
  curl_slist_free_all(headers);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &request.response.status);
  if (code != CURLE_OK) {
    if (code == CURLE_WRITE_ERROR && !request.sink_error.empty())
      throw IoError(redact(request.sink_error));
    const std::string reason = error_buffer[0] ? error_buffer : curl_easy_strerror(code);
    throw HubError(
        redact(fmt::format("{} {} failed: {}", request.method, shown(request.url), trim(reason))),
        0, "", transient_curl(code));
  }
  return request.response;
}

HttpResponse HubHttp::call(const std::string& method, const std::string& url) {
  for (int attempt = 1;; ++attempt) {
    try {
      std::string current = url;
      for (int hop = 0;; ++hop) {
        Request request;
        request.method = method;
        request.url = current;
        request.timeout_s = settings_.metadata_timeout_s;
        HttpResponse response = send(request);
        const std::string location = response.header("location");
        if (response.status >= 300 && response.status < 400 && !location.empty() &&
            !is_absolute_location(location)) {
          if (hop == kMaxRedirects)
            throw HubError(redact(fmt::format("too many redirects from {}", shown(url))),
                           response.status, "", false);
          current = Url(location, current).part(CURLUPART_URL);
          continue;
        }
        if (response.status >= 400) {
          throw HubError(status_message(method, response, settings_.token), response.status,
                         redact(response.header("x-error-code")),
                         transient_status(response.status));
        }
        return response;
      }
    } catch (const HubError& e) {
      if (!e.transient || attempt >= settings_.attempts) {
        if (!e.transient || settings_.attempts == 1) throw;
        throw HubError(fmt::format("{} (gave up after {} attempts)", e.what(), attempt), e.status,
                       e.error_code, true);
      }
      sleep_backoff(attempt);
    }
  }
}

void HubHttp::download(const std::string& url, const std::string& path, uint64_t size,
                       const std::string& label) {
  const auto start = Clock::now();
  if (size == 0) {  // nothing to fetch
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> empty(std::fopen(path.c_str(), "wb"),
                                                          &std::fclose);
    if (!empty) throw IoError(fmt::format("cannot create {}: {}", path, std::strerror(errno)));
    return;
  }
  const uint64_t initial = std::min(file_size_or_zero(path), size);
  if (initial > 0)
    log_(fmt::format("hub: {}: resuming a partial download at {} of {}", label,
                     human_bytes(initial), human_bytes(size)));
  auto last_report = start;
  int attempts_without_progress = 0, attempts = 0;
  uint64_t received = 0;  // bytes written in this call, over all requests
  auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  // The bound of a file's download this one has broken ("" for none), naming its setting.
  auto broken_bound = [&]() -> std::string {
    const double elapsed = seconds();
    if (settings_.file_deadline_s > 0 && elapsed > settings_.file_deadline_s) {
      return fmt::format("it ran past the deadline of {:g} s per file (STRATA_HUB_FILE_DEADLINE)",
                         settings_.file_deadline_s);
    }
    if (settings_.min_rate > 0 && elapsed >= settings_.min_rate_after_s &&
        static_cast<double>(received) / elapsed < settings_.min_rate) {
      return fmt::format(
          "its average rate, {}/s, is below the minimum of {}/s (STRATA_HUB_MIN_RATE) that "
          "holds once a download has run {:g} s (STRATA_HUB_MIN_RATE_AFTER)",
          human_bytes(static_cast<double>(received) / elapsed), human_bytes(settings_.min_rate),
          settings_.min_rate_after_s);
    }
    return "";
  };
  // `last`: the failure of the last attempt, when the bound was found after it.
  auto fail_bound = [&](const std::string& bound, const HubError* last) {
    throw HubRuleError(
        redact(fmt::format(
            "the download of {} was stopped because {}: {} received in {:.1f} s over {} "
            "attempt{}, the file holds {} of {}{}",
            label, bound, human_bytes(static_cast<double>(received)), seconds(), attempts,
            attempts == 1 ? "" : "s", human_bytes(static_cast<double>(file_size_or_zero(path))),
            human_bytes(static_cast<double>(size)),
            last ? fmt::format(" (last attempt: {})", last->what()) : "")),
        "HINT: the server sends this file too slowly or keeps stalling; retry later, or relax "
        "the bound: STRATA_HUB_MIN_RATE (bytes/s, 0: off), STRATA_HUB_MIN_RATE_AFTER (s), "
        "STRATA_HUB_FILE_DEADLINE (s, 0: none), STRATA_HUB_MAX_RETRIES; the partial file is "
        "kept and a later run continues it",
        true);
  };
  while (true) {
    uint64_t have = file_size_or_zero(path);
    if (have > size) {  // not ours to continue: start over
      fs::remove(path);
      have = 0;
    }
    if (have == size) break;
    const uint64_t before = have;
    ++attempts;
    std::string broken;  // the bound the running request broke
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(nullptr, &std::fclose);
    try {
      std::string current = url;
      HttpResponse response;
      for (int hop = 0;; ++hop) {
        Request request;
        request.url = current;
        request.stall_timeout = true;
        if (have > 0) request.headers.push_back(fmt::format("Range: bytes={}-", have));
        request.sink = [&](const char* data, size_t bytes, long status) {
          if (!file) {
            if (status == 206) {
              // Content-Range: bytes START-END/TOTAL must continue where the file ends.
              const std::string range = request.response.header("content-range");
              const size_t space = range.find(' '), dash = range.find('-');
              if (space == std::string::npos || dash == std::string::npos ||
                  range.substr(space + 1, dash - space - 1) != std::to_string(have)) {
                request.sink_error =
                    fmt::format("{}: the server answered Range bytes={}- with Content-Range '{}'",
                                label, have, range);
                return false;
              }
            } else {
              have = 0;  // 200 to a Range request: the whole file again
            }
            file.reset(std::fopen(path.c_str(), have > 0 ? "ab" : "wb"));
            if (!file) {
              request.sink_error = fmt::format("cannot open {}: {}", path, std::strerror(errno));
              return false;
            }
          }
          if (std::fwrite(data, 1, bytes, file.get()) != bytes) {
            request.sink_error = fmt::format("cannot write {}: {}", path, std::strerror(errno));
            return false;
          }
          received += bytes;
          return true;
        };
        const uint64_t base = have;
        request.progress = [&, base](double now_received) {
          broken = broken_bound();
          if (!broken.empty()) return false;
          const auto now = Clock::now();
          if (now - last_report < std::chrono::seconds(2)) return true;
          last_report = now;
          const double done = static_cast<double>(base) + now_received;
          const double elapsed = std::chrono::duration<double>(now - start).count();
          const double rate = (done - static_cast<double>(initial)) / std::max(elapsed, 1e-9);
          log_(fmt::format("hub: {}: {} of {} ({:.0f}%), {}/s, ETA {:.0f} s", label,
                           human_bytes(done), human_bytes(static_cast<double>(size)),
                           100.0 * done / std::max<double>(size, 1), human_bytes(rate),
                           rate > 0 ? (static_cast<double>(size) - done) / rate : 0.0));
          return true;
        };
        response = send(request);
        const std::string location = response.header("location");
        if (response.status >= 300 && response.status < 400 && !location.empty()) {
          if (hop == kMaxRedirects)
            throw HubError(redact(fmt::format("too many redirects from {}", shown(url))),
                           response.status, "", false);
          current = Url(location, current).part(CURLUPART_URL);
          continue;
        }
        break;
      }
      file.reset();
      if (response.status == 416) {  // the partial file is no prefix the server knows: start over
        fs::remove(path);
        throw HubError(status_message("GET", response, settings_.token), response.status, "", true);
      }
      if (response.status >= 300) {
        throw HubError(status_message("GET", response, settings_.token), response.status,
                       redact(response.header("x-error-code")), transient_status(response.status));
      }
      if (file_size_or_zero(path) < size && file_size_or_zero(path) <= before) {
        throw HubError(redact(fmt::format("GET {}: answered {} without data", shown(current),
                                          response.status)),
                       response.status, "", true);
      }
    } catch (const HubError& e) {
      file.reset();
      if (!broken.empty()) fail_bound(broken, nullptr);
      if (!e.transient) throw;
      const uint64_t now_have = file_size_or_zero(path);
      attempts_without_progress = now_have > before ? 0 : attempts_without_progress + 1;
      if (attempts_without_progress >= settings_.attempts) {
        throw HubError(
            fmt::format(
                "{} (download of {} gave up after {} attempts without progress, at {} of {})",
                e.what(), redact(label), attempts_without_progress, human_bytes(now_have),
                human_bytes(size)),
            e.status, e.error_code, true);
      }
      if (const std::string bound = broken_bound(); !bound.empty()) fail_bound(bound, &e);
      if (attempts > settings_.max_retries) {
        fail_bound(fmt::format("it needed more than {} retries (STRATA_HUB_MAX_RETRIES)",
                               settings_.max_retries),
                   &e);
      }
      log_(fmt::format("hub: {}: {}; retrying from byte {}", label, e.what(), now_have));
      if (attempts_without_progress > 0) sleep_backoff(attempts_without_progress);
    }
    if (file_size_or_zero(path) > size) {
      const uint64_t got = file_size_or_zero(path);
      fs::remove(path);
      throw HubError(
          redact(fmt::format("consistency check failed for {}: expected {} bytes, received {}",
                             label, size, got)),
          0, "", false);
    }
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  if (size < (1u << 20)) return;  // small files: the summary line counts them
  log_(fmt::format("hub: {}: {} in {:.1f} s ({}/s)", label, human_bytes(static_cast<double>(size)),
                   elapsed,
                   human_bytes(static_cast<double>(size - initial) / std::max(elapsed, 1e-9))));
}

}  // namespace strata
