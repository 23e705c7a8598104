// The farm store upload: what is sent, in which order, what is retried and
// what a job's result says, over a fake farm store that enforces the real
// one's rules (references first, one record per path) and a fake local
// store whose paths are directories in a temporary tree.
#include "worker/farm_uploading_executor.h"

#include "worker/farm_cache_relay.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/nar.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

std::string StorePath(absl::string_view name) {
  std::string hash(32, 'a');
  for (size_t i = 0; i < name.size() && i < 32; ++i) hash[i] = static_cast<char>('a' + (name[i] % 26));
  return absl::StrCat("/nix/store/", hash, "-", name);
}

// A fake farm store client: paths it holds; refuses a path whose
// references it lacks, checks every NAR is well formed and of the size
// announced; fails the next `fail_next` calls with `failure`.
class FakeFarmStore final : public FarmStoreClient {
 public:
  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& paths) override {
    absl::MutexLock lock(&mu);
    ++missing_calls;
    if (absl::Status s = MaybeFail(); !s.ok()) return s;
    std::vector<std::string> out;
    for (const std::string& p : paths) {
      if (!held.contains(p)) out.push_back(p);
    }
    return out;
  }
  absl::Status AddPath(const kiln::v1::PathInfo& info,
                       absl::FunctionRef<absl::Status(NarSink sink)> write_nar) override {
    {
      absl::MutexLock lock(&mu);
      if (absl::Status s = MaybeFail(); !s.ok()) return s;
      for (const std::string& r : info.references()) {
        if (r != info.store_path() && !held.contains(r)) {
          return absl::FailedPreconditionError(absl::StrCat(info.store_path(), " before ", r));
        }
      }
    }
    std::string nar;
    if (absl::Status s = write_nar([&](absl::string_view b) {
          nar.append(b.data(), b.size());
          return absl::OkStatus();
        });
        !s.ok()) {
      return s;
    }
    absl::StatusOr<NarSummary> read = ReadNar(nar);
    if (!read.ok()) return read.status();
    absl::MutexLock lock(&mu);
    if (read->nar_bytes != info.nar_size()) return absl::DataLossError("size differs");
    held.insert(info.store_path());
    order.push_back(info.store_path());
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> PublicKey() override { return "farm:key"; }
  absl::StatusOr<std::string> NarInfo(const std::string&) override { return absl::NotFoundError("none"); }
  absl::Status FetchNar(const std::string&, NarSink) override { return absl::NotFoundError("none"); }

  absl::Status MaybeFail() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (fail_next == 0) return absl::OkStatus();
    --fail_next;
    return failure;
  }

  absl::Mutex mu;
  absl::flat_hash_set<std::string> held ABSL_GUARDED_BY(mu);
  std::vector<std::string> order ABSL_GUARDED_BY(mu);
  int missing_calls ABSL_GUARDED_BY(mu) = 0;
  int fail_next ABSL_GUARDED_BY(mu) = 0;
  absl::Status failure ABSL_GUARDED_BY(mu);
};

// A fake local store: each path a file under a temporary directory, with
// the references it is given.
class FakeLocalStore final : public LocalStore {
 public:
  void Add(const std::string& path, std::vector<std::string> refs) {
    const std::string file = dir.Sub(path.substr(path.rfind('/') + 1));
    std::ofstream(file) << "contents of " << path;
    kiln::v1::PathInfo info;
    info.set_store_path(path);
    std::string nar;
    EXPECT_TRUE(DumpPathAsNar(file, [&](absl::string_view b) {
                  nar.append(b.data(), b.size());
                  return absl::OkStatus();
                }).ok());
    info.set_nar_size(nar.size());
    info.set_nar_hash("sha256-unchecked-by-the-fake");
    for (std::string& r : refs) info.add_references(std::move(r));
    paths[path] = info;
  }
  absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string&) override {
    return absl::UnimplementedError("not used by uploads");
  }
  absl::StatusOr<absl::flat_hash_set<std::string>> ValidPaths(const std::vector<std::string>&) override {
    return absl::UnimplementedError("not used by uploads");
  }
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> ClosureInfos(const std::vector<std::string>& roots) override {
    std::vector<kiln::v1::PathInfo> out;
    absl::flat_hash_set<std::string> seen;
    std::vector<std::string> todo = roots;
    while (!todo.empty()) {
      const std::string p = todo.back();
      todo.pop_back();
      if (!seen.insert(p).second) continue;
      auto it = paths.find(p);
      if (it == paths.end()) return absl::NotFoundError(absl::StrCat(p, " is not valid"));
      out.push_back(it->second);
      for (const std::string& r : it->second.references()) todo.push_back(r);
    }
    return out;
  }
  absl::Status DumpNar(const std::string& path, NarSink sink) override {
    return DumpPathAsNar(dir.Sub(path.substr(path.rfind('/') + 1)), sink);
  }

  testing::TempDir dir;
  std::map<std::string, kiln::v1::PathInfo> paths;
};

