#include "push/registry_client.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/json_fields.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr size_t kMaxResponseBody = 1 << 20;

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

std::string UrlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out += absl::StrFormat("%%%02X", c);
    }
  }
  return out;
}

struct Response {
  long status = 0;
  std::map<std::string, std::string> headers;  // Lower-case names.
  std::string body;
  std::string Header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? "" : it->second;
  }
};

struct Request {
  std::string method;  // GET HEAD POST PUT PATCH
  std::string url;
  std::vector<std::string> headers;
  const BlobSource* body = nullptr;  // For PUT and PATCH.
  uint64_t offset = 0;
  uint64_t length = 0;
  std::string what;              // For errors: "PUT manifest repo:tag".
  bool send_credentials = true;  // False for the token realm's redirects.
};

// Feeds a BlobSource range to libcurl.
struct BodyReader {
  const BlobSource* blob = nullptr;
  uint64_t pos = 0;
  uint64_t end = 0;
  int fd = -1;
  std::string error;
  const std::function<void(uint64_t)>* on_sent = nullptr;
  static size_t Read(char* out, size_t size, size_t n, void* self_ptr) {
    auto* self = static_cast<BodyReader*>(self_ptr);
    const size_t want = static_cast<size_t>(std::min<uint64_t>(size * n, self->end - self->pos));
    if (want == 0) return 0;
    size_t got = want;
    if (self->blob->file.empty()) {
      std::memcpy(out, self->blob->data.data() + self->pos, want);
    } else {
      const ssize_t r = ::pread(self->fd, out, want, static_cast<off_t>(self->pos));
      if (r <= 0) {
        self->error = r < 0 ? std::strerror(errno) : "file shorter than expected";
        return CURL_READFUNC_ABORT;
      }
      got = static_cast<size_t>(r);
    }
    self->pos += got;
    if (self->on_sent != nullptr && *self->on_sent) (*self->on_sent)(got);
    return got;
  }
};

size_t CollectBody(char* data, size_t size, size_t n, void* self) {
  auto* body = static_cast<std::string*>(self);
  const size_t len = size * n;
  if (body->size() < kMaxResponseBody) body->append(data, std::min(len, kMaxResponseBody - body->size()));
  return len;
}

size_t CollectHeader(char* data, size_t size, size_t n, void* self) {
  auto* headers = static_cast<std::map<std::string, std::string>*>(self);
  absl::string_view line(data, size * n);
  const size_t colon = line.find(':');
  if (colon != absl::string_view::npos) {
    (*headers)[absl::AsciiStrToLower(absl::StripAsciiWhitespace(line.substr(0, colon)))] =
        std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  }
  return size * n;
}

absl::StatusCode CodeFor(long status) {
  switch (status) {
    case 400: return absl::StatusCode::kInvalidArgument;
    case 401: return absl::StatusCode::kUnauthenticated;
    case 403: return absl::StatusCode::kPermissionDenied;
    case 404: return absl::StatusCode::kNotFound;
    case 429: return absl::StatusCode::kResourceExhausted;
    default: return status >= 500 ? absl::StatusCode::kUnavailable : absl::StatusCode::kUnknown;
  }
}

}  // namespace

// `key="value",key2="value2"` after the scheme of a WWW-Authenticate header.
std::map<std::string, std::string> ParseAuthParams(absl::string_view s) {
  std::map<std::string, std::string> out;
  while (!s.empty()) {
    s = absl::StripLeadingAsciiWhitespace(s);
    const size_t eq = s.find('=');
    if (eq == absl::string_view::npos) break;
    std::string key = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s.substr(0, eq)));
    s.remove_prefix(eq + 1);
    std::string value;
    if (absl::ConsumePrefix(&s, "\"")) {
      const size_t end = s.find('"');
      value = std::string(s.substr(0, end));
      s.remove_prefix(end == absl::string_view::npos ? s.size() : end + 1);
    } else {
      const size_t end = s.find(',');
      value = std::string(absl::StripAsciiWhitespace(s.substr(0, end)));
      s.remove_prefix(end == absl::string_view::npos ? s.size() : end);
    }
    out[key] = value;
    absl::ConsumePrefix(&s, ",");
  }
  return out;
}

