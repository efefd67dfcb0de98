// HTTP to the Hugging Face Hub with libcurl (docs/formats.md): API calls that follow only
// relative redirects (renamed repos), file downloads that follow every redirect but send the
// token to the endpoint's host alone, retries with backoff for transient failures (connection
// errors, timeouts, 429, 5xx), and downloads resumed with Range after an interruption.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/hub/cache.h"
#include "checkpoint/errors.h"

namespace strata {

struct HttpResponse {
  long status = 0;
  std::map<std::string, std::string> headers;         // lower-case names
  std::string body;                                   // error bodies and API answers, not downloads
  std::string url;                                    // the URL that answered
  std::string header(const std::string& name) const;  // "" when absent
};

// Percent-encoding as Python's urllib.parse.quote: unreserved characters kept, plus `safe`.
std::string url_quote(const std::string& text, const std::string& safe = "");

// `text` safe to print: every piece of text that came from a server (headers, body excerpts,
// redirect locations, file names) and every URL passes through here before it reaches a
// message or a log line. Replaced by "<redacted>": `token` (as sent and percent-encoded),
// the credentials after "Bearer" and after "Authorization:" (an echoed header, any scheme),
// anything shaped like a Hub token (hf_ and 30 or more letters and digits), and the
// user:password@ of a URL.
std::string redact_secrets(const std::string& text, const std::string& token);

// A HubError that carries its own hint: a download that broke one of its bounds, a listing
// that does not end or names a file outside the repo.
class HubRuleError : public HubError {
 public:
  HubRuleError(const std::string& message, std::string hint, bool transient)
      : HubError(message, 0, "", transient), hint(std::move(hint)) {}
  std::string hint;  // "HINT: ..."
};

class HubHttp {
 public:
  using Log = std::function<void(const std::string&)>;

  // `log` receives progress lines of downloads (a line every few seconds and one per file).
  HubHttp(const HubSettings& settings, Log log);
  ~HubHttp();
  HubHttp(const HubHttp&) = delete;
  HubHttp& operator=(const HubHttp&) = delete;

  // GET or HEAD of a Hub URL: follows relative redirects only (an absolute one is answered as
  // is, its Location readable), retries transient failures, and throws HubError for any status
  // other than 2xx and 3xx.
  HttpResponse call(const std::string& method, const std::string& url);

  // Downloads `url` (every redirect followed) into `path`, continuing from the bytes `path`
  // already holds with a Range request, until it holds `size` bytes. Retries transient failures
  // as long as they make progress (settings.attempts tries without progress), within the
  // bounds of one file's download (settings.max_retries retries in all, the average rate
  // settings.min_rate once settings.min_rate_after_s have passed, settings.file_deadline_s);
  // a broken bound throws HubRuleError naming the file, the bytes received and the bound.
  // `label` names the file in progress lines and messages.
  void download(const std::string& url, const std::string& path, uint64_t size,
                const std::string& label);

  // redact_secrets with this client's token.
  std::string redact(const std::string& text) const;

 private:
  struct Request;
  HttpResponse send(Request& request);
  bool to_endpoint_host(const std::string& url) const;

  const HubSettings& settings_;
  Log log_;
  void* curl_ = nullptr;
  std::string endpoint_origin_;
};

}  // namespace strata