FarmUploadOptions Quick() {
  FarmUploadOptions o;
  o.first_backoff = absl::ZeroDuration();
  o.parallel = 4;
  return o;
}

class FarmUploadTest : public ::testing::Test {
 protected:
  // app -> lib -> libc, app -> data; tool stands apart. lib refers to itself.
  FarmUploadTest() {
    local_.Add(StorePath("libc"), {});
    local_.Add(StorePath("lib"), {StorePath("libc"), StorePath("lib")});
    local_.Add(StorePath("data"), {});
    local_.Add(StorePath("app"), {StorePath("lib"), StorePath("data")});
    local_.Add(StorePath("tool"), {});
  }
  std::vector<std::string> Order() {
    absl::MutexLock lock(&farm_.mu);
    return farm_.order;
  }
  FakeLocalStore local_;
  FakeFarmStore farm_;
};

TEST_F(FarmUploadTest, SendsOnlyWhatTheFarmLacksReferencesFirst) {
  {
    absl::MutexLock lock(&farm_.mu);
    farm_.held.insert(StorePath("libc"));
  }
  absl::StatusOr<FarmUploadReport> sent = UploadClosure({StorePath("app")}, local_, farm_, Quick());
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_EQ(sent->closure_paths, 4u);
  EXPECT_EQ(sent->paths_sent, 3u);
  const std::vector<std::string> order = Order();
  ASSERT_EQ(order.size(), 3u);
  EXPECT_EQ(order.back(), StorePath("app"));  // After lib and data, in whichever order.
  EXPECT_GT(sent->nar_bytes_sent, 0u);

  // Again: one question (the root is held, so is its closure), nothing sent.
  int asked = 0;
  {
    absl::MutexLock lock(&farm_.mu);
    asked = farm_.missing_calls;
  }
  sent = UploadClosure({StorePath("app")}, local_, farm_, Quick());
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_EQ(sent->paths_sent, 0u);
  EXPECT_EQ(sent->closure_paths, 0u);  // Not even read from the local store.
  EXPECT_EQ(Order().size(), 3u);
  absl::MutexLock lock(&farm_.mu);
  EXPECT_EQ(farm_.missing_calls, asked + 1);
}

TEST_F(FarmUploadTest, AnUnreachableFarmIsRetriedAndWhatWasSentIsNotSentAgain) {
  {
    absl::MutexLock lock(&farm_.mu);
    farm_.fail_next = 3;  // The roots' question, then two attempts.
    farm_.failure = absl::UnavailableError("connection refused");
  }
  absl::StatusOr<FarmUploadReport> sent = UploadClosure({StorePath("app"), StorePath("tool")}, local_, farm_, Quick());
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_EQ(sent->attempts, 3);
  EXPECT_EQ(Order().size(), 5u);
}

TEST_F(FarmUploadTest, ARefusalIsNotRetriedAndGivingUpSaysWhy) {
  {
    absl::MutexLock lock(&farm_.mu);
    farm_.fail_next = 2;  // The roots' question (then read whole), then the first attempt.
    farm_.failure = absl::DataLossError("NAR hash mismatch");
  }
  absl::StatusOr<FarmUploadReport> sent = UploadClosure({StorePath("tool")}, local_, farm_, Quick());
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(absl::StrContains(sent.status().message(), "after 1 attempt")) << sent.status();
  {
    absl::MutexLock lock(&farm_.mu);
    farm_.fail_next = 100;
    farm_.failure = absl::UnavailableError("connection refused");
  }
  sent = UploadClosure({StorePath("tool")}, local_, farm_, Quick());
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(sent.status().message(), "after 4 attempt")) << sent.status();
  // An output the local store does not know.
  sent = UploadClosure({StorePath("ghost")}, local_, farm_, Quick());
  EXPECT_TRUE(absl::IsNotFound(sent.status())) << sent.status();
}

// A fake inner executor: reports `result` at once.
class ImmediateExecutor final : public BuildExecutor {
 public:
  absl::StatusOr<BuildId> Start(const BuildRequest&, LineCallback, DoneCallback on_done) override {
    std::move(on_done)(result);
    return ++next;
  }
  void Cancel(BuildId) override {}
  kiln::v1::BuildResult result;
  BuildId next = 0;
};

