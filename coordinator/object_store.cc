#include "coordinator/object_store.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <fstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/digest.h"
#include "common/http_request.h"

namespace kiln {
namespace {

bool Unreserved(unsigned char c) { return absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~'; }

std::string Encode(absl::string_view s, bool keep_slash) {
  std::string out;
  for (unsigned char c : s) {
    if (Unreserved(c) || (keep_slash && c == '/')) {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppend(&out, "%", absl::AsciiStrToUpper(absl::BytesToHexString(std::string(1, static_cast<char>(c)))));
    }
  }
  return out;
}

std::string Hmac(absl::string_view key, absl::string_view data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()),
       data.size(), out, &len);
  return std::string(reinterpret_cast<char*>(out), len);
}

// What an S3 error response says, without the request (which may carry a
// signature) or the body's noise.
std::string S3ErrorCode(const HttpResponse& response) {
  const size_t begin = response.body.find("<Code>");
  const size_t end = response.body.find("</Code>");
  if (begin == std::string::npos || end == std::string::npos || end < begin) return "";
  return response.body.substr(begin + 6, end - begin - 6);
}

absl::Status Failure(absl::string_view what, const std::string& key, const HttpResponse& response) {
  const std::string code = S3ErrorCode(response);
  const std::string message =
      absl::StrCat("object storage: ", what, " ", key, ": HTTP ", response.status, code.empty() ? "" : " ", code);
  if (response.status == 404) return absl::NotFoundError(message);
  if (response.status == 401 || response.status == 403) return absl::PermissionDeniedError(message);
  if (response.status >= 500) return absl::UnavailableError(message);
  return absl::InternalError(message);
}

}  // namespace

std::string S3EncodePath(absl::string_view path) { return Encode(path, /*keep_slash=*/true); }

absl::StatusOr<S3Location> ParseS3Uri(absl::string_view uri) {
  if (!absl::ConsumePrefix(&uri, "s3://")) return absl::InvalidArgumentError("an S3 store is s3://BUCKET?…");
  S3Location location;
  const size_t q = uri.find('?');
  location.bucket = std::string(uri.substr(0, q));
  if (location.bucket.empty() || absl::StrContains(location.bucket, '/')) {
    return absl::InvalidArgumentError(absl::StrCat("not a bucket name: '", location.bucket, "'"));
  }
  if (q != absl::string_view::npos) {
    for (absl::string_view param : absl::StrSplit(uri.substr(q + 1), '&', absl::SkipEmpty())) {
      std::pair<std::string, std::string> kv = absl::StrSplit(param, absl::MaxSplits('=', 1));
      if (kv.first == "endpoint") {
        location.endpoint = kv.second;
      } else if (kv.first == "region") {
        location.region = kv.second;
      } else if (kv.first == "scheme") {
        if (kv.second != "https" && kv.second != "http") {
          return absl::InvalidArgumentError("scheme= is https or http");
        }
        location.scheme = kv.second;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown S3 store parameter '", kv.first, "' (endpoint, region, scheme)"));
      }
    }
  }
  if (location.endpoint.empty()) location.endpoint = absl::StrCat("s3.", location.region, ".amazonaws.com");
  return location;
}

absl::StatusOr<S3Credentials> LoadS3Credentials(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the S3 credentials file ", path));
  S3Credentials credentials;
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view l = absl::StripAsciiWhitespace(line);
    if (l.empty() || l[0] == '#' || l[0] == ';' || l[0] == '[') continue;
    const size_t eq = l.find('=');
    if (eq == absl::string_view::npos) continue;
    const absl::string_view name = absl::StripAsciiWhitespace(l.substr(0, eq));
    const std::string value(absl::StripAsciiWhitespace(l.substr(eq + 1)));
    if (name == "aws_access_key_id") credentials.access_key_id = value;
    if (name == "aws_secret_access_key") credentials.secret_access_key = value;
  }
  if (credentials.access_key_id.empty() || credentials.secret_access_key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the S3 credentials file ", path, " needs aws_access_key_id and aws_secret_access_key lines"));
  }
  return credentials;
}