// "UNAUTHORIZED: authentication required" from the registry's error body.
std::string RegistryErrorSummary(const std::string& body) {
  nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (!j.is_object() || !j.contains("errors") || !j["errors"].is_array()) return "";
  std::vector<std::string> parts;
  for (const auto& e : j["errors"]) {
    if (!e.is_object()) continue;
    parts.push_back(absl::StrCat(JsonString(e, "code", "UNKNOWN"), ": ", JsonString(e, "message")));
  }
  return absl::StrJoin(parts, "; ");
}

struct HttpRegistryClient::Impl {
  std::string registry;
  RegistryOptions options;
  CURL* curl = nullptr;
  std::string bearer;                               // The token the registry's realm issued, if any.
  std::map<std::string, std::string> token_params;  // The challenge `bearer` answers.
  absl::Time token_renew = absl::InfiniteFuture();  // Fetch a new one from here on.
  bool basic = false;                               // The registry asked for Basic credentials.
  std::map<std::string, int> counts;
  std::mt19937 rng{std::random_device{}()};

  std::string Base() const { return absl::StrCat(options.plain_http ? "http://" : "https://", registry); }
  std::string Resolve(const std::string& location) const {
    if (absl::StartsWith(location, "http://") || absl::StartsWith(location, "https://")) return location;
    return Base() + (absl::StartsWith(location, "/") ? "" : "/") + location;
  }