kiln::v1::BuildResult RunThrough(BuildExecutor& executor, const BuildRequest& request,
                                 std::vector<std::string>* lines = nullptr) {
  kiln::v1::BuildResult out;
  absl::Notification done;
  EXPECT_TRUE(executor
                  .Start(
                      request,
                      [&](kiln::v1::LogLine l) {
                        if (lines != nullptr) lines->push_back(l.text());
                      },
                      [&](kiln::v1::BuildResult r) {
                        out = std::move(r);
                        done.Notify();
                      })
                  .ok());
  done.WaitForNotification();
  return out;
}

TEST_F(FarmUploadTest, AJobSucceedsOnlyOnceItsOutputsAreInTheFarm) {
  ImmediateExecutor inner;
  inner.result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  (*inner.result.mutable_outputs())["out"] = StorePath("app");
  (*inner.result.mutable_outputs())["bin"] = StorePath("tool");
  FarmUploadingExecutor uploading(&inner, &local_, &farm_, Quick());
  std::vector<std::string> lines;
  kiln::v1::BuildResult result = RunThrough(uploading, BuildRequest{}, &lines);
  EXPECT_EQ(result.code(), kiln::v1::RESULT_CODE_SUCCEEDED) << result.error_message();
  EXPECT_EQ(Order().size(), 5u);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(absl::StrContains(lines[0], "farm store: sent 5 of 5 path(s)")) << lines[0];

  // The farm unreachable throughout: an infrastructure error, retried elsewhere.
  {
    absl::MutexLock lock(&farm_.mu);
    farm_.held.clear();
    farm_.fail_next = 100;
    farm_.failure = absl::UnavailableError("connection refused");
  }
  result = RunThrough(uploading, BuildRequest{});
  EXPECT_EQ(result.code(), kiln::v1::RESULT_CODE_INFRA_ERROR);
  EXPECT_TRUE(absl::StrContains(result.error_message(), "could not be added to the farm store"))
      << result.error_message();

  // A coordinator without a farm store: the build stands.
  {
    absl::MutexLock lock(&farm_.mu);
    farm_.fail_next = 1;
    farm_.failure = absl::UnimplementedError("unknown service");
  }
  result = RunThrough(uploading, BuildRequest{});
  EXPECT_EQ(result.code(), kiln::v1::RESULT_CODE_SUCCEEDED);

  // Steps other than the job's build, and failed builds, pass through.
  {
    absl::MutexLock lock(&farm_.mu);
    farm_.fail_next = 100;
  }
  BuildRequest evaluate;
  evaluate.step = BuildRequest::Step::kEvaluate;
  EXPECT_EQ(RunThrough(uploading, evaluate).code(), kiln::v1::RESULT_CODE_SUCCEEDED);
  inner.result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
  EXPECT_EQ(RunThrough(uploading, BuildRequest{}).code(), kiln::v1::RESULT_CODE_BUILD_FAILED);
}

TEST(FarmSubstituterOptionsTest, TheFarmComesFirstAndItsKeyIsTrusted) {
  NixOptionList given = {{"substituters", ""}, {"max-silent-time", "60"}};
  NixOptionList with = WithFarmSubstituter(given, "http://127.0.0.1:5000", "farm-1:KEY");
  EXPECT_EQ(with[0], (std::pair<std::string, std::string>{"substituters", "http://127.0.0.1:5000"}));
  auto has = [&](const std::string& n, const std::string& v) {
    return std::find(with.begin(), with.end(), std::pair<std::string, std::string>{n, v}) != with.end();
  };
  EXPECT_TRUE(has("extra-trusted-public-keys", "farm-1:KEY"));
  EXPECT_TRUE(has("narinfo-cache-negative-ttl", "0"));
  EXPECT_TRUE(has("fallback", "true"));

  with = WithFarmSubstituter(
      {{"substituters", "https://cache.example"}, {"trusted-public-keys", "ex:1"}, {"fallback", "false"}},
      "http://127.0.0.1:5000", "farm-1:KEY");
  EXPECT_TRUE(has("substituters", "http://127.0.0.1:5000 https://cache.example"));
  EXPECT_TRUE(has("trusted-public-keys", "ex:1 farm-1:KEY"));
  EXPECT_TRUE(has("fallback", "false"));
  EXPECT_FALSE(has("fallback", "true"));

  with = WithFarmSubstituter({}, "http://127.0.0.1:5000", "farm-1:KEY");
  EXPECT_TRUE(has("extra-substituters", "http://127.0.0.1:5000"));
}

}  // namespace
}  // namespace kiln
