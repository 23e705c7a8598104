// One HTTP request through libcurl, for the object-storage backend of the
// farm store: the coordinator's signed requests to the bucket (SigV4 done by
// libcurl) and the workers' uploads to presigned URLs. Not in a client-only
// build (the CLI never talks to the bucket).
//
// Thread-safe: every call has its own handle.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kiln {

struct HttpRequest {
  std::string method = "GET";  // GET, HEAD, PUT, DELETE.
  std::string url;
  std::vector<std::string> headers;  // "Name: value".
  // The body of a PUT: `body_file` when set, else `body`.
  std::string body;
  std::string body_file;
  // A successful (2xx) response's body, piece by piece; unset, or another
  // status: collected into the response (at most max_collected bytes).
  std::function<absl::Status(absl::string_view)> sink;
  size_t max_collected = size_t{16} << 20;
  // AWS Signature Version 4 by libcurl ("aws:amz:REGION:SERVICE") with these
  // credentials ("ACCESS_KEY:SECRET"); they never reach a log or an error.
  std::string aws_sigv4;
  std::string credentials;
  absl::Duration timeout = absl::Minutes(10);
};

struct HttpResponse {
  long status = 0;
  std::string body;             // When collected.
  int64_t content_length = -1;  // As the server announced it; -1 unknown.
};

// UNAVAILABLE when the server cannot be reached or the transfer breaks;
// any HTTP status is a response (the caller decides).
absl::StatusOr<HttpResponse> SendHttp(const HttpRequest& request);

// The URL without its query (presigned URLs carry a signature there).
std::string UrlWithoutQuery(absl::string_view url);

}  // namespace kiln