  // One HTTP exchange; a transport failure is Unavailable.
  absl::StatusOr<Response> Perform(const Request& r, const std::string& authorization) {
    Response response;
    BodyReader reader;
    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_URL, r.url.c_str());
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, 20L);
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);  // Abort after 60 s without progress.
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME, 60L);
    if (!options.ca_file.empty()) curl_easy_setopt(curl, CURLOPT_CAINFO, options.ca_file.c_str());
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, CollectBody);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &response.body);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, CollectHeader);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, &response.headers);
    curl_slist* headers = curl_slist_append(nullptr, "Expect:");
    for (const std::string& h : r.headers) headers = curl_slist_append(headers, h.c_str());
    if (!authorization.empty()) headers = curl_slist_append(headers, authorization.c_str());
    if (r.method == "HEAD") {
      curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
    } else if (r.method == "POST") {
      curl_easy_setopt(curl, CURLOPT_POST, 1L);
      curl_easy_setopt(curl, CURLOPT_POSTFIELDS, "");
      curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, 0L);
    } else if (r.method == "PUT" || r.method == "PATCH") {
      curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
      if (r.method == "PATCH") curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "PATCH");
      static const BlobSource kEmpty;
      reader.blob = r.body != nullptr ? r.body : &kEmpty;
      reader.pos = r.offset;
      reader.end = r.offset + (r.body != nullptr ? r.length : 0);
      reader.on_sent = &options.on_sent;
      if (r.body != nullptr && !r.body->file.empty()) {
        reader.fd = ::open(r.body->file.c_str(), O_RDONLY | O_CLOEXEC);
        if (reader.fd < 0) {
          curl_slist_free_all(headers);
          return absl::InternalError(absl::StrCat("cannot read ", r.body->file, ": ", std::strerror(errno)));
        }
      }
      curl_easy_setopt(curl, CURLOPT_READFUNCTION, BodyReader::Read);
      curl_easy_setopt(curl, CURLOPT_READDATA, &reader);
      curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(reader.end - reader.pos));
    }
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    ++counts[r.method];
    const CURLcode code = curl_easy_perform(curl);
    curl_slist_free_all(headers);
    if (reader.fd >= 0) ::close(reader.fd);
    if (!reader.error.empty()) {
      return absl::InternalError(absl::StrCat("cannot read ", r.body->file, ": ", reader.error));
    }
    if (code != CURLE_OK) {
      const std::string why = absl::StrCat("registry ", registry, ": ", r.what, ": ", curl_easy_strerror(code));
      // TLS trust and URL problems do not go away by asking again.
      switch (code) {
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_URL_MALFORMAT:
        case CURLE_UNSUPPORTED_PROTOCOL: return absl::FailedPreconditionError(why);
        default: return absl::UnavailableError(why);
      }
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
    return response;
  }

  std::string Authorization(bool send_credentials) const {
    if (!bearer.empty()) return absl::StrCat("Authorization: Bearer ", bearer);
    if (basic && send_credentials && !options.credentials.username.empty()) {
      return absl::StrCat("Authorization: Basic ",
                          absl::Base64Escape(options.credentials.username + ":" + options.credentials.password));
    }
    return "";
  }

  // The Bearer flow: a token for `scope` from the realm, with the Basic
  // credentials when there are any.
  absl::Status FetchToken(const std::map<std::string, std::string>& params) {
    auto realm = params.find("realm");
    if (realm == params.end())
      return absl::UnauthenticatedError(absl::StrCat("registry ", registry, ": no token realm"));
    std::string url = realm->second;
    std::vector<std::string> query;
    for (const char* key : {"service", "scope"}) {
      auto it = params.find(key);
      if (it == params.end()) continue;
      std::string value = it->second;
      // A lone pull scope comes from a HEAD or GET on the repository being
      // pushed; asking for push as well saves a second token when the
      // upload starts. (A mount's challenge names two repositories and is
      // asked for as it is.)
      if (std::string(key) == "scope" && absl::StartsWith(value, "repository:") && absl::EndsWith(value, ":pull") &&
          value.find(' ') == std::string::npos) {
        value += ",push";
      }
      query.push_back(absl::StrCat(key, "=", UrlEncode(value)));
    }
    if (!query.empty()) url += (url.find('?') == std::string::npos ? "?" : "&") + absl::StrJoin(query, "&");
    Request r{.method = "GET",
              .url = url,
              .headers = {},
              .body = nullptr,
              .offset = 0,
              .length = 0,
              .what = "token request",
              .send_credentials = true};
    std::string authorization;
    if (!options.credentials.username.empty()) {
      authorization = absl::StrCat("Authorization: Basic ", absl::Base64Escape(options.credentials.username + ":" +
                                                                               options.credentials.password));
    }
    const absl::Time asked = absl::Now();
    absl::StatusOr<Response> response = Perform(r, authorization);
    if (!response.ok()) return response.status();
    if (response->status == 401 || response->status == 403) {
      return absl::Status(CodeFor(response->status),
                          options.credentials.username.empty()
                              ? absl::StrCat("registry ", registry,
                                             ": UNAUTHORIZED: the token service wants credentials and none are "
                                             "configured")
                              : absl::StrCat("registry ", registry,
                                             ": UNAUTHORIZED: the token service refused the credentials of user '",
                                             options.credentials.username, "' (HTTP ", response->status, ")"));
    }
    if (response->status != 200) {
      return absl::Status(CodeFor(response->status),
                          absl::StrCat("registry ", registry, ": token request: HTTP ", response->status));
    }
    nlohmann::json j = nlohmann::json::parse(response->body, nullptr, false);
    std::string token = JsonString(j, "token");
    if (token.empty()) token = JsonString(j, "access_token");
    if (token.empty()) {
      return absl::UnauthenticatedError(absl::StrCat("registry ", registry, ": the token service sent no token"));
    }
    // Kept until shortly before it expires (60 s when the service does not
    // say, as the token specification has it), then fetched again.
    int64_t lifetime = JsonInt<int64_t>(j, "expires_in", 60);
    if (lifetime <= 0) lifetime = 60;
    const absl::Duration life = absl::Seconds(lifetime);
    token_renew = asked + life - std::min(absl::Seconds(10), life / 4);
    bearer = std::move(token);
    token_params = params;
    return absl::OkStatus();
  }

  // A request with authentication and retries. Returns any HTTP status;
  // only transport failures that outlast the retries are errors.
  absl::StatusOr<Response> Send(const Request& r) {
    bool auth_retried = false;
    absl::Status last;
    for (int attempt = 0; attempt < options.max_attempts; ++attempt) {
      if (attempt > 0) {
        absl::Duration wait = std::min(absl::Milliseconds(200) * (1 << std::min(attempt, 10)), options.max_backoff);
        wait = wait * std::uniform_real_distribution<double>(0.5, 1.5)(rng);
        if (options.on_retry) {
          options.on_retry(absl::StrFormat("registry %s: %s failed (%s); retrying in %.1fs (attempt %d of %d)",
                                           registry, r.what, last.message(), absl::ToDoubleSeconds(wait), attempt + 1,
                                           options.max_attempts));
        }
        absl::SleepFor(wait);
      }
      if (!bearer.empty() && absl::Now() >= token_renew) {
        if (absl::Status s = FetchToken(token_params); !s.ok()) {
          if (!absl::IsUnavailable(s)) return s;
          last = s;
          continue;
        }
      }
      absl::StatusOr<Response> response = Perform(r, Authorization(r.send_credentials));
      if (!response.ok()) {
        last = response.status();
        if (absl::IsUnavailable(last)) continue;
        return last;
      }
      if (response->status == 401 && !auth_retried) {
        auth_retried = true;
        const std::string challenge = response->Header("www-authenticate");
        absl::string_view rest = challenge;
        if (absl::ConsumePrefix(&rest, "Bearer ") || absl::ConsumePrefix(&rest, "bearer ")) {
          if (absl::Status s = FetchToken(ParseAuthParams(rest)); !s.ok()) {
            if (!absl::IsUnavailable(s)) return s;
            last = s;  // The token service is unreachable: a retry like any other.
            auth_retried = false;
            continue;
          }
        } else if (!options.credentials.username.empty()) {
          basic = true;
        } else {
          return *response;
        }
        --attempt;  // Authenticating is not a retry.
        continue;
      }
      if (response->status == 429 || response->status >= 500) {
        last = absl::Status(CodeFor(response->status),
                            absl::StrCat("registry ", registry, ": ", r.what, ": HTTP ", response->status));
        int64_t retry_after = 0;
        if (absl::SimpleAtoi(response->Header("retry-after"), &retry_after) && retry_after > 0) {
          absl::SleepFor(std::min(absl::Seconds(retry_after), options.max_backoff));
        }
        continue;
      }
      return response;
    }
    return absl::Status(last.code(), absl::StrCat(last.message(), " (after ", options.max_attempts, " attempts)"));
  }

  absl::Status Fail(const Request& r, const Response& response) const {
    std::string errors = RegistryErrorSummary(response.body);
    if (errors.empty() && response.status == 401) {  // HEAD answers carry no body.
      errors = options.credentials.username.empty()
                   ? "UNAUTHORIZED: the registry wants credentials and none are configured"
                   : absl::StrCat("UNAUTHORIZED: the registry refused the credentials of user '",
                                  options.credentials.username, "'");
    } else if (errors.empty() && response.status == 403) {
      errors = "DENIED: the credentials may not do this";
    }
    return absl::Status(CodeFor(response.status), absl::StrCat("registry ", registry, ": ", r.what, ": HTTP ",
                                                               response.status, errors.empty() ? "" : " ", errors));
  }

  absl::StatusOr<std::string> StartUpload(const std::string& repository, const std::string& digest) {
    Request r{.method = "POST",
              .url = absl::StrCat(Base(), "/v2/", repository, "/blobs/uploads/"),
              .headers = {},
              .body = nullptr,
              .offset = 0,
              .length = 0,
              .what = absl::StrCat("start upload of ", digest),
              .send_credentials = true};
    absl::StatusOr<Response> response = Send(r);
    if (!response.ok()) return response.status();
    if (response->status != 202 || response->Header("location").empty()) return Fail(r, *response);
    return Resolve(response->Header("location"));
  }
};

