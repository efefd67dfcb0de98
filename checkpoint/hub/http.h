// HTTP to the Hugging Face Hub with libcurl (docs/formats.md): API calls that follow only
// relative redirects (renamed repos), file downloads that follow every redirect but send the
// token to the endpoint's host alone, retries with backoff for transient failures (connection
// errors, timeouts, 429, 5xx), and downloads resumed with Range after an interruption.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
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
  // as long as they make progress (settings.attempts tries without progress). `label` names the
  // file in progress lines.
  void download(const std::string& url, const std::string& path, uint64_t size,
                const std::string& label);

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
