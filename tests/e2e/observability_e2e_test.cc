// What SREs get from a running farm, checked against real daemons over
// loopback after a real build: the metrics pass `promtool check metrics`,
// every metric is documented in docs/METRICS.md and every documented one is
// served, the Grafana dashboard and the Prometheus rules name only metrics
// that exist, /healthz and /readyz answer, and --log-format=json writes one
// JSON object per line.
#include <map>
#include <regex>
#include <set>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {
using testing::LocalFarm;
using testing::ReadFileOrDie;
using testing::WriteFileOrDie;

// name → type, from the exposition's "# TYPE name type" lines.
std::map<std::string, std::string> Families(const std::string& exposition) {
  std::map<std::string, std::string> out;
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    if (parts.size() == 4 && parts[0] == "#" && parts[1] == "TYPE") out[parts[2]] = parts[3];
  }
  return out;
}

// Metric names in PromQL or YAML text: kiln_… not part of a recording rule's
// name (kiln:…), with a histogram's _bucket/_sum/_count taken off.
std::set<std::string> NamesIn(const std::string& text, const std::map<std::string, std::string>& families) {
  std::set<std::string> out;
  static const std::regex name_re("(^|[^A-Za-z0-9_:])(kiln_[a-z0-9_]+)");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), name_re); it != std::sregex_iterator(); ++it) {
    std::string name = (*it)[2];
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      if (!absl::EndsWith(name, suffix)) continue;
      std::string base = name.substr(0, name.size() - strlen(suffix));
      auto f = families.find(base);
      if (f != families.end() && f->second == "histogram") name = base;
    }
    out.insert(name);
  }
  return out;
}

struct HttpAnswer {
  int status = 0;
  std::string body;
};

HttpAnswer Get(const std::string& url) {
  auto r = RunCommand({.argv = {"curl", "-sS", "-w", "\n%{http_code}", url}, .extra_env = {}, .cwd = ""}, "",
                      absl::Seconds(30));
  if (!r.ok() || !r->exit.Success()) return {};
  const size_t cut = r->stdout_data.rfind('\n');
  HttpAnswer answer;
  answer.body = r->stdout_data.substr(0, cut);
  answer.status = std::atoi(r->stdout_data.c_str() + cut + 1);
  return answer;
}

class ObservabilityE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    farm_ = new LocalFarm(/*workers=*/1);
    farm_->SetCoordinatorFlags({"--log-format=json"});
    farm_->SetWorkerFlags({"--log-format=json"});
    absl::Status s = farm_->Start();
    ASSERT_TRUE(s.ok()) << s;
    // One real build, so the job, worker and RPC series have values.
    testing::TempDir work;
    std::string flake = ReadFileOrDie(testing::SourcePath("examples/services/greeter/flake.nix"));
    flake = absl::StrReplaceAll(
        flake, {{"writing greeter", absl::StrCat("writing greeter ", absl::ToUnixNanos(absl::Now()))}});
    WriteFileOrDie(work.Sub("greeter/flake.nix"), flake);
    auto r = farm_->Kiln({"build", work.Sub("greeter"), "--json"});
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->exit.exit_code, 0) << r->stderr_data;
    job_id_ = nlohmann::json::parse(r->stdout_data)[0]["jobId"];
    auto coordinator = testing::ScrapeMetrics(farm_->coordinator_metrics());
    auto worker = testing::ScrapeMetrics(farm_->worker_metrics()[0]);
    ASSERT_TRUE(coordinator.ok() && worker.ok());
    coordinator_scrape_ = *coordinator;
    worker_scrape_ = *worker;
    families_ = Families(coordinator_scrape_);
    families_.merge(Families(worker_scrape_));
  }
  static void TearDownTestSuite() {
    delete farm_;
    farm_ = nullptr;
  }

  static LocalFarm* farm_;
  static std::string job_id_;
  static std::string coordinator_scrape_;
  static std::string worker_scrape_;
  static std::map<std::string, std::string> families_;
};
LocalFarm* ObservabilityE2eTest::farm_ = nullptr;
std::string ObservabilityE2eTest::job_id_;
std::string ObservabilityE2eTest::coordinator_scrape_;
std::string ObservabilityE2eTest::worker_scrape_;
std::map<std::string, std::string> ObservabilityE2eTest::families_;

TEST_F(ObservabilityE2eTest, ScrapesPassPromtoolLint) {
  for (const std::string* scrape : {&coordinator_scrape_, &worker_scrape_}) {
    auto r =
        RunCommand({.argv = {"promtool", "check", "metrics"}, .extra_env = {}, .cwd = ""}, *scrape, absl::Seconds(30));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->exit.Success()) << r->stdout_data << r->stderr_data;
    EXPECT_EQ(r->stdout_data + r->stderr_data, "");
  }
  // The build is in the series it should be in.
  EXPECT_THAT(coordinator_scrape_, ::testing::HasSubstr("kiln_jobs_finished_total{result=\"succeeded\"} 1"));
  EXPECT_THAT(coordinator_scrape_,
              ::testing::HasSubstr("kiln_grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"SubmitBuild\","
                                   "grpc_service=\"kiln.v1.BuildService\"} 1"));
  EXPECT_THAT(worker_scrape_, ::testing::HasSubstr("kiln_worker_builds_finished_total{result=\"succeeded\"} 1"));
  EXPECT_THAT(worker_scrape_, ::testing::ContainsRegex("kiln_worker_store_free_bytes [1-9]"));
}

