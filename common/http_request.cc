#include "common/http_request.h"

#include <curl/curl.h>

#include <cstdio>
#include <memory>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kiln {
namespace {

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct Transfer {
  CURL* curl;
  const HttpRequest* request;
  HttpResponse* response;
  absl::Status sink_status;
};

size_t OnBody(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t n = size * count;
  long status = 0;
  curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &status);
  // Only a success's body is the caller's data; an error's is collected.
  if (t->request->sink && status >= 200 && status < 300) {
    t->sink_status = t->request->sink(absl::string_view(data, n));
    return t->sink_status.ok() ? n : 0;
  }
  if (t->response->body.size() + n > (t->request->sink ? size_t{1} << 16 : t->request->max_collected)) {
    t->sink_status =
        absl::ResourceExhaustedError(absl::StrCat("response body over ", t->request->max_collected, " bytes"));
    return 0;
  }
  t->response->body.append(data, n);
  return n;
}

size_t OnHeader(char* data, size_t size, size_t count, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const absl::string_view line(data, size * count);
  if (absl::StartsWithIgnoreCase(line, "content-length:")) {
    int64_t n = -1;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(15)), &n)) t->response->content_length = n;
  }
  return size * count;
}

struct FileCloser {
  void operator()(FILE* f) const { std::fclose(f); }
};
struct CurlCleanup {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
struct SlistFree {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};

}  // namespace

std::string UrlWithoutQuery(absl::string_view url) { return std::string(url.substr(0, url.find('?'))); }

absl::StatusOr<HttpResponse> SendHttp(const HttpRequest& request) {
  GlobalInit();
  std::unique_ptr<CURL, CurlCleanup> curl(curl_easy_init());
  if (curl == nullptr) return absl::InternalError("curl_easy_init failed");
  HttpResponse response;
  CURL* c = curl.get();
  Transfer transfer{c, &request, &response, absl::OkStatus()};
  curl_easy_setopt(c, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 20L);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(absl::ToInt64Milliseconds(request.timeout)));
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &transfer);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &transfer);
  std::unique_ptr<curl_slist, SlistFree> headers;
  auto add_header = [&](const std::string& h) { headers.reset(curl_slist_append(headers.release(), h.c_str())); };
  for (const std::string& h : request.headers) add_header(h);
  // No "Expect: 100-continue" round trip before each upload. Not with
  // SigV4: libcurl would sign the header it then leaves out.
  if (request.aws_sigv4.empty()) add_header("Expect:");
  std::unique_ptr<FILE, FileCloser> file;
  if (request.method == "HEAD") {
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  } else if (request.method == "PUT") {
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    if (!request.body_file.empty()) {
      file.reset(std::fopen(request.body_file.c_str(), "rb"));
      if (file == nullptr) return absl::InternalError(absl::StrCat("cannot open ", request.body_file));
      std::fseek(file.get(), 0, SEEK_END);
      const long size = std::ftell(file.get());
      std::rewind(file.get());
      curl_easy_setopt(c, CURLOPT_READDATA, file.get());
      curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(size));
    } else {
      curl_easy_setopt(c, CURLOPT_UPLOAD, 0L);
      curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "PUT");
      curl_easy_setopt(c, CURLOPT_POSTFIELDS, request.body.data());
      curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
    }
  } else if (request.method != "GET") {
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, request.method.c_str());
  }
  if (!request.aws_sigv4.empty()) {
    curl_easy_setopt(c, CURLOPT_AWS_SIGV4, request.aws_sigv4.c_str());
    curl_easy_setopt(c, CURLOPT_USERPWD, request.credentials.c_str());
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
  const CURLcode rc = curl_easy_perform(c);
  if (!transfer.sink_status.ok()) return transfer.sink_status;
  // The URL without its query in errors: a presigned URL's query is a
  // credential for as long as it is valid.
  if (rc != CURLE_OK) {
    return absl::UnavailableError(
        absl::StrCat(request.method, " ", UrlWithoutQuery(request.url), ": ", curl_easy_strerror(rc)));
  }
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &response.status);
  return response;
}

}  // namespace kiln