HttpRegistryClient::HttpRegistryClient(std::string registry, RegistryOptions options) : impl_(new Impl) {
  GlobalInit();
  impl_->registry = std::move(registry);
  impl_->options = std::move(options);
  impl_->curl = curl_easy_init();
}

HttpRegistryClient::~HttpRegistryClient() {
  if (impl_->curl != nullptr) curl_easy_cleanup(impl_->curl);
}

int HttpRegistryClient::requests(const std::string& method) const {
  auto it = impl_->counts.find(method);
  return it == impl_->counts.end() ? 0 : it->second;
}

absl::StatusOr<bool> HttpRegistryClient::HasBlob(const std::string& repository, const std::string& digest) {
  Request r{.method = "HEAD",
            .url = absl::StrCat(impl_->Base(), "/v2/", repository, "/blobs/", digest),
            .headers = {},
            .body = nullptr,
            .offset = 0,
            .length = 0,
            .what = absl::StrCat("HEAD blob ", digest),
            .send_credentials = true};
  absl::StatusOr<Response> response = impl_->Send(r);
  if (!response.ok()) return response.status();
  if (response->status == 200) return true;
  if (response->status == 404) return false;
  return impl_->Fail(r, *response);
}

absl::Status HttpRegistryClient::UploadBlob(const std::string& repository, const std::string& digest,
                                            const BlobSource& blob) {
  // A broken upload is started again from the beginning, a bounded number of
  // times (each request inside it already retries).
  absl::Status last;
  for (int attempt = 0; attempt < 3; ++attempt) {
    absl::StatusOr<std::string> location = impl_->StartUpload(repository, digest);
    if (!location.ok()) return location.status();
    std::string url = *location;
    uint64_t offset = 0;
    const bool monolithic = blob.size <= impl_->options.monolithic_max_bytes;
    bool broken = false;
    while (!monolithic && offset < blob.size) {
      const uint64_t n = std::min<uint64_t>(impl_->options.chunk_bytes, blob.size - offset);
      Request patch{.method = "PATCH",
                    .url = url,
                    .headers = {"Content-Type: application/octet-stream",
                                absl::StrCat("Content-Range: ", offset, "-", offset + n - 1)},
                    .body = &blob,
                    .offset = offset,
                    .length = n,
                    .what = absl::StrCat("upload of ", digest, " at ", offset),
                    .send_credentials = true};
      absl::StatusOr<Response> response = impl_->Send(patch);
      if (!response.ok() || response->status != 202) {
        last = response.ok() ? impl_->Fail(patch, *response) : response.status();
        broken = true;
        break;
      }
      if (!response->Header("location").empty()) url = impl_->Resolve(response->Header("location"));
      offset += n;
    }
    if (broken) continue;
    Request put{.method = "PUT",
                .url = absl::StrCat(url, url.find('?') == std::string::npos ? "?" : "&", "digest=", UrlEncode(digest)),
                .headers = {"Content-Type: application/octet-stream"},
                .body = monolithic ? &blob : nullptr,
                .offset = 0,
                .length = monolithic ? blob.size : 0,
                .what = absl::StrCat("upload of ", digest),
                .send_credentials = true};
    absl::StatusOr<Response> response = impl_->Send(put);
    if (!response.ok()) {
      last = response.status();
      continue;
    }
    if (response->status == 201 || response->status == 204) return absl::OkStatus();
    return impl_->Fail(put, *response);
  }
  return last;
}

