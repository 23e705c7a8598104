#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <atomic>
#include <filesystem>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/cli_args.h"
#include "common/digest.h"
#include "common/log.h"
#include "common/net.h"
#include "common/tls.h"
#include "common/outbound_queue.h"
#include "common/serial_executor.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

TEST(DigestTest, KnownVector) {
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_TRUE(IsSha256Hex(Sha256Hex("")));
  EXPECT_FALSE(IsSha256Hex("ABC"));
}

TEST(LogTest, TextLinesPrefixWorkerAndJob) {
  EXPECT_EQ(FormatLogLine(LogFormat::kText, "T", LogLevel::kInfo, "worker", ForJob("12", 2), "built"),
            "T INFO  worker: job 12 attempt 2: built");
  EXPECT_EQ(FormatLogLine(LogFormat::kText, "T", LogLevel::kWarning, "coordinator", ForWorker("w1"), "gone"),
            "T WARN  coordinator: worker w1: gone");
  EXPECT_EQ(FormatLogLine(LogFormat::kText, "T", LogLevel::kError, "cas", {}, "x"), "T ERROR cas: x");
}

TEST(LogTest, JsonLinesAreOneObjectEvenForHostileText) {
  // A message with quotes, a newline and invalid UTF-8 (build output can
  // hold anything) stays one parseable line.
  LogFields fields = ForJob("7", 1);
  fields.worker = "w\"1";
  const std::string line = FormatLogLine(LogFormat::kJson, "2026-11-25T00:00:00.000Z", LogLevel::kDebug, "worker",
                                         fields, "say \"hi\"\n\xff\xfe done");
  EXPECT_EQ(line.find('\n'), std::string::npos) << line;
  nlohmann::json j = nlohmann::json::parse(line);
  EXPECT_EQ(j["time"], "2026-11-25T00:00:00.000Z");
  EXPECT_EQ(j["level"], "debug");
  EXPECT_EQ(j["component"], "worker");
  EXPECT_EQ(j["job"], "7");
  EXPECT_EQ(j["attempt"], 1);
  EXPECT_EQ(j["worker"], "w\"1");
  EXPECT_EQ(j["msg"], "say \"hi\"\n\xEF\xBF\xBD\xEF\xBF\xBD done");
  // Fields a line is not about are left out.
  nlohmann::json plain = nlohmann::json::parse(FormatLogLine(LogFormat::kJson, "T", LogLevel::kInfo, "c", {}, "m"));
  EXPECT_FALSE(plain.contains("job"));
  EXPECT_FALSE(plain.contains("attempt"));
  EXPECT_FALSE(plain.contains("worker"));
}

TEST(NetTest, ParsesAddresses) {
  auto a = ParseHostPort("127.0.0.1:7600");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 7600);
  auto v6 = ParseHostPort("[::1]:0");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_FALSE(ParseHostPort("nohost").ok());
  EXPECT_FALSE(ParseHostPort("h:99999").ok());
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("127.255.3.9"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_TRUE(IsLoopbackHost("localhost"));  // /etc/hosts: loopback only.
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  // Names are names: whoever controls this one decides where it points.
  EXPECT_FALSE(IsLoopbackHost("127.attacker.example"));
  EXPECT_FALSE(IsLoopbackHost("127.0.0.1.nip.io"));
  EXPECT_FALSE(IsLoopbackHost("localhost.attacker.example"));
  EXPECT_FALSE(IsLoopbackHost("128.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("::2"));
  EXPECT_FALSE(IsLoopbackHost(""));
}

TEST(NetTest, PlaintextOnlyToLoopback) {
  EXPECT_TRUE(CheckPlaintextAllowed("kiln", {"127.0.0.1:7600", "[::1]:7600", "localhost:7600"}).ok());
  absl::Status refused = CheckPlaintextAllowed("kiln", {"127.attacker.example:7600"});
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.message().find("127.attacker.example:7600"), std::string::npos) << refused;
}

TEST(NetTest, AFailedAtomicWriteLeavesNoTemporaryFile) {
  testing::TempDir dir;
  const std::string path = dir.Sub("blob");
  ASSERT_TRUE(WriteFileAtomically(path, "first").ok());
  // Files may not grow past 1 KiB for now: the write fails as on a full disk.
  rlimit old_limit;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old_limit;
  small.rlim_cur = 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  absl::Status failed = WriteFileAtomically(path, std::string(64 << 10, 'x'));
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_FALSE(failed.ok());
  EXPECT_NE(failed.message().find("cannot write " + path), std::string::npos) << failed;
  EXPECT_EQ(testing::ReadFileOrDie(path), "first");  // The old content stands.
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    ++files;
    EXPECT_FALSE(IsAtomicWriteLeftover(entry.path().filename().string())) << entry.path();
  }
  EXPECT_EQ(files, 1);
  EXPECT_TRUE(IsAtomicWriteLeftover("ab12.kiln-tmp.123.4"));
  EXPECT_FALSE(IsAtomicWriteLeftover("ab12"));
}

TEST(TerminalSafeTest, ShowsControlCharactersInsteadOfActingOnThem) {
  EXPECT_EQ(TerminalSafe("plain name-1.0"), "plain name-1.0");
  EXPECT_EQ(TerminalSafe("\x1b]0;owned\x07x"), "\\x1b]0;owned\\x07x");
  EXPECT_EQ(TerminalSafe("a\rb\bc\x7f"), "a\\x0db\\x08c\\x7f");
  EXPECT_EQ(TerminalSafe("two\nlines\tok"), "two\nlines\tok");
  EXPECT_EQ(TerminalSafe("two\nlines", /*multiline=*/false), "two\\x0alines");
  EXPECT_EQ(TerminalSafe("caf\xc3\xa9"), "caf\xc3\xa9");  // UTF-8 stays.
}

