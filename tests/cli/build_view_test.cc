// The build views apart from any terminal: the status board's lines, and
// the plain and JSON forms of the same events.
#include "cli/build_view.h"

#include <cstdio>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "common/grpc_util.h"

namespace kiln {
namespace {
using kiln::v1::JobEvent;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const absl::Time kT0 = absl::FromUnixSeconds(1'800'000'000);

JobEvent Assigned(const std::string& worker) {
  JobEvent e;
  e.set_job_id("7");
  e.mutable_assigned()->set_worker(worker);
  e.mutable_assigned()->set_attempt(1);
  return e;
}
JobEvent Log(const std::string& drv, const std::string& text) {
  JobEvent e;
  e.set_job_id("7");
  auto* line = e.mutable_log()->add_lines();
  line->set_derivation(drv);
  line->set_text(text);
  return e;
}
JobEvent Finished(kiln::v1::JobState state, absl::Duration took) {
  JobEvent e;
  e.set_job_id("7");
  e.mutable_finished()->set_state(state);
  e.mutable_finished()->set_worker("w1");
  *e.mutable_finished()->mutable_result()->mutable_build_duration() = ToProtoDuration(took);
  return e;
}

TEST(StatusBoardTest, AStatusLineNamesStateWorkerElapsedAndLastLogLine) {
  StatusBoard board({"./svc#oci-image"}, ViewOptions{.width = 80});
  board.Submitted(0, "7");
  EXPECT_TRUE(board.Event(0, Assigned("w1"), kT0).empty());
  EXPECT_TRUE(board.Event(0, Log("svc", "compiling main.go"), kT0 + absl::Seconds(3)).empty());  // No -L.
  EXPECT_THAT(board.Frame(kT0 + absl::Seconds(75)),
              ElementsAre("building   ./svc#oci-image  w1  1:15  svc> compiling main.go"));
  std::vector<std::string> last = board.Event(0, Finished(kiln::v1::JOB_STATE_SUCCEEDED, absl::Seconds(80)), kT0);
  EXPECT_THAT(last, ElementsAre("succeeded  ./svc#oci-image (job 7 on w1, 80.0s)"));
  EXPECT_TRUE(board.Frame(kT0).empty());  // Finished targets leave the status lines.
}

TEST(StatusBoardTest, LinesNeverWrapOrCarryControlCharacters) {
  StatusBoard board({"./t#default"}, ViewOptions{.width = 40});
  board.Event(0, Assigned("w1"), kT0);
  board.Event(0, Log("t", "\x1b[31mred\x1b[0m and a tab\there and a very long tail that goes on and on"), kT0);
  std::vector<std::string> frame = board.Frame(kT0);
  ASSERT_EQ(frame.size(), 1u);
  EXPECT_EQ(frame[0].size(), 39u) << frame[0];  // 40 columns less one.
  EXPECT_EQ(frame[0].find('\x1b'), std::string::npos) << frame[0];
  EXPECT_EQ(frame[0].find('\t'), std::string::npos) << frame[0];
  // Multi-byte characters are kept whole and counted once.
  StatusBoard utf8({"é"}, ViewOptions{.width = 20});
  utf8.Event(0, Log("", "ééééééééééééééééééé"), kT0);
  const std::string line = utf8.Frame(kT0)[0];
  EXPECT_EQ(line, "building   é  ééééééé");  // 10 columns after the state: "é", two spaces, seven more.
}

TEST(StatusBoardTest, ColoursOnlyWhenAskedAndLogsOnlyWithDashL) {
  StatusBoard plain({"a"}, ViewOptions{.color = false});
  plain.Event(0, Assigned("w1"), kT0);
  EXPECT_EQ(plain.Frame(kT0)[0].find('\x1b'), std::string::npos);
  StatusBoard colored({"a"}, ViewOptions{.print_build_logs = true, .color = true});
  colored.Event(0, Assigned("w1"), kT0);
  EXPECT_TRUE(absl::StartsWith(colored.Frame(kT0)[0], "\x1b[36mstarting")) << colored.Frame(kT0)[0];
  EXPECT_THAT(colored.Event(0, Log("a", "one"), kT0), ElementsAre("a> one"));
  std::vector<std::string> failed = colored.Event(0, Finished(kiln::v1::JOB_STATE_FAILED, absl::Seconds(1)), kT0);
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_TRUE(absl::StartsWith(failed[0], "\x1b[31mfailed")) << failed[0];
}

TEST(StatusBoardTest, ManyTargetsEndInASummaryLine) {
  std::vector<std::string> targets;
  for (int i = 0; i < 50; ++i) targets.push_back("./svc" + std::to_string(i) + "#default");
  StatusBoard board(targets, ViewOptions{.width = 100, .max_status_lines = 5});
  for (size_t i = 0; i < 50; ++i) {
    JobEvent queued;
    queued.mutable_queued();
    board.Event(i, queued, kT0);
  }
  board.Event(3, Assigned("w1"), kT0);
  std::vector<std::string> frame = board.Frame(kT0);
  ASSERT_EQ(frame.size(), 6u);
  EXPECT_EQ(frame[5], "… and 45 more (50 unfinished: 49 queued, 1 building)");
}

// Runs `fn` on a view writing to a memory stream; returns what it wrote.
template <typename Fn>
std::string Written(Fn fn) {
  char* data = nullptr;
  size_t size = 0;
  FILE* out = open_memstream(&data, &size);
  fn(out);
  std::fclose(out);
  std::string text(data, size);
  free(data);
  return text;
}

TEST(PlainViewTest, PrintsALinePerEventAndEveryLogLine) {
  const std::string text = Written([](FILE* out) {
    auto view = MakePlainView({"./svc#default"}, ViewOptions{}, out);
    view->Submitted(0, "7");
    JobEvent queued;
    queued.set_job_id("7");
    queued.mutable_queued();
    view->Event(0, queued);
    view->Event(0, Assigned("w1"));
    view->Event(0, Log("svc", "hello"));
    view->Reconnecting(0);
    view->Message("kiln: done");
  });
  EXPECT_EQ(text,
            "kiln: ./svc#default: queued as job 7\n"
            "kiln: job 7: building on w1 (attempt 1)\n"
            "svc> hello\n"
            "kiln: job 7: reconnecting to the coordinator…\n"
            "kiln: done\n");
}

TEST(JsonEventViewTest, OneObjectPerLine) {
  const std::string text = Written([](FILE* out) {
    auto view = MakeJsonEventView({"./svc#default"}, out);
    view->Submitted(0, "7");
    view->Event(0, Log("svc", "say \"hi\"\n"));
    view->Event(0, Finished(kiln::v1::JOB_STATE_SUCCEEDED, absl::Seconds(2)));
  });
  std::vector<std::string> lines = absl::StrSplit(text, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 3u) << text;
  auto log = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(log["event"], "log");
  EXPECT_EQ(log["text"], "say \"hi\"\n");
  auto finished = nlohmann::json::parse(lines[2]);
  EXPECT_EQ(finished["status"], "succeeded");
  EXPECT_EQ(finished["durationSeconds"], 2.0);
  EXPECT_EQ(finished["installable"], "./svc#default");

  // --quiet: the same without the log lines.
  const std::string quiet = Written([](FILE* out) {
    auto view = MakeJsonEventView({"./svc#default"}, out, /*quiet=*/true);
    view->Event(0, Log("svc", "noise"));
    view->Event(0, Finished(kiln::v1::JOB_STATE_SUCCEEDED, absl::Seconds(2)));
  });
  EXPECT_THAT(quiet, ::testing::Not(HasSubstr("noise")));
  EXPECT_THAT(quiet, HasSubstr("\"event\":\"finished\""));
}

}  // namespace
}  // namespace kiln