namespace {

// PATCHes what it is given in chunks of `chunk_bytes` (each kept until the
// registry took it, so a retried PATCH sends it again), then PUTs the digest.
class HttpBlobStream final : public BlobStream {
 public:
  HttpBlobStream(HttpRegistryClient::Impl* impl, std::string location) : impl_(impl), url_(std::move(location)) {}
  absl::Status Append(absl::string_view data) override {
    pending_.append(data.data(), data.size());
    while (pending_.size() >= impl_->options.chunk_bytes) {
      RETURN_IF_ERROR(Send(impl_->options.chunk_bytes));
    }
    return absl::OkStatus();
  }
  absl::Status Finish(const std::string& digest) override {
    if (!pending_.empty()) {
      RETURN_IF_ERROR(Send(pending_.size()));
    }
    Request put{
        .method = "PUT",
        .url = absl::StrCat(url_, url_.find('?') == std::string::npos ? "?" : "&", "digest=", UrlEncode(digest)),
        .headers = {"Content-Type: application/octet-stream"},
        .body = nullptr,
        .offset = 0,
        .length = 0,
        .what = absl::StrCat("upload of ", digest),
        .send_credentials = true};
    absl::StatusOr<Response> response = impl_->Send(put);
    if (!response.ok()) return response.status();
    if (response->status != 201 && response->status != 204) return impl_->Fail(put, *response);
    return absl::OkStatus();
  }