TEST(LabelsTest, KeyValuePairsPrintableBoundedAndEachKeyOnce) {
  auto labels = ParseLabels({"pool=orbstack", "region=fr-par"});
  ASSERT_TRUE(labels.ok()) << labels.status();
  EXPECT_EQ(labels->at("pool"), "orbstack");
  auto twice = ParseLabels({"pool=a", "pool=b"});
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find("label 'pool' is given twice"), std::string::npos) << twice.status();
  EXPECT_FALSE(ParseLabels({"=x"}).ok());
  EXPECT_FALSE(ParseLabels({"novalue"}).ok());
  auto escape = ParseLabels({"pool=\x1b[2J"});
  ASSERT_FALSE(escape.ok());
  EXPECT_EQ(escape.status().message().find('\x1b'), std::string::npos) << escape.status();
  auto huge = ParseLabels({"pool=" + std::string(9000, 'a')});
  ASSERT_FALSE(huge.ok());
  EXPECT_NE(huge.status().message().find("at most 256"), std::string::npos) << huge.status();
  EXPECT_TRUE(CheckPrintableName("id", "b12").ok());
  EXPECT_FALSE(CheckPrintableName("id", std::string(200, '1'), 128).ok());
}

TEST(TokenFileTest, OnlyAPrivateFileIsRead) {
  testing::TempDir dir;
  const std::string path = dir.Sub("token");
  EXPECT_TRUE(absl::IsNotFound(ReadPrivateTokenFile(path).status()));
  testing::WriteFileOrDie(path, "  kiln_abc_def\n");
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  auto open = ReadPrivateTokenFile(path);
  ASSERT_TRUE(absl::IsPermissionDenied(open.status()));
  EXPECT_NE(open.status().message().find("chmod 600"), std::string::npos) << open.status();
  ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
  auto token = ReadPrivateTokenFile(path);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, "kiln_abc_def");
}

TEST(DashedFlagArgsTest, RewritesNamesNotValues) {
  char a0[] = "kiln-worker", a1[] = "--work-dir=/tmp/a-b", a2[] = "--max-jobs", a3[] = "2", a4[] = "--",
       a5[] = "--keep-me";
  char* argv[] = {a0, a1, a2, a3, a4, a5, nullptr};
  DashedFlagArgs args(6, argv);
  ASSERT_EQ(args.argc(), 6);
  EXPECT_STREQ(args.argv()[1], "--work_dir=/tmp/a-b");
  EXPECT_STREQ(args.argv()[2], "--max_jobs");
  EXPECT_STREQ(args.argv()[5], "--keep-me");
}

TEST(SerialExecutorTest, RunsInOrderOnItsThread) {
  std::vector<int> seen;
  {
    SerialExecutor ex("test");
    for (int i = 0; i < 100; ++i)
      ex.Post([&seen, i, &ex] {
        EXPECT_TRUE(ex.IsCurrent());
        seen.push_back(i);
      });
  }  // Destructor drains.
  ASSERT_EQ(seen.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(seen[i], i);
}

// A fake stream: records writes; the test completes them by hand.
struct FakeStream {
  std::vector<int> started;
  int finishes = 0;
  grpc::Status status;
};

TEST(OutboundQueueTest, OneWriteInFlightBoundedAndFinishAfterDrain) {
  FakeStream s;
  OutboundQueue<int> q(2, {.start_write = [&](const int* m) { s.started.push_back(*m); },
                           .finish =
                               [&](grpc::Status st) {
                                 ++s.finishes;
                                 s.status = st;
                               }});
  using R = OutboundQueue<int>::PushResult;
  EXPECT_EQ(q.Push(1), R::kQueued);
  EXPECT_EQ(q.Push(2), R::kQueued);
  EXPECT_EQ(q.Push(3), R::kFull);
  EXPECT_EQ(q.Push(4, /*force=*/true), R::kQueued);
  EXPECT_EQ(s.started, std::vector<int>{1});  // Only one in flight.
  q.Finish(grpc::Status(grpc::StatusCode::ABORTED, "bye"));
  EXPECT_EQ(q.Push(5), R::kClosed);
  EXPECT_EQ(s.finishes, 0);  // Waits for the queued writes.
  q.OnWriteDone(true);
  q.OnWriteDone(true);
  EXPECT_EQ(s.started, (std::vector<int>{1, 2, 4}));
  EXPECT_EQ(s.finishes, 0);
  q.OnWriteDone(true);
  EXPECT_EQ(s.finishes, 1);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::ABORTED);
  q.Finish(grpc::Status::OK);
  EXPECT_EQ(s.finishes, 1);  // Exactly once.
}

TEST(OutboundQueueTest, BrokenStreamFinishesWithoutMoreWrites) {
  FakeStream s;
  OutboundQueue<int> q(8, {.start_write = [&](const int* m) { s.started.push_back(*m); },
                           .finish =
                               [&](grpc::Status st) {
                                 ++s.finishes;
                                 s.status = st;
                               }});
  q.Push(1);
  q.Push(2);
  q.OnWriteDone(false);
  EXPECT_EQ(s.started, std::vector<int>{1});
  EXPECT_EQ(s.finishes, 1);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace kiln
