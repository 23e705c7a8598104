#include "tests/support/local_s3.h"

#include <unistd.h>

#include <csignal>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "tests/support/local_registry.h"

namespace kiln::testing {
namespace {

// moto_server from PATH, or where pyenv puts it.
std::string MotoServer() {
  if (const char* env = std::getenv("KILN_MOTO_SERVER"); env != nullptr && *env != '\0') return env;
  if (const char* path = std::getenv("PATH"); path != nullptr) {
    for (absl::string_view dir : absl::StrSplit(path, ':', absl::SkipEmpty())) {
      const std::string candidate = absl::StrCat(dir, "/moto_server");
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
  }
  return "/root/.pyenv/shims/moto_server";
}

// `curl ARGS…`, its stdout; an error unless it exits 0.
absl::StatusOr<std::string> Curl(const std::vector<std::string>& args) {
  ProcessSpec spec;
  spec.argv = {"curl", "-sS", "--fail-with-body"};
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Seconds(20));
  if (!r.ok()) return r.status();
  if (!r->exit.Success()) return absl::InternalError(absl::StrCat("curl: ", r->stderr_data, r->stdout_data));
  return r->stdout_data;
}

std::string Between(const std::string& text, const std::string& open, const std::string& close) {
  const size_t a = text.find(open);
  if (a == std::string::npos) return "";
  const size_t b = text.find(close, a + open.size());
  return b == std::string::npos ? "" : text.substr(a + open.size(), b - a - open.size());
}

}  // namespace

absl::StatusOr<std::unique_ptr<LocalS3>> LocalS3::Start(const Options& options) {
  auto s3 = std::unique_ptr<LocalS3>(new LocalS3());
  absl::StatusOr<int> port = FreeLoopbackPort();
  if (!port.ok()) return port.status();
  s3->endpoint_ = absl::StrCat("127.0.0.1:", *port);
  s3->bucket_ = options.bucket;
  std::vector<std::string> env;
  // With signatures checked, the first four requests (the IAM user, its
  // key, its policy, the bucket) go unchecked; every later one is checked.
  if (options.verify_signatures) env.push_back("INITIAL_NO_AUTH_ACTION_COUNT=4");
  auto daemon =
      Daemon::Start({MotoServer(), "-H", "127.0.0.1", "-p", absl::StrCat(*port)}, s3->dir_.Sub("moto.log"), env);
  if (!daemon.ok()) return daemon.status();
  s3->daemon_ = *std::move(daemon);
  const std::string base = absl::StrCat("http://", s3->endpoint_);
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  for (;;) {
    ProcessSpec probe;
    probe.argv = {"curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", base + "/moto-api/"};
    absl::StatusOr<CommandResult> r = RunCommand(probe, "", absl::Seconds(5));
    if (r.ok() && r->stdout_data == "200") break;
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat("moto_server did not start: ", s3->LogText()));
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  if (options.verify_signatures) {
    // IAM calls are recognised by the service in the Authorization header's
    // scope; unchecked, so any key id does.
    const std::string iam = "Authorization: AWS4-HMAC-SHA256 Credential=x/20260101/us-east-1/iam/aws4_request";
    const std::string policy =
        R"({"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]})";
    for (const std::vector<std::string>& call : std::vector<std::vector<std::string>>{
             {"Action=CreateUser", "UserName=kiln"},
             {"Action=CreateAccessKey", "UserName=kiln"},
             {"Action=PutUserPolicy", "UserName=kiln", "PolicyName=s3", "PolicyDocument=" + policy}}) {
      std::vector<std::string> args = {"-X", "POST", "-H", iam, base + "/", "--data-urlencode", "Version=2010-05-08"};
      for (const std::string& field : call) args.insert(args.end(), {"--data-urlencode", field});
      absl::StatusOr<std::string> out = Curl(args);
      if (!out.ok()) return out.status();
      if (call[0] == "Action=CreateAccessKey") {
        s3->access_key_id_ = Between(*out, "<AccessKeyId>", "</AccessKeyId>");
        s3->secret_access_key_ = Between(*out, "<SecretAccessKey>", "</SecretAccessKey>");
      }
    }
    if (s3->access_key_id_.empty()) return absl::InternalError("moto gave no access key");
  } else {
    s3->access_key_id_ = "AKIAKILNTESTKEY00000";
    s3->secret_access_key_ = "kiln-test-secret";
  }
  if (absl::StatusOr<std::string> made = Curl({"-X", "PUT", absl::StrCat(base, "/", s3->bucket_)}); !made.ok()) {
    return made.status();
  }
  if (options.public_read && !options.verify_signatures) {
    const std::string policy =
        absl::StrCat(R"({"Version":"2012-10-17","Statement":[{"Sid":"PublicRead","Effect":"Allow","Principal":"*",)",
                     R"("Action":"s3:GetObject","Resource":"arn:aws:s3:::)", s3->bucket_, R"(/*"}]})");
    absl::StatusOr<std::string> set = Curl({"-X", "PUT", "-H", "Content-Type: application/json", "--data-binary",
                                            policy, absl::StrCat(base, "/", s3->bucket_, "?policy")});
    if (!set.ok()) return set.status();
  }
  WriteFileOrDie(s3->CredentialsFile(), absl::StrCat("[default]\naws_access_key_id = ", s3->access_key_id_,
                                                     "\naws_secret_access_key = ", s3->secret_access_key_, "\n"));
  return s3;
}

std::string LocalS3::StoreUri() const {
  return absl::StrCat("s3://", bucket_, "?endpoint=", endpoint_, "&region=fr-par&scheme=http");
}

std::string LocalS3::BucketUrl() const { return absl::StrCat("http://", endpoint_, "/", bucket_); }

std::string LocalS3::LogText() const { return ReadFileOrDie(dir_.Sub("moto.log")); }

LocalS3::~LocalS3() {
  if (daemon_) {
    daemon_->Kill(SIGTERM);
    daemon_->WaitExit(5000);
  }
}

}  // namespace kiln::testing