 private:
  absl::Status Send(size_t n) {
    BlobSource chunk{.file = "", .data = pending_.substr(0, n), .size = n};
    Request patch{.method = "PATCH",
                  .url = url_,
                  .headers = {"Content-Type: application/octet-stream",
                              absl::StrCat("Content-Range: ", offset_, "-", offset_ + n - 1)},
                  .body = &chunk,
                  .offset = 0,
                  .length = n,
                  .what = absl::StrCat("streamed upload at ", offset_),
                  .send_credentials = true};
    absl::StatusOr<Response> response = impl_->Send(patch);
    if (!response.ok()) return response.status();
    if (response->status != 202) return impl_->Fail(patch, *response);
    if (!response->Header("location").empty()) url_ = impl_->Resolve(response->Header("location"));
    offset_ += n;
    pending_.erase(0, n);
    return absl::OkStatus();
  }
  HttpRegistryClient::Impl* impl_;
  std::string url_;
  std::string pending_;
  uint64_t offset_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BlobStream>> HttpRegistryClient::StartStream(const std::string& repository) {
  absl::StatusOr<std::string> location = impl_->StartUpload(repository, "a streamed blob");
  if (!location.ok()) return location.status();
  return std::unique_ptr<BlobStream>(new HttpBlobStream(impl_.get(), *location));
}

absl::StatusOr<bool> HttpRegistryClient::MountBlob(const std::string& repository, const std::string& digest,
                                                   const std::string& from) {
  Request r{.method = "POST",
            .url = absl::StrCat(impl_->Base(), "/v2/", repository, "/blobs/uploads/?mount=", UrlEncode(digest),
                                "&from=", UrlEncode(from)),
            .headers = {},
            .body = nullptr,
            .offset = 0,
            .length = 0,
            .what = absl::StrCat("mount of ", digest, " from ", from),
            .send_credentials = true};
  absl::StatusOr<Response> response = impl_->Send(r);
  if (!response.ok()) return response.status();
  if (response->status == 201) return true;
  // 202: the registry opened an upload instead (it may not see `from`); the
  // blob is sent the ordinary way and that session expires unused.
  if (response->status == 202) return false;
  return impl_->Fail(r, *response);
}

absl::StatusOr<std::string> HttpRegistryClient::ManifestDigest(const std::string& repository,
                                                               const std::string& reference,
                                                               const std::string& media_type) {
  Request r{.method = "HEAD",
            .url = absl::StrCat(impl_->Base(), "/v2/", repository, "/manifests/", reference),
            .headers = {absl::StrCat("Accept: ", media_type)},
            .body = nullptr,
            .offset = 0,
            .length = 0,
            .what = absl::StrCat("HEAD manifest ", repository, ":", reference),
            .send_credentials = true};
  absl::StatusOr<Response> response = impl_->Send(r);
  if (!response.ok()) return response.status();
  if (response->status == 404) return std::string();
  if (response->status != 200) return impl_->Fail(r, *response);
  std::string digest = response->Header("docker-content-digest");
  // Without the header only a digest reference says which manifest it is.
  if (digest.empty() && absl::StartsWith(reference, "sha256:")) digest = reference;
  return digest;
}

absl::StatusOr<std::string> HttpRegistryClient::PutManifest(const std::string& repository, const std::string& reference,
                                                            const std::string& media_type, const std::string& body) {
  BlobSource source{.file = "", .data = body, .size = body.size()};
  Request r{.method = "PUT",
            .url = absl::StrCat(impl_->Base(), "/v2/", repository, "/manifests/", reference),
            .headers = {absl::StrCat("Content-Type: ", media_type)},
            .body = &source,
            .offset = 0,
            .length = body.size(),
            .what = absl::StrCat("PUT manifest ", repository, ":", reference),
            .send_credentials = true};
  absl::StatusOr<Response> response = impl_->Send(r);
  if (!response.ok()) return response.status();
  if (response->status != 201 && response->status != 200) return impl_->Fail(r, *response);
  return response->Header("docker-content-digest");
}

}  // namespace kiln