TEST_F(ObservabilityE2eTest, EveryMetricIsDocumentedAndEveryDocumentedMetricIsServed) {
  // docs/METRICS.md: a table row per metric, "| `name` | type | …".
  const std::string doc = ReadFileOrDie(testing::SourcePath("docs/METRICS.md"));
  std::map<std::string, std::string> documented;
  static const std::regex row_re(R"(\n\| `(kiln_[a-z0-9_]+)` \| (counter|gauge|histogram) \|)");
  for (auto it = std::sregex_iterator(doc.begin(), doc.end(), row_re); it != std::sregex_iterator(); ++it) {
    documented[(*it)[1]] = (*it)[2];
  }
  ASSERT_GT(documented.size(), 30u);
  for (const auto& [name, type] : families_) {
    if (!absl::StartsWith(name, "kiln_")) continue;
    auto d = documented.find(name);
    EXPECT_NE(d, documented.end()) << name << " is served but not in docs/METRICS.md";
    if (d != documented.end()) {
      EXPECT_EQ(d->second, type) << name;
    }
  }
  for (const auto& [name, type] : documented) {
    EXPECT_TRUE(families_.contains(name)) << name << " is in docs/METRICS.md but no daemon serves it";
  }
}

TEST_F(ObservabilityE2eTest, DashboardAndRulesNameOnlyServedMetrics) {
  const nlohmann::json dashboard =
      nlohmann::json::parse(ReadFileOrDie(testing::SourcePath("deploy/grafana/kiln-dashboard.json")));
  std::set<std::string> used;
  int expressions = 0;
  for (const auto& panel : dashboard["panels"]) {
    if (!panel.contains("targets")) continue;
    for (const auto& target : panel["targets"]) {
      const std::string expr = target["expr"];
      std::set<std::string> names = NamesIn(expr, families_);
      EXPECT_FALSE(names.empty()) << "panel '" << panel["title"] << "': " << expr;
      used.merge(names);
      ++expressions;
    }
  }
  EXPECT_GT(expressions, 30);
  for (const std::string& name : used) {
    EXPECT_TRUE(families_.contains(name)) << "the dashboard uses " << name << ", which no daemon serves";
  }
  const std::set<std::string> in_rules =
      NamesIn(ReadFileOrDie(testing::SourcePath("deploy/prometheus/kiln-rules.yml")), families_);
  EXPECT_GT(in_rules.size(), 5u);
  for (const std::string& name : in_rules) {
    EXPECT_TRUE(families_.contains(name)) << "kiln-rules.yml uses " << name << ", which no daemon serves";
  }
}

TEST_F(ObservabilityE2eTest, LogsAreOneJsonObjectPerLineWithJobFields) {
  for (const char* daemon : {"coordinator", "worker-1"}) {
    const std::string log = ReadFileOrDie(farm_->LogOf(daemon));
    int lines = 0;
    bool about_the_job = false;
    for (absl::string_view line : absl::StrSplit(log, '\n', absl::SkipEmpty())) {
      nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      ASSERT_TRUE(j.is_object()) << daemon << ": not JSON: " << line;
      EXPECT_TRUE(j["time"].is_string() && j["level"].is_string() && j["component"].is_string() && j["msg"].is_string())
          << line;
      if (j.contains("job") && j["job"] == job_id_) about_the_job = true;
      ++lines;
    }
    EXPECT_GT(lines, 1) << daemon;
    EXPECT_TRUE(about_the_job) << daemon << " logged nothing with \"job\":\"" << job_id_ << "\":\n" << log;
  }
}

// Last in the file (gtest runs them in order): it stops the coordinator.
TEST_F(ObservabilityE2eTest, HealthAndReadinessProbes) {
  for (const std::string& address : {farm_->coordinator_metrics(), farm_->worker_metrics()[0]}) {
    HttpAnswer health = Get(absl::StrCat("http://", address, "/healthz"));
    EXPECT_EQ(health.status, 200) << address;
    HttpAnswer ready = Get(absl::StrCat("http://", address, "/readyz"));
    EXPECT_EQ(ready.status, 200) << address << ": " << ready.body;
    EXPECT_EQ(Get(absl::StrCat("http://", address, "/nothing")).status, 404);
  }
  // Without its coordinator the worker is alive but not ready, and says why.
  farm_->KillCoordinator(SIGTERM);
  const std::string worker = farm_->worker_metrics()[0];
  HttpAnswer ready;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  do {
    ready = Get(absl::StrCat("http://", worker, "/readyz"));
    if (ready.status == 503) break;
    absl::SleepFor(absl::Milliseconds(100));
  } while (absl::Now() < give_up);
  EXPECT_EQ(ready.status, 503);
  EXPECT_THAT(ready.body, ::testing::HasSubstr("not connected to the coordinator"));
  EXPECT_EQ(Get(absl::StrCat("http://", worker, "/healthz")).status, 200);
}

}  // namespace
}  // namespace kiln