std::string PresignSigV4(absl::string_view method, absl::string_view scheme, absl::string_view host,
                         absl::string_view canonical_uri, absl::string_view region, const S3Credentials& credentials,
                         absl::Time now, absl::Duration valid_for) {
  const absl::TimeZone utc = absl::UTCTimeZone();
  const std::string date = absl::FormatTime("%Y%m%d", now, utc);
  const std::string stamp = absl::FormatTime("%Y%m%dT%H%M%SZ", now, utc);
  const std::string scope = absl::StrCat(date, "/", region, "/s3/aws4_request");
  // Already in the sorted order SigV4 wants.
  const std::string query =
      absl::StrCat("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=",
                   Encode(absl::StrCat(credentials.access_key_id, "/", scope), false), "&X-Amz-Date=", stamp,
                   "&X-Amz-Expires=", absl::ToInt64Seconds(valid_for), "&X-Amz-SignedHeaders=host");
  const std::string canonical_request =
      absl::StrCat(method, "\n", canonical_uri, "\n", query, "\nhost:", host, "\n\nhost\nUNSIGNED-PAYLOAD");
  const std::string to_sign =
      absl::StrCat("AWS4-HMAC-SHA256\n", stamp, "\n", scope, "\n", Sha256Hex(canonical_request));
  std::string key = Hmac(absl::StrCat("AWS4", credentials.secret_access_key), date);
  key = Hmac(key, region);
  key = Hmac(key, "s3");
  key = Hmac(key, "aws4_request");
  return absl::StrCat(scheme, "://", host, canonical_uri, "?", query,
                      "&X-Amz-Signature=", absl::BytesToHexString(Hmac(key, to_sign)));
}

std::string S3ObjectStore::ObjectUrl(const std::string& key) const {
  return absl::StrCat(location_.scheme, "://", location_.endpoint, "/", S3EncodePath(location_.bucket), "/",
                      S3EncodePath(key));
}

std::string S3ObjectStore::PublicUrl() const {
  return absl::StrCat(location_.scheme, "://", location_.endpoint, "/", location_.bucket);
}

namespace {

HttpRequest Signed(std::string method, std::string url, const S3Location& location, const S3Credentials& c) {
  HttpRequest r;
  r.method = std::move(method);
  r.url = std::move(url);
  r.aws_sigv4 = absl::StrCat("aws:amz:", location.region, ":s3");
  r.credentials = absl::StrCat(c.access_key_id, ":", c.secret_access_key);
  // S3 wants the payload's hash signed in; the body's own checks are ours
  // (NAR hashes), so it is not hashed twice.
  r.headers.push_back("x-amz-content-sha256: UNSIGNED-PAYLOAD");
  return r;
}

}  // namespace

absl::Status S3ObjectStore::Put(const std::string& key, absl::string_view body, absl::string_view content_type) {
  HttpRequest r = Signed("PUT", ObjectUrl(key), location_, credentials_);
  r.body = std::string(body);
  r.headers.push_back(absl::StrCat("Content-Type: ", content_type));
  absl::StatusOr<HttpResponse> response = SendHttp(r);
  if (!response.ok()) return response.status();
  if (response->status != 200) return Failure("PUT", key, *response);
  return absl::OkStatus();
}

absl::Status S3ObjectStore::PutFile(const std::string& key, const std::string& file, absl::string_view content_type) {
  HttpRequest r = Signed("PUT", ObjectUrl(key), location_, credentials_);
  r.body_file = file;
  r.headers.push_back(absl::StrCat("Content-Type: ", content_type));
  absl::StatusOr<HttpResponse> response = SendHttp(r);
  if (!response.ok()) return response.status();
  if (response->status != 200) return Failure("PUT", key, *response);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> S3ObjectStore::Size(const std::string& key) {
  HttpRequest r = Signed("HEAD", ObjectUrl(key), location_, credentials_);
  absl::StatusOr<HttpResponse> response = SendHttp(r);
  if (!response.ok()) return response.status();
  if (response->status != 200) return Failure("HEAD", key, *response);
  if (response->content_length < 0) return absl::InternalError(absl::StrCat("HEAD ", key, ": no Content-Length"));
  return static_cast<uint64_t>(response->content_length);
}

absl::Status S3ObjectStore::Get(const std::string& key, absl::FunctionRef<absl::Status(absl::string_view)> sink) {
  HttpRequest r = Signed("GET", ObjectUrl(key), location_, credentials_);
  r.sink = [&](absl::string_view piece) { return sink(piece); };
  absl::StatusOr<HttpResponse> response = SendHttp(r);
  if (!response.ok()) return response.status();
  if (response->status != 200) return Failure("GET", key, *response);
  return absl::OkStatus();
}

absl::Status S3ObjectStore::Delete(const std::string& key) {
  HttpRequest r = Signed("DELETE", ObjectUrl(key), location_, credentials_);
  absl::StatusOr<HttpResponse> response = SendHttp(r);
  if (!response.ok()) return response.status();
  if (response->status != 204 && response->status != 200 && response->status != 404) {
    return Failure("DELETE", key, *response);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> S3ObjectStore::PresignedUrl(absl::string_view method, const std::string& key,
                                                        absl::Duration valid_for) {
  if (method != "GET" && method != "PUT") return absl::InvalidArgumentError("presigned URLs are for GET and PUT");
  return PresignSigV4(method, location_.scheme, location_.endpoint,
                      absl::StrCat("/", S3EncodePath(location_.bucket), "/", S3EncodePath(key)), location_.region,
                      credentials_, clock_->Now(), valid_for);
}

}  // namespace kiln
